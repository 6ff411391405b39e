#!/usr/bin/env bash
# Soak: DEVICES TLS devices (`companion-agent fleet`) against `companion serve` (SQLite) for
# DURATION seconds with churn, sampling the server every SAMPLE_S seconds; then a verdict on
# whether its RSS, open descriptors and `broker_router_client_ids` stayed flat.
#
# Churn, all of it at once:
#   - own reconnects: every device disconnects cleanly and reconnects about every RECONNECT_S
#     seconds (fleet `--reconnect-every-s`);
#   - token rotations: every CHURN_S seconds this script rotates ROTATE tokens through the admin
#     API (the server kicks the device), writes the new tokens into the fleet's credentials
#     file, and the fleet (`--reload-credentials-s 2`) reconnects those devices with them
#     (refused until it has read them);
#   - deletions: every CHURN_S seconds DELETE devices are deleted through the admin API (kicked,
#     then refused), and re-registered under the same device id one round later with a new
#     token, which goes into the credentials file the same way.
#
# Flat: after WARMUP_S, the average of the last third of the samples is within FLAT_PCT % of
# the average of the first third, for the RSS, descriptors, `broker_router_client_ids` and
# `backend_device_workers` (descriptors and workers: or within FD_SLACK, since a few devices
# are always between connections). Exit status 1 when something is not flat.
#
#   bench/soak.sh                                  # 1,000 devices, 30 min (the README figures)
#   DEVICES=200 DURATION=120 bench/soak.sh         # a short run
#
# Knobs: DEVICES (1000), DURATION (1800), RAMP (30), SAMPLE_S (60), WARMUP_S (300, at most a
# quarter of DURATION), TELEMETRY_MS (5000), PERSONA_S (120), RECONNECT_S (300), CHURN_S (10),
# ROTATE (5 per round), DELETE (2 per round), FLAT_PCT (10), FD_SLACK (25). Everything listens
# on 127.0.0.1 (ports picked free); the run stops by itself. Tokens are never printed.
set -euo pipefail

DEVICES="${DEVICES:-1000}"
DURATION="${DURATION:-1800}"
RAMP="${RAMP:-30}"
SAMPLE_S="${SAMPLE_S:-60}"
WARMUP_S="${WARMUP_S:-300}"
TELEMETRY_MS="${TELEMETRY_MS:-5000}"
PERSONA_S="${PERSONA_S:-120}"
RECONNECT_S="${RECONNECT_S:-300}"
CHURN_S="${CHURN_S:-10}"
ROTATE="${ROTATE:-5}"
DELETE="${DELETE:-2}"
FLAT_PCT="${FLAT_PCT:-10}"
FD_SLACK="${FD_SLACK:-25}"
[ "$WARMUP_S" -le $(( DURATION / 4 )) ] || WARMUP_S=$(( DURATION / 4 ))

for tool in curl python3 awk shuf; do
  command -v "$tool" >/dev/null || {
    echo "soak.sh needs $tool (apt-get install -y curl python3 gawk coreutils)" >&2
    exit 69
  }
done

root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p companion-backend -p companion-agent)
companion="$target/release/companion"
agent="$target/release/companion-agent"

work="$(mktemp -d)"
pids=()
# shellcheck disable=SC2317 # run by the trap
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# 1,000 devices need more than the usual 1,024 descriptors (server and fleet each).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
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
metric() { # metric TEXT NAME -> value of the first sample line starting with NAME (0 if none)
  awk -v n="$2" 'index($0, n) == 1 && !done {print $NF; done = 1} END {if (!done) print 0}' <<<"$1"
}

