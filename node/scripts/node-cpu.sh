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
"$BIN" run --brokers "$B" --topics bench --group-id g --database-url "$URL" \
  --api-addr 127.0.0.1:0 --group-protocol consumer "$@" > "$W/node.log" 2>&1 &
NODE=$!
START=$(date +%s.%N)
until [ "$(psql -d "$DB" -Atc 'SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets' 2>/dev/null || echo 0)" -ge "$EVENTS" ]; do
  sleep 0.2
done
END=$(date +%s.%N)
read -r UT ST < <(awk '{print $14, $15}' "/proc/$NODE/stat")
HZ=$(getconf CLK_TCK)
awk -v ut="$UT" -v st="$ST" -v hz="$HZ" -v n="$EVENTS" -v s="$START" -v e="$END" -v l="$LABEL" \
  'BEGIN { cpu = (ut + st) / hz; printf "%s: node CPU %.2f s = %.1f µs/event; wall %.2f s\n", l, cpu, cpu * 1e6 / n, e - s }'
