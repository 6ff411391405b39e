#!/usr/bin/env bash
# Measures the agent's CPU (% of one core) and RSS while idle, while streaming a push-to-talk
# utterance, and while playing a reply, with simulated hardware against the local stand-in
# server (examples/local_server.rs: the real broker crate + a backend double), over TLS.
#
# Usage: agent/scripts/measure.sh [seconds-per-phase]   (release build; CARGO_TARGET_DIR honoured)
set -euo pipefail

secs="${1:-20}"
for tool in cargo python3 getconf; do
  command -v "$tool" >/dev/null || { echo "measure.sh: $tool is needed" >&2; exit 1; }
done
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p companion-agent --bin companion-agent --example local_server)

work="$(mktemp -d)"
server_pid=""; agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$target/release/examples/local_server" --devices 1 --reply-s $((secs + 10)) --dir "$work/server" >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 100); do grep -q '^internal_pass=' "$work/server.out" 2>/dev/null && break; sleep 0.1; done
tls="$(sed -n 's/^tls=//p' "$work/server.out")"
ca="$(sed -n 's/^ca=//p' "$work/server.out")"
IFS=, read -r device token <"$work/server/credentials.csv"

cat >"$work/agent.env" <<ENV
DEVICE_ID=$device
CONTROL_PLANE_URL=mqtts://localhost:${tls##*:}
DEVICE_AUTH_TOKEN=$token
CA_CERT=$ca
CACHE_DIR=$work/cache
ENV
RUST_LOG=info "$target/release/companion-agent" --env-file "$work/agent.env" --hardware sim \
  --button-socket "$work/buttons.sock" --speaker-dir "$work" 2>"$work/agent.err" &
agent_pid=$!
for _ in $(seq 100); do grep -q 'connected' "$work/agent.err" 2>/dev/null && break; sleep 0.1; done
grep -q 'connected' "$work/agent.err" || { echo "the agent did not connect" >&2; cat "$work/agent.err" >&2; exit 1; }

tck="$(getconf CLK_TCK)"
button() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall((sys.argv[2]+"\n").encode()); s.close()' "$work/buttons.sock" "$1"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent_pid/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$agent_pid/status"; }
phase() {
  local name="$1" t0 t1 rss max=0
  t0="$(cpu_ticks)"
  for _ in $(seq "$secs"); do
    sleep 1
    rss="$(rss_kib)"; [ "$rss" -gt "$max" ] && max="$rss"
  done
  t1="$(cpu_ticks)"
  awk -v n="$name" -v d=$((t1 - t0)) -v hz="$tck" -v s="$secs" -v m="$max" \
    'BEGIN { printf "%-28s cpu %5.2f%% of one core   max RSS %5.1f MiB\n", n, 100 * d / hz / s, m / 1024 }'
}

sleep 2
phase "idle (connected)"
button "talk press"
phase "streaming (push-to-talk)"
button "talk release"
sleep 1
phase "playing a reply"
sleep 12
echo "agent log: $(grep -c 'utterance sent' "$work/agent.err") utterance(s) sent, $(grep -c 'reply played' "$work/agent.err") reply(ies) played, $(grep -c 'WARN\|ERROR' "$work/agent.err") warnings/errors"
