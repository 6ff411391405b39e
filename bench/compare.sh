#!/usr/bin/env bash
# Same load, same run, two servers: Mosquitto 2 over TLS with one subscriber on
# devices/+/telemetry, then the whole `companion serve` (telemetry stored, rules run, the
# backend as the subscriber). Load: `companion-agent fleet`, TLS devices with real
# subscriptions, QoS 1 telemetry. Prints each server's CPU seconds per million acknowledged
# messages, RSS, loss, and the ratio. Then (FLEET_DEVICES > 0) the scale run: that many TLS
# devices against `companion serve` with persona presses, connected over FLEET_RAMP seconds.
#
#   bench/compare.sh                       # 1,000 devices x 10 msg/s for 60 s, then 10,000 devices
#   DEVICES=200 SECS=20 FLEET_DEVICES=0 bench/compare.sh   # a short throughput run only
#   DEVICES=0 bench/compare.sh                              # the scale run only
#   ROUNDS=5 DEVICES=1000 SECS=30 FLEET_DEVICES=0 bench/compare.sh  # 5 paired rounds, median
#
# Knobs: DEVICES (1000), INTERVAL_MS (100: 10 msg/s each), SECS (60), RAMP (10), ROUNDS (1:
# the throughput run is repeated, Mosquitto then Companion each round, and the median ratio
# printed: on a shared 2-core VM one server's CPU per message varies by +-20 % from run to
# run, the ratio within a round much less),
# FLEET_DEVICES (10000), FLEET_RAMP (50), FLEET_SECS (60), FLEET_TELEMETRY_MS (30000),
# FLEET_PERSONA_S (60), FLEET_TRANSPORTS ("mqtts"; "mqtts wss" runs the scale run once per
# transport, wss being MQTT over WebSocket over TLS). Everything listens on 127.0.0.1 (ports
# picked free); the run stops by itself.
set -euo pipefail

DEVICES="${DEVICES:-1000}"
INTERVAL_MS="${INTERVAL_MS:-100}"
SECS="${SECS:-60}"
RAMP="${RAMP:-10}"
ROUNDS="${ROUNDS:-1}"
FLEET_DEVICES="${FLEET_DEVICES:-10000}"
FLEET_RAMP="${FLEET_RAMP:-50}"
FLEET_SECS="${FLEET_SECS:-60}"
FLEET_TELEMETRY_MS="${FLEET_TELEMETRY_MS:-30000}"
FLEET_PERSONA_S="${FLEET_PERSONA_S:-60}"
FLEET_TRANSPORTS="${FLEET_TRANSPORTS:-mqtts}"

for tool in mosquitto curl python3 awk; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
    echo "compare.sh needs $tool (apt-get install -y mosquitto curl python3)" >&2
    exit 69
  }
done
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p companion-backend -p companion-agent)
companion="$target/release/companion"
agent="$target/release/companion-agent"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# 10,000 devices need more than the usual 1,024 descriptors (server and fleet each).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# utime + stime in seconds; the command name has no spaces for either server.
cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
wait_http() {
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  exit 1
}
wait_tcp() {
  for _ in $(seq 1 200); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}
metric() { # metric URL NAME -> value of the first sample line starting with NAME
  curl -fsS "$1" | awk -v n="$2" 'index($0, n) == 1 && !done {print $NF; done = 1}'
}
field() { # field FILE LABEL COLUMN -> a number from the fleet report
  awk -v l="$2" -v c="$3" 'index($0, l) == 1 && !done {print $c; done = 1}' "$1"
}

# --- companion serve: data dir, devices, server ------------------------------------------
export COMPANION_DATA_DIR="$work/companion"
export RUST_LOG="${RUST_LOG:-warn}"
http_port="$(free_port)"
mqtts_port="$(free_port)"
wss_port="$(free_port)"
export COMPANION_HTTP__LISTEN="127.0.0.1:$http_port"
export COMPANION_MQTT__LISTEN=""
export COMPANION_MQTT__TLS_LISTEN="127.0.0.1:$mqtts_port"
export COMPANION_MQTT__WS_LISTEN=""
export COMPANION_MQTT__WSS_LISTEN="127.0.0.1:$wss_port"
export COMPANION_MQTT__MAX_CONNECTIONS=$(( (DEVICES > FLEET_DEVICES ? DEVICES : FLEET_DEVICES) + 100 ))
# The fleet sends 10 msg/s per device in the throughput run: above the default control
# limit's burst only if INTERVAL_MS < 50.
max_devices=$(( DEVICES > FLEET_DEVICES ? DEVICES : FLEET_DEVICES ))
"$companion" devices bulk-create --count "$max_devices" --out "$work/creds.csv" >/dev/null

