#!/usr/bin/env bash
# Registers a device with the control plane using the admin token (POST /api/v1/devices), prints
# its DEVICE_ID and stores the credentials in the agent's environment file (mode 0600) instead
# of printing the token. Restarts the agent service when it is installed.
#
#   CONTROL_PLANE_URL=https://companion.example.com ADMIN_API_TOKEN=... \
#     sudo -E provisioning/register_device.sh [NAME] [TYPE]
#
# Prefer setup_device.sh with an ENROLL_CODE on devices: the admin token then never leaves the
# admin's machine. See provisioning/README.md.
set -euo pipefail

readonly PROG="register_device.sh"
readonly CAPABILITIES='["audio_input","audio_output","buttons","leds"]'
readonly UNIT_NAME="companion-agent.service"

usage() {
  cat <<EOF
Usage: ${PROG} [NAME] [TYPE]

  NAME                 device name (default: the host name)
  TYPE                 raspberry_pi | esp32 | simulated | other (default: raspberry_pi)

Environment:
  CONTROL_PLANE_URL    the control plane's HTTP(S) API base, e.g. https://companion.example.com
  ADMIN_API_TOKEN      an admin token (never printed)
  ENV_FILE             where to store the credentials (default: /opt/companion/.env)
  API_CA_CERT          CA file for an https:// API with a private CA (optional)
  NO_RESTART=1         do not restart ${UNIT_NAME}

Prints the new DEVICE_ID on stdout. The token goes to ENV_FILE (mode 0600) only.
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  exit 1
}

say() {
  echo "${PROG}: $*" >&2
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed: sudo apt-get install -y $2"
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
  -*) usage >&2; die "unknown option: $1" ;;
esac
(($# <= 2)) || { usage >&2; die "too many arguments"; }

DEVICE_NAME=${1:-$(uname -n)}
DEVICE_TYPE=${2:-raspberry_pi}
CONTROL_PLANE_URL=${CONTROL_PLANE_URL:-}
ADMIN_API_TOKEN=${ADMIN_API_TOKEN:-}
ENV_FILE=${ENV_FILE:-/opt/companion/.env}
API_CA_CERT=${API_CA_CERT:-}
NO_RESTART=${NO_RESTART:-0}

need curl curl
need jq jq
[[ -n $CONTROL_PLANE_URL ]] || die "CONTROL_PLANE_URL is not set: the API base, e.g. https://companion.example.com"
api_base=${CONTROL_PLANE_URL%/}
[[ $api_base =~ ^https?://[^/]+$ ]] || die "CONTROL_PLANE_URL must be http(s)://host[:port] (no path), not '${api_base}'"
[[ -n $ADMIN_API_TOKEN ]] || die "ADMIN_API_TOKEN is not set: an admin token (the server's {data_dir}/admin-token, or 'companion admin token create --name NAME')"
env_dir=$(dirname "$ENV_FILE")
[[ -d $env_dir ]] || die "ENV_FILE directory ${env_dir} does not exist (run setup_device.sh first, or set ENV_FILE)"
[[ -w $env_dir ]] || die "cannot write ${env_dir}: run as root (sudo -E) or set ENV_FILE"

umask 077
TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR"' EXIT

# The request body, built by jq from the environment (not from arguments, which `ps` shows).
DEVICE_NAME=$DEVICE_NAME DEVICE_TYPE=$DEVICE_TYPE CAPS=$CAPABILITIES \
  jq -n '{name: env.DEVICE_NAME, device_type: env.DEVICE_TYPE, capabilities: (env.CAPS | fromjson)}' \
  >"${TMP_DIR}/request"
# The Authorization header goes through a curl config file, so the token is not in argv either.
printf 'header = "Authorization: Bearer %s"\n' "$ADMIN_API_TOKEN" >"${TMP_DIR}/curl.conf"

curl_args=(-sS --connect-timeout 10 --max-time 30 -K "${TMP_DIR}/curl.conf"
  -H 'content-type: application/json' --data-binary "@${TMP_DIR}/request"
  -D "${TMP_DIR}/headers" -o "${TMP_DIR}/response" -w '%{http_code}')
if [[ -n $API_CA_CERT ]]; then
  curl_args+=(--cacert "$API_CA_CERT")
fi
rc=0
status=$(curl "${curl_args[@]}" "${api_base}/api/v1/devices") || rc=$?
((rc == 0)) || die "cannot reach the control plane at ${api_base} (curl exit ${rc}): check CONTROL_PLANE_URL and the network"

message() {
  jq -r '.error.message // empty' "${TMP_DIR}/response" 2>/dev/null || true
}

case $status in
  201) ;;
  401) die "the admin token was refused (401): check ADMIN_API_TOKEN" ;;
  403) die "forbidden (403): $(message)" ;;
  429)
    wait_s=$(awk 'tolower($1) == "retry-after:" { gsub("\r", "", $2); print $2 }' "${TMP_DIR}/headers")
    die "rate limited (429): retry after ${wait_s:-60} seconds" ;;
  4*) die "registration rejected (${status}): $(message)" ;;
  *) die "registration failed (HTTP ${status}): the server had a problem; see its log" ;;
esac

device_id=$(jq -r '.device_id // empty' "${TMP_DIR}/response")
token=$(jq -r '.auth_token // empty' "${TMP_DIR}/response")
[[ -n $device_id && -n $token ]] || die "the answer has no device_id or auth_token"
mqtt_host=$(jq -r '.mqtt.host // empty' "${TMP_DIR}/response")
mqtt_port=$(jq -r '.mqtt.port // 8883' "${TMP_DIR}/response")
mqtt_tls=$(jq -r '.mqtt.tls // false' "${TMP_DIR}/response")
api_host=${api_base#*://}
api_host=${api_host%:*}
if [[ -z $mqtt_host || ($mqtt_host =~ ^(localhost|127\.) && ! $api_host =~ ^(localhost|127\.)) ]]; then
  mqtt_host=$api_host
fi
scheme=mqtts
[[ $mqtt_tls == true ]] || scheme=mqtt

# Rewrite the three identity lines, keep every other line of the file.
staged="${TMP_DIR}/env"
if [[ -f $ENV_FILE ]]; then
  grep -v -E '^[[:space:]]*(export[[:space:]]+)?(DEVICE_ID|DEVICE_AUTH_TOKEN|CONTROL_PLANE_URL)=' "$ENV_FILE" >"$staged" || true
else
  : >"$staged"
fi
{
  echo "DEVICE_ID=${device_id}"
  echo "CONTROL_PLANE_URL=${scheme}://${mqtt_host}:${mqtt_port}"
  echo "DEVICE_AUTH_TOKEN=${token}"
} >>"$staged"
next="${ENV_FILE}.new.$$"
cp "$staged" "$next"
chmod 0600 "$next"
if [[ -f $ENV_FILE ]]; then
  chown --reference="$ENV_FILE" "$next"
elif id -u companion >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
  chown companion:companion "$next"
fi
mv -f "$next" "$ENV_FILE"
say "credentials for ${device_id} stored in ${ENV_FILE} (mode 0600)"

if [[ $NO_RESTART != 1 && -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1 \
  && systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
  systemctl restart "$UNIT_NAME"
  say "restarted ${UNIT_NAME}"
fi

echo "$device_id"
