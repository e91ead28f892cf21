#!/usr/bin/env bash
# moat benchmark: direct vs through moat, on loopback only, bounded in time.
#   bash bench/run.sh            (SECS=10 CONNS=32 by default; ONLY=https|sandbox|peer|ir|shared|p99 runs that part; BASELINE=other/moat in part 3)
# Prints requests/s, p50/p99 latency, the ratio of each path to direct, the p99 added at a
# fixed 2,000 req/s, moat's RSS (with 1,000 idle keep-alive connections, and peak), and for
# HTTPS: intercepted handler vs direct TLS, and the cost of a new host's first request.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-10}
CONNS=${CONNS:-32}
RATE=${RATE:-2000}
IDLE=${IDLE:-1000}

cargo build --release --quiet --bin moat --example bench-upstream --example bench-load --example bench-relay --example bench-lua-call
BIN=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The shared-store part's PostgreSQL (its postmaster, whoever started it).
  [ -f "$work/pg/postmaster.pid" ] && kill -INT "$(head -1 "$work/pg/postmaster.pid")" 2>/dev/null && sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

UP=127.0.0.1:18080
TLSUP=127.0.0.1:18443
"$BIN/examples/bench-upstream" "$UP" "$TLSUP" "$work/up-ca.pem" > "$work/up.log" 2>&1 &
UPSTREAM=$!
pids+=($UPSTREAM)
for _ in $(seq 50); do [ -s "$work/up-ca.pem" ] && break; sleep 0.1; done
# The ceiling for any proxy here: a relay that only copies bytes (no parsing, no policy).
RELAY=127.0.0.1:18090
"$BIN/examples/bench-relay" "$RELAY" "$UP" > /dev/null 2>&1 &
RELAYPID=$!
pids+=($RELAYPID)

