#!/usr/bin/env bash
# Query API benchmark of issue 4 (docs/PERFORMANCE.md § Query API):
# on a table of 5M events, with 50 concurrent clients (wrk),
#   1. stream history (GET /v1/streams/{id}/events?limit=100, random streams): p99;
#   2. 100-event filtered pages (GET /v1/events?event_type=T&limit=100&cursor=C,
#      T one of the six event types, C a random position in the table): p99;
#   3. NDJSON replay of the whole table (GET /v1/replay, one client): events/s.
#
#   api/scripts/bench-api.sh
#
# The first run loads the events into the database BENCH_DB through the
# production path: a mock Kafka cluster (`audit-node kafka-mock`), a node
# (`audit-node run`, field protection and hash chains on) and `audit-node
# produce` (seed 42, as fast as it goes, into enough partitions that the
# mock keeps every record until it is read). Later runs reuse the database
# while it holds BENCH_EVENTS events (BENCH_RELOAD=1 loads it again).
#
# Environment (defaults): BENCH_EVENTS (5000000), BENCH_DB (audit_bench_api),
# BENCH_RATE (unlimited), BENCH_PARTITIONS (1431 for 5M), BENCH_CONNECTIONS (50),
# BENCH_THREADS (2), BENCH_DURATION (30s), BENCH_WARMUP (10s),
# BENCH_API_POOL (--api-db-max-connections, 8), BENCH_REPLAY (1: measure replay),
# BENCH_THINK_MS (0: each client sends its next request as soon as the last
# one is answered, i.e. the server saturated; N: each client waits N ms
# between requests, so 50 clients offer at most 50 * 1000 / N requests/s),
# AUDIT_NODE (the binary; default: cargo build --release, then target/release/audit-node).
# Needs wrk (apt-get install wrk), psql on the local PostgreSQL socket as a
# role that may create databases, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

EVENTS="${BENCH_EVENTS:-5000000}"
DB="${BENCH_DB:-audit_bench_api}"
RATE="${BENCH_RATE:-}"
# Enough partitions that the mock cluster's retention (about 5 MiB per
# partition) holds every record at once: ~900 bytes a record, 3 MiB each.
PARTITIONS="${BENCH_PARTITIONS:-$(( (EVENTS * 900 + 3145727) / 3145728 > 16 ? (EVENTS * 900 + 3145727) / 3145728 : 16 ))}"
CONNECTIONS="${BENCH_CONNECTIONS:-50}"
THREADS="${BENCH_THREADS:-2}"
DURATION="${BENCH_DURATION:-30s}"
WARMUP="${BENCH_WARMUP:-10s}"
POOL="${BENCH_API_POOL:-8}"
THINK="${BENCH_THINK_MS:-0}"
REPLAY="${BENCH_REPLAY:-1}"
DB_URL="postgres:///${DB}?host=/var/run/postgresql"

