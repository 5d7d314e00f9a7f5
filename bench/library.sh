#!/usr/bin/env bash
# Library micro-benchmarks: runs crates/bulwark/benches/policies.rs (criterion) once,
# reads the median of each benchmark from target/criterion/*/*/new/estimates.json,
# and writes bench/results/library.md (bulwark vs peers, ratios, targets, machine).
# Not a test: it asserts nothing; it reports.
#
# Usage: bash bench/library.sh        (env: WARMUP=1 MEASURE=3 seconds per benchmark;
#                                      SKIP_RUN=1 only re-renders the table from the
#                                      last run's estimates)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
WARMUP=${WARMUP:-1}
MEASURE=${MEASURE:-3}
mkdir -p bench/results bench/work
crit="${CARGO_TARGET_DIR:-$root/target}/criterion"
log=bench/work/library-bench.log

if [ "${SKIP_RUN:-0}" != 1 ]; then
  # Start from an empty report directory so no stale estimate from an earlier run
  # (or a benchmark since removed) can end up in the table.
  rm -rf "$crit"
  echo "load before: $(uptime)" | tee "$log"
  cargo bench -p bulwark --bench policies -- \
    --warm-up-time "$WARMUP" --measurement-time "$MEASURE" --noplot 2>&1 | tee -a "$log"
  echo "load after: $(uptime)" | tee -a "$log"
fi

load_before=$( (sed -n 's/.*load average: //p' "$log" | head -1) 2>/dev/null || true)
load_after=$( (sed -n 's/.*load average: //p' "$log" | tail -1) 2>/dev/null || true)

CRIT="$crit" LOAD_BEFORE="$load_before" LOAD_AFTER="$load_after" \
WARMUP="$WARMUP" MEASURE="$MEASURE" python3 - <<'PY' > bench/results/library.md
import json, os, platform, subprocess, datetime

crit = os.environ["CRIT"]

def med(group, name):
    """Median of criterion's samples, in ns per iteration (None if absent)."""
    p = os.path.join(crit, group, name, "new", "estimates.json")
    try:
        with open(p) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None

def ns(v):
    if v is None:
        return "n/a"
    return f"{v:.1f} ns" if v < 1000 else f"{v/1000:.2f} µs"

def ratio(b, p):
    if b is None or p is None:
        return ""
    return f"{p/b:.1f}x"

def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

nproc = os.cpu_count()
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

# (operation, bulwark (group, bench), [(peer label, (group, bench))], issue reference)
rows = [
    ("Closed breaker, permit API (`try_acquire` + `record(Success)`), 1 thread",
     ("breaker", "bulwark_permit"),
     [("failsafe 1.3 `call`", ("breaker", "failsafe_call"))], "failsafe 73.8 ns"),
    ("Closed breaker, `call(|| async { Ok(1) })`, 1 thread",
     ("breaker", "bulwark_call"),
     [("failsafe 1.3 `call`", ("breaker", "failsafe_call"))], "failsafe 73.8 ns"),
    ("Closed breaker, permit API, 60 s time window (one clock read per call; not the default)",
     ("breaker", "bulwark_permit_time_window"),
     [("failsafe 1.3 `call`", ("breaker", "failsafe_call"))], ""),
    ("Closed breaker as tower service (`poll_ready` + `call` + poll)",
     ("breaker_layer", "bulwark_service"),
     [("tower-resilience 0.13", ("breaker_layer", "tower_resilience_service"))],
     "tower-resilience 188 ns"),
    ("Closed breaker, permit API, 2 threads contending (per call, per thread)",
     ("breaker_2threads", "bulwark_permit"),
     [("failsafe 1.3", ("breaker_2threads", "failsafe_call")),
      ("tower-resilience 0.13 service", ("breaker_2threads", "tower_resilience_service"))], ""),
    ("Closed breaker, `call`, 2 threads contending (per call, per thread)",
     ("breaker_2threads", "bulwark_call"),
     [("failsafe 1.3", ("breaker_2threads", "failsafe_call")),
      ("tower-resilience 0.13 service", ("breaker_2threads", "tower_resilience_service"))], ""),
    ("Retry, first attempt succeeds, no budget",
     ("retry", "bulwark_call"), [], "no peer in the dev-dependencies"),
    ("Retry, first attempt succeeds, with budget",
     ("retry", "bulwark_call_budget"), [], "no peer in the dev-dependencies"),
    ("Bulkhead `try_acquire` + drop",
     ("bulkhead", "bulwark_try_acquire_drop"),
     [("tokio Semaphore `try_acquire` + drop", ("floor", "tokio_semaphore_try_acquire_drop"))],
     "semaphore 20.2 ns"),
    ("Bulkhead `call(|| async { Ok(1) })`",
     ("bulkhead", "bulwark_call"), [], ""),
    ("Bulkhead as tower service",
     ("bulkhead_layer", "bulwark_service"),
     [("tower-resilience 0.13", ("bulkhead_layer", "tower_resilience_service"))],
     "tower-resilience 162 ns"),
    ("Rate limiter `check()` (GCRA)",
     ("rate_limit", "bulwark_check"),
     [("governor 0.10 `check`", ("rate_limit", "governor_check"))], "governor 19.7 ns"),
    ("Keyed rate limiter `check(&key)`, warm key",
     ("rate_limit", "bulwark_keyed_check_warm"),
     [("governor 0.10 keyed (dashmap) `check_key`", ("rate_limit", "governor_keyed_check_warm"))], ""),
    ("Full pipeline: total timeout, retry with budget, breaker, rate limiter, bulkhead, attempt timeout",
     ("pipeline", "bulwark_full"), [], "Polly v8 breaker alone: 138 ns (published)"),
    ("Pipeline: retry + breaker",
     ("pipeline", "bulwark_retry_breaker"), [], ""),
    ("Rate limiter as tower service",
     ("rate_limit_layer", "bulwark_service"),
     [("tower-resilience 0.13", ("rate_limit_layer", "tower_resilience_service"))],
     "tower-resilience 104 ns"),
]