cat > "$work/egress.lua" <<'LUA'
-- Egress only: an allowed host, no handler.
allowedHosts = { "127.0.0.1" }
LUA
cat > "$work/handler.lua" <<'LUA'
-- A handler that sets a header and forwards.
allowedHosts = { "127.0.0.1" }
outboundByHost = {
  ["127.0.0.1"] = function(request, env, ctx)
    local r = Request.new(request)
    r.headers:set("x-moat-container", ctx.containerId)
    return fetch(r)
  end,
}
LUA
cat > "$work/kv.lua" <<'LUA'
-- A constant answer, and an answer read from KV (PUT seeds it).
outboundByHost = {
  ["const.test"] = function() return Response.new("hello, moat!\n") end,
  ["my.kv"] = function(request, env)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then env.KV:put(key, request:text()) return Response.new("ok") end
    return Response.new(env.KV:get(key))
  end,
  -- A read that goes to the store every time (a list is never answered from moat's cache).
  ["list.kv"] = function(request, env)
    return Response.new(env.KV:list({ prefix = "greet", limit = 1 }).keys[1].name)
  end,
}
LUA
# HTTPS interception: the same header-injecting handler (for the TLS upstream), and a local
# answer for any *.bench host (for the first-request measurement).
{ cat "$work/handler.lua"; cat <<'LUA'; } > "$work/intercept.lua"
interceptHttps = true
allowedHosts = { "127.0.0.1", "*.bench" }
outboundByHost["*.bench"] = function() return Response.new("hello, moat!\n") end
LUA
# The sandbox part: the same header-injecting handler, for a name that a program in a
# sandbox (moat run) asks for, its upstream the bench's.
cat > "$work/sandbox.lua" <<'LUA'
allowedHosts = { "up.bench" }
outboundByHost = {
  ["up.bench"] = function(request, env, ctx)
    local r = Request.new("http://127.0.0.1:18080/", request)
    r.headers:set("x-moat-container", ctx.containerId)
    return fetch(r)
  end,
}
LUA
cat > "$work/moat.toml" <<TOML
data_dir = "$work/data"
[tls]
extra_ca = ["$work/up-ca.pem"]
[[class]]
name = "intercept"
policy = "$work/intercept.lua"
listen = "127.0.0.1:13131"
[[class]]
name = "egress"
policy = "$work/egress.lua"
listen = "127.0.0.1:13128"
[[class]]
name = "handler"
policy = "$work/handler.lua"
listen = "127.0.0.1:13129"
[[class]]
name = "kv"
policy = "$work/kv.lua"
listen = "127.0.0.1:13130"
[[class]]
name = "sandbox"
policy = "$work/sandbox.lua"
listen = "127.0.0.1:13132"
TOML
# MOAT_NO_DNS: every name here is answered by a handler; nothing may leave loopback.
MOAT_NO_DNS=1 RUST_LOG=warn,moat::reload=info MOAT_WORKERS=${MOAT_WORKERS:-} "$BIN/moat" serve --config "$work/moat.toml" > "$work/moat.out" 2> "$work/moat.log" &
MOAT=$!
pids+=($MOAT)
sleep 1

run() { "$BIN/examples/bench-load" "$@"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A closed-loop run that also reports the CPU each process used per request (µs): the load
# generator's own figure, the upstream's and the proxy's (PROXY_PID; none for direct).
run_cpu() {
  local proxy=$1; shift
  local u0 p0 line n
  u0=$(ticks "$UPSTREAM"); p0=$([ "$proxy" = - ] && echo 0 || ticks "$proxy")
  line=$(run "$@")
  n=$(echo "$line" | field requests)
  awk -v l="$line" -v n="$n" -v u=$(( $(ticks "$UPSTREAM") - u0 )) -v p=$(( $([ "$proxy" = - ] && echo 0 || ticks "$proxy") - p0 )) \
    'BEGIN {printf "%s upstream_cpu_us=%.2f proxy_cpu_us=%.2f\n", l, u * 10000 / n, p * 10000 / n}'
}
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

ROUNDS=${ROUNDS:-3}

median() { sort -t= -k4 -n "$1" | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
middle() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
median_rps() { field rps < "$1" | middle; }

https_part() {
  echo "== HTTPS, $CONNS keep-alive connections, ${SECS}s per run, $ROUNDS rounds: direct TLS to the"
  echo "   upstream vs through moat intercepting, with the header-injecting handler's fetch"
  : > "$work/tlsdirect"; : > "$work/tlsmoat"
  for r in $(seq "$ROUNDS"); do
    run --tls "$work/up-ca.pem" "$TLSUP" "https://$TLSUP/" "$CONNS" "$SECS" >> "$work/tlsdirect"
    run --tls "$work/data/ca.pem" --connect 127.0.0.1:13131 "https://$TLSUP/" "$CONNS" "$SECS" >> "$work/tlsmoat"
  done
  local d m
  d=$(median_rps "$work/tlsdirect"); m=$(median_rps "$work/tlsmoat")
  printf '%-22s median rps=%-7s runs: %s\n' "direct TLS" "$d" "$(field rps < "$work/tlsdirect" | tr '\n' ' ')"
  printf '%-22s median rps=%-7s runs: %s\n' "moat intercepting" "$m" "$(field rps < "$work/tlsmoat" | tr '\n' ' ')"
  echo "intercepted / direct TLS: $(awk -v m="$m" -v d="$d" 'BEGIN {printf "%.2f", m/d}')"
  echo "== first request (CONNECT + TLS handshake + GET) for a new host vs a cached host, 201 rounds"
  run first-request 127.0.0.1:13131 "$work/data/ca.pem" 201
  echo "leaf certificates generated: $(curl -s --unix-socket "$work/data/admin.sock" http://moat/metrics | awk '/^moat_tls_leaf_certificates_generated_total/ {print $2}')"
  echo "== $IDLE idle intercepted HTTPS connections (CONNECT, TLS, one request each, then held)"
  local before idler
  before=$(awk '/VmRSS/ {print $2}' /proc/$MOAT/status)
  run idle --tls "$work/data/ca.pem" --connect 127.0.0.1:13131 "https://$TLSUP/" "$IDLE" 4 > /dev/null &
  idler=$!
  sleep 3
  echo "moat RSS: $before kB before, $(awk '/VmRSS/ {print $2}' /proc/$MOAT/status) kB with them open"
  wait $idler
}
# The same handler, its requests sent (1) through the explicit proxy and (2) by a program in
# a sandbox (moat run, the load generator as its command) that knows no proxy: origin-form
# requests to an address on port 80, captured by the kernel to moat's transparent listener.
# `moat run` on this data folder hands its sandbox to the moat serving it, so one process
# serves both paths and its CPU per request compares directly.
sandbox_part() {
  echo "== sandbox: the same handler through the explicit proxy vs from inside moat run's sandbox"
  echo "   (transparent port 80), $CONNS connections, ${SECS}s per run, $ROUNDS rounds"
  : > "$work/sbx-explicit"; : > "$work/sbx-transparent"
  mkfifo "$work/sbx-out"
  local here
  here=$(pwd)
  for r in $(seq "$ROUNDS"); do
    run_cpu "$MOAT" 127.0.0.1:13132 "http://up.bench/" "$CONNS" "$SECS" >> "$work/sbx-explicit"
    MOAT_NO_DNS=1 RUST_LOG=warn "$BIN/moat" run --config "$work/moat.toml" --class sandbox --id bench --no-internet -- \
      sh -c "echo begin; $here/$BIN/examples/bench-load --origin 192.0.2.80:80 http://up.bench/ $CONNS $SECS; echo end" \
      > "$work/sbx-out" 2> "$work/sbx-run.log" &
    local runner=$! u0 p0 line n
    exec 3< "$work/sbx-out"
    read -r _ <&3
    u0=$(ticks "$UPSTREAM"); p0=$(ticks "$MOAT")
    read -r line <&3
    n=$(echo "$line" | field requests)
    awk -v l="$line" -v n="$n" -v u=$(( $(ticks "$UPSTREAM") - u0 )) -v p=$(( $(ticks "$MOAT") - p0 )) \
      'BEGIN {printf "%s upstream_cpu_us=%.2f proxy_cpu_us=%.2f\n", l, u * 10000 / n, p * 10000 / n}' >> "$work/sbx-transparent"
    read -r _ <&3 || true
    exec 3<&-
    wait "$runner" || { echo "moat run failed:"; cat "$work/sbx-run.log"; return 1; }
  done
  local e t le lt
  e=$(median_rps "$work/sbx-explicit"); t=$(median_rps "$work/sbx-transparent")
  le=$(grep "rps=$e" "$work/sbx-explicit" | head -1); lt=$(grep "rps=$t" "$work/sbx-transparent" | head -1)
  printf '%-22s median rps=%-7s proxy CPU/request %-6s µs  %s   runs: %s\n' "explicit proxy" "$e" "$(echo "$le" | field proxy_cpu_us)" \
    "$(echo "$le" | sed 's/.*\(p50_us=[0-9]* p99_us=[0-9]*\).*/\1/')" "$(field rps < "$work/sbx-explicit" | tr '\n' ' ')"
  printf '%-22s median rps=%-7s proxy CPU/request %-6s µs  %s   runs: %s\n' "sandbox (transparent)" "$t" "$(echo "$lt" | field proxy_cpu_us)" \
    "$(echo "$lt" | sed 's/.*\(p50_us=[0-9]* p99_us=[0-9]*\).*/\1/')" "$(field rps < "$work/sbx-transparent" | tr '\n' ' ')"
  echo "sandbox / explicit: requests/s $(awk -v t="$t" -v e="$e" 'BEGIN {printf "%.2f", t/e}') (target >= 0.90)," \
    "proxy CPU per request $(awk -v t="$(echo "$lt" | field proxy_cpu_us)" -v e="$(echo "$le" | field proxy_cpu_us)" 'BEGIN {printf "%.2f", t/e}') (target <= 1.10)"
}
# The peer: nginx + lua-nginx-module (LuaJIT) doing the handler path's job, at 1, 4 and 32
# connections, side by side with moat's handler and egress paths in the same run. The figure
# that compares on two shared cores is each proxy's own CPU per request (all its processes,
# from /proc over the load run only); requests/s also measures the load generator.
ensure_nginx() {
  [ -x /usr/sbin/nginx ] && [ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] && return 0
  echo "installing nginx-light and libnginx-mod-http-lua (Debian) for the peer"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-http-lua > /dev/null
}
# user and system ticks of every process given, summed: "USER SYS".
cpu_of() { awk '{u += $14; s += $15} END {print u, s}' $(for p in "$@"; do echo "/proc/$p/stat"; done); }
# run_cpu_of "PIDS" ARGS...: a closed-loop run and the CPU of every process in PIDS per request
# (in all, and in user space and in the kernel).
run_cpu_of() {
  local pids=$1; shift
  local before after line n
  before=$(cpu_of $pids)
  line=$(run "$@")
  after=$(cpu_of $pids)
  n=$(echo "$line" | field requests)
  awk -v l="$line" -v n="$n" -v b="$before" -v a="$after" 'BEGIN {
    split(b, x, " "); split(a, y, " "); u = y[1] - x[1]; s = y[2] - x[2]
    printf "%s proxy_cpu_us=%.2f proxy_user_us=%.2f proxy_sys_us=%.2f\n", l, (u + s) * 10000 / n, u * 10000 / n, s * 10000 / n
  }'
}
peer_part() {
  ensure_nginx
  mkdir -p "$work/nginx"
  sed -e "s|@WORK@|$work/nginx|g" -e "s|@LISTEN@|127.0.0.1:13140|" -e "s|@UPSTREAM@|$UP|" -e "s|@WORKERS@|${NGINX_WORKERS:-2}|" \
    bench/nginx-lua.conf > "$work/nginx/nginx.conf"
  /usr/sbin/nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g "daemon off;" 2> "$work/nginx/stderr" &
  local master=$!
  pids+=($master)
  for _ in $(seq 50); do curl -s -o /dev/null -x http://127.0.0.1:13140 "http://$UP/" && break; sleep 0.1; done
  local nginx_pids="$master $(pgrep -P "$master" | tr '\n' ' ')"
  echo "== peer: nginx $(/usr/sbin/nginx -v 2>&1 | sed 's|.*/||') + lua-nginx-module (LuaJIT), ${NGINX_WORKERS:-2} workers,"
  echo "   access_by_lua_block setting one header + proxy_pass with upstream keep-alive, vs moat's"
  echo "   handler (Request.new, one header set, fetch) and egress paths; ${SECS}s per run, $ROUNDS rounds,"
  echo "   median run; CPU = the proxy's own processes per request over the run"
  printf '%-12s %6s %8s %7s %7s %10s %8s %8s\n' path conns rps p50_us p99_us cpu_us/req user_us sys_us
  local conns path file
  for conns in 1 4 32; do
    for path in nginx-lua moat-handler moat-egress; do : > "$work/peer-$path-$conns"; done
    for r in $(seq "$ROUNDS"); do
      run_cpu_of "$nginx_pids" 127.0.0.1:13140 "http://$UP/" "$conns" "$SECS" >> "$work/peer-nginx-lua-$conns"
      run_cpu_of "$MOAT" 127.0.0.1:13129 "http://$UP/" "$conns" "$SECS" >> "$work/peer-moat-handler-$conns"
      run_cpu_of "$MOAT" 127.0.0.1:13128 "http://$UP/" "$conns" "$SECS" >> "$work/peer-moat-egress-$conns"
    done
    for path in nginx-lua moat-handler moat-egress; do
      file="$work/peer-$path-$conns"
      local line
      line=$(grep "rps=$(median_rps "$file")" "$file" | head -1)
      printf '%-12s %6s %8s %7s %7s %10s %8s %8s\n' "$path" "$conns" "$(echo "$line" | field rps)" "$(echo "$line" | field p50_us)" \
        "$(echo "$line" | field p99_us)" "$(echo "$line" | field proxy_cpu_us)" "$(echo "$line" | field proxy_user_us)" \
        "$(echo "$line" | field proxy_sys_us)"
      echo "$path $conns $(echo "$line" | field rps) $(echo "$line" | field proxy_cpu_us)" >> "$work/peer-summary"
    done
  done
  awk '
    { rps[$1 " " $2] = $3; cpu[$1 " " $2] = $4 }
    END {
      for (c = 0; c < 2; c++) {
        n = (c == 0) ? 4 : 32
        printf "at %2d conns: moat handler CPU/req = %.2f x nginx+lua (target <= 1.0); moat egress = %.2f x nginx+lua handler (target <= 0.7)\n", n, cpu["moat-handler " n] / cpu["nginx-lua " n], cpu["moat-egress " n] / cpu["nginx-lua " n]
      }
      printf "at 32 conns: moat handler requests/s = %.2f x nginx+lua (target >= 1.0)\n", rps["moat-handler 32"] / rps["nginx-lua 32"]
    }' "$work/peer-summary"
  instructions_part
  kill "$master" 2> /dev/null || true
}
# A callgrind file's instruction total, and what one unit (request, call) costs between two
# runs that made N1 and N2 of them: (total2 - total1) / count apart, without start-up.
cg_total() { sed -n 's/^summary: //p' "$1"; }
per_unit() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.0f", (b - a) / n}'; }
# Instructions per request of moat's handler and egress paths, from callgrind: a moat with
# one worker serves N1 then N2 requests in two runs; the difference over N2 - N1 is what one
# request costs, without start-up and without the machine's noise.
instructions_part() {
  command -v valgrind > /dev/null || { echo "(valgrind not installed: no instruction counts)"; return 0; }
  local n1=${N1:-1000} n2=${N2:-3000} path port n total out
  echo "== instructions per request (callgrind, one worker, ($n2 - $n1) requests, 4 connections)"
  for path in handler egress; do
    port=$([ "$path" = handler ] && echo 13229 || echo 13228)
    for n in "$n1" "$n2"; do
      out="$work/callgrind-$path-$n"
      mkdir -p "$work/cg-data-$path-$n"
      sed -e "s|$work/data|$work/cg-data-$path-$n|" -e "s|127.0.0.1:131|127.0.0.1:132|" "$work/moat.toml" > "$work/cg.toml"
      MOAT_NO_DNS=1 RUST_LOG=warn MOAT_WORKERS=1 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN/moat" serve --config "$work/cg.toml" > "$out.log" 2> "$out.err" &
      local vg=$!
      for _ in $(seq 300); do grep -q "listening on 127.0.0.1:$port" "$out.log" 2> /dev/null && break; sleep 0.2; done
      run count "127.0.0.1:$port" "http://$UP/" 4 "$n" > /dev/null
      kill -TERM "$vg"; wait "$vg" 2> /dev/null || true
    done
    total=$(per_unit "$(cg_total "$work/callgrind-$path-$n1")" "$(cg_total "$work/callgrind-$path-$n2")" $(( n2 - n1 )))
    printf 'moat %-8s %s instructions per request\n' "$path" "$total"
  done
  # The peer, counted the same way: nginx without a master process, one worker. LuaJIT
  # writes machine code at run time, which callgrind follows only with --smc-check=all.
  [ -x /usr/sbin/nginx ] || { echo "(nginx not installed: no peer count)"; return 0; }
  local counts=()
  for n in "$n1" "$n2"; do
    local dir="$work/cg-nginx-$n"
    mkdir -p "$dir"
    sed -e "s|@WORK@|$dir|g" -e "s|@LISTEN@|127.0.0.1:13240|" -e "s|@UPSTREAM@|$UP|" -e "s|@WORKERS@|1|" \
      bench/nginx-lua.conf > "$dir/nginx.conf"
    echo "master_process off;" >> "$dir/nginx.conf"
    valgrind --tool=callgrind --smc-check=all --callgrind-out-file="$dir/cg.out" \
      /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -g "daemon off;" 2> "$dir/stderr" &
    local vg=$!
    for _ in $(seq 300); do curl -s -o /dev/null -x http://127.0.0.1:13240 "http://$UP/" && break; sleep 0.2; done
    run count 127.0.0.1:13240 "http://$UP/" 4 "$n" > /dev/null
    kill -QUIT "$vg"; wait "$vg" 2> /dev/null || true
    counts+=("$(cg_total "$dir/cg.out")")
  done
  # The warm-up request above is in both runs, so it cancels out like start-up does.
  local peer
  peer=$(per_unit "${counts[0]}" "${counts[1]}" $(( n2 - n1 )))
  printf 'nginx+lua         %s instructions per request (the peer, same job as moat handler)\n' "$peer"
  lua_floor_count "$peer"
}
# The handler's Lua side alone on bare mlua and Lua 5.4, with no moat code and no HTTP
# (bench/lua_floor.rs): what any handler call of this shape costs under SPEC's Lua 5.4 and
# its CPU limit's count hook, set against the peer's whole request.
lua_floor_count() {
  local peer=$1 n1=2000 n2=6000 counts=() n
  for n in "$n1" "$n2"; do
    valgrind --tool=callgrind --callgrind-out-file="$work/callgrind-floor-$n" \
      "$BIN/examples/bench-lua-call" floor-fetch "$n" > /dev/null 2>&1
    counts+=("$(cg_total "$work/callgrind-floor-$n")")
  done
  # Each run also makes a tenth of its calls as warm-up: 1.1 * (n2 - n1) calls apart.
  awk -v f="$(per_unit "${counts[0]}" "${counts[1]}" $(( (n2 - n1) * 11 / 10 )))" -v peer="$peer" 'BEGIN {
    printf "lua floor         %.0f instructions per call (mlua + Lua 5.4 with the count hook: the bench handler, fetch ready at once, no HTTP)\n", f
    printf "                  = %.2f x nginx+lua'"'"'s whole request, before moat parses, sends or receives a byte\n", f / peer
  }'
}
# The p99 latency each moat path adds at RATE req/s over direct: ROUNDS rounds, each path's
# added p99 taken against that round's direct run, the median round reported. With
# BASELINE=path/to/another/moat (a build of another commit), that moat serves the same classes
# on other ports and its runs alternate with this one's, so the machine's noise hits both
# alike: a change's effect on latency, judged in one run.
open_loop_part() {
  local paths=(egress handler) r p
  if [ -n "${BASELINE:-}" ]; then
    sed -e "s|$work/data|$work/base-data|" -e "s|127.0.0.1:131|127.0.0.1:133|" "$work/moat.toml" > "$work/base.toml"
    MOAT_NO_DNS=1 RUST_LOG=warn "$BASELINE" serve --config "$work/base.toml" > "$work/base.out" 2> "$work/base.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on 127.0.0.1:13329" "$work/base.out" "$work/base.log" 2> /dev/null && break; sleep 0.1; done
    paths+=(base-egress base-handler)
  fi
  echo "== open loop at $RATE req/s, $CONNS connections, ${SECS}s per run, $ROUNDS rounds${BASELINE:+ (baseline: $BASELINE)}"
  : > "$work/ol-direct"; for p in "${paths[@]}"; do : > "$work/ol-$p"; done
  for r in $(seq "$ROUNDS"); do
    local d; d=$(run "$UP" "http://$UP/" "$CONNS" "$SECS" "$RATE" | tee -a "$work/ol-direct" | field p99_us)
    # Every other round runs the paths in reverse order: none always runs first after direct.
    local order=("${paths[@]}")
    [ $(( r % 2 )) = 0 ] && order=($(printf '%s\n' "${paths[@]}" | tac))
    for p in "${order[@]}"; do
      local port; port=$(case $p in egress) echo 13128;; handler) echo 13129;; base-egress) echo 13328;; base-handler) echo 13329;; esac)
      run "127.0.0.1:$port" "http://$UP/" "$CONNS" "$SECS" "$RATE" | awk -v d="$d" '{print} {sub(/.*p99_us=/, ""); print "added=" $1 - d}' >> "$work/ol-$p"
    done
  done
  printf '%-13s p99 (µs) per round: %s median %s\n' direct "$(field p99_us < "$work/ol-direct" | tr '\n' ' ')" \
    "$(field p99_us < "$work/ol-direct" | middle)"
  for p in "${paths[@]}"; do
    local added; added=$(sed -n 's/^added=//p' "$work/ol-$p")
    printf '%-13s p99 added (µs) per round: %s median %s\n' "$p" "$(echo "$added" | tr '\n' ' ')" "$(echo "$added" | middle)"
  done
}
# KV-reading handlers with the namespace in moat's redb file and in a shared PostgreSQL
# database (a second moat, [kv] KV = { backend = "postgres" }), in one run: a hot key's get
# (answered from moat's cache on both, which a shared database keeps exact through its
# notifications), and a list (a store round trip on every request).
shared_part() {
  local bin; bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -1)
  [ -n "$bin" ] || { echo "== shared store: skipped (no PostgreSQL server; apt-get install postgresql)"; return; }
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  mkdir -p "$work/pg"; echo bench-pg-pass > "$work/pgpw"
  [ "$(id -u)" = 0 ] && chown -R postgres "$work/pg" "$work/pgpw" && chmod 755 "$work"
  "${as[@]}" "$bin/initdb" -D "$work/pg" -U moat --auth=scram-sha-256 --pwfile="$work/pgpw" --no-sync > /dev/null
  "${as[@]}" "$bin/postgres" -D "$work/pg" -p 15432 -k "$work/pg" -c listen_addresses=127.0.0.1 > "$work/pg.log" 2>&1 &
  for _ in $(seq 100); do PGPASSWORD=bench-pg-pass psql -h 127.0.0.1 -p 15432 -U moat -d postgres -c 'select 1' > /dev/null 2>&1 && break; sleep 0.1; done
  cat > "$work/moat-pg.toml" <<TOML
