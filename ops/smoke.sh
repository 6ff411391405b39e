#!/usr/bin/env bash
# Post-deployment smoke test against a running Companion control plane:
#   1. GET /ready answers 200;
#   2. registers a throw-away device (POST /api/v1/devices);
#   3. publishes one telemetry message as that device with mosquitto_pub over TLS (the CA given);
#   4. checks that /metrics counted it (broker_messages_in_total{class="telemetry"} went up);
#   5. deletes the device (also when a step fails).
#
#   CONTROL_PLANE_URL=https://companion.example.com ADMIN_API_TOKEN=... CA_CERT=ca.pem ops/smoke.sh
#
# Exit 0 and "smoke test passed" on success; otherwise a message naming the failed step.
set -euo pipefail

readonly PROG="smoke.sh"

usage() {
  cat <<EOF
Usage: ${PROG}

Environment:
  CONTROL_PLANE_URL   the control plane's HTTP(S) API base, e.g. https://companion.example.com
  ADMIN_API_TOKEN     an admin token (never printed)
  CA_CERT             CA certificate of the MQTT TLS listener (the server's {data_dir}/tls/ca.pem)
  MQTT_HOST           MQTT host (default: from the registration answer, else the API host)
  MQTT_PORT           MQTT TLS port (default: from the registration answer, else 8883)
  API_CA_CERT         CA file for an https:// API with a private CA (optional)
  SMOKE_TIMEOUT_S     how long to wait for the metric to move (default 15)
EOF
}

die() {
  echo "${PROG}: FAILED: $*" >&2
  exit 1
}

say() {
  echo "${PROG}: $*"
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed: sudo apt-get install -y $2"
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; die "unknown argument: $1" ;;
esac

need curl curl
need jq jq
need mosquitto_pub mosquitto-clients
CONTROL_PLANE_URL=${CONTROL_PLANE_URL:-}
ADMIN_API_TOKEN=${ADMIN_API_TOKEN:-}
CA_CERT=${CA_CERT:-}
API_CA_CERT=${API_CA_CERT:-}
SMOKE_TIMEOUT_S=${SMOKE_TIMEOUT_S:-15}
[[ -n $CONTROL_PLANE_URL ]] || die "CONTROL_PLANE_URL is not set (the API base, e.g. https://companion.example.com)"
api_base=${CONTROL_PLANE_URL%/}
[[ $api_base =~ ^https?://[^/]+$ ]] || die "CONTROL_PLANE_URL must be http(s)://host[:port], not '${api_base}'"
[[ -n $ADMIN_API_TOKEN ]] || die "ADMIN_API_TOKEN is not set"
[[ -n $CA_CERT && -f $CA_CERT ]] || die "CA_CERT must name the CA file of the MQTT TLS listener"
[[ $SMOKE_TIMEOUT_S =~ ^[0-9]+$ ]] || die "SMOKE_TIMEOUT_S must be a number of seconds"

umask 077
TMP_DIR=$(mktemp -d)
device_id=""
cleanup() {
  local rc=$?
  if [[ -n $device_id ]]; then
    if api DELETE "/api/v1/devices/${device_id}" >/dev/null 2>&1; then
      say "deleted ${device_id}"
    else
      echo "${PROG}: could not delete ${device_id}; delete it by hand" >&2
    fi
  fi
  rm -rf "$TMP_DIR"
  exit "$rc"
}
trap cleanup EXIT

printf 'header = "Authorization: Bearer %s"\n' "$ADMIN_API_TOKEN" >"${TMP_DIR}/auth.conf"
curl_common=(-sS --connect-timeout 10 --max-time 30)
if [[ -n $API_CA_CERT ]]; then
  curl_common+=(--cacert "$API_CA_CERT")
fi

# api METHOD PATH [BODY-FILE]: prints the HTTP status; the body is in $TMP_DIR/response.
api() {
  local method=$1 path=$2 body=${3:-}
  local args=("${curl_common[@]}" -K "${TMP_DIR}/auth.conf" -X "$method"
    -o "${TMP_DIR}/response" -w '%{http_code}')
  if [[ -n $body ]]; then
    args+=(-H 'content-type: application/json' --data-binary "@${body}")
  fi
  curl "${args[@]}" "${api_base}${path}"
}

# Sum of a metric's samples whose labels contain FILTER (e.g. class="telemetry").
metric_sum() {
  local name=$1 filter=$2
  curl "${curl_common[@]}" -f "${api_base}/metrics" \
    | awk -v n="$name" -v f="$filter" \
      'index($1, n "{") == 1 && index($1, f) > 0 { s += $2 } END { printf "%d\n", s }'
}

# 1. Readiness.
status=$(curl "${curl_common[@]}" -o /dev/null -w '%{http_code}' "${api_base}/ready") \
  || die "cannot reach ${api_base}/ready: is the server up, is CONTROL_PLANE_URL right?"
[[ $status == 200 ]] || die "/ready answered ${status}: the database or the broker is down"
say "/ready: 200"

before=$(metric_sum broker_messages_in_total 'class="telemetry"') || die "cannot read ${api_base}/metrics"

# 2. Register a throw-away device.
jq -n --arg name "smoke test $(date -u +%Y%m%dT%H%M%SZ)" \
  '{name: $name, device_type: "simulated", capabilities: ["audio_input","audio_output","buttons","leds"]}' \
  >"${TMP_DIR}/register.json"
status=$(api POST /api/v1/devices "${TMP_DIR}/register.json") || die "cannot reach ${api_base}"
case $status in
  201) ;;
  401) die "the admin token was refused (401): check ADMIN_API_TOKEN" ;;
  429) die "rate limited (429): try again in a minute" ;;
  *) die "registering a device answered ${status}: $(jq -r '.error.message // empty' "${TMP_DIR}/response" 2>/dev/null)" ;;
