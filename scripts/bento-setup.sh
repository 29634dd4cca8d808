#!/usr/bin/env bash
# Bento image build step (bentofile.yaml docker.setup_script). BentoML runs it after installing
# requirements.txt and before copying the source in, so the pin is restated here: it must equal
# requirements-nodeps.txt (tests/test_bento.py checks). Why --no-deps: see that file.
set -euxo pipefail
NODEPS="mediapipe==0.10.21"
if command -v uv >/dev/null 2>&1; then
    uv pip install --no-deps "$NODEPS"
else
    python3 -m pip install --no-deps "$NODEPS"
fi
python3 -c "import mediapipe as mp; mp.solutions.face_mesh.FaceMesh(static_image_mode=True).close()"
