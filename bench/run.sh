#!/usr/bin/env bash
# moat benchmark: direct vs through moat, on loopback only, bounded in time.
#   bash bench/run.sh            (SECONDS=10 CONNS=32 by default)
# Prints requests/s, p50/p99 latency, the ratio of each path to direct, the p99 added at a
# fixed 2,000 req/s, and moat's RSS (with 1,000 idle keep-alive connections, and peak).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-10}
CONNS=${CONNS:-32}
RATE=${RATE:-2000}
IDLE=${IDLE:-1000}

cargo build --release --quiet --bin moat --example bench-upstream --example bench-load
BIN=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

UP=127.0.0.1:18080
"$BIN/examples/bench-upstream" "$UP" > "$work/up.log" 2>&1 &
pids+=($!)

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
cat > "$work/moat.toml" <<TOML
data_dir = "$work/data"
[[class]]
name = "egress"
policy = "$work/egress.lua"
listen = "127.0.0.1:13128"
[[class]]
name = "handler"
policy = "$work/handler.lua"
listen = "127.0.0.1:13129"
TOML
RUST_LOG=warn MOAT_WORKERS=${MOAT_WORKERS:-} "$BIN/moat" serve --config "$work/moat.toml" > "$work/moat.out" 2> "$work/moat.log" &
MOAT=$!
pids+=($MOAT)
sleep 1

run() { "$BIN/examples/bench-load" "$@"; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

echo "== closed loop: $CONNS keep-alive connections, ${SECS}s each, 13-byte responses"
direct=$(run "$UP" "http://$UP/" "$CONNS" "$SECS")
egress=$(run 127.0.0.1:13128 "http://$UP/" "$CONNS" "$SECS")
handler=$(run 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS")
d=$(echo "$direct" | field rps)
printf '%-26s %s\n' "direct" "$direct"
printf '%-26s %s ratio=%.2f\n' "moat egress" "$egress" "$(echo "$egress" | field rps | awk -v d="$d" '{print $1/d}')"
printf '%-26s %s ratio=%.2f\n' "moat handler" "$handler" "$(echo "$handler" | field rps | awk -v d="$d" '{print $1/d}')"

echo "== open loop at $RATE req/s, $CONNS connections, ${SECS}s"
rd=$(run "$UP" "http://$UP/" "$CONNS" "$SECS" "$RATE")
re=$(run 127.0.0.1:13128 "http://$UP/" "$CONNS" "$SECS" "$RATE")
rh=$(run 127.0.0.1:13129 "http://$UP/" "$CONNS" "$SECS" "$RATE")
printf '%-26s %s\n' "direct @${RATE}" "$rd" "moat egress @${RATE}" "$re" "moat handler @${RATE}" "$rh"
p99d=$(echo "$rd" | field p99_us)
echo "p99 added: egress $(( $(echo "$re" | field p99_us) - p99d )) us, handler $(( $(echo "$rh" | field p99_us) - p99d )) us"

echo "== $IDLE idle keep-alive connections"
run idle 127.0.0.1:13129 "http://$UP/" "$IDLE" 3 &
idler=$!
sleep 2
echo "moat RSS with $IDLE idle connections: $(awk '/VmRSS/ {print $2, $3}' /proc/$MOAT/status)"
wait $idler
echo "moat peak RSS (whole run): $(awk '/VmHWM/ {print $2, $3}' /proc/$MOAT/status)"