data_dir = "$work/data-pg"
[kv]
KV = { backend = "postgres", url_env = "BENCH_PG_URL" }
[[class]]
name = "kv"
policy = "$work/kv.lua"
listen = "127.0.0.1:13133"
TOML
  BENCH_PG_URL=postgres://moat:bench-pg-pass@127.0.0.1:15432/postgres MOAT_NO_DNS=1 RUST_LOG=warn \
    MOAT_WORKERS=${MOAT_WORKERS:-} "$BIN/moat" serve --config "$work/moat-pg.toml" > /dev/null 2> "$work/moat-pg.log" &
  local pgmoat=$!
  pids+=($pgmoat)
  sleep 1
  for port in 13130 13133; do
    curl -s --noproxy '' -x "http://127.0.0.1:$port" -X PUT --data 'hello, moat!' http://my.kv/greeting > /dev/null
  done
  echo "== KV-reading handler, namespace in redb vs in PostgreSQL: $CONNS connections, ${SECS}s per run, $ROUNDS rounds"
  local r
  for f in redb-get pg-get redb-list pg-list; do : > "$work/$f"; done
  for r in $(seq "$ROUNDS"); do
    run_cpu "$MOAT" 127.0.0.1:13130 "http://my.kv/greeting" "$CONNS" "$SECS" >> "$work/redb-get"
    run_cpu "$pgmoat" 127.0.0.1:13133 "http://my.kv/greeting" "$CONNS" "$SECS" >> "$work/pg-get"
    run_cpu "$MOAT" 127.0.0.1:13130 "http://list.kv/" "$CONNS" "$SECS" >> "$work/redb-list"
    run_cpu "$pgmoat" 127.0.0.1:13133 "http://list.kv/" "$CONNS" "$SECS" >> "$work/pg-list"
  done
  for f in redb-get pg-get redb-list pg-list; do
    local line; line=$(grep "rps=$(median_rps "$work/$f")" "$work/$f" | head -1)
    printf '%-10s rps=%-7s p50_us=%-6s p99_us=%-6s proxy_cpu_us=%s\n' "$f" "$(echo "$line" | field rps)" \
      "$(echo "$line" | field p50_us)" "$(echo "$line" | field p99_us)" "$(echo "$line" | field proxy_cpu_us)"
  done
  echo "   (proxy_cpu_us: moat's own CPU; PostgreSQL's is not in it)"
}

