#!/usr/bin/env bash
# Serve the lip-sync service on http://localhost:${PORT:-3000}; `serve.sh --help` lists the settings.
# Uses MUSETALK_MODELS_DIR when set; otherwise tiny RANDOM-weight models (demo only).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'USAGE'
usage: [PORT=3000] [HOST=0.0.0.0] [MUSETALK_MODELS_DIR=DIR] ./scripts/serve.sh

Sets up .venv (./scripts/setup.sh), then runs `bentoml serve service:LipSync`:
  http://localhost:PORT/                the API reference (Swagger UI)
  http://localhost:PORT/ui/             the web page
  http://localhost:PORT/api/lip-sync/   the REST API (README.md: The service)
It is ready when http://localhost:PORT/readyz answers 200 (the models have loaded). Ctrl-C stops it.

Settings (environment):
  PORT                  the port to listen on (default 3000)
  HOST                  the address to bind (default 0.0.0.0: every interface)
  MUSETALK_MODELS_DIR   a MuseTalk models directory (default: tiny random-weight models in demo/models)
  BENTOML_CONFIG        BentoML's settings file (default configuration.yaml)
  LIP_SYNC_*            the service's settings, listed in docs/configuration.md (data directory, limits, API tokens)
USAGE
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

step() { printf '==> %s\n' "$*"; }

PORT="${PORT:-3000}"
HOST="${HOST:-0.0.0.0}"
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    echo "serve: PORT must be a number from 1 to 65535, got '$PORT'" >&2
    exit 2
fi

# One clear line instead of BentoML's traceback: try to bind the port as the server would.
check_port() {
    local python=.venv/bin/python
    [ -x "$python" ] || python="${PYTHON:-python3}"
    local problem
    if ! problem=$("$python" - "$HOST" "$PORT" <<'PY'
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is not "busy"
    try:
        s.bind((host, port))
    except OSError as exc:
        print(exc.strerror or exc)
        sys.exit(1)
PY
    ); then
        echo "serve: port $PORT on $HOST is not free ($problem): is the service already running? Use another one: PORT=$((PORT + 1)) ./scripts/serve.sh" >&2
        exit 1
    fi
}

check_port  # before the setup: fail in a second, not after minutes
./scripts/setup.sh
if [ -z "${MUSETALK_MODELS_DIR:-}" ]; then
    if [ -d demo/models ]; then
        step "serve: tiny random-weight models from demo/models (set MUSETALK_MODELS_DIR for real weights)"
    else
        step "serve: writing tiny RANDOM-weight models and the test clip into demo/ (set MUSETALK_MODELS_DIR for real weights)"
        .venv/bin/python -m lipsync_runner make-test-assets --to demo
    fi
    export MUSETALK_MODELS_DIR="$PWD/demo/models"
fi
export BENTOML_CONFIG="${BENTOML_CONFIG:-$PWD/configuration.yaml}"
check_port  # again: the setup may have taken minutes
step "serve: starting on http://localhost:$PORT (API reference at /, web page at /ui/); ready when /readyz answers 200"
exec .venv/bin/bentoml serve service:LipSync --host "$HOST" --port "$PORT"
