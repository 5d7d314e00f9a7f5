#!/usr/bin/env bash
# What one proxied request costs bulwark, in two steadier measures than req/s on a shared machine:
#   1. CPU time per request: the proxy's utime+stime (from /proc) over the requests wrk completed,
#      ROUNDS rounds of DURATION seconds, median (same load as bench/gateway.sh);
#   2. user-space instructions per request under callgrind (zeroed after a warm-up), unless
#      CALLGRIND=0. Deterministic to within ~1%, so it shows small changes the req/s noise hides.
# Not a test: it asserts nothing. For A/B work on the hot path; bench/gateway.sh is the comparison
# with nginx and HAProxy.
#
# Usage: bash bench/cost.sh [path/to/bulwark]   (env: ROUNDS=5 DURATION=4 CALLGRIND=1 PORT_BASE=18180)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4}
CALLGRIND=${CALLGRIND:-1}
PORT_BASE=${PORT_BASE:-18180}
. bench/lib.sh
bulwark_binary "${1:-}"
bench_tools
bench_scratch cost
UP=127.0.0.1:$PORT_BASE BLW=127.0.0.1:$((PORT_BASE + 1)) ADM=127.0.0.1:$((PORT_BASE + 2))
reqs() { grep -oP '^\s*\K\d+(?= requests in)' "$1"; }

start_upstream "$UP"
start_bulwark "$BULWARK" "$BLW" "$ADM" "$UP"; bpid=$LAST_PID
wait_port "$UP"; wait_port "$BLW"
wrk -t1 -c8 -d1s "http://$BLW/" >/dev/null
tick=$(getconf CLK_TCK)

results=()
for r in $(seq "$ROUNDS"); do
  c0=$(ticks "$bpid")
  wrk -t2 -c64 -d"${DURATION}s" "http://$BLW/" > "$work/w.out"
  c1=$(ticks "$bpid")
  n=$(reqs "$work/w.out")
  results+=("$(python3 -c "print(f'{($c1-$c0)/$tick/$n*1e6:.2f}')")")
  rps=$(grep -oP 'Requests/sec:\s+\K[\d.]+' "$work/w.out")
  echo "round $r: $n requests, $rps req/s, ${results[-1]} us CPU/request"
done
printf '%s\n' "${results[@]}" | sort -n | awk '{a[NR]=$1} END {print "median CPU per request: " a[int((NR+1)/2)] " us (" NR " rounds)"}'
kill "$bpid"; wait "$bpid" 2>/dev/null || true

if [ "$CALLGRIND" = 1 ]; then
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$BULWARK" run -c "$work/bulwark.yaml" --threads 1 \
    >"$work/cg.log" 2>&1 & vpid=$!; pids+=($vpid)
  wait_port "$BLW"
  wrk -t1 -c8 -d3s "http://$BLW/" >/dev/null
  callgrind_control -z "$vpid" >/dev/null
  wrk -t2 -c64 -d10s "http://$BLW/" > "$work/w.out"
  callgrind_control -d "$vpid" >/dev/null
  n=$(reqs "$work/w.out")
  # The dump after zeroing is the file with the highest part number.
  f=$(ls -1v "$work"/cg.out* | tail -1)
  ir=$(callgrind_annotate "$f" 2>/dev/null | grep -m1 -oP '^\s*\K[\d,]+(?= \(100.0%\)\s+PROGRAM TOTALS)' | tr -d ,)
  echo "callgrind: $n requests, $(python3 -c "print(round($ir/$n))") user-space instructions/request"
  if [ -n "${KEEP:-}" ]; then cp "$f" "$KEEP"; echo "profile kept in $KEEP"; fi
fi
