#!/usr/bin/env bash
# What an open circuit breaker costs a client: bulwark (`--threads 1`, the gateway.sh config) in
# front of an upstream that is down, its breaker opened by the first failures, so every request is
# answered 503 `circuit_open` by the gateway alone. Measured in the same interleaved rounds as the
# same gateway proxying to a live upstream, and as that upstream answered directly (the floor for a
# loopback request and answer): wrk -t2 -c64 -d${DURATION}s --latency, ROUNDS rounds, medians.
# Writes bench/results/breaker-open.md. Not a test: it asserts nothing; it reports.
#
# Usage: bash bench/breaker.sh            (env: DURATION=8 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
. bench/lib.sh
bench_tools
bulwark_binary "${1:-}"
bench_scratch breaker

UP=127.0.0.1:18380 LIVE=127.0.0.1:18381 LIVEADM=127.0.0.1:18382
OPEN=127.0.0.1:18383 OPENADM=127.0.0.1:18384 DEAD=127.0.0.1:18389
start_upstream "$UP"; uppid=$LAST_PID
mkdir -p "$work/live" "$work/open"
w=$work; work=$w/live; start_bulwark "$BULWARK" "$LIVE" "$LIVEADM" "$UP"; livepid=$LAST_PID
work=$w/open; start_bulwark "$BULWARK" "$OPEN" "$OPENADM" "$DEAD"; openpid=$LAST_PID; work=$w
wait_port "$UP"; wait_port "$LIVE"
for _ in $(seq 300); do curl -sS -o /dev/null "http://$OPENADM/health" 2>/dev/null && break; sleep 0.1; done
# Open the breaker: connect failures (refused at once) until it trips.
for _ in $(seq 100); do
  curl -s -o /dev/null "http://$OPEN/" || true
  curl -s "http://$OPENADM/health" | grep -q '"circuit_breaker": *"open"' && break
done
curl -s "http://$OPENADM/health" | grep -q '"circuit_breaker": *"open"' || { echo "the breaker did not open" >&2; exit 1; }
first=$(curl -s -D - -o /dev/null "http://$OPEN/" | tr -d '\r' | grep -iE '^(HTTP|x-bulwark-reason|retry-after)' | tr '\n' ' ')
echo "an open breaker answers: $first"

declare -A RPS P50 P99 CPU PIDOF=([direct]=$uppid [proxied]=$livepid [breaker-open]=$openpid)
declare -A ADDR=([direct]=$UP [proxied]=$LIVE [breaker-open]=$OPEN)
targets=(direct proxied breaker-open)
ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}' <<<"$1"; }
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    c0=$(ticks "${PIDOF[$t]}")
    wrk -t2 -c64 -d"${DURATION}s" --latency "http://${ADDR[$t]}/" > "$work/w.out"
    c1=$(ticks "${PIDOF[$t]}")
    n=$(grep -oP '^\s*\K\d+(?= requests in)' "$work/w.out")
    RPS[$t]+="$(grep -oP 'Requests/sec:\s+\K[\d.]+' "$work/w.out" | awk '{printf "%.0f", $1}') "
    P50[$t]+="$(ms "$(grep -oP '^\s+50%\s+\K\S+' "$work/w.out")") "
    P99[$t]+="$(ms "$(grep -oP '^\s+99%\s+\K\S+' "$work/w.out")") "
    CPU[$t]+="$(python3 -c "print(f'{($c1-$c0)/$(getconf CLK_TCK)/$n*1e6:.2f}')") "
    echo "round $r $t: $(awk '{print $NF}' <<<"${RPS[$t]}") req/s"
  done
done
# The open breaker must still be open at the end (the open_duration is 30 s; rounds re-open it).
still=$(curl -s "http://$OPENADM/health" | grep -o '"circuit_breaker": *"[a-z_]*"' | head -1)
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
out=bench/results/breaker-open.md
{
  echo "# What an open circuit breaker costs a client"
  echo
  echo "\`bash bench/breaker.sh\`: wrk -t2 -c64 -d${DURATION}s --latency, $ROUNDS interleaved rounds, medians, on one shared 2-core machine (read the columns against each other, not as absolute figures). *breaker-open*: bulwark (\`--threads 1\`, the \`bench/gateway.sh\` config) whose only upstream is down and whose breaker is open, so the gateway answers every request by itself (\`$first\`). *proxied*: the same gateway in front of the live upstream. *direct*: that upstream (nginx, a static 20-byte answer) without a proxy, the floor for one loopback request and answer. CPU us/req: the answering process's own CPU time per request (for *direct*, the upstream's)."
  echo
  echo "| target | req/s | p50 ms | p99 ms | CPU us/req | req/s per round |"
  echo "|---|---|---|---|---|---|"
  for t in "${targets[@]}"; do
    echo "| $t | $(median "${RPS[$t]}") | $(median "${P50[$t]}") | $(median "${P99[$t]}") | $(median "${CPU[$t]}") | $(sed 's/ $//; s/ /, /g' <<<"${RPS[$t]}") |"
  done
  echo
  echo "Breaker state at the end: \`$still\`."
} > "$out"
cat "$out"
