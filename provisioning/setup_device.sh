#!/usr/bin/env bash
# Sets up a Companion device (a fresh Raspberry Pi OS, or any Debian-like system): creates the
# `companion` user, installs the agent, enrols the device, writes the agent's environment file and
# installs, enables and starts the systemd service. Safe to run again: a re-run keeps the enrolled
# identity and changes only what differs. See provisioning/README.md.
set -euo pipefail

readonly PROG="setup_device.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

# Where things live on the device (inside --root DIR when given).
readonly INSTALL_DIR="/opt/companion"
readonly ENV_FILE="${INSTALL_DIR}/.env"
readonly BIN_PATH="${INSTALL_DIR}/bin/companion-agent"
readonly CA_PATH="${INSTALL_DIR}/ca.pem"
readonly CACHE_PATH="/var/cache/companion"
readonly UNIT_NAME="companion-agent.service"
readonly UNIT_PATH="/etc/systemd/system/${UNIT_NAME}"
readonly SERVICE_USER="companion"
readonly SERVICE_GROUPS=(audio gpio)
readonly CAPABILITIES='["audio_input","audio_output","buttons","leds"]'

usage() {
  cat <<EOF
Usage: sudo ${PROG} [options]

Installs and enrols the Companion agent on this device. Inputs come from flags or the
environment (flags win). Secrets are read from the environment only, never from flags, and are
never printed.

  --control-plane-url URL   CONTROL_PLANE_URL: the control plane's HTTP(S) API base,
                            e.g. https://companion.example.com (used to enrol)
  ENROLL_CODE (env)         one-time enrolment code from POST /api/v1/enrollments (preferred)
  --device-id ID            DEVICE_ID, with DEVICE_AUTH_TOKEN (env): credentials from
                            register_device.sh, instead of an enrolment code
  --agent-binary PATH|URL   AGENT_BINARY: the companion-agent executable (AGENT_SHA256 checks it)
  --ca-cert FILE            CA_CERT: CA certificate of the control plane's TLS listener
  --device-name NAME        DEVICE_NAME (default: the host name)
  --device-type TYPE        DEVICE_TYPE: raspberry_pi | esp32 | simulated | other (default: detected)
  --mqtt-url URL            MQTT_URL: mqtts://host:port for the agent, or wss://host[:443]/mqtt
                            (MQTT over WebSocket, for networks that allow only 443) (default:
                            the enrolment answer, else mqtts://<API host>:8883)
  --hardware pi|sim         AGENT_HARDWARE: passed to the agent (default: the agent detects it)
  --root DIR                install under DIR as the device's root file system (an SD card
                            image): user database, files and unit inside DIR; the unit is
                            enabled there (unless --no-start) but nothing is started
  --no-start                do not enable or start the service
  --dry-run                 print what would be done; change nothing, enrol nothing
  -h, --help                this help

The agent's file ${ENV_FILE} holds CONTROL_PLANE_URL too, but there it is the MQTT URL the agent
connects to (mqtts://host:8883 or wss://host/mqtt), not the API base. Behind a reverse proxy
with a public certificate (ops/nginx), wss:// needs --ca-cert /etc/ssl/certs/ca-certificates.crt.
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  exit 1
}

say() {
  echo "${PROG}: $*"
}

need() {
  local tool=$1 package=$2
  command -v "$tool" >/dev/null 2>&1 \
    || die "'${tool}' is required but not installed: sudo apt-get install -y ${package}"
}

ROOT=""
START=1
DRY_RUN=0
CHANGES=0

while (($# > 0)); do
  case $1 in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --no-start) START=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --control-plane-url) CONTROL_PLANE_URL=${2:?--control-plane-url needs a URL}; shift 2 ;;
    --device-id) DEVICE_ID=${2:?--device-id needs an id}; shift 2 ;;
    --agent-binary) AGENT_BINARY=${2:?--agent-binary needs a path or URL}; shift 2 ;;
    --ca-cert) CA_CERT=${2:?--ca-cert needs a file}; shift 2 ;;
    --device-name) DEVICE_NAME=${2:?--device-name needs a name}; shift 2 ;;
    --device-type) DEVICE_TYPE=${2:?--device-type needs a type}; shift 2 ;;
    --mqtt-url) MQTT_URL=${2:?--mqtt-url needs a URL}; shift 2 ;;
    --hardware) AGENT_HARDWARE=${2:?--hardware needs pi or sim}; shift 2 ;;
    --enroll-code | --device-auth-token | --token)
      die "$1: secrets are read from the environment only (ENROLL_CODE, DEVICE_AUTH_TOKEN), so they stay out of the process list and shell history" ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

