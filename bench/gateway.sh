#!/usr/bin/env bash
# End-to-end load: one upstream, then direct / nginx / HAProxy / bulwark in front of it, each
# driven by wrk (-t2 -c64 -d${DURATION}s --latency), ROUNDS interleaved rounds, medians, ratios.
# Writes bench/results/gateway.md. Not a test: it asserts nothing; it reports.
#
# Usage: bash bench/gateway.sh            (env: DURATION=10 ROUNDS=3 CONNS=64)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
work=$root/bench/work
mkdir -p "$work" bench/results
rm -f "$work"/*.out

. bench/lib.sh
bench_tools
cargo build --release -p bulwark-gateway --bin bulwark --quiet
BULWARK=$root/target/release/bulwark

UP=127.0.0.1:18080 NGX=127.0.0.1:18081 HAP=127.0.0.1:18082 BLW=127.0.0.1:18083
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start_upstream $UP; uppid=$LAST_PID
start_nginx_proxy $NGX $UP; ngxpid=$LAST_PID
start_haproxy $HAP $UP; happid=$LAST_PID
start_bulwark "$BULWARK" $BLW 127.0.0.1:18084 $UP; bpid=$LAST_PID
for a in $UP $NGX $HAP $BLW; do wait_port "$a"; done

rss_max=0
run() { # name addr round
  local out="$work/$1.$3.out" pid
  case $1 in direct) pid=$uppid;; nginx) pid=$ngxpid;; haproxy) pid=$happid;; bulwark) pid=$bpid;; esac
  if [ "$1" = bulwark ]; then
    ( while kill -0 "$bpid" 2>/dev/null; do ps -o rss= -p "$bpid"; sleep 0.5; done ) > "$work/rss.$3.out" & local sampler=$!
  fi
  local t0; t0=$(ticks "$pid")
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "http://$2/" > "$out"
  echo "$(( $(ticks "$pid") - t0 )) $(getconf CLK_TCK)" > "$work/$1.$3.cpu"
  [ "$1" = bulwark ] && kill "$sampler" 2>/dev/null || true
}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# warm-up
for a in $NGX $HAP $BLW; do wrk -t1 -c8 -d1s "http://$a/" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  run direct $UP "$r"; run nginx $NGX "$r"; run haproxy $HAP "$r"; run bulwark $BLW "$r"
done

# Hand-written analysis below the table ("## What bounds it" onwards) survives re-runs.
notes=$(sed -n '/^## What bounds it/,$p' bench/results/gateway.md 2>/dev/null || true)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$work" "$ROUNDS" "$DURATION" "$CONNS" "$load_start" "$load_end" > bench/results/gateway.md <<'PY'
import re, statistics, sys, glob, os, platform, subprocess
work, rounds, dur, conns, load_start, load_end = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
res = {}
for name in ["direct", "nginx", "haproxy", "bulwark"]:
    rps, p50, p99, errs, cpu = [], [], [], 0, []
    for r in range(1, rounds + 1):
        t = open(f"{work}/{name}.{r}.out").read()
        rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)))
        ticks, hz = map(int, open(f"{work}/{name}.{r}.cpu").read().split())
        n = int(re.search(r"(\d+) requests in", t).group(1))
        cpu.append(ticks / hz / n * 1e6)
        m = re.search(r"50%\s+([\d.]+)(us|ms|s)", t); p50.append(ms(*m.groups()))
        m = re.search(r"99%\s+([\d.]+)(us|ms|s)", t); p99.append(ms(*m.groups()))
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", t); errs += int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: .*", t); errs += sum(map(int, re.findall(r"\d+", m.group(0)))) if m else 0
    res[name] = dict(rps=statistics.median(rps), p50=statistics.median(p50), p99=statistics.median(p99), errs=errs, all=rps, cpu=statistics.median(cpu))
rss = []
for f in glob.glob(f"{work}/rss.*.out"):
    rss += [int(x) for x in open(f).read().split() if x.isdigit()]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print("# Gateway load test\n")
print(f"`bash bench/gateway.sh`: wrk -t2 -c{conns} -d{dur}s --latency, {rounds} interleaved rounds, medians. "
      f"One machine ({os.cpu_count()} cores, {cpu}), shared and noisy: read the ratios, not the absolute numbers. "
      "Upstream: nginx, 1 worker, static 20-byte body. nginx proxy: 1 worker, keepalive pool. HAProxy: nbthread 1, "
      "http-reuse always. bulwark: `--threads 1`, circuit breaker, retry with budget, timeouts and metrics on.\n")
print("| target | req/s (median) | p50 ms | p99 ms | vs nginx | vs HAProxy | CPU us/req | errors | req/s per round |")
print("|---|---|---|---|---|---|---|---|---|")
for name, label in [("direct", "direct (no proxy)"), ("nginx", "nginx"), ("haproxy", "HAProxy"), ("bulwark", "bulwark")]:
    r = res[name]
    print(f"| {label} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']/res['nginx']['rps']:.2f}x | "
          f"{r['rps']/res['haproxy']['rps']:.2f}x | {r['cpu']:.1f} | {r['errs']} | {', '.join(f'{x:.0f}' for x in r['all'])} |")
print("\nCPU us/req: the proxy's own CPU time (user + system, from /proc; nginx: master and worker) per "
      "request wrk completed, median of the rounds; for `direct`, the upstream's.")
if rss:
    print(f"\nbulwark RSS under load: median {statistics.median(rss)/1024:.1f} MiB, max {max(rss)/1024:.1f} MiB.")
print(f"\nLoad average (1, 5, 15 min) at start: {load_start}; at end: {load_end} (2 cores; above ~4, other work shared the machine).")
PY
if [ -n "$notes" ]; then printf '\n%s\n' "$notes" >> bench/results/gateway.md; fi
cat bench/results/gateway.md