command -v wrk >/dev/null || { echo "bench-api: wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v psql >/dev/null || { echo "bench-api: psql is missing: apt-get install postgresql-client-15" >&2; exit 1; }
if [ -n "${AUDIT_NODE:-}" ]; then
  BIN="$AUDIT_NODE"
else
  cargo build --release -p audit-node >&2
  BIN="${CARGO_TARGET_DIR:-target}/release/audit-node"
fi

WORK="$(mktemp -d /tmp/audit-bench-api.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "bench-api: $*" >&2; }
sql() { psql -X -q -At -d "$DB" -c "$1"; }

# Waits for a file to exist (up to 60 s).
wait_file() {
  for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done
  log "timed out waiting for $1"; exit 1
}

# Starts a mock cluster with topic:partitions and sets BOOT to its address.
# (Not through $(...): the subshell would lose the pid, and the mock would
# outlive the script.)
mock_kafka() {
  local file="$WORK/bootstrap-${1%%:*}.txt"
  AUDIT_LOG=warn "$BIN" kafka-mock --brokers 1 --topic "$1" --bootstrap-file "$file" >"$WORK/mock-${1%%:*}.log" 2>&1 &
  PIDS+=($!)
  wait_file "$file"
  BOOT="$(cat "$file")"
}

loaded=0
if [ "${BENCH_RELOAD:-0}" != 1 ] && psql -X -At -d "$DB" -c "SELECT 1" >/dev/null 2>&1; then
  loaded="$(sql "SELECT count(*) FROM events WHERE kafka_topic = 'bench'" 2>/dev/null || echo 0)"
fi
if [ "$loaded" != "$EVENTS" ]; then
  log "loading $EVENTS events into database $DB (produce at ${RATE:-full speed} events/s into $PARTITIONS partitions)"
  dropdb --if-exists "$DB" 2>/dev/null || psql -X -q -d postgres -c "DROP DATABASE IF EXISTS \"$DB\""
  "$BIN" keys init --state-dir "$WORK/state" >/dev/null
  mock_kafka "bench:$PARTITIONS"
  "$BIN" migrate --database-url "$DB_URL" --create-database >&2
  AUDIT_LOG=warn "$BIN" run --brokers "$BOOT" --topics bench --group-id bench-load --database-url "$DB_URL" \
    --node-id bench-load --api-addr 127.0.0.1:0 --state-dir "$WORK/state" --group-protocol consumer \
    --checkpoint-every 100000 --prefetch-budget-kbytes 262144 >"$WORK/load-node.log" 2>&1 &
  NODE=$!
  PIDS+=("$NODE")
  started=$(date +%s)
  AUDIT_LOG=warn "$BIN" produce --brokers "$BOOT" --topic bench --count "$EVENTS" ${RATE:+--rate "$RATE"} --seed 42 \
    >"$WORK/produce.log" 2>&1 &
  PRODUCER=$!
  PIDS+=("$PRODUCER")
  last=-1
  while :; do
    stored="$(sql "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = 'bench-load'" 2>/dev/null || echo 0)"
    [ "$stored" -ge "$EVENTS" ] && break
    if ! kill -0 "$NODE" 2>/dev/null; then log "the loading node exited:"; tail -20 "$WORK/load-node.log" >&2; exit 1; fi
    now=$(date +%s)
    if [ $(( (now - started) / 15 )) -ne "$last" ]; then
      last=$(( (now - started) / 15 ))
      log "  $stored of $EVENTS stored after $((now - started)) s"
    fi
    sleep 1
  done
  wait "$PRODUCER"
  kill -TERM "$NODE"; wait "$NODE" || true
  kill "${PIDS[0]}" 2>/dev/null || true   # the loading mock cluster
  log "loaded in $(( $(date +%s) - started )) s: $(tail -1 "$WORK/produce.log")"
  count="$(sql "SELECT count(*) FROM events WHERE kafka_topic = 'bench'")"
  if [ "$count" != "$EVENTS" ]; then
    log "stored $count events, not $EVENTS: the mock cluster's retention evicted records the node had not read yet; lower BENCH_RATE or raise BENCH_PARTITIONS"
    exit 1
  fi
  if grep -q "offsets_missing\|gap" "$WORK/load-node.log"; then
    log "the node reported missing offsets:"; grep "offsets_missing\|gap" "$WORK/load-node.log" | head -5 >&2; exit 1
  fi
  log "VACUUM ANALYZE"
  psql -X -q -d "$DB" -c "VACUUM ANALYZE"
fi

# Serve: a node with a reader token, on an idle topic of a new mock cluster
# (another consumer group: the loaded offsets belong to the old cluster).
TOKEN_OUT="$("$BIN" tokens create --role reader --name bench)"
TOKEN="$(echo "$TOKEN_OUT" | sed -n 2p)"
echo "{\"tokens\": [$(echo "$TOKEN_OUT" | sed -n 4p)]}" >"$WORK/tokens.json"
"$BIN" keys init --state-dir "$WORK/serve-state" >/dev/null
mock_kafka "idle:1"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADDR="127.0.0.1:$PORT"
AUDIT_LOG=warn "$BIN" run --brokers "$BOOT" --topics idle --group-id "bench-serve-$$" --database-url "$DB_URL" \
  --node-id bench-serve --api-addr "$ADDR" --api-tokens "$WORK/tokens.json" --state-dir "$WORK/serve-state" \
  --group-protocol consumer --api-db-max-connections "$POOL" >"$WORK/serve-node.log" 2>&1 &
SERVE=$!
PIDS+=("$SERVE")
for _ in $(seq 1 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$ADDR/readyz")" = 200 ] && break
  sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$ADDR/readyz")" = 200 ] || { log "the node is not ready:"; tail -20 "$WORK/serve-node.log" >&2; exit 1; }

