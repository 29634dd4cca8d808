#!/usr/bin/env bash
# Quick start: install, then lip-sync a test video (a real face) to a test audio track.
# With MUSETALK_MODELS_DIR set (real weights, see README) it uses them; otherwise it writes
# tiny RANDOM-weight models in MuseTalk's layout, so the whole pipeline runs on a fresh
# machine without downloads (the regenerated mouth is then noise, not speech).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
OUT="${OUT:-demo}"
if [ -n "${MUSETALK_MODELS_DIR:-}" ]; then
    [ -f "$OUT/face.mp4" ] || .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT" --media-only
else
    [ -d "$OUT/models" ] || .venv/bin/python -m lipsync_runner make-test-assets --to "$OUT"
    export MUSETALK_MODELS_DIR="$OUT/models"
fi
.venv/bin/python -m lipsync_runner generate --video "${VIDEO:-$OUT/face.mp4}" --audio "${AUDIO:-$OUT/speech.wav}" \
    --output "$OUT/lipsynced.mp4"
