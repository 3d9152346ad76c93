#!/bin/bash
# Node CPU per event of two builds, measured in alternating runs so that a
# change in the machine's state (page cache, other load) hits both alike.
#
#   node/scripts/node-cpu-ab.sh BASE_BINARY NEW_BINARY [RUNS]
#
# Each run is one `node-cpu.sh` (200,000 events, seed 42). NEW runs with
# `--state-dir $STATE_DIR` (default /tmp/cpu-state: `audit-node keys init
# --state-dir /tmp/cpu-state` first) when NEW_NEEDS_STATE=1 (the default);
# BASE runs with no extra flags. Both use NEW_BINARY as the mock cluster and
# the producer, so both drain the same records.
set -euo pipefail
BASE=$1; NEW=$2; RUNS=${3:-6}
STATE_DIR=${STATE_DIR:-/tmp/cpu-state}
HERE=$(dirname "$0")
NEW_ARGS=()
[ "${NEW_NEEDS_STATE:-1}" = 1 ] && NEW_ARGS=(--state-dir "$STATE_DIR")
base=(); new=()
per_event() { sed -n 's/.*= \([0-9.]*\) µs\/event.*/\1/p' | tail -1; }
for i in $(seq 1 "$RUNS"); do
  b=$(TOOLS=$NEW "$HERE/node-cpu.sh" base "$BASE" 2>&1 | tee /dev/stderr | per_event)
  n=$("$HERE/node-cpu.sh" new "$NEW" "${NEW_ARGS[@]}" 2>&1 | tee /dev/stderr | per_event)
  base+=("$b"); new+=("$n")
done
python3 - "${base[*]}" "${new[*]}" <<'PY'
import sys, statistics as st
b = [float(x) for x in sys.argv[1].split()]
n = [float(x) for x in sys.argv[2].split()]
print(f"base: {' '.join(map(str, b))} µs/event; mean {st.mean(b):.2f}, median {st.median(b):.2f}")
print(f"new:  {' '.join(map(str, n))} µs/event; mean {st.mean(n):.2f}, median {st.median(n):.2f}")
pairs = [y / x - 1 for x, y in zip(b, n)]
print(f"new over base: {100*(st.mean(n)/st.mean(b)-1):+.1f}% (means), "
      f"{100*(st.median(n)/st.median(b)-1):+.1f}% (medians), "
      f"pairs {' '.join(f'{100*p:+.0f}%' for p in pairs)}")
PY
