#!/usr/bin/env bash
# Fuzzes every target (or those named) for SECS seconds each with cargo-fuzz (nightly,
# libFuzzer, AddressSanitizer). New inputs go to a scratch corpus in a temporary folder;
# the committed seeds in corpus/ are read, never written. Prints one line per target:
# executions, coverage reached and corpus size. Exits non-zero on the first crash, leaving
# the crashing input under fuzz/artifacts/TARGET/ (turn it into a seed and a unit test).
#
#   bash fuzz/run.sh            # 10 minutes each
#   SECS=20 bash fuzz/run.sh http_head chunked_body
set -euo pipefail
cd "$(dirname "$0")"
SECS=${SECS:-600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
triple=$(rustc -vV | sed -n "s/^host: //p")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if ! cargo +nightly fuzz build >"$scratch/build.log" 2>&1; then
  tail -30 "$scratch/build.log"
  echo "fuzz: the targets did not build"
  exit 1
fi
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  log="$scratch/$t.log"
  # A Lua state keeps what it allocated until its collector runs, which LeakSanitizer would
  # take for a leak and rescan the heap after every input (100x slower).
  case $t in stdlib_codecs | url_new) leaks=0 ;; *) leaks=1 ;; esac
  # The binary cargo-fuzz built, run directly: `cargo fuzz run` would rebuild the targets
  # whenever moat's sources change while a long run goes on.
  if ! "target/$triple/release/$t" -artifact_prefix="artifacts/$t/" "$scratch/$t" "corpus/$t" \
      -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -detect_leaks=$leaks >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz $t: CRASH (input under fuzz/artifacts/$t/)"
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  echo "fuzz $t: ${SECS}s, $execs executions, cov $cov, ft $ft, corpus $(ls "$scratch/$t" | wc -l) new + $(ls "corpus/$t" | wc -l) seeds, no crash"
done
