#!/usr/bin/env bash
# Set up .venv: the pinned requirements, then this project in editable mode, so `lipsync`,
# `lipsync_client` and `python -m lipsync_runner` are all there. `setup.sh dev` adds the test tools.
# A run with unchanged requirement files takes seconds: their hash is stamped into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: ./scripts/setup.sh [dev]

Creates .venv (with $PYTHON, default python3; 3.10 or newer) and installs into it:
  requirements.txt        the service and the inference core (pinned)
  requirements-dev.txt    with "dev": the test tools as well
  this project            `pip install -e .`: the lipsync command and the lipsync_client SDK
Skips all of it when the requirement files have not changed since the last run.
EOF
}

MODE="${1:-runtime}"
case "$MODE" in
    runtime) FILES=(requirements.txt requirements-nodeps.txt pyproject.toml); REQUIREMENTS=requirements.txt ;;
    dev) FILES=(requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml); REQUIREMENTS=requirements-dev.txt ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.setup-$MODE.sha256"

step() { printf '==> %s\n' "$*"; }

fingerprint() { cat "${FILES[@]}" | sha256sum | cut -d' ' -f1; }

if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/lipsync" ] && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && "$VENV/bin/python" -c "" 2>/dev/null; then
    step "setup: $VENV is up to date (${FILES[*]} unchanged since the last setup); nothing to install"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
    step "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: Python 3.10 or newer is needed; set PYTHON=/path/to/python3.11" >&2; exit 1; }

step "setup: upgrading pip"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

if [ "$MODE" = dev ]; then
    what="the service's and the test tools' pinned requirements ($REQUIREMENTS)"
else
    what="the service's pinned requirements ($REQUIREMENTS)"
fi
step "setup: installing $what into $VENV"
step "       on a fresh machine this downloads about 2.5 GB (torch is most of it) and takes 5 to 10 minutes;"
step "       pip reports each package below, and a second run skips all of this"
"$VENV/bin/python" -m pip install --progress-bar on --disable-pip-version-check -r "$REQUIREMENTS"
# mediapipe without its declared dependencies (why: requirements-nodeps.txt)
step "setup: installing mediapipe (the offline landmark detector) without its clashing dependencies"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt

# Editable: the code stays in this checkout. --no-deps: the client's few dependencies are pinned above.
# setuptools>=64 builds editable installs in a temporary directory: no build/ is left in the checkout.
step "setup: installing this project in editable mode (the lipsync command, lipsync_client, lipsync_runner)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .

fingerprint >"$STAMP"
if [ "$MODE" = dev ]; then  # dev includes the runtime set
    FILES=(requirements.txt requirements-nodeps.txt pyproject.toml)
    fingerprint >"$VENV/.setup-runtime.sha256"
fi
step "setup: done in ${SECONDS} s; $VENV holds $(du -sh "$VENV" 2>/dev/null | cut -f1)"
