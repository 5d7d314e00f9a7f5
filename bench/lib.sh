# Shared pieces of the load scripts (sourced by gateway.sh, cost.sh and machine.sh): the peers and
# bulwark started the same way in each, and the /proc readings they take.
#
# Each start_* function writes its config under "$work", starts the server in the background,
# appends its pid to the caller's `pids` array and sets LAST_PID.

# Installs nginx, HAProxy and wrk from Debian when missing; sets NGINX and HAPROXY.
bench_tools() {
  local need=()
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  command -v wrk >/dev/null || need+=(wrk)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
}

# BULWARK: the binary given ($1), or a release build of this tree.
bulwark_binary() { # [path]
  BULWARK=${1:-}
  if [ -z "$BULWARK" ]; then
    cargo build --release -p bulwark-gateway --bin bulwark --quiet
    BULWARK=$(pwd)/target/release/bulwark
  fi
}

# A scratch directory `work`, removed on exit with every server started into `pids`.
bench_scratch() { # name
  work=$(mktemp -d "/tmp/bulwark-$1.XXXXXX")
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

# The upstream: nginx with one worker answering a small static body from memory.
start_upstream() { # addr
  cat > "$work/upstream.conf" <<CONF
worker_processes 1;
daemon off; pid $work/upstream.pid; error_log $work/upstream.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $1; location / { return 200 "hello from upstream\n"; } } }
CONF
  "$NGINX" -c "$work/upstream.conf" -p "$work" & LAST_PID=$!; pids+=("$LAST_PID")
}

# nginx as a proxy: one worker, keep-alive pool to the upstream. With `same` as the third argument it
# also adds the headers bulwark adds to every request (X-Forwarded-For, X-Forwarded-Proto and a
# generated X-Request-ID), so that both do the same work per request.
start_nginx_proxy() { # addr upstream-addr [same]
  local extra=""
  [ "${3:-}" = same ] && extra='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Request-ID $request_id;'
  cat > "$work/nginx.$1.conf" <<CONF
worker_processes 1;
daemon off; pid $work/nginx.$1.pid; error_log $work/nginx.$1.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server $2; keepalive 128; }
  server { listen $1; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; $extra } } }
CONF
  "$NGINX" -c "$work/nginx.$1.conf" -p "$work" & LAST_PID=$!; pids+=("$LAST_PID")
}

# HAProxy: one thread, connection reuse. With `same` as the third argument it also adds the headers
# bulwark adds (X-Forwarded-For, X-Forwarded-Proto and an X-Request-ID, a UUID).
start_haproxy() { # addr upstream-addr [same]
  local defaults="" frontend=""
  if [ "${3:-}" = same ]; then
    defaults=$'  option forwardfor\n  unique-id-format %[uuid()]\n  unique-id-header X-Request-ID\n'
    frontend=$'  http-request set-header X-Forwarded-Proto http\n'
  fi
  cat > "$work/haproxy.$1.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
${defaults}frontend fe
  bind $1
${frontend}  default_backend be
backend be
  server s1 $2 maxconn 1000
CONF
  "$HAPROXY" -f "$work/haproxy.$1.cfg" -db & LAST_PID=$!; pids+=("$LAST_PID")
}

# bulwark: one worker thread, with breaker, retry with budget, timeouts and metrics on.
start_bulwark() { # binary addr admin-addr upstream-addr [log]
  cat > "$work/bulwark.yaml" <<CONF
listen: $2
admin: { listen: $3 }
upstreams:
  up:
    endpoints: [ { url: http://$4 } ]
    balance: round_robin
    circuit_breaker: { window: { kind: count, size: 100 }, minimum_calls: 20, failure_rate_threshold: 50, open_duration: 30s }
routes:
  - match: { path_prefix: / }
    upstream: up
    timeout: 30s
    retry: { attempts: 3, per_try_timeout: 10s, backoff: { kind: exponential, base: 10ms, max: 1s }, on: [connect_failure, reset, 5xx], budget: { ratio: 0.2, min_per_second: 10 } }
CONF
  "$1" check -c "$work/bulwark.yaml" >/dev/null
  "$1" run -c "$work/bulwark.yaml" --threads 1 >"${5:-$work/bulwark.log}" 2>&1 & LAST_PID=$!; pids+=("$LAST_PID")
}

wait_port() { # addr
  for _ in $(seq 300); do curl -fsS -o /dev/null "http://$1/" 2>/dev/null && return 0; sleep 0.1; done
  echo "no answer on $1" >&2; return 1
}

# CPU ticks (utime + stime) of a process and its children (nginx's master and worker).
ticks() { # pid
  local t=0 p
  for p in "$1" $(pgrep -P "$1" || true); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

# Voluntary and involuntary context switches of a process and its children, all threads.
ctx_switches() { # pid
  local v=0 i=0 p th
  for p in "$1" $(pgrep -P "$1" || true); do
    for th in /proc/"$p"/task/*; do
      v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$th/status")))
      i=$((i + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$th/status")))
    done
  done
  echo "$v $i"
}

# TCP segments sent so far, machine-wide.
tcp_out_segs() { awk '/^Tcp:/ {n++; if (n == 2) print $12}' /proc/net/snmp; }

# Pins every thread of a process and of its children (nginx's workers) to a CPU list.
pin() { # pid cpu-list
  local p
  for p in "$1" $(pgrep -P "$1" || true); do taskset -a -pc "$2" "$p" >/dev/null; done
}

# Busy and total jiffies of one CPU so far, from /proc/stat (busy: all but idle and iowait).
cpu_busy() { # cpu-number
  awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat
}