out = []
w = out.append
w("# Library benchmarks: bulwark vs peers")
w("")
w(f"Generated by `bench/library.sh` on {now}. **One run on a shared {nproc}-core machine** "
  f"({cpu()}, {rustc}), other builds running alongside "
  f"(load average before: {os.environ.get('LOAD_BEFORE') or 'n/a'}; "
  f"after: {os.environ.get('LOAD_AFTER') or 'n/a'}).")
w("")
w(f"Every figure is the **median** of criterion's samples (criterion 0.5, "
  f"`--warm-up-time {os.environ['WARMUP']} --measurement-time {os.environ['MEASURE']}`), "
  "per call, on the healthy path (closed breaker, free slot, conforming cell, first "
  "attempt succeeds) around an operation that is already complete. Futures are polled "
  "once with `now_or_never` inside `rt.enter()`; tower services get `poll_ready`, `call` "
  "and one poll. *Ratio* is peer / bulwark: above 1x, bulwark is faster.")
w("")
w("| operation | bulwark | peer(s) | ratio | issue's reference |")
w("|---|---:|---|---:|---|")
for op, b, peers, ref in rows:
    bv = med(*b)
    if peers:
        ptxt = "<br>".join(f"{lbl}: {ns(med(*k))}" for lbl, k in peers)
        rtxt = "<br>".join(ratio(bv, med(*k)) for _, k in peers)
    else:
        ptxt, rtxt = "—", ""
    op = op.replace("|", "\\|")  # a literal pipe would end the table cell
    w(f"| {op} | {ns(bv)} | {ptxt} | {rtxt} | {ref} |")
w("")

w("## Floors and the clock")
w("")
w("| operation | median | issue's reference |")
w("|---|---:|---|")
floors = [
    ("atomic load + `fetch_add` (floor of a lock-free closed path)", ("floor", "atomic_load_fetch_add"), "6.1 ns"),
    ("tokio `Semaphore::try_acquire` + drop", ("floor", "tokio_semaphore_try_acquire_drop"), "20.2 ns"),
    ("`std::time::Instant::now()`", ("clock", "std_instant_now"), ""),
    ("`tokio::time::Instant::now()`, outside a runtime", ("clock", "tokio_instant_now_no_runtime"), ""),
    ("`tokio::time::Instant::now()`, inside `rt.enter()`", ("clock", "tokio_instant_now_in_runtime"), ""),
    ("`tokio::time::Instant::now()` after some runtime paused its clock, outside a runtime",
     ("clock_paused", "tokio_instant_now_no_runtime"), ""),
    ("`tokio::time::Instant::now()` after some runtime paused its clock, inside another (unpaused) runtime",
     ("clock_paused", "tokio_instant_now_in_unpaused_runtime"), ""),
]
for op, k, ref in floors:
    w(f"| {op} | {ns(med(*k))} | {ref} |")
w("")