# --- server -------------------------------------------------------------------------------
export COMPANION_DATA_DIR="$work/companion"
export RUST_LOG="${RUST_LOG:-warn}"
http_port="$(free_port)"
mqtts_port="$(free_port)"
export COMPANION_HTTP__LISTEN="127.0.0.1:$http_port"
export COMPANION_MQTT__LISTEN=""
export COMPANION_MQTT__TLS_LISTEN="127.0.0.1:$mqtts_port"
export COMPANION_MQTT__WS_LISTEN=""
export COMPANION_MQTT__WSS_LISTEN=""
export COMPANION_MQTT__MAX_CONNECTIONS=$(( DEVICES + 100 ))
# The churn is admin API traffic from one principal: above the default 100 requests a minute.
export COMPANION_HTTP__RATE_LIMIT_PER_MINUTE=100000
# Every simulated device comes from 127.0.0.1, like a fleet behind one NAT: rotated devices
# retrying their old token would get the address blocked (20 failures a minute) and with it
# the whole fleet, and the ramp would hit the per-address cap of handshakes in progress.
export COMPANION_MQTT__AUTH_FAILURES_PER_IP=0
export COMPANION_MQTT__MAX_PENDING_PER_IP=$(( DEVICES + 100 ))
creds="$work/creds.csv"
"$companion" devices bulk-create --count "$DEVICES" --prefix soak --out "$creds" >/dev/null
"$companion" serve >"$work/companion.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")
base="http://127.0.0.1:$http_port"
wait_http "$base/ready"
# The bearer header in a 0600 file: the token never appears in a command line.
umask 077
printf 'Authorization: Bearer %s\n' "$(cat "$COMPANION_DATA_DIR/admin-token")" >"$work/auth.h"
api() { # api METHOD PATH [JSON] -> body on stdout; fails on an HTTP error
  local args=(-fsS -X "$1" -H "@$work/auth.h" "$base$2")
  [ $# -lt 3 ] || args+=(-H 'Content-Type: application/json' -d "$3")
  curl "${args[@]}"
}
json_token() { python3 -c 'import json,sys; print(json.load(sys.stdin)["auth_token"])'; }
set_token() { # set_token ID TOKEN_FILE: replaces ID's token in the credentials file atomically
  awk -F, -v id="$1" -v tf="$2" 'BEGIN {getline t <tf} $1 == id {print id "," t; next} {print}' \
    "$creds" >"$creds.new"
  mv "$creds.new" "$creds"
}

# --- fleet --------------------------------------------------------------------------------
"$agent" fleet --devices "$DEVICES" --telemetry-interval-ms "$TELEMETRY_MS" --talkers 0 \
  --duration "$DURATION" --ramp-s "$RAMP" --persona-every-s "$PERSONA_S" \
  --reconnect-every-s "$RECONNECT_S" --reload-credentials-s 2 \
  --credentials "$creds" --url "mqtts://localhost:$mqtts_port" \
  --ca-cert "$COMPANION_DATA_DIR/tls/ca.pem" --quiet >"$work/fleet.txt" 2>"$work/fleet.log" &
fleet_pid=$!
pids+=("$fleet_pid")

# --- churn (rotations, deletions, re-registrations) ----------------------------------------
churn() {
  local rotated=0 deleted=0 reregistered=0 failed=0 pending=() id
  sleep "$RAMP"
  while kill -0 "$fleet_pid" 2>/dev/null; do
    # Re-register last round's deletions under the same ids.
    for id in "${pending[@]}"; do
      if api POST /api/v1/devices \
        "{\"device_id\":\"$id\",\"name\":\"soak again\",\"device_type\":\"simulated\"}" |
        json_token >"$work/token"; then
        set_token "$id" "$work/token"
        reregistered=$((reregistered + 1))
      else
        failed=$((failed + 1))
      fi
    done
    pending=()
    for id in $(cut -d, -f1 "$creds" | shuf -n "$ROTATE"); do
      if api POST "/api/v1/devices/$id/token" | json_token >"$work/token"; then
        set_token "$id" "$work/token"
        rotated=$((rotated + 1))
      else
        failed=$((failed + 1))
      fi
    done
    for id in $(cut -d, -f1 "$creds" | shuf -n "$DELETE"); do
      if api DELETE "/api/v1/devices/$id" >/dev/null; then
        pending+=("$id")
        deleted=$((deleted + 1))
      else
        failed=$((failed + 1))
      fi
    done
    echo "$rotated $deleted $reregistered $failed" >"$work/churn.count"
    sleep "$CHURN_S"
  done
}
churn &
pids+=("$!")
churn_counts() { cat "$work/churn.count" 2>/dev/null || echo 0 0 0 0; }

# --- samples ------------------------------------------------------------------------------
echo "== soak: $DEVICES TLS devices, ${DURATION}s after a ${RAMP}s ramp; telemetry every ${TELEMETRY_MS} ms," \
  "persona press every ${PERSONA_S}s, own reconnect every ~${RECONNECT_S}s, every ${CHURN_S}s" \
  "$ROTATE token rotations + $DELETE deletions (re-registered a round later) =="
printf '%6s %8s %6s %10s %8s %10s %8s %8s %6s %12s %10s\n' \
  t_s rss_MiB fds router_ids active connected workers gaps lost "rot/del/rereg" sqlite_MiB
samples="$work/samples.txt"
start=$(date +%s)
while kill -0 "$fleet_pid" 2>/dev/null; do
  sleep "$SAMPLE_S"
  kill -0 "$fleet_pid" 2>/dev/null || break
  m="$(curl -fsS "$base/metrics")"
  t=$(( $(date +%s) - start ))
  rss=$(( $(rss_kib "$server_pid") / 1024 ))
  fd="$(fds "$server_pid")"
  ids="$(metric "$m" broker_router_client_ids)"
  active="$(metric "$m" active_devices)"
  connected="$(metric "$m" broker_connected_devices)"
  # The backend's per-device workers: one per device with recent events, retired when idle.
  workers="$(metric "$m" backend_device_workers)"
  gaps="$(metric "$m" telemetry_gaps_total)"
  lost="$(metric "$m" broker_messages_lost_total)"
  # What SQLite holds (page caches, statements): part of the RSS, bounded by its cache size.
  sqlite="$(metric "$m" backend_sqlite_memory_bytes | awk '{printf "%.1f", $1 / 1048576}')"
  read -r rot del rereg _ < <(churn_counts)
  echo "$t $rss $fd $ids $active $connected $gaps $lost $sqlite $workers" >>"$samples"
  printf '%6s %8s %6s %10s %8s %10s %8s %8s %6s %12s %10s\n' \
    "$t" "$rss" "$fd" "$ids" "$active" "$connected" "$workers" "$gaps" "$lost" "$rot/$del/$rereg" "$sqlite"
done
wait "$fleet_pid" || true
echo
cat "$work/fleet.txt"
read -r rot del rereg failed < <(churn_counts)
echo "churn by the script: $rot token rotations, $del deletions, $rereg re-registrations, $failed failed API calls"
echo "server log: $(grep -c . "$work/companion.log" || true) lines at warn or above;" \
  "$(grep -ci panic "$work/companion.log" || true) panics"

# --- verdict --------------------------------------------------------------------------------
# Columns: 2 RSS, 3 descriptors, 4 router client ids, 10 device workers. After the warm-up,
# first third vs last.
verdict="$(awk -v warm="$((RAMP + WARMUP_S))" -v pct="$FLAT_PCT" -v fdslack="$FD_SLACK" '
  $1 >= warm { n++; for (c = 2; c <= 4; c++) v[n, c] = $c; v[n, 10] = $10; sq[n] = $9 }
  END {
    if (n < 3) { print "TOO_SHORT " n " samples after the warm-up"; exit }
    k = int(n / 3); bad = 0
    split("2 3 4 10", cols, " ")
    name[2] = "rss_MiB"; name[3] = "fds"; name[4] = "router_client_ids"; name[10] = "device_workers"
    for (j = 1; j <= 4; j++) {
      c = cols[j]
      a = 0; b = 0
      for (i = 1; i <= k; i++) { a += v[i, c]; b += v[n - k + i, c] }
      a /= k; b /= k
      growth = (a > 0) ? (b - a) / a * 100 : 0
      ok = (growth <= pct) || ((c == 3 || c == 10) && b - a <= fdslack)
      if (!ok) bad = 1
      printf "%s first third %.1f, last third %.1f (%+.1f %%) %s\n", name[c], a, b, growth, ok ? "flat" : "GROWING"
    }
    # Not part of the verdict: how much of the RSS change is SQLite (page caches fill up
    # to their size as the tables grow).
    a = 0; b = 0; ra = 0; rb = 0
    for (i = 1; i <= k; i++) { a += sq[i]; b += sq[n - k + i]; ra += v[i, 2]; rb += v[n - k + i, 2] }
    printf "sqlite_MiB first third %.1f, last third %.1f; rss minus sqlite %.1f -> %.1f MiB\n", a / k, b / k, (ra - a) / k, (rb - b) / k
    print bad ? "NOT_FLAT" : "FLAT"
  }' "$samples")"
echo "$verdict"
case "$(tail -n 1 <<<"$verdict")" in
  FLAT) exit 0 ;;
  *) exit 1 ;;
esac
