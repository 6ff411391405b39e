#!/usr/bin/env bash
# Installs the pinned schemathesis (requirements.txt beside this script) into a virtualenv for
# backend/tests/api_schemathesis.rs, and prints the path of its `schemathesis` binary.
#
#   bash backend/tests/schemathesis/install.sh [VENV_DIR]    # default: target/schemathesis
#
# The test finds the binary through $SCHEMATHESIS, else at target/schemathesis/bin/schemathesis,
# else on PATH. Idempotent: a venv that already has the pinned versions is left as it is.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="${1:-$root/target/schemathesis}"
requirements="$here/requirements.txt"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
  echo "install.sh: $python not found; install Python 3 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "install.sh: $python cannot make a virtualenv; on Debian: apt-get install python3-venv" >&2
  exit 1
fi

stamp="$venv/.companion-requirements"
if [[ -x "$venv/bin/schemathesis" && -f "$stamp" ]] && cmp -s "$stamp" "$requirements"; then
  echo "$venv/bin/schemathesis"
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-virtualenv \
  -r "$requirements" >&2
"$venv/bin/schemathesis" --version >&2
cp "$requirements" "$stamp"
echo "$venv/bin/schemathesis"
