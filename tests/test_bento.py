"""`bentoml build` makes a Bento that a GPU deployment can run: code, pinned CUDA-capable
torch, ffmpeg, the runner's GPU resources, and the weights from the BentoML model store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store_env(tmp_path_factory, models_dir) -> dict[str, str]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {k: v for k, v in os.environ.items() if k != "MUSETALK_MODELS_DIR"}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")
    imported = run(sys.executable, "-m", "lipsync_runner", "import-models", "--from", str(models_dir), env=env)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported musetalk:")
    return env


@pytest.fixture(scope="module")
def bento(store_env) -> Path:
    built = run(sys.executable, "-m", "bentoml", "build", ".", env=store_env)
    assert built.returncode == 0, built.stdout + built.stderr
    bentos = list((Path(store_env["BENTOML_HOME"]) / "bentos" / "lipsync").glob("*/bento.yaml"))
    assert len(bentos) == 1
    return bentos[0].parent


def test_bento_declares_both_services_with_a_gpu_for_the_runner_and_the_weights(bento: Path):
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["entry_service"] == "LipSync"
    services = {s["name"]: s for s in meta["services"]}
    runner, api = services["MuseTalkRunner"], services["LipSync"]
    assert runner["config"]["resources"]["gpu"] == 1
    assert "resources" not in api["config"]  # the API service stays on CPU
    assert [m["tag"].split(":")[0] for m in runner["models"]] == ["musetalk"]
    assert {"service": "MuseTalkRunner"} in api["dependencies"]
    envs = {e["name"]: e["value"] for e in meta["envs"]}
    assert envs["LIP_SYNC_DEVICE"] == "cuda"
    assert envs["BENTOML_CONFIG"].endswith("/src/configuration.yaml")


def test_bento_source_has_the_code_and_no_weights_or_data(bento: Path):
    src = bento / "src"
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert {"service.py", "configuration.yaml", "lipsync_runner/models/musetalk.py", "lipsync_runner/pipeline/job.py"} <= files
    # the pages' static files: the web page and the API reference at / (docs_page.py reads them at startup)
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "lipsync_runner").rglob("*.py") if "__pycache__" not in p.parts}
    assert code <= files, sorted(code - files)  # every room's code, models/ included
    assert {"lipsync_runner/ui/static/app.js", "lipsync_runner/serving/docs_static/index.html",
            "lipsync_runner/serving/docs_static/docs.js"} <= files
    assert not [f for f in files if f.startswith(("tests/", "data/", "models/", "demo/"))]
    assert not [f for f in files if f.endswith((".pth", ".bin", ".safetensors", ".pyc"))]


def test_dockerfile_installs_ffmpeg_and_the_pinned_cuda_torch(bento: Path):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ffmpeg" in dockerfile and "libgl1" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements.splitlines()
    # a CPU-only wheel index or local version would make the GPU image useless
    assert "+cpu" not in requirements and "download.pytorch.org/whl/cpu" not in requirements
    assert "imageio-ffmpeg==" in requirements and "bentoml==1.4.40" in requirements


def test_runner_loads_its_weights_from_the_model_store_without_a_models_dir(store_env, tmp_path):
    script = textwrap.dedent("""
        import time, service
        assert service.MODELS_FROM_STORE
        runner = service.MuseTalkRunner()
        deadline = time.time() + 60
        while runner.core.state == "loading" and time.time() < deadline:
            time.sleep(0.2)
        health = runner.core.health()
        assert health["models_loaded"], health
        print(runner.core.settings.models_dir)
    """)
    env = {**store_env, "LIP_SYNC_DEVICE": "cpu", "LIP_SYNC_DATA_DIR": str(tmp_path / "data")}
    result = run(sys.executable, "-c", script, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/models/musetalk/" in result.stdout


def test_import_refuses_a_directory_that_would_not_load(store_env, tmp_path):
    (tmp_path / "musetalkV15").mkdir()
    result = run(sys.executable, "-m", "lipsync_runner", "import-models", "--from", str(tmp_path), env=store_env)
    assert result.returncode == 3 and "missing model file" in result.stderr


def test_the_image_installs_mediapipe_without_its_declared_dependencies(bento: Path):
    """mediapipe asks for opencv-contrib-python (a second cv2) and numpy<2: the image must install
    it with --no-deps after requirements.txt, as scripts/setup.sh does (requirements-nodeps.txt)."""
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = {line.split("==")[0].strip().lower() for line in requirements if line and not line.startswith("#")}
    assert "mediapipe" not in names and "opencv-contrib-python" not in names
    assert {"opencv-python==4.14.0.94", "numpy==2.4.6", "protobuf==4.25.9", "matplotlib==3.11.2"} <= set(requirements)
    nodeps = [line for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert nodeps == ["mediapipe==0.10.21"]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    (script,) = [p for p in (bento / "env" / "docker").iterdir() if p.name.startswith(("script__", "setup_script"))]
    text = script.read_text()
    assert 'NODEPS="mediapipe==0.10.21"' in text and '--no-deps "$NODEPS"' in text
    # run after the Python packages, so that nothing installs over it afterwards
    assert dockerfile.index("requirements.txt") < dockerfile.index(script.name)