CONTROL_PLANE_URL=${CONTROL_PLANE_URL:-}
ENROLL_CODE=${ENROLL_CODE:-}
DEVICE_ID=${DEVICE_ID:-}
DEVICE_AUTH_TOKEN=${DEVICE_AUTH_TOKEN:-}
AGENT_BINARY=${AGENT_BINARY:-}
AGENT_SHA256=${AGENT_SHA256:-}
CA_CERT=${CA_CERT:-}
DEVICE_NAME=${DEVICE_NAME:-}
DEVICE_TYPE=${DEVICE_TYPE:-}
MQTT_URL=${MQTT_URL:-}
AGENT_HARDWARE=${AGENT_HARDWARE:-}
API_CA_CERT=${API_CA_CERT:-}

if [[ -n $ROOT ]]; then
  [[ -d $ROOT ]] || die "--root ${ROOT}: not a directory"
  ROOT="$(cd "$ROOT" && pwd)"
fi
case $AGENT_HARDWARE in
  "" | pi | sim) ;;
  *) die "--hardware must be pi or sim, not '${AGENT_HARDWARE}'" ;;
esac

# ---------------------------------------------------------------------------------------------
# Preflight: tools, privileges, inputs. Nothing is changed (and no code is used up) before every
# check has passed.

need install coreutils
need cmp diffutils
need sed sed
need awk mawk
if ((DRY_RUN == 0)); then
  [[ $(id -u) -eq 0 ]] || die "run as root (sudo ${PROG} ...): it creates a user and installs a service"
  need useradd passwd
  need groupadd passwd
  need usermod passwd
  if ((START == 1)); then
    need systemctl systemd
  fi
fi

TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT
umask 077

# Reads KEY from an env file (the last assignment wins; surrounding quotes removed).
env_value() {
  local file=$1 key=$2
  [[ -r $file ]] || return 0
  sed -n "s/^[[:space:]]*\(export[[:space:]]\+\)\?${key}=//p" "$file" | tail -n 1 \
    | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}

target_env="${ROOT}${ENV_FILE}"
existing_id="$(env_value "$target_env" DEVICE_ID)"
existing_token="$(env_value "$target_env" DEVICE_AUTH_TOKEN)"
existing_mqtt="$(env_value "$target_env" CONTROL_PLANE_URL)"

# Where the identity comes from: explicit credentials, then the one already installed, then an
# enrolment code.
identity=""
if [[ -n $DEVICE_ID || -n $DEVICE_AUTH_TOKEN ]]; then
  [[ -n $DEVICE_ID && -n $DEVICE_AUTH_TOKEN ]] \
    || die "DEVICE_ID and DEVICE_AUTH_TOKEN go together (or use ENROLL_CODE instead)"
  [[ $DEVICE_ID =~ ^[a-z0-9-]{1,64}$ ]] || die "DEVICE_ID must be 1-64 characters of a-z, 0-9 and -"
  identity="given"
elif [[ -n $existing_id && -n $existing_token ]]; then
  identity="existing"
  DEVICE_ID=$existing_id
  DEVICE_AUTH_TOKEN=$existing_token
  if [[ -n $ENROLL_CODE ]]; then
    say "already enrolled as ${DEVICE_ID}; not using ENROLL_CODE (delete ${ENV_FILE} to enrol again)"
  fi
elif [[ -n $ENROLL_CODE ]]; then
  identity="enrol"
else
  die "no identity: set ENROLL_CODE (preferred) or DEVICE_ID and DEVICE_AUTH_TOKEN"
fi

# The MQTT URL for the agent: MQTT_URL, else the one already installed for this identity, else
# the enrolment answer, else derived from the API host.
keep_mqtt=0
if [[ -z $MQTT_URL && -n $existing_mqtt && $identity != enrol && $DEVICE_ID == "$existing_id" ]]; then
  keep_mqtt=1
