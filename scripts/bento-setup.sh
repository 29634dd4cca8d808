#!/usr/bin/env bash
# Bento image build step (bentofile.yaml docker.setup_script), run after requirements.txt is
# installed: the packages that must be installed without their declared dependencies.
set -euxo pipefail
REQ="${BENTO_PATH:-/home/bentoml/bento}/src/requirements-nodeps.txt"
if command -v uv >/dev/null 2>&1; then
    uv pip install --no-deps -r "$REQ"
else
    python3 -m pip install --no-deps -r "$REQ"
fi
python3 -c "import mediapipe as mp; mp.solutions.face_mesh.FaceMesh(static_image_mode=True).close()"
