#!/usr/bin/env bash
# Quick start: set up .venv, then lip-sync a test video (a real face) to a test speech track.
# With MUSETALK_MODELS_DIR set (real weights, see README) it uses them; otherwise it writes
# tiny RANDOM-weight models in MuseTalk's layout, so the whole pipeline runs on a fresh machine
# without downloads (the mouth is then regenerated, but does not follow the speech).
# OUT (default demo), VIDEO and AUDIO override where the files are.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*"; }

OUT="${OUT:-demo}"
step "demo: step 1 of 3: setting up .venv (./scripts/setup.sh)"
./scripts/setup.sh
if [ -n "${MUSETALK_MODELS_DIR:-}" ]; then
    if [ -f "$OUT/face.mp4" ] && [ -f "$OUT/speech.wav" ]; then
        step "demo: step 2 of 3: models from $MUSETALK_MODELS_DIR; test clip already in $OUT/"
    else
        step "demo: step 2 of 3: models from $MUSETALK_MODELS_DIR; writing a test clip and speech track into $OUT/"
        .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT" --media-only
    fi
else
    if [ -d "$OUT/models" ] && [ -f "$OUT/face.mp4" ] && [ -f "$OUT/speech.wav" ]; then
        step "demo: step 2 of 3: tiny random-weight models and the test clip already in $OUT/"
    else
        step "demo: step 2 of 3: writing tiny RANDOM-weight models in MuseTalk's layout, a test clip and a speech track into $OUT/"
        .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT"
    fi
    export MUSETALK_MODELS_DIR="$OUT/models"
fi
VIDEO="${VIDEO:-$OUT/face.mp4}"
AUDIO="${AUDIO:-$OUT/speech.wav}"
step "demo: step 3 of 3: lip-syncing $VIDEO to $AUDIO with the models in $MUSETALK_MODELS_DIR"
.venv/bin/python -m lipsync_runner generate --video "$VIDEO" --audio "$AUDIO" --output "$OUT/lipsynced.mp4"
step "demo: done in ${SECONDS} s: $OUT/lipsynced.mp4"
step "demo: next: ./scripts/serve.sh runs the service on http://localhost:${PORT:-3000} (README: The service)"
