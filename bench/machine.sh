#!/usr/bin/env bash
# The whole machine per proxy: with wrk, the upstream and one proxy sharing the cores, what each of
# the three costs per request, how often wrk's threads block and the proxy is preempted, and TCP
# segments per request. nginx, HAProxy and bulwark in ROUNDS interleaved rounds, medians.
# Writes bench/results/machine.md. Not a test: it asserts nothing; it reports.
#
# Why: on a 2-core machine req/s depends on how the scheduler places the four processes, not only
# on the proxy's own CPU time (see "What bounds it" in bench/results/gateway.md).
#
# Usage: bash bench/machine.sh [path/to/bulwark]   (env: ROUNDS=4 DURATION=5 PORT_BASE=18280)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-5}
PORT_BASE=${PORT_BASE:-18280}
. bench/lib.sh
bulwark_binary "${1:-}"
bench_tools
bench_scratch machine
UP=127.0.0.1:$PORT_BASE NGX=127.0.0.1:$((PORT_BASE + 1)) HAP=127.0.0.1:$((PORT_BASE + 2))
BLW=127.0.0.1:$((PORT_BASE + 3)) ADM=127.0.0.1:$((PORT_BASE + 4))
start_upstream "$UP"; uppid=$LAST_PID
start_nginx_proxy "$NGX" "$UP"; ngxpid=$LAST_PID
start_haproxy "$HAP" "$UP"; happid=$LAST_PID
start_bulwark "$BULWARK" "$BLW" "$ADM" "$UP"; bpid=$LAST_PID
for a in $UP $NGX $HAP $BLW; do wait_port "$a"; done
for a in $NGX $HAP $BLW; do wrk -t1 -c8 -d1s "http://$a/" >/dev/null; done

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
rows=$work/rows
for r in $(seq "$ROUNDS"); do
  for name in nginx haproxy bulwark; do
    case $name in nginx) pid=$ngxpid a=$NGX;; haproxy) pid=$happid a=$HAP;; bulwark) pid=$bpid a=$BLW;; esac
    u0=$(ticks "$uppid"); p0=$(ticks "$pid"); read -r pv0 pi0 < <(ctx_switches "$pid"); s0=$(tcp_out_segs)
    /usr/bin/time -f "%U %S %w %c" -o "$work/time.out" wrk -t2 -c64 -d"${DURATION}s" --latency "http://$a/" > "$work/w.out"
    u1=$(ticks "$uppid"); p1=$(ticks "$pid"); read -r pv1 pi1 < <(ctx_switches "$pid"); s1=$(tcp_out_segs)
    n=$(grep -oP '^\s*\K\d+(?= requests in)' "$work/w.out")
    rps=$(grep -oP 'Requests/sec:\s+\K[\d.]+' "$work/w.out")
    p99=$(grep -oP '^\s*99%\s+\K[\d.]+(us|ms|s)' "$work/w.out")
    echo "$name $r $n $rps $p99 $(tail -1 "$work/time.out") $((u1 - u0)) $((p1 - p0)) $((pi1 - pi0)) $((s1 - s0))" | tee -a "$rows"
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$rows" "$ROUNDS" "$DURATION" "$(getconf CLK_TCK)" "$load_start" "$load_end" > bench/results/machine.md <<'PY'
import re, statistics, sys, collections
rows, rounds, dur, hz, load_start, load_end = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
d = collections.defaultdict(list)
for line in open(rows):
    name, r, n, rps, p99, wu, ws, wvol, winv, up, px, pinv, segs = line.split()
    n = int(n)
    wrk = (float(wu) + float(ws)) / n * 1e6
    upc, pxc = int(up) / hz / n * 1e6, int(px) / hz / n * 1e6
    d[name].append(dict(rps=float(rps), p99=ms(p99), wrk=wrk, up=upc, px=pxc, total=wrk + upc + pxc,
                        blocks=int(wvol) / n * 100, pre=int(pinv) / n * 100, segs=int(segs) / n))
med = lambda name, k: statistics.median(x[k] for x in d[name])
print("# The whole machine per proxy\n")
print(f"`bash bench/machine.sh`: wrk -t2 -c64 -d{dur}s against nginx, HAProxy and bulwark (same setups as "
      f"bench/gateway.sh), {rounds} interleaved rounds, medians. CPU time from /proc (upstream, proxy) and "
      "/usr/bin/time (wrk), per request wrk completed. *wrk blocks*: voluntary context switches of wrk's "
      "threads; *proxy preempted*: involuntary context switches of the proxy; per 100 requests. "
      "Shared, noisy 2-core machine: compare rows of the same run.\n")
print("| proxy | req/s | p99 ms | wrk us/req | upstream us/req | proxy us/req | machine us/req | wrk blocks /100 req | proxy preempted /100 req | TCP segments/req |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, label in [("nginx", "nginx"), ("haproxy", "HAProxy"), ("bulwark", "bulwark")]:
    print(f"| {label} | {med(name,'rps'):.0f} | {med(name,'p99'):.2f} | {med(name,'wrk'):.1f} | {med(name,'up'):.1f} | "
          f"{med(name,'px'):.1f} | {med(name,'total'):.1f} | {med(name,'blocks'):.1f} | {med(name,'pre'):.1f} | {med(name,'segs'):.2f} |")
print("\nEvery round (req/s, wrk blocks, proxy preempted):\n")
for name in ["nginx", "haproxy", "bulwark"]:
    print(f"- {name}: " + "; ".join(f"{x['rps']:.0f}, {x['blocks']:.1f}, {x['pre']:.1f}" for x in d[name]))
print(f"\nLoad average (1, 5, 15 min) at start: {load_start}; at end: {load_end}.")
PY
cat bench/results/machine.md