esac
device_id=$(jq -r '.device_id' "${TMP_DIR}/response")
token=$(jq -r '.auth_token' "${TMP_DIR}/response")
[[ $(jq -r '.mqtt.tls' "${TMP_DIR}/response") == true ]] || die "the server offers no MQTT TLS listener"
api_host=${api_base#*://}
api_host=${api_host%:*}
mqtt_host=${MQTT_HOST:-$(jq -r '.mqtt.host' "${TMP_DIR}/response")}
if [[ -z ${MQTT_HOST:-} && $mqtt_host =~ ^(localhost|127\.) && ! $api_host =~ ^(localhost|127\.) ]]; then
  mqtt_host=$api_host
fi
mqtt_port=${MQTT_PORT:-$(jq -r '.mqtt.port' "${TMP_DIR}/response")}
say "registered ${device_id}"

# 3. One telemetry message, MessagePack {v:1, seq:1, ts_ms:now, uptime_s:1}, over TLS. The password
# goes through mosquitto_pub's options file so it is not on the command line.
ts_ms=$(($(date +%s) * 1000))
ts_bytes=""
for shift_by in 56 48 40 32 24 16 8 0; do
  ts_bytes+=$(printf '\\x%02x' $(((ts_ms >> shift_by) & 255)))
done
# shellcheck disable=SC2059 # the format is built from hex escapes on purpose
printf "\x84\xa1v\x01\xa3seq\x01\xa5ts_ms\xcf${ts_bytes}\xa8uptime_s\x01" >"${TMP_DIR}/telemetry.msgpack"
mkdir -p "${TMP_DIR}/xdg"
printf -- '-P %s\n' "$token" >"${TMP_DIR}/xdg/mosquitto_pub"
XDG_CONFIG_HOME="${TMP_DIR}/xdg" mosquitto_pub -h "$mqtt_host" -p "$mqtt_port" --cafile "$CA_CERT" \
  -V mqttv311 -i "$device_id" -u "$device_id" -q 1 \
  -t "devices/${device_id}/telemetry" -f "${TMP_DIR}/telemetry.msgpack" \
  || die "mosquitto_pub could not publish to ${mqtt_host}:${mqtt_port} over TLS (certificate, port, or credentials)"
say "published telemetry over TLS to ${mqtt_host}:${mqtt_port}"

# 4. The broker counted it.
deadline=$((SECONDS + SMOKE_TIMEOUT_S))
while :; do
  after=$(metric_sum broker_messages_in_total 'class="telemetry"') || die "cannot read ${api_base}/metrics"
  if ((after > before)); then
    break
  fi
  ((SECONDS < deadline)) || die "/metrics did not count the message within ${SMOKE_TIMEOUT_S}s (broker_messages_in_total{class=\"telemetry\"} stayed at ${before})"
  sleep 0.2
done
say "/metrics: broker_messages_in_total{class=\"telemetry\"} ${before} -> ${after}"

# 5. Delete it (the EXIT trap does it; do it here to check the answer).
status=$(api DELETE "/api/v1/devices/${device_id}") || die "cannot reach ${api_base}"
[[ $status == 204 || $status == 200 ]] || die "deleting ${device_id} answered ${status}"
say "deleted ${device_id}"
device_id=""

say "smoke test passed"
