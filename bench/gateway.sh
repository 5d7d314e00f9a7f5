#!/usr/bin/env bash
# End-to-end load: one upstream, then direct / nginx / HAProxy / bulwark in front of it, each
# driven by wrk (-t2 -c64 -d${DURATION}s --latency), ROUNDS interleaved rounds, medians, ratios.
# nginx and HAProxy run twice: as configured by the issue (they pass the request on as it came), and
# adding the three headers bulwark adds to every request ("same headers"), so that the comparison
# is also made at equal work.
#
# With PIN=1 (the default on 2+ CPUs) every proxy also runs in the same rounds with one fixed CPU
# placement: the proxy alone on CPU 1, wrk and the upstream on CPU 0. Unpinned, the kernel places
# the four busy threads on the cores differently from round to round, and req/s follows the
# placement (bench/results/gateway.md, "Sixth pass"); pinned, every proxy gets the same placement.
# Writes bench/results/gateway.md. Not a test: it asserts nothing; it reports.
#
# Usage: bash bench/gateway.sh            (env: DURATION=10 ROUNDS=3 CONNS=64 PIN=1)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
NCPU=$(nproc)
PIN=${PIN:-$([ "$NCPU" -ge 2 ] && echo 1 || echo 0)}
work=$root/bench/work
mkdir -p "$work" bench/results
rm -f "$work"/*.out

. bench/lib.sh
bench_tools
cargo build --release -p bulwark-gateway --bin bulwark --quiet
BULWARK=$root/target/release/bulwark

UP=127.0.0.1:18080 NGX=127.0.0.1:18081 HAP=127.0.0.1:18082 BLW=127.0.0.1:18083
NGS=127.0.0.1:18085 HAS=127.0.0.1:18086
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start_upstream $UP; uppid=$LAST_PID
start_nginx_proxy $NGX $UP; ngxpid=$LAST_PID
start_haproxy $HAP $UP; happid=$LAST_PID
start_nginx_proxy $NGS $UP same; ngspid=$LAST_PID
start_haproxy $HAS $UP same; haspid=$LAST_PID
start_bulwark "$BULWARK" $BLW 127.0.0.1:18084 $UP; bpid=$LAST_PID
for a in $UP $NGX $HAP $NGS $HAS $BLW; do wait_port "$a"; done

run() { # name addr round [pinned]
  local out="$work/$1.$3.out" pid wrk=(wrk)
  case $1 in direct) pid=$uppid;; nginx*) pid=$ngxpid;; haproxy*) pid=$happid;; bulwark*) pid=$bpid;; esac
  case $1 in nginx_same*) pid=$ngspid;; haproxy_same*) pid=$haspid;; esac
  if [ "$1" = bulwark ]; then
    ( while kill -0 "$bpid" 2>/dev/null; do ps -o rss= -p "$bpid"; sleep 0.5; done ) > "$work/rss.$3.out" & local sampler=$!
  fi
  if [ -n "${4:-}" ]; then pin "$pid" 1; pin "$uppid" 0; wrk=(taskset -c 0 wrk); fi
  local t0 b0 b1 c0 c1; t0=$(ticks "$pid"); b0=$(cpu_busy 0); b1=$(cpu_busy 1)
  "${wrk[@]}" -t2 -c"$CONNS" -d"${DURATION}s" --latency "http://$2/" > "$out"
  c0=$(cpu_busy 0); c1=$(cpu_busy 1)
  echo "$(( $(ticks "$pid") - t0 )) $(getconf CLK_TCK) $((${c0% *} - ${b0% *})) $((${c0#* } - ${b0#* })) $((${c1% *} - ${b1% *})) $((${c1#* } - ${b1#* }))" > "$work/$1.$3.cpu"
  if [ -n "${4:-}" ]; then pin "$pid" "0-$((NCPU - 1))"; pin "$uppid" "0-$((NCPU - 1))"; fi
  [ "$1" = bulwark ] && kill "$sampler" 2>/dev/null || true
}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# warm-up
for a in $NGX $HAP $NGS $HAS $BLW; do wrk -t1 -c8 -d1s "http://$a/" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  run direct $UP "$r"; run nginx $NGX "$r"; run nginx_same $NGS "$r"
  run haproxy $HAP "$r"; run haproxy_same $HAS "$r"; run bulwark $BLW "$r"
  if [ "$PIN" = 1 ]; then
    run nginx_pinned $NGX "$r" pin; run nginx_same_pinned $NGS "$r" pin
    run haproxy_pinned $HAP "$r" pin; run haproxy_same_pinned $HAS "$r" pin; run bulwark_pinned $BLW "$r" pin
  fi
done

# Hand-written analysis below the table ("## What bounds it" onwards) survives re-runs.
notes=$(sed -n '/^## What bounds it/,$p' bench/results/gateway.md 2>/dev/null || true)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$work" "$ROUNDS" "$DURATION" "$CONNS" "$load_start" "$load_end" "$PIN" > bench/results/gateway.md <<'PY'
import re, statistics, sys, glob, os, subprocess
work, rounds, dur, conns, load_start, load_end, pin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7] == "1"
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
def load(name):
    rps, p50, p99, errs, cpu, busy = [], [], [], 0, [], []
    for r in range(1, rounds + 1):
        t = open(f"{work}/{name}.{r}.out").read()
        rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)))
        ticks, hz, b0, t0, b1, t1 = map(int, open(f"{work}/{name}.{r}.cpu").read().split())
        n = int(re.search(r"(\d+) requests in", t).group(1))
        cpu.append(ticks / hz / n * 1e6)
        busy.append((b0 / max(t0, 1) * 100, b1 / max(t1, 1) * 100))
        m = re.search(r"50%\s+([\d.]+)(us|ms|s)", t); p50.append(ms(*m.groups()))
        m = re.search(r"99%\s+([\d.]+)(us|ms|s)", t); p99.append(ms(*m.groups()))
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", t); errs += int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: .*", t); errs += sum(map(int, re.findall(r"\d+", m.group(0)))) if m else 0
    return dict(rps=statistics.median(rps), p50=statistics.median(p50), p99=statistics.median(p99), errs=errs, all=rps,
                cpu=statistics.median(cpu), busy0=statistics.median(b[0] for b in busy), busy1=statistics.median(b[1] for b in busy))
rows = [("direct", "direct (no proxy)"), ("nginx", "nginx"), ("nginx_same", "nginx, same headers"),
        ("haproxy", "HAProxy"), ("haproxy_same", "HAProxy, same headers"), ("bulwark", "bulwark")]
res = {name: load(name) for name, _ in rows}
rss = []
for f in glob.glob(f"{work}/rss.*.out"):
    rss += [int(x) for x in open(f).read().split() if x.isdigit()]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
def table(rows, res, suffix="", busy=False):
    n, h, ns, hs = (res[k + suffix]["rps"] for k in ("nginx", "haproxy", "nginx_same", "haproxy_same"))
    print("| target | req/s (median) | p50 ms | p99 ms | vs nginx | vs HAProxy | vs nginx, same headers | vs HAProxy, same headers | CPU us/req |"
          + (" CPU 0 / CPU 1 busy % |" if busy else "") + " errors | req/s per round |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if busy else "") + "---|---|")
    for name, label in rows:
        r = res[name + suffix]
        print(f"| {label} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']/n:.2f}x | {r['rps']/h:.2f}x | "
              f"{r['rps']/ns:.2f}x | {r['rps']/hs:.2f}x | {r['cpu']:.1f} |" + (f" {r['busy0']:.0f} / {r['busy1']:.0f} |" if busy else "")
              + f" {r['errs']} | {', '.join(f'{x:.0f}' for x in r['all'])} |")
print("# Gateway load test\n")
print(f"`bash bench/gateway.sh`: wrk -t2 -c{conns} -d{dur}s --latency, {rounds} interleaved rounds, medians. "
      f"One machine ({os.cpu_count()} cores, {cpu}), shared and noisy: read the ratios, not the absolute numbers. "
      "Upstream: nginx, 1 worker, static 20-byte body. nginx proxy: 1 worker, keepalive pool. HAProxy: nbthread 1, "
      "http-reuse always. bulwark: `--threads 1`, circuit breaker, retry with budget, timeouts and metrics on. "
      "bulwark adds X-Forwarded-For, X-Forwarded-Proto and a generated X-Request-ID to every request; nginx and "
      "HAProxy as the issue configures them do not, so they also run with those three headers added "
      "(*same headers*: nginx `$proxy_add_x_forwarded_for`, `$scheme`, `$request_id`; HAProxy `option forwardfor`, "
      "`set-header X-Forwarded-Proto`, `unique-id-format %[uuid()]`).\n")
table(rows, res)
print("\nCPU us/req: the proxy's own CPU time (user + system, from /proc; nginx: master and worker) per "
      "request wrk completed, median of the rounds; for `direct`, the upstream's.")
if rss:
    print(f"\nbulwark RSS under load: median {statistics.median(rss)/1024:.1f} MiB, max {max(rss)/1024:.1f} MiB.")
if pin:
    pres = {name + "_pinned": load(name + "_pinned") for name, _ in rows[1:]}
    print("\n### The same proxies with one fixed CPU placement (same rounds)\n")
    print("Each proxy alone on CPU 1; wrk and the upstream on CPU 0 (`taskset`). Unpinned, the kernel places the "
          "four busy threads differently from round to round, and req/s follows the placement more than the proxy "
          "(see \"Sixth pass\" below). *CPU 0 / CPU 1 busy*: share of each CPU's time not idle during the round, "
          "machine-wide.\n")
    table(rows[1:], pres, "_pinned", busy=True)
print(f"\nLoad average (1, 5, 15 min) at start: {load_start}; at end: {load_end} ({os.cpu_count()} cores; above ~{os.cpu_count()*2}, other work shared the machine).")
PY
if [ -n "$notes" ]; then printf '\n%s\n' "$notes" >> bench/results/gateway.md; fi
cat bench/results/gateway.md
