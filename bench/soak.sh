#!/usr/bin/env bash
# moat soak: a mixed load (plain egress, intercepted HTTPS, a KV handler, WebSockets) for a
# bounded time on loopback, while the policy is saved every 3 s and a container's overrides
# change; reports failed requests, RSS and descriptors over time (bench/soak.py).
#   bash bench/soak.sh           # SECS=1800 by default
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-1800}
cargo build --release --quiet --bin moat
exec python3 bench/soak.py target/release/moat "$SECS"