start_companion() {
  # Every run starts from the same data: the fleet's sequence numbers start at 1 each run, and
  # a server that stored higher ones from an earlier run acknowledges them as copies without
  # storing them (a round after the first measured that instead of the store path).
  if [ -d "$work/pristine" ]; then
    rm -rf "$COMPANION_DATA_DIR"
    cp -a "$work/pristine" "$COMPANION_DATA_DIR"
  fi
  "$companion" serve >"$work/companion.log" 2>&1 &
  companion_pid=$!
  pids+=("$companion_pid")
  wait_http "http://127.0.0.1:$http_port/ready"
}
stop_companion() {
  kill -TERM "$companion_pid"
  wait "$companion_pid" 2>/dev/null || true
}

# --- Mosquitto over TLS, with the same certificate, plus a loopback listener for the subscriber
start_companion
stop_companion # it generated data/tls/ (CA and server certificate) for both servers
cp -a "$COMPANION_DATA_DIR" "$work/pristine"
tls="$COMPANION_DATA_DIR/tls"
mq_tls="$(free_port)"
mq_plain="$(free_port)"
cat >"$work/mosquitto.conf" <<CONF
# Run as whoever runs the bench (as root it would switch to "mosquitto", who cannot read the
# bench's private directory).
user $(id -un)
per_listener_settings false
allow_anonymous true
persistence false
log_type error
max_queued_messages 100000
max_inflight_messages 100
set_tcp_nodelay true
listener $mq_plain 127.0.0.1
listener $mq_tls 127.0.0.1
cafile $tls/ca.pem
certfile $tls/server.pem
keyfile $tls/server.key
CONF

fleet() { # fleet OUT URL DEVICES INTERVAL SECS RAMP PERSONA [observer args...]
  local out="$1" url="$2" n="$3" interval="$4" secs="$5" ramp="$6" persona="$7"
  shift 7
  "$agent" fleet --devices "$n" --telemetry-interval-ms "$interval" --talkers 0 \
    --duration "$secs" --ramp-s "$ramp" --persona-every-s "$persona" \
    --credentials "$work/creds.csv" --url "$url" --ca-cert "$tls/ca.pem" --quiet "$@" >"$out" 2>&1
}

ratios=()
throughput_round() {
  "$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
  mq_pid=$!
  pids+=("$mq_pid")
  wait_tcp "$mq_tls"
  mq_cpu0="$(cpu_s "$mq_pid")"
  fleet "$work/fleet-mosquitto.txt" "mqtts://localhost:$mq_tls" "$DEVICES" "$INTERVAL_MS" "$SECS" "$RAMP" 0 \
    --observe-addr "127.0.0.1:$mq_plain" --observe-user bench --observe-pass bench
  mq_cpu="$(awk -v a="$mq_cpu0" -v b="$(cpu_s "$mq_pid")" 'BEGIN {printf "%.2f", b - a}')"
  mq_rss="$(rss_kib "$mq_pid")"
  mq_acked="$(field "$work/fleet-mosquitto.txt" "telemetry (puback)" 4)"
  mq_seen="$(field "$work/fleet-mosquitto.txt" "telemetry (observed)" 4)"
  kill "$mq_pid"
  wait "$mq_pid" 2>/dev/null || true

  start_companion
  url="http://127.0.0.1:$http_port/metrics"
  c_rss0="$(rss_kib "$companion_pid")"
  c_cpu0="$(cpu_s "$companion_pid")"
  c_recv0="$(metric "$url" 'backend_messages_received_total{kind="telemetry"}')"
  fleet "$work/fleet-companion.txt" "mqtts://localhost:$mqtts_port" "$DEVICES" "$INTERVAL_MS" "$SECS" "$RAMP" 0
  c_cpu="$(awk -v a="$c_cpu0" -v b="$(cpu_s "$companion_pid")" 'BEGIN {printf "%.2f", b - a}')"
  c_rss="$(rss_kib "$companion_pid")"
  c_acked="$(field "$work/fleet-companion.txt" "telemetry (puback)" 4)"
  c_seen=$(( $(metric "$url" 'backend_messages_received_total{kind="telemetry"}') - c_recv0 ))
  c_gaps="$(metric "$url" 'telemetry_gaps_total')"
  c_lost="$(metric "$url" 'broker_messages_lost_total')"
  stop_companion

  per_m() { awk -v c="$1" -v n="$2" 'BEGIN {if (n > 0) printf "%.1f", c / n * 1e6; else print "n/a"}'; }
  mq_per_m="$(per_m "$mq_cpu" "$mq_acked")"
  c_per_m="$(per_m "$c_cpu" "$c_acked")"
  printf '%-22s %12s %12s %12s %14s %10s\n' server acked delivered "cpu s" "cpu s/M msg" "rss MiB"
  printf '%-22s %12s %12s %12s %14s %10s\n' "mosquitto (TLS)" "$mq_acked" "$mq_seen" "$mq_cpu" "$mq_per_m" "$((mq_rss / 1024))"
  printf '%-22s %12s %12s %12s %14s %10s\n' "companion serve" "$c_acked" "$c_seen" "$c_cpu" "$c_per_m" "$((c_rss / 1024))"
  awk -v a="$c_per_m" -v b="$mq_per_m" 'BEGIN {if (b > 0) printf "ratio companion / mosquitto: %.2f CPU per message\n", a / b}'
  echo "companion: telemetry_gaps_total $c_gaps, broker_messages_lost_total $c_lost, RSS at start $((c_rss0 / 1024)) MiB"
  ratios+=("$(awk -v a="$c_per_m" -v b="$mq_per_m" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "nan"}')")
  echo "fleet reports: $work/fleet-*.txt (kept until exit)"
  sed -n '1,4p;/latency/,$p' "$work/fleet-companion.txt"
}

