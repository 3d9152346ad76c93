#!/usr/bin/env bash
# The ingestion core's acceptance scenario, from outside, with real processes:
# kafka-mock (48 partitions) + run + produce 200k (2% invalid, 1% duplicates),
# node A kill -9'd twice and restarted, node B joining and leaving; then the
# store must hold exactly the valid distinct events and the invalid records,
# and `verify` must accept every hash chain and checkpoint.
#
#   cargo build --release -p audit-node && chaos/scripts/acceptance.sh
#
# Uses the local PostgreSQL (Unix socket, current OS user). Extra `run` flags
# can be passed in RUN_FLAGS (e.g. RUN_FLAGS="--group-protocol consumer", or
# "--session-timeout-ms 6000": with the classic protocol's default 45 s a
# killed member's partitions wait that long, so the run takes minutes).
# RATE (default 1000 records/s) keeps production going across all faults.
set -euo pipefail
BIN="${BIN:-target/release/audit-node}"
WORK="$(mktemp -d)"
DB="audit_acceptance_$$"
URL="postgres:///$DB?host=/var/run/postgresql"
# Keys and published checkpoints, shared by every node (like a real cluster).
STATE="$WORK/state"
GROUP="acceptance-$$"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
log() { echo "[$(date +%T)] $*"; }
TOTAL=200000
stored() { psql -tAq "$URL" -c "SELECT coalesce(sum(next_offset),0) FROM consumer_offsets WHERE group_id = '$GROUP'" 2>/dev/null || echo 0; }
# Waits until `delta` more records are stored (or all of them are), at most 5 min.
progress() {
  local target=$(( $(stored) + $1 )); [ "$target" -le "$TOTAL" ] || target=$TOTAL
  local deadline=$(( $(date +%s) + 300 ))
  until [ "$(stored)" -ge "$target" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "FAIL: no progress to $target in 5 min (logs in $WORK)"; exit 1; }
    sleep 0.5
  done
}
# Starts a node as a child of this shell; its pid lands in NODE_PID.
start_node() { # name
  "$BIN" run --brokers "$BOOT" --topics orders --group-id "$GROUP" --database-url "$URL" \
    --node-id "$1" --api-addr 127.0.0.1:0 --state-dir "$STATE" ${RUN_FLAGS:-} >>"$WORK/$1.log" 2>&1 &
  NODE_PID=$!
  pids+=("$NODE_PID")
}

"$BIN" kafka-mock --brokers 3 --topic orders:48 --bootstrap-file "$WORK/bootstrap.txt" >"$WORK/mock.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$WORK/bootstrap.txt" ] && break; sleep 0.1; done
BOOT="$(cat "$WORK/bootstrap.txt")"
"$BIN" migrate --database-url "$URL" --create-database >/dev/null
"$BIN" keys init --state-dir "$STATE" >/dev/null
log "mock kafka at $BOOT, database $DB, logs in $WORK"

start_node node-a; A=$NODE_PID
"$BIN" produce --brokers "$BOOT" --topic orders --count "$TOTAL" --invalid-ratio 0.02 --duplicate-ratio 0.01 \
  --rate "${RATE:-1000}" >"$WORK/produce.out" 2>"$WORK/produce.log" &
PRODUCER=$!

for round in 1 2; do
  progress 5000
  log "kill -9 node-a (round $round) at $(stored) records stored"
  kill -9 "$A"; wait "$A" 2>/dev/null || true
  start_node node-a; A=$NODE_PID
done
progress 5000
log "node-b joins at $(stored)"
start_node node-b; B=$NODE_PID
# node-b must really take part: it writes batches before it leaves.
until [ "$(psql -tAq "$URL" -c "SELECT count(*) FROM consumer_offsets WHERE updated_by = 'node-b'")" -gt 0 ]; do
  kill -0 "$B" 2>/dev/null || { log "FAIL: node-b exited (logs in $WORK)"; exit 1; }
  kill -0 "$PRODUCER" 2>/dev/null || { log "FAIL: production ended before node-b was assigned partitions; lower RATE"; exit 1; }
  sleep 0.5
done
progress 5000
log "node-b leaves (SIGTERM) at $(stored)"
kill -TERM "$B"
if wait "$B"; then log "node-b left cleanly"; else log "FAIL: node-b exited with $? on SIGTERM"; exit 1; fi

wait "$PRODUCER"
SUMMARY="$(tail -1 "$WORK/produce.out")"
log "producer: $SUMMARY"
N=$(echo "$SUMMARY" | python3 -c 'import json,sys; print(json.load(sys.stdin)["produced"])')
deadline=$(( $(date +%s) + 600 ))
until [ "$(stored)" -ge "$N" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { log "FAIL: only $(stored) of $N stored after 10 min"; exit 1; }
  sleep 1
done
read -r EVENTS DISTINCT DEAD DUPS POSITIONS <<<"$(psql -tAq -F' ' "$URL" -c "
  SELECT (SELECT count(*) FROM events), (SELECT count(DISTINCT event_id) FROM events),
         (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM duplicates),
         (SELECT count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) FROM (
            SELECT kafka_topic, kafka_partition, kafka_offset FROM events UNION ALL
            SELECT kafka_topic, kafka_partition, kafka_offset FROM dead_letters UNION ALL
            SELECT kafka_topic, kafka_partition, kafka_offset FROM duplicates) p)")"
want=$(echo "$SUMMARY" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["valid"], s["valid"], s["invalid"], s["duplicates"], s["produced"])')
got="$EVENTS $DISTINCT $DEAD $DUPS $POSITIONS"
log "stored (events, distinct ids, dead letters, duplicates, positions) = $got; expected $want"
kill -TERM "$A"; wait "$A" || log "node-a exited with $? on SIGTERM"
if "$BIN" verify --database-url "$URL" --state-dir "$STATE" >"$WORK/verify.out" 2>&1; then
  VERIFIED=yes; log "$(grep 'verify: OK' "$WORK/verify.out")"
else
  VERIFIED=no; log "verify failed:"; grep -v 'verify: chain' "$WORK/verify.out" | head -20
fi
if [ "$got" = "$want" ] && [ "$VERIFIED" = yes ]; then
  log "PASS"; psql -q postgres -c "DROP DATABASE \"$DB\" WITH (FORCE)"
else
  log "FAIL (database $DB kept)"; exit 1
fi
