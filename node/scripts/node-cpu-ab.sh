#!/bin/bash
# Node CPU per event of two builds, measured in alternating runs so that a
# change in the machine's state (page cache, other load) hits both alike.
#
#   node/scripts/node-cpu-ab.sh BASE_BINARY NEW_BINARY [RUNS]
#
# Each run is one `node-cpu.sh` (200,000 events, seed 42). NEW runs with
# `--state-dir $STATE_DIR` (default /tmp/cpu-state: `audit-node keys init
# --state-dir /tmp/cpu-state` first) when NEW_NEEDS_STATE=1 (the default);
# BASE runs with no extra flags. AFTER_MIGRATE_SQL (see node-cpu.sh) applies
# to both. Both use NEW_BINARY as the mock cluster and
# the producer, so both drain the same records.
set -euo pipefail
BASE=$1; NEW=$2; RUNS=${3:-6}
STATE_DIR=${STATE_DIR:-/tmp/cpu-state}
HERE=$(dirname "$0")
NEW_ARGS=()
[ "${NEW_NEEDS_STATE:-1}" = 1 ] && NEW_ARGS=(--state-dir "$STATE_DIR")
base=(); new=(); base_pg=(); new_pg=()
node_us() { sed -n 's/.*= \([0-9.]*\) µs\/event;.*/\1/p' | tail -1; }
pg_us() { sed -n 's/.*PostgreSQL \([0-9.]*\) µs\/event.*/\1/p' | tail -1; }
for i in $(seq 1 "$RUNS"); do
  b=$(TOOLS=$NEW "$HERE/node-cpu.sh" base "$BASE" 2>&1 | tee /dev/stderr | tail -1)
  n=$("$HERE/node-cpu.sh" new "$NEW" "${NEW_ARGS[@]}" 2>&1 | tee /dev/stderr | tail -1)
  base+=("$(node_us <<< "$b")"); new+=("$(node_us <<< "$n")")
  base_pg+=("$(pg_us <<< "$b")"); new_pg+=("$(pg_us <<< "$n")")
done
python3 - "${base[*]}" "${new[*]}" "${base_pg[*]}" "${new_pg[*]}" <<'PY'
import sys, statistics as st
b, n, bp, np_ = ([float(x) for x in a.split()] for a in sys.argv[1:5])
def line(name, xs): return f"{name} {' '.join(map(str, xs))} µs/event; mean {st.mean(xs):.2f}, median {st.median(xs):.2f}"
print(line("node, base:", b)); print(line("node, new: ", n))
pairs = [y / x - 1 for x, y in zip(b, n)]
print(f"node, new over base: {100*(st.mean(n)/st.mean(b)-1):+.1f}% (means), "
      f"{100*(st.median(n)/st.median(b)-1):+.1f}% (medians), "
      f"pairs {' '.join(f'{100*p:+.0f}%' for p in pairs)}")
print(line("PostgreSQL, base:", bp)); print(line("PostgreSQL, new: ", np_))
tb = [x + y for x, y in zip(b, bp)]; tn = [x + y for x, y in zip(n, np_)]
print(f"node + PostgreSQL: base {st.mean(tb):.1f}, new {st.mean(tn):.1f} µs/event: "
      f"{100*(st.mean(tn)/st.mean(tb)-1):+.1f}% (means), {100*(st.median(tn)/st.median(tb)-1):+.1f}% (medians)")
PY