if [ "${ONLY:-}" = shared ]; then
  shared_part
  exit 0
fi
if [ "${ONLY:-}" = ir ]; then
  ensure_nginx
  instructions_part
  exit 0
fi
if [ "${ONLY:-}" = peer ]; then
  peer_part
  exit 0
fi
if [ "${ONLY:-}" = https ]; then
  https_part
  exit 0
fi
if [ "${ONLY:-}" = p99 ]; then
  open_loop_part
  exit 0
fi
if [ "${ONLY:-}" = sandbox ]; then
  sandbox_part
  exit 0
fi

# First of all, on the fresh instance: the handler path at RATE req/s. A moat that was just
# started (or restarted) meets its first load like this; stalls that warm-up hides (the
# allocator taking fresh memory from the kernel) show here and not in the later open loop.
fresh=$(run 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS" "$RATE")

echo "== closed loop: $CONNS keep-alive connections, ${SECS}s per run, $ROUNDS rounds of direct/relay/egress/handler"
echo "   (runs alternate so that machine noise hits every path alike; the median run is reported;"
echo "   relay = a proxy that only copies bytes: the most any proxy can reach on this machine)"
: > "$work/direct"; : > "$work/relay"; : > "$work/egress"; : > "$work/handler"
for r in $(seq "$ROUNDS"); do
  run_cpu - "$UP" "http://$UP/" "$CONNS" "$SECS" >> "$work/direct"
  run_cpu "$RELAYPID" "$RELAY" "http://$UP/" "$CONNS" "$SECS" >> "$work/relay"
  run_cpu "$MOAT" 127.0.0.1:13128 "http://$UP/" "$CONNS" "$SECS" >> "$work/egress"
  run_cpu "$MOAT" 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS" >> "$work/handler"
done
d=$(median_rps "$work/direct"); c=$(median_rps "$work/relay")
for path in direct relay egress handler; do
  m=$(median_rps "$work/$path")
  printf '%-9s median rps=%-7s ratio=%.2f  of relay=%.2f   runs: %s\n' "$path" "$m" "$(awk -v m="$m" -v d="$d" 'BEGIN {print m/d}')" "$(awk -v m="$m" -v c="$c" 'BEGIN {print m/c}')" "$(field rps < "$work/$path" | tr '\n' ' ')"
done
for path in direct relay egress handler; do
  printf '%-9s latency of the median run: %s\n' "$path" "$(grep "rps=$(median_rps "$work/$path")" "$work/$path" | head -1 | sed 's/.*\(p50_us=[0-9]* p99_us=[0-9]*\).*/\1/')"
done
echo "CPU per request (µs, median run; a proxy handles two connections per request, so a pure"
echo "relay costs about what the load generator and the upstream cost together):"
for path in direct relay egress handler; do
  line=$(grep "rps=$(median_rps "$work/$path")" "$work/$path" | head -1)
  printf '%-9s load generator %-6s upstream %-6s proxy %s\n' "$path" "$(echo "$line" | field loadgen_cpu_us)" "$(echo "$line" | field upstream_cpu_us)" "$(echo "$line" | field proxy_cpu_us)"
done

# Each set of connections makes one request through the handler path and is held, then
# closed before the next set opens: RSS should not climb from set to set (objects a handler
# call leaves to Lua's collector must not keep connection buffers alive).
IDLE_SETS=${IDLE_SETS:-4}
idle_rss() {
  echo "== $IDLE idle keep-alive connections ($1), $IDLE_SETS sets one after another"
  local sizes=""
  for _ in $(seq "$IDLE_SETS"); do
    run idle 127.0.0.1:13129 "http://$UP/" "$IDLE" 3 > /dev/null &
    local idler=$!
    sleep 2
    sizes="$sizes $(awk '/VmRSS/ {print $2}' /proc/$MOAT/status)"
    wait $idler
  done
  echo "moat RSS with $IDLE idle connections (kB, each set):$sizes"
}
idle_rss "after the closed-loop runs"

echo "== egress with the access log on (moat's default; the runs above have it off), ${SECS}s, $ROUNDS rounds"
# A second instance: the log level is per process. Its log goes to a file, as in production.
cat > "$work/logged.toml" <<TOML
data_dir = "$work/data-logged"
[[class]]
name = "egress"
policy = "$work/egress.lua"
listen = "127.0.0.1:13138"
TOML
MOAT_NO_DNS=1 RUST_LOG=info "$BIN/moat" serve --config "$work/logged.toml" > /dev/null 2> "$work/logged.log" &
LOGGED=$!
pids+=($LOGGED)
sleep 1
: > "$work/logged"
for r in $(seq "$ROUNDS"); do
  run_cpu "$LOGGED" 127.0.0.1:13138 "http://$UP/" "$CONNS" "$SECS" >> "$work/logged"
done
kill "$LOGGED" 2>/dev/null || true
l=$(median_rps "$work/logged")
line=$(grep "rps=$l" "$work/logged" | head -1)
printf 'egress, access log on  median rps=%-7s ratio=%.2f  proxy CPU per request %s µs   (%s lines logged)\n' "$l" \
  "$(awk -v m="$l" -v d="$d" 'BEGIN {print m/d}')" "$(echo "$line" | field proxy_cpu_us)" "$(grep -c 'access' "$work/logged.log" || true)"
rm -f "$work/logged.log"

open_loop_part
p99d=$(field p99_us < "$work/ol-direct" | middle)
echo "handler on the fresh instance (the first run of all): $fresh"
echo "p99 added on the fresh instance: handler $(( $(echo "$fresh" | field p99_us) - p99d )) us"

echo "== handler path while the policy is saved once a second (hot reload), ${SECS}s each, $ROUNDS rounds"
echo "   (quiet and saving runs alternate, so that the machine's drift hits both alike)"
: > "$work/quiet"; : > "$work/busy"
for r in $(seq "$ROUNDS"); do
  run 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS" >> "$work/quiet"
  ( for i in $(seq "$SECS"); do sleep 1; sed -i "1s/.*/-- saved $r.$i/" "$work/handler.lua"; done ) &
  saver=$!
  run 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS" >> "$work/busy"
  wait $saver
done
q=$(median_rps "$work/quiet"); b=$(median_rps "$work/busy")
printf '%-26s median rps=%-7s runs: %s\n' "handler, no reloads" "$q" "$(field rps < "$work/quiet" | tr '\n' ' ')" \
  "handler, 1 save/s" "$b" "$(field rps < "$work/busy" | tr '\n' ' ')"
echo "with reloads / without: $(awk -v b="$b" -v q="$q" 'BEGIN {printf "%.2f", b/q}')   (reloads seen: $(grep -c 'policy reloaded' "$work/moat.log" || true))"

echo "== handler answering from KV vs a constant handler, ${SECS}s each, $ROUNDS rounds"
curl -s --noproxy '' -x http://127.0.0.1:13130 -X PUT --data 'hello, moat!' http://my.kv/greeting > /dev/null
: > "$work/const"; : > "$work/kvread"
for r in $(seq "$ROUNDS"); do
  run 127.0.0.1:13130 "http://const.test/" "$CONNS" "$SECS" >> "$work/const"
  run 127.0.0.1:13130 "http://my.kv/greeting" "$CONNS" "$SECS" >> "$work/kvread"
done
c=$(median_rps "$work/const"); k=$(median_rps "$work/kvread")
echo "constant handler median rps=$c   KV read median rps=$k   ratio=$(awk -v k="$k" -v c="$c" 'BEGIN {printf "%.2f", k/c}')"

idle_rss "at the end, after the reloads under load and the KV runs"
echo "moat peak RSS (plain HTTP parts): $(awk '/VmHWM/ {print $2, $3}' /proc/$MOAT/status)"

sandbox_part
https_part
echo "moat peak RSS (whole run): $(awk '/VmHWM/ {print $2, $3}' /proc/$MOAT/status)"
peer_part
shared_part