fi
api_base="${CONTROL_PLANE_URL%/}"
if [[ $identity == enrol || (-z $MQTT_URL && $keep_mqtt == 0) ]]; then
  [[ -n $api_base ]] || die "CONTROL_PLANE_URL is not set: the control plane's API base, e.g. https://companion.example.com"
  [[ $api_base =~ ^https?://[^/]+$ ]] \
    || die "CONTROL_PLANE_URL must be http(s)://host[:port] (the API base, no path), not '${api_base}'"
fi
if [[ -n $MQTT_URL ]]; then
  [[ $MQTT_URL =~ ^mqtts?://[^/]+$ || $MQTT_URL =~ ^wss?://[^/]+(/[^[:space:]]*)?$ ]] \
    || die "MQTT_URL must be mqtts://host[:port] or wss://host[:port][/path], not '${MQTT_URL}'"
fi
if [[ $identity == enrol ]]; then
  need curl curl
  need jq jq
fi

# The agent binary: a file, a URL, or the one already installed.
agent_src=""
if [[ -n $AGENT_BINARY ]]; then
  if [[ $AGENT_BINARY =~ ^https?:// ]]; then
    need curl curl
    agent_src="${TMP_DIR}/companion-agent"
    if ((DRY_RUN == 1)); then
      say "would download the agent from ${AGENT_BINARY}"
      agent_src=""
    else
      curl -fsSL --proto '=https,http' --connect-timeout 10 --max-time 600 -o "$agent_src" "$AGENT_BINARY" \
        || die "cannot download AGENT_BINARY from ${AGENT_BINARY}"
    fi
  else
    [[ -f $AGENT_BINARY ]] || die "AGENT_BINARY ${AGENT_BINARY}: no such file (build it: cargo build --release -p companion-agent)"
    agent_src=$AGENT_BINARY
  fi
  if [[ -n $agent_src && -n $AGENT_SHA256 ]]; then
    need sha256sum coreutils
    actual="$(sha256sum "$agent_src" | awk '{print $1}')"
    [[ $actual == "$AGENT_SHA256" ]] || die "AGENT_BINARY checksum mismatch: expected ${AGENT_SHA256}, got ${actual}"
  fi
elif [[ ! -x ${ROOT}${BIN_PATH} ]]; then
  die "AGENT_BINARY is not set and no agent is installed at ${BIN_PATH}: pass --agent-binary PATH|URL"
fi

# The CA certificate: a file, or the one already installed.
if [[ -n $CA_CERT ]]; then
  [[ -f $CA_CERT ]] || die "CA_CERT ${CA_CERT}: no such file (on the server it is {data_dir}/tls/ca.pem)"
  grep -q -- "-----BEGIN CERTIFICATE-----" "$CA_CERT" || die "CA_CERT ${CA_CERT} is not a PEM certificate"
elif [[ ! -f ${ROOT}${CA_PATH} ]]; then
  die "CA_CERT is not set and none is installed at ${CA_PATH}: pass --ca-cert FILE (the server's {data_dir}/tls/ca.pem, or /etc/ssl/certs/ca-certificates.crt for a public certificate)"
fi

template="${UNIT_TEMPLATE:-${SCRIPT_DIR}/companion-agent.service}"
[[ -f $template ]] || die "unit template ${template} not found: copy the whole provisioning/ directory, or set UNIT_TEMPLATE"

if [[ -z $DEVICE_NAME ]]; then
  if [[ -n $ROOT && -s ${ROOT}/etc/hostname ]]; then
    DEVICE_NAME="$(head -n 1 "${ROOT}/etc/hostname")"
  else
    DEVICE_NAME="$(uname -n)"
  fi
fi
if [[ -z $DEVICE_TYPE ]]; then
  if grep -qi 'raspberry pi' /proc/device-tree/model 2>/dev/null; then
    DEVICE_TYPE="raspberry_pi"
  else
    DEVICE_TYPE="other"
  fi
fi

# ---------------------------------------------------------------------------------------------
# Helpers that change things. Each one compares first and counts what it changed.

# Writes stdin to DEST with MODE and OWNER (user:group, or numeric) unless the content is equal;
# fixes mode and owner either way. The description never contains a secret.
put_file() {
  local dest=$1 mode=$2 owner=$3 what=$4
  local staged="${TMP_DIR}/staged"
  cat >"$staged"
  if ((DRY_RUN == 1)); then
    if [[ -f $dest ]] && cmp -s "$staged" "$dest"; then
      say "unchanged: ${what}"
    else
      say "would write ${what} (mode ${mode}, owner ${owner})"
    fi
    return 0
  fi
  if [[ -f $dest ]] && cmp -s "$staged" "$dest"; then
    chmod "$mode" "$dest"
    chown "$owner" "$dest"
    return 0
  fi
  local next="${dest}.new.$$"
  install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$staged" "$next"
  mv -f "$next" "$dest"
  CHANGES=$((CHANGES + 1))
  say "wrote ${what}"
}

make_dir() {
  local dir=$1 mode=$2 owner=$3
  if ((DRY_RUN == 1)); then
    [[ -d $dir ]] || say "would create ${dir} (mode ${mode}, owner ${owner})"
    return 0
  fi
  if [[ ! -d $dir ]]; then
    install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$dir"
    CHANGES=$((CHANGES + 1))
    say "created ${dir}"
  else
    chmod "$mode" "$dir"
    chown "$owner" "$dir"
  fi
}

# The user database of the target system: the host's, or the one inside --root.
prefix_args=()
if [[ -n $ROOT ]]; then
  prefix_args=(--prefix "$ROOT")
fi

group_exists() {
  awk -F: -v g="$1" '$1 == g { found = 1 } END { exit !found }' "${ROOT}/etc/group" 2>/dev/null
}

ensure_user() {
  if ((DRY_RUN == 1)); then
    awk -F: -v u="$SERVICE_USER" '$1 == u { found = 1 } END { exit !found }' "${ROOT}/etc/passwd" 2>/dev/null \
      || say "would create the system user ${SERVICE_USER} (groups: ${SERVICE_GROUPS[*]})"
    return 0
  fi
  if [[ -n $ROOT && ! -f ${ROOT}/etc/passwd ]]; then
    # An empty image: give it the files useradd expects.
    install -d -m 0755 "${ROOT}/etc"
    install -m 0644 /dev/null "${ROOT}/etc/passwd"
    install -m 0644 /dev/null "${ROOT}/etc/group"
    install -m 0640 /dev/null "${ROOT}/etc/shadow"
    install -m 0640 /dev/null "${ROOT}/etc/gshadow"
  fi
  local g
  for g in "${SERVICE_GROUPS[@]}"; do
    if ! group_exists "$g"; then
      groupadd "${prefix_args[@]}" --system "$g"
      CHANGES=$((CHANGES + 1))
      say "created group ${g}"
    fi
  done
  if ! awk -F: -v u="$SERVICE_USER" '$1 == u { found = 1 } END { exit !found }' "${ROOT}/etc/passwd"; then
    useradd "${prefix_args[@]}" --system --user-group --no-create-home \
      --home-dir "$INSTALL_DIR" --shell /usr/sbin/nologin \
      --groups "$(IFS=,; echo "${SERVICE_GROUPS[*]}")" "$SERVICE_USER"
    CHANGES=$((CHANGES + 1))
    say "created system user ${SERVICE_USER}"
  else
    for g in "${SERVICE_GROUPS[@]}"; do
      if ! awk -F: -v g="$g" -v u="$SERVICE_USER" \
        '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 } END { exit !found }' \
        "${ROOT}/etc/group"; then
        usermod "${prefix_args[@]}" --append --groups "$g" "$SERVICE_USER"
        CHANGES=$((CHANGES + 1))
        say "added ${SERVICE_USER} to group ${g}"
      fi
    done
  fi
}

# user:group of the service account as numbers (the --root user database is not the host's).
service_owner() {
  if ((DRY_RUN == 1)); then
    echo "${SERVICE_USER}:${SERVICE_USER}"
    return 0
  fi
  awk -F: -v u="$SERVICE_USER" '$1 == u { print $3 ":" $4; found = 1 } END { exit !found }' "${ROOT}/etc/passwd" \
    || die "user ${SERVICE_USER} missing from ${ROOT}/etc/passwd"
}

# POST the JSON file BODY to the API; sets HTTP_STATUS and leaves the answer in
# $TMP_DIR/response (never printed: it holds the token).
api_post() {
  local path=$1 body=$2
  local curl_args=(-sS --connect-timeout 10 --max-time 30 -X POST
    -H 'content-type: application/json' --data-binary "@${body}"
    -D "${TMP_DIR}/headers" -o "${TMP_DIR}/response" -w '%{http_code}')
  if [[ -n $API_CA_CERT ]]; then
    curl_args+=(--cacert "$API_CA_CERT")
  fi
  local rc=0
  HTTP_STATUS="$(curl "${curl_args[@]}" "${api_base}${path}")" || rc=$?
  if ((rc != 0)); then
    die "cannot reach the control plane at ${api_base} (curl exit ${rc}): check CONTROL_PLANE_URL and the network"
  fi
}

api_error_message() {
  jq -r '.error.message // empty' "${TMP_DIR}/response" 2>/dev/null || true
}

retry_after() {
  awk 'tolower($1) == "retry-after:" { gsub("\r", "", $2); print $2 }' "${TMP_DIR}/headers"
}

enrol() {
  if ((DRY_RUN == 1)); then
    say "would enrol '${DEVICE_NAME}' (${DEVICE_TYPE}) at ${api_base}/api/v1/enroll with ENROLL_CODE"
    DEVICE_ID="<enrolled-id>"
    DEVICE_AUTH_TOKEN="<enrolled-token>"
    return 0
  fi
  say "enrolling '${DEVICE_NAME}' (${DEVICE_TYPE}) at ${api_base}"
  # Built from the environment, not from arguments (which `ps` shows).
  ENROLL_CODE=$ENROLL_CODE DEVICE_NAME=$DEVICE_NAME DEVICE_TYPE=$DEVICE_TYPE CAPS=$CAPABILITIES \
    jq -n '{code: env.ENROLL_CODE, name: env.DEVICE_NAME, device_type: env.DEVICE_TYPE,
            capabilities: (env.CAPS | fromjson)}' >"${TMP_DIR}/enroll.json"
  api_post /api/v1/enroll "${TMP_DIR}/enroll.json"
  case $HTTP_STATUS in
    201) ;;
    403) die "enrolment refused (403): the code is unknown, expired or already used; ask an admin for a new one (POST /api/v1/enrollments)" ;;
    429) die "rate limited (429): too many attempts; retry after $(retry_after) seconds" ;;
    4*) die "enrolment rejected (${HTTP_STATUS}): $(api_error_message)" ;;
    *) die "enrolment failed (HTTP ${HTTP_STATUS}): the server had a problem; see its log" ;;
  esac
  DEVICE_ID="$(jq -r '.device_id // empty' "${TMP_DIR}/response")"
  DEVICE_AUTH_TOKEN="$(jq -r '.auth_token // empty' "${TMP_DIR}/response")"
  [[ -n $DEVICE_ID && -n $DEVICE_AUTH_TOKEN ]] || die "the enrolment answer has no device_id or auth_token"
  if [[ -z $MQTT_URL ]]; then
    local host port tls api_host
    host="$(jq -r '.mqtt.host // empty' "${TMP_DIR}/response")"
    port="$(jq -r '.mqtt.port // empty' "${TMP_DIR}/response")"
    tls="$(jq -r '.mqtt.tls // false' "${TMP_DIR}/response")"
    api_host="$(url_host "$api_base")"
    if [[ $host =~ ^(localhost|127\.[0-9.]+|::1)$ ]] && ! [[ $api_host =~ ^(localhost|127\.[0-9.]+|\[::1\])$ ]]; then
      say "the server names its MQTT host '${host}' (set mqtt.hosts on the server); using ${api_host}"
      host=$api_host
    fi
    [[ $tls == true ]] || die "the server offers MQTT without TLS only; the agent needs mqtts (enable mqtt.tls_listen)"
    MQTT_URL="mqtts://${host}:${port:-8883}"
  fi
  say "enrolled as ${DEVICE_ID}"
}

