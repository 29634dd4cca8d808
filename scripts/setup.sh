#!/usr/bin/env bash
# Create .venv and install the project's pinned requirements (add "dev" for the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "dev" ]; then
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
else
    .venv/bin/python -m pip install --quiet -r requirements.txt
fi
# mediapipe without its declared dependencies (why: requirements-nodeps.txt)
.venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
