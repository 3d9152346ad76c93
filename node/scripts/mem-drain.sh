#!/bin/bash
# Resident memory of one `audit-node run` process while it drains a backlog
# of 1M records over 256 partitions (issue 2: it must stay under 300 MB).
#
#   node/scripts/mem-drain.sh [BINARY] [extra `run` flags...]
#
# Prints VmRSS, threads and progress every 5 s, then the peak (VmHWM) and
# the drain time. Needs the local PostgreSQL (peer authentication).
set -euo pipefail
BIN=${1:-target/release/audit-node}; shift || true
COUNT=${COUNT:-1000000}
W=$(mktemp -d /tmp/mem-drain.XXXXXX)
cleanup() {
  [ -n "${NODE:-}" ] && kill "$NODE" 2>/dev/null && wait "$NODE" 2>/dev/null || true
  [ -n "${MOCK:-}" ] && kill "$MOCK" 2>/dev/null && wait "$MOCK" 2>/dev/null || true
  [ -n "${DB:-}" ] && dropdb --if-exists "$DB" || true
  rm -rf "$W"
}
trap cleanup EXIT
"$BIN" keys init --state-dir "$W/state" > /dev/null
"$BIN" kafka-mock --brokers 1 --topic big:256 --bootstrap-file "$W/boot" > "$W/mock.log" 2>&1 &
MOCK=$!
until [ -s "$W/boot" ]; do sleep 0.2; done
"$BIN" produce --brokers "$(cat "$W/boot")" --topic big --count "$COUNT" --seed 42 > "$W/produce.out" 2>&1
DB="mem_drain_$RANDOM"; createdb "$DB"
stored() { psql -d "$DB" -Atc "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets" 2>/dev/null || echo 0; }
"$BIN" run --brokers "$(cat "$W/boot")" --topics big --group-id mem \
  --database-url "postgres:///$DB?host=/var/run/postgresql" --api-addr 127.0.0.1:0 \
  --state-dir "$W/state" "$@" > "$W/node.log" 2>&1 &
NODE=$!
START=$(date +%s.%N)
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
# Checks every 0.2 s (the drain time to about a fifth of a second), prints
# about every 5 s.
NEXT=5
while [ "$(stored)" -lt "$COUNT" ]; do
  sleep 0.2
  kill -0 "$NODE" || { echo "the node exited; its log:"; tail -20 "$W/node.log"; exit 1; }
  NOW=$(elapsed)
  if [ "${NOW%.*}" -ge "$NEXT" ]; then
    NEXT=$((NEXT + 5))
    echo "${NOW}s $(grep -E 'VmRSS|Threads' /proc/$NODE/status | tr -s ' \t\n' ' ') stored $(stored)"
  fi
done
echo "drained $COUNT records in $(elapsed) s"
grep -E 'VmHWM' /proc/$NODE/status