url_host() {
  local rest=${1#*://}
  rest=${rest%%/*}
  if [[ $rest == \[* ]]; then
    echo "${rest%%]*}]"
  else
    echo "${rest%%:*}"
  fi
}

# ---------------------------------------------------------------------------------------------
# Do it.

if [[ -n $ROOT ]]; then
  say "installing under ${ROOT} (the device's root file system); nothing is started here"
fi
if ((DRY_RUN == 1)); then
  say "dry run: nothing is changed, nothing is enrolled"
fi

ensure_user
owner="$(service_owner)"

make_dir "${ROOT}${INSTALL_DIR}" 0755 0:0
make_dir "${ROOT}${INSTALL_DIR}/bin" 0755 0:0
make_dir "${ROOT}${CACHE_PATH}" 0750 "$owner"
make_dir "${ROOT}/etc/systemd/system" 0755 0:0

if [[ -n $agent_src ]]; then
  put_file "${ROOT}${BIN_PATH}" 0755 0:0 "the agent ${BIN_PATH}" <"$agent_src"
fi
if [[ -n $CA_CERT ]]; then
  put_file "${ROOT}${CA_PATH}" 0644 0:0 "the CA certificate ${CA_PATH}" <"$CA_CERT"
fi

if [[ $identity == enrol ]]; then
  enrol
fi
if [[ -z $MQTT_URL ]]; then
  if ((keep_mqtt == 1)); then
    MQTT_URL=$existing_mqtt
  else
    MQTT_URL="mqtts://$(url_host "$api_base"):8883"
  fi
fi

# Optional agent settings: the environment wins, then what the file already has.
optional_line() {
  local key=$1 value
  value="${!key:-}"
  [[ -n $value ]] || value="$(env_value "$target_env" "$key")"
  if [[ -n $value ]]; then
    [[ $value != *$'\n'* ]] || die "${key} must be one line"
    echo "${key}=${value}"
  fi
}

env_staged="${TMP_DIR}/env"
{
  echo "# Companion agent settings, written by provisioning/setup_device.sh. Mode 0600: holds the"
  echo "# device token. CONTROL_PLANE_URL here is the MQTT URL the agent connects to."
  echo "DEVICE_ID=${DEVICE_ID}"
  echo "CONTROL_PLANE_URL=${MQTT_URL}"
  echo "DEVICE_AUTH_TOKEN=${DEVICE_AUTH_TOKEN}"
  echo "CA_CERT=${CA_PATH}"
  echo "AUDIO_SAMPLE_RATE=${AUDIO_SAMPLE_RATE:-16000}"
  echo "AUDIO_CHANNELS=${AUDIO_CHANNELS:-1}"
  echo "CACHE_DIR=${CACHE_PATH}"
  optional_line AUDIO_CAPTURE_DEVICE
  optional_line AUDIO_PLAYBACK_DEVICE
  optional_line BUTTON_PINS
  optional_line LED_PINS
} >"$env_staged"
put_file "$target_env" 0600 "$owner" "the agent environment ${ENV_FILE}" <"$env_staged"

agent_args=""
if [[ -n $AGENT_HARDWARE ]]; then
  agent_args=" --hardware ${AGENT_HARDWARE}"
fi
sed -e "s|@USER@|${SERVICE_USER}|g" \
  -e "s|@INSTALL_DIR@|${INSTALL_DIR}|g" \
  -e "s|@ENV_FILE@|${ENV_FILE}|g" \
  -e "s|@CACHE_DIR@|${CACHE_PATH}|g" \
  -e "s|@AGENT_ARGS@|${agent_args}|g" \
  "$template" >"${TMP_DIR}/unit"
put_file "${ROOT}${UNIT_PATH}" 0644 0:0 "the unit ${UNIT_PATH}" <"${TMP_DIR}/unit"

if ((DRY_RUN == 1)); then
  if ((START == 1)) && [[ -n $ROOT ]]; then
    say "would run: systemctl --root ${ROOT} enable ${UNIT_NAME}"
  elif ((START == 1)); then
    say "would run: systemctl daemon-reload; systemctl enable ${UNIT_NAME}; systemctl restart ${UNIT_NAME}"
  fi
  exit 0
fi

if ((START == 1)); then
  if [[ -n $ROOT ]]; then
    # An image: enable (a symlink in ${ROOT}/etc/systemd/system), start on its first boot.
    systemctl --root "$ROOT" enable --quiet "$UNIT_NAME"
  elif [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT_NAME"
    if ((CHANGES > 0)); then
      systemctl restart "$UNIT_NAME"
      say "restarted ${UNIT_NAME}"
    else
      systemctl start "$UNIT_NAME"
    fi
    systemctl is-active --quiet "$UNIT_NAME" || die "${UNIT_NAME} is not running: journalctl -u ${UNIT_NAME} -n 50"
  else
    die "systemd is not running here; use --no-start and start the agent another way"
  fi
fi

if ((CHANGES == 0)); then
  say "nothing to change: ${DEVICE_ID} is set up"
else
  say "done: ${DEVICE_ID} set up (${CHANGES} changes)"
fi