# Request paths: random streams; random positions for the filtered pages.
log "sampling streams and positions"
sql "SELECT '/v1/streams/' || stream_id || '/events?limit=100' FROM (SELECT DISTINCT stream_id FROM events TABLESAMPLE SYSTEM (0.5) REPEATABLE (42)) s LIMIT 20000" >"$WORK/streams.txt"
sql "WITH positions AS (SELECT tx, seq FROM events TABLESAMPLE SYSTEM (0.2) REPEATABLE (42) LIMIT 20000),
          types(t) AS (VALUES ('order.created'), ('order.paid'), ('order.shipped'), ('order.delivered'), ('order.cancelled'), ('order.refunded'))
     SELECT '/v1/events?event_type=' || t || '&limit=100&cursor=' ||
            rtrim(translate(encode('\\x01'::bytea || int8send(tx::text::bigint) || int8send(seq), 'base64'), '+/', '-_'), '=')
     FROM positions, LATERAL (SELECT t FROM types ORDER BY random() LIMIT 1) x" >"$WORK/pages.txt"
# Half of the filtered pages from the beginning of the table.
sql "SELECT '/v1/events?event_type=' || t || '&limit=100' FROM (VALUES ('order.created'), ('order.paid'), ('order.shipped'), ('order.delivered'), ('order.cancelled'), ('order.refunded')) v(t), generate_series(1, 100)" >>"$WORK/pages.txt"
log "$(wc -l <"$WORK/streams.txt") stream paths, $(wc -l <"$WORK/pages.txt") page paths"

cat >"$WORK/paths.lua" <<'LUA'
-- Random paths from BENCH_PATHS with the bearer token; each thread seeded apart.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
local paths = {}
function init(args)
  for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
  math.randomseed(42 + seed)
  headers = { ["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN") }