if [ "$DEVICES" -gt 0 ]; then
echo "== throughput: $DEVICES TLS devices x $(( 1000 / INTERVAL_MS )) msg/s QoS 1 telemetry for ${SECS}s (${RAMP}s ramp) =="
for round in $(seq 1 "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "-- round $round of $ROUNDS"
  throughput_round
done
if [ "$ROUNDS" -gt 1 ]; then
  printf '%s\n' "${ratios[@]}" | sort -g | awk '{r[NR] = $1} END {
    m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
    printf "ratio companion / mosquitto over %d rounds: median %.2f (min %.2f, max %.2f)\n", NR, m, r[1], r[NR]
  }'
fi
fi

if [ "$FLEET_DEVICES" -gt 0 ]; then
for transport in $FLEET_TRANSPORTS; do
  case "$transport" in
    mqtts) fleet_url="mqtts://localhost:$mqtts_port" ;;
    wss) fleet_url="wss://localhost:$wss_port/mqtt" ;;
    *) echo "FLEET_TRANSPORTS: mqtts or wss, not $transport" >&2; exit 64 ;;
  esac
  echo
  url="http://127.0.0.1:$http_port/metrics"
  echo "== scale over $transport: $FLEET_DEVICES devices, ${FLEET_RAMP}s ramp, telemetry every ${FLEET_TELEMETRY_MS} ms, persona press every ${FLEET_PERSONA_S}s, ${FLEET_SECS}s =="
  start_companion
  rss0="$(rss_kib "$companion_pid")"
  fleet "$work/fleet-scale.txt" "$fleet_url" "$FLEET_DEVICES" "$FLEET_TELEMETRY_MS" \
    "$FLEET_SECS" "$FLEET_RAMP" "$FLEET_PERSONA_S" &
  fleet_pid=$!
  # Peak connected state: just before the fleet ends.
  sleep $(( FLEET_RAMP + FLEET_SECS - 5 ))
  rss1="$(rss_kib "$companion_pid")"
  fds1="$(fds "$companion_pid")"
  connected="$(metric "$url" 'broker_connected_devices')"
  wait "$fleet_pid" || true
  stop_companion
  cat "$work/fleet-scale.txt"
  echo "server: connected ${connected} at the end, RSS $((rss0 / 1024)) -> $((rss1 / 1024)) MiB" \
    "($(( (rss1 - rss0) / FLEET_DEVICES )) KiB per device), $fds1 descriptors"
  echo "server log lines about the router link: $(grep -c "router connection timed out\|router link" "$work/companion.log" || true)"
done
fi
