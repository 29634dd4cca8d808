#!/usr/bin/env bash
# Quick start: install, then lip-sync a test video to a test audio track.
# Without real weights (MUSETALK_MODELS_DIR unset) it writes tiny RANDOM-weight models in
# MuseTalk's layout, so the whole pipeline runs on a fresh machine; the mouth is then noise.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
OUT="${OUT:-demo}"
if [ -z "${MUSETALK_MODELS_DIR:-}" ]; then
    [ -d "$OUT/models" ] || .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT"
    export MUSETALK_MODELS_DIR="$OUT/models"
else
    [ -f "$OUT/face.mp4" ] || .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT/assets" >/dev/null
    mkdir -p "$OUT"; cp -n "$OUT/assets/face.mp4" "$OUT/assets/speech.wav" "$OUT/" 2>/dev/null || true
fi
.venv/bin/python -m lipsync_runner generate --video "${VIDEO:-$OUT/face.mp4}" --audio "${AUDIO:-$OUT/speech.wav}" \
    --output "$OUT/lipsynced.mp4"
