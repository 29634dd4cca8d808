#!/usr/bin/env bash
# Serve the lip-sync API on http://localhost:${PORT:-3000} (REST under /api/lip-sync).
# Uses MUSETALK_MODELS_DIR when set; otherwise tiny RANDOM-weight models (demo only).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -z "${MUSETALK_MODELS_DIR:-}" ]; then
    [ -d demo/models ] || .venv/bin/python -m lipsync_runner make-test-assets --to demo
    export MUSETALK_MODELS_DIR="$PWD/demo/models"
fi
export BENTOML_CONFIG="${BENTOML_CONFIG:-$PWD/configuration.yaml}"
exec .venv/bin/bentoml serve service:LipSync --port "${PORT:-3000}"