std_now = med("clock", "std_instant_now")
tok_out = med("clock", "tokio_instant_now_no_runtime")
tok_rt = med("clock", "tokio_instant_now_in_runtime")
paused_rt = med("clock_paused", "tokio_instant_now_in_unpaused_runtime")
if None not in (std_now, tok_rt, tok_out):
    diff = max(tok_rt, tok_out) - std_now
    verdict = ("within noise of" if abs(diff) < 5 else
               ("slower than" if diff > 0 else "faster than"))
    w("**The `test-util` clock.** bulwark's dev-dependencies turn on tokio's `test-util` "
      "feature, so this benchmark binary is built with it. tokio (1.54) then makes every "
      "`tokio::time::Instant::now()` first check whether any runtime in the process has ever "
      "paused its clock (one atomic load); until one has, it reads the system clock directly. "
      f"Measured: {ns(tok_out)} outside a runtime and {ns(tok_rt)} inside `rt.enter()`, "
      f"{verdict} `std::time::Instant::now()` ({ns(std_now)}). So the numbers of policies that "
      "read the clock (rate limiter, retry, keyed maps, time-window breakers) are **not** "
      "made pessimistic by `test-util`: the benchmark pauses no clock before its last group. "
      "Once a clock has been paused, tokio looks the clock up through the runtime context and "
      f"locks a mutex on every read ({ns(paused_rt)} inside a runtime, see the last row): that "
      "is the cost inside `start_paused` tests only; production builds do not have `test-util`.")
    w("")
    w(f"A clock read costs about {ns(std_now)} on this VM (vDSO `clock_gettime`). It is the "
      "largest item in every policy that reads the clock: the rate limiter reads it once per "
      "check, the keyed rate limiter twice (key map + GCRA), the retry three times on a "
      "first-attempt success (four with a budget). governor reads quanta's TSC clock instead, "
      "which is most of its lead on `check`.")
    w("")

w("## Targets (from the issue)")
w("")
permit = med("breaker", "bulwark_permit")
call = med("breaker", "bulwark_call")
fs = med("breaker", "failsafe_call")
svc = med("breaker_layer", "bulwark_service")
trs = med("breaker_layer", "tower_resilience_service")
def yes(c):
    return "**met**" if c else "**missed**"
if None not in (permit, call, fs, svc, trs):
    w(f"- Closed-breaker overhead <= 25 ns/call, single-threaded: permit {ns(permit)}, "
      f"`call` {ns(call)}: {yes(max(permit, call) <= 25.0)}.")
    w(f"- 3x ahead of failsafe: {fs/permit:.1f}x (permit), {fs/call:.1f}x (`call`): "
      f"{yes(min(fs/permit, fs/call) >= 3.0)}.")
    w(f"- 7x ahead of tower-resilience: service vs service {trs/svc:.1f}x; "
      f"tower-resilience service vs bulwark `call` {trs/call:.1f}x: {yes(min(trs/svc, trs/call) >= 7.0)}.")
pairs = [
    ("bulkhead (tower service) vs tower-resilience", ("bulkhead_layer", "bulwark_service"), ("bulkhead_layer", "tower_resilience_service")),
    ("rate limiter (tower service) vs tower-resilience", ("rate_limit_layer", "bulwark_service"), ("rate_limit_layer", "tower_resilience_service")),
]
for lbl, b, p in pairs:
    bv, pv = med(*b), med(*p)
    if None not in (bv, pv):
        w(f"- Ahead of its counterpart, {lbl}: {ns(bv)} vs {ns(pv)} ({pv/bv:.1f}x): {yes(bv < pv)}.")
w("- Retry: neither failsafe nor the enabled tower-resilience features have one; no target.")
w("- Zero heap allocations per call on the healthy paths: asserted by "
  "`crates/bulwark/tests/alloc.rs` (counting allocator, 10 000 calls after warm-up).")
w("")

w("Not an issue target, for context (governor is the issue's reference for a rate-limit check):")
w("")
for lbl, b, p in [
    ("rate limiter `check` vs governor `check`", ("rate_limit", "bulwark_check"), ("rate_limit", "governor_check")),
    ("keyed `check` vs governor keyed `check_key`", ("rate_limit", "bulwark_keyed_check_warm"), ("rate_limit", "governor_keyed_check_warm")),
    ("bulkhead `try_acquire` + drop vs bare tokio semaphore", ("bulkhead", "bulwark_try_acquire_drop"), ("floor", "tokio_semaphore_try_acquire_drop")),
]:
    bv, pv = med(*b), med(*p)
    if None not in (bv, pv):
        w(f"- {lbl}: {ns(bv)} vs {ns(pv)}: bulwark is {'ahead' if bv < pv else 'behind'} ({pv/bv:.2f}x).")
w("")
w("## Caveats")
w("")
w("- One run, on a 2-core machine shared with other builders: expect a few ns of noise on "
  "the small figures and more on the 2-thread ones (the two threads compete with other "
  "processes for the two cores; a descheduled thread inflates the wall time). Compare "
  "within this table, not across machines.")
w("- The 2-thread rows time both threads making N calls each on one shared breaker; the "
  "figure is wall time / N, i.e. what one call costs each of the two contending callers.")
w("- failsafe's breaker is synchronous (`call(|| Ok(()))`); tower-resilience's policies "
  "exist only as tower services, which box their response future and (breaker) take a "
  "`tokio::sync::Mutex` twice per call; the service rows compare layer with layer.")
w("- The issue's reference column was measured earlier on a similar machine; it is "
  "context, not part of this run.")
print("\n".join(out))
PY
echo "wrote bench/results/library.md"
