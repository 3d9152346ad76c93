#!/bin/bash
# CPU per ingested event of one `audit-node run` process, measured from
# /proc (user + system time) while it drains a pre-produced backlog.
# The mock cluster and the producer run in other processes, so only the
# node's own work is counted.
#
#   node/scripts/node-cpu.sh LABEL BINARY [extra `run` flags...]
#
# Compare two builds (e.g. before and after a change) with the same
# backlog: 200,000 generated order events over 58 partitions, seed 42.
# Needs the local PostgreSQL (peer authentication) and psql/createdb/dropdb.
set -euo pipefail
LABEL=$1; BIN=$2; shift 2
TOOLS=${TOOLS:-$BIN}     # binary used for kafka-mock and produce
EVENTS=${EVENTS:-200000}
W=$(mktemp -d "/tmp/node-cpu-$LABEL.XXXXXX")
cleanup() {
  [ -n "${NODE:-}" ] && kill "$NODE" 2>/dev/null && wait "$NODE" 2>/dev/null || true
  [ -n "${MOCK:-}" ] && kill "$MOCK" 2>/dev/null && wait "$MOCK" 2>/dev/null || true
  [ -n "${DB:-}" ] && dropdb --if-exists "$DB" || true
}
trap cleanup EXIT
"$TOOLS" kafka-mock --brokers 1 --topic bench:58 --bootstrap-file "$W/boot" > "$W/mock.log" 2>&1 &
MOCK=$!
until [ -s "$W/boot" ]; do sleep 0.2; done
B=$(cat "$W/boot")
"$TOOLS" produce --brokers "$B" --topic bench --count "$EVENTS" --seed 42 > "$W/produce.out" 2> "$W/produce.err"
DB="node_cpu_${LABEL}_$RANDOM"
URL="postgres:///$DB?host=/var/run/postgresql"
createdb "$DB"
"$BIN" migrate --database-url "$URL" > /dev/null
# AFTER_MIGRATE_SQL: run against the new database before the node starts
# (e.g. drop an index to see what it costs).
[ -n "${AFTER_MIGRATE_SQL:-}" ] && psql -q -d "$DB" -c "$AFTER_MIGRATE_SQL"
# Each run's chains start afresh in a new database, so a state directory
# reused across runs would hold another run's checkpoints at the same sizes:
# the node rightly refuses to replace them (a WARN per chain at shutdown).
# Publish into this run's own directory instead.
CHECKPOINTS=()
for arg in "$@"; do
  if [ "$arg" = --state-dir ]; then CHECKPOINTS=(--checkpoints "$W/checkpoints"); fi
done
"$BIN" run --brokers "$B" --topics bench --group-id g --database-url "$URL" \
  --api-addr 127.0.0.1:0 --group-protocol consumer "${CHECKPOINTS[@]}" "$@" > "$W/node.log" 2>&1 &
NODE=$!
# PERF=FILE: also sample the node with `perf record` into FILE.
if [ -n "${PERF:-}" ]; then
  perf record -F 1999 ${PERF_ARGS:-} -p "$NODE" -o "$PERF" > "$W/perf.log" 2>&1 &
  PERFPID=$!
fi
# CPU ticks of all PostgreSQL server processes (backends, WAL writer,
# checkpointer, autovacuum), to split the machine's work between the node and
# the database.
pg_ticks() {
  local t=0 p
  for p in $(pgrep -u postgres postgres 2>/dev/null || pgrep postgres); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    t=$((t + u + s))
  done
  echo "$t"
}
PG0=$(pg_ticks)
MOCK0=$(awk '{print $14 + $15}' "/proc/$MOCK/stat")
START=$(date +%s.%N)
until [ "$(psql -d "$DB" -Atc 'SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets' 2>/dev/null || echo 0)" -ge "$EVENTS" ]; do
  if ! kill -0 "$NODE" 2>/dev/null; then echo "node-cpu: the node exited:" >&2; tail -5 "$W/node.log" >&2; exit 1; fi
  sleep 0.2
done
END=$(date +%s.%N)
PG1=$(pg_ticks)
MOCK1=$(awk '{print $14 + $15}' "/proc/$MOCK/stat")
HWM=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$NODE/status")
[ -n "${PERFPID:-}" ] && kill -INT "$PERFPID" && wait "$PERFPID" || true
read -r UT ST < <(awk '{print $14, $15}' "/proc/$NODE/stat")
HZ=$(getconf CLK_TCK)
awk -v ut="$UT" -v st="$ST" -v hz="$HZ" -v n="$EVENTS" -v s="$START" -v e="$END" -v l="$LABEL" -v pg=$((PG1 - PG0)) \
  -v mock=$((MOCK1 - MOCK0)) -v hwm="$HWM" \
  'BEGIN { cpu = (ut + st) / hz; printf "%s: node CPU %.2f s = %.1f µs/event; PostgreSQL %.1f µs/event; wall %.2f s; mock cluster %.1f µs/event; node peak RSS %d MB\n", l, cpu, cpu * 1e6 / n, pg / hz * 1e6 / n, e - s, mock / hz * 1e6 / n, hwm }'
