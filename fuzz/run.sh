#!/usr/bin/env bash
# Runs every fuzz target (or those named in FUZZ_TARGETS) for N seconds each, one after
# another: fuzz/run.sh [seconds]  (default 600). Installs cargo-fuzz if it is missing.
#
# Stable Rust is enough: cargo-fuzz passes nightly-only flags (-Zsanitizer=address, the
# sanitizer-coverage passes), which a stable rustc accepts under RUSTC_BOOTSTRAP=1 for this
# build only. New inputs go into fuzz/corpus/<target>/ (minimise with `cargo fuzz cmin`);
# a crash stops the run with its input in fuzz/artifacts/<target>/ and exits 1.
#
# Environment: FUZZ_TARGETS (space-separated; default all four), FUZZ_SANITIZER (address |
# none; default address), FUZZ_PROFILE (release | dev; default release: dev builds in a
# fraction of the time and runs slower, for short runs), FUZZ_LOG (a file to append each
# target's closing figures to).
set -euo pipefail

SECONDS_PER_TARGET="${1:-600}"
TARGETS="${FUZZ_TARGETS:-schema_decode packet_framing proxy_header rule_parse}"
SANITIZER="${FUZZ_SANITIZER:-address}"
PROFILE="${FUZZ_PROFILE:-release}"
CARGO_FUZZ_VERSION="0.13.2"

if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
  echo "usage: $0 [seconds per target, default 600]" >&2
  exit 64
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup, stable) first" >&2
  exit 69
fi
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found: installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_INCREMENTAL=0
FLAGS=(--sanitizer "$SANITIZER")
# Only rule_parse needs the backend, the longest build by far.
if [[ " $TARGETS " == *" rule_parse "* ]]; then FLAGS+=(--features backend); fi
case "$PROFILE" in
  release) ;;
  dev) FLAGS+=(--dev) ;;
  *) echo "FUZZ_PROFILE is release or dev, not $PROFILE" >&2; exit 64 ;;
esac

start=$(date +%s)
# shellcheck disable=SC2086 # TARGETS is a word list
for target in $TARGETS; do
  cargo fuzz build "${FLAGS[@]}" "$target"
done
echo "build: $(($(date +%s) - start)) s"

for target in $TARGETS; do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  echo "== $target: ${SECONDS_PER_TARGET} s"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: libFuzzer's default.
  if ! cargo fuzz run "${FLAGS[@]}" "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "$target: the fuzzer stopped on a failure; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  summary="$(grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$log" | tr '\n' ' ' || true)"
  files="$(find "corpus/$target" -type f | wc -l)"
  bytes="$(du -sk "corpus/$target" | cut -f1)"
  line="$target: ${SECONDS_PER_TARGET} s; $summary; corpus ${files} files, ${bytes} KiB"
  echo "$line"
  if [ -n "${FUZZ_LOG:-}" ]; then echo "$(date -u +%FT%TZ) $line" >>"$FUZZ_LOG"; fi
  rm -f "$log"
done
echo "fuzz: ${TARGETS// /, }: no crash in ${SECONDS_PER_TARGET} s each ($(($(date +%s) - start)) s with the build)"