end
function request()
  return wrk.format("GET", paths[math.random(#paths)], headers)
end
local think = tonumber(os.getenv("BENCH_THINK_MS") or "0")
function delay()
  return think
end
LUA

# CPU ticks of a process, and of every PostgreSQL server process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() {
  local t=0 p
  for p in $(pgrep -u postgres postgres 2>/dev/null || pgrep postgres); do
    t=$((t + $(ticks "$p")))
  done
  echo "$t"
}

run_wrk() { # name paths-file -> prints wrk's report, returns p99 line
  local name="$1" paths="$2"
  log "$name: warm-up $WARMUP"
  BENCH_PATHS="$paths" BENCH_TOKEN="$TOKEN" BENCH_THINK_MS="$THINK" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" --timeout 10s \
    -s "$WORK/paths.lua" "http://$ADDR" >/dev/null
  log "$name: $CONNECTIONS connections, think time $THINK ms, $DURATION (load before: $(cut -d' ' -f1-3 /proc/loadavg))"
  local node0 pg0 stat0 node1 pg1 stat1
  node0=$(ticks "$SERVE"); pg0=$(pg_ticks); stat0=$(head -1 /proc/stat)
  # `times` in the subshell: wrk's own CPU (user and system).
  (BENCH_PATHS="$paths" BENCH_TOKEN="$TOKEN" BENCH_THINK_MS="$THINK" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --timeout 10s --latency \
    -s "$WORK/paths.lua" "http://$ADDR"; times >"$WORK/wrk-$name.times") | tee "$WORK/wrk-$name.txt" >&2
  node1=$(ticks "$SERVE"); pg1=$(pg_ticks); stat1=$(head -1 /proc/stat)
  # Where the two cores went per request: the node, PostgreSQL, wrk (its
  # own process), and all the rest (kernel work not charged to any of them).
  python3 - "$WORK/wrk-$name.txt" "$WORK/wrk-$name.times" "$((node1 - node0))" "$((pg1 - pg0))" "$stat0" "$stat1" "$(getconf CLK_TCK)" <<'PY' >&2
import re, sys
report, times, node, pg, stat0, stat1, hz = sys.argv[1:8]
hz = float(hz)
def seconds(t):
    minutes, secs = re.match(r"(\d+)m([0-9.]+)s", t).groups()
    return int(minutes) * 60 + float(secs)
# `times`: the shell's user and system time, then its children's (wrk).
wrk = sum(seconds(t) for t in open(times).read().split("\n")[1].split())
a = [int(x) for x in stat0.split()[1:9]]; b = [int(x) for x in stat1.split()[1:9]]
busy = (sum(b) - sum(a) - (b[3] - a[3]) - (b[4] - a[4])) / hz
total = (sum(b) - sum(a)) / hz
n = float(re.search(r"([0-9]+) requests in", open(report).read()).group(1))
per = lambda s: 1000 * s / n
node_s, pg_s = int(node) / hz, int(pg) / hz
rest = busy - node_s - pg_s - wrk
print(f"CPU per request: node {per(node_s):.2f} ms, PostgreSQL {per(pg_s):.2f} ms, wrk {per(wrk):.2f} ms, "
      f"rest (kernel, other) {per(max(rest, 0)):.2f} ms; cores {100 * busy / total:.0f}% busy")
PY
  if grep -q "Non-2xx" "$WORK/wrk-$name.txt"; then
    log "$name: some responses were not 200 (the node's log: $WORK/serve-node.log):"
    grep "request failed" "$WORK/serve-node.log" | tail -3 >&2 || true
  fi
}

run_wrk streams "$WORK/streams.txt"
run_wrk pages "$WORK/pages.txt"

replay=""
if [ "$REPLAY" = 1 ]; then
  log "NDJSON replay of all $EVENTS events (one client)"
  read -r seconds bytes < <(curl -s -o /dev/null -w '%{time_total} %{size_download}\n' \
    -H "Authorization: Bearer $TOKEN" "http://$ADDR/v1/replay")
  replay="$(python3 -c "print(f'{$EVENTS / $seconds:.0f} events/s ({$EVENTS} events, {$bytes / 1e9:.2f} GB in {$seconds:.1f} s)')")"
fi

p99() { awk '$1 == "99%" { print $2 }' "$WORK/wrk-$1.txt"; }
rps() { awk '$1 == "Requests/sec:" { print $2 }' "$WORK/wrk-$1.txt"; }
errors() { awk '$1 == "Non-2xx" { n = $5 } END { print n + 0 }' "$WORK/wrk-$1.txt"; }
echo
echo "bench-api: $(sql "SELECT count(*) FROM events") events in $DB; $CONNECTIONS connections, think time $THINK ms, $THREADS wrk threads, $DURATION; API pool $POOL"
echo "  stream history (limit 100): p99 $(p99 streams), $(rps streams) requests/s, $(errors streams) not 200   (target p99 <= 10 ms)"
echo "  filtered page (100 events): p99 $(p99 pages), $(rps pages) requests/s, $(errors pages) not 200   (target p99 <= 20 ms)"
[ -n "$replay" ] && echo "  NDJSON replay: $replay   (target >= 50k events/s)"
echo "  machine: $(nproc) cores, load average now $(cut -d' ' -f1-3 /proc/loadavg); $(psql -X -At -d "$DB" -c 'SHOW server_version') shared_buffers $(psql -X -At -d "$DB" -c 'SHOW shared_buffers')"
