"""The quick-start scripts: setup.sh installs once and then skips, serve.sh refuses a busy port clearly.

setup.sh runs in a copy of the scripts and requirement files, with a `.venv/bin/python` stand-in
that records what it is asked to do (pip is never run for real here: a fresh install is measured
by hand, see README's quick start).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = f"""#!/usr/bin/env bash
# Records pip's invocations; anything else runs the real interpreter.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$*" >> "$(dirname "$0")/../pip.log"
    [[ " $* " == *" -e . "* ]] && : > "$(dirname "$0")/lipsync" && chmod +x "$(dirname "$0")/lipsync"
    exit 0
fi
exec {sys.executable} "$@"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "serve.sh"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    return root


def setup(checkout: Path, *args: str) -> tuple[str, list[str]]:
    log = checkout / ".venv" / "pip.log"
    log.unlink(missing_ok=True)
    r = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, log.read_text().splitlines() if log.exists() else []


def test_setup_installs_the_requirements_and_the_project_then_skips_until_they_change(checkout):
    out, pip = setup(checkout)
    assert any("install" in c and "-r requirements.txt" in c for c in pip), pip
    assert any(c.endswith("install --quiet --disable-pip-version-check --no-deps -e .") for c in pip), pip
    assert "2.5 GB" in out and "minutes" in out, "a fresh install says how big and how long"
    assert "installing this project in editable mode" in out

    out, pip = setup(checkout)
    assert pip == [] and "up to date" in out, "a second run installs nothing"

    with (checkout / "requirements.txt").open("a") as f:
        f.write("# a changed pin\n")
    _, pip = setup(checkout)
    assert any("-r requirements.txt" in c for c in pip), "a changed requirement file is installed again"


def test_setup_dev_installs_the_test_tools_and_covers_the_runtime_set(checkout):
    _, pip = setup(checkout, "dev")
    assert any("-r requirements-dev.txt" in c for c in pip), pip
    assert setup(checkout, "dev")[1] == []
    assert setup(checkout)[1] == [], "dev includes the runtime requirements"
    with (checkout / "requirements-dev.txt").open("a") as f:
        f.write("# a changed test pin\n")
    assert setup(checkout)[1] == [], "a test-tool change does not touch the runtime set"
    assert any("-r requirements-dev.txt" in c for c in setup(checkout, "dev")[1])


def test_serve_refuses_a_busy_port_in_one_line_before_any_setup(checkout):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(["bash", "scripts/serve.sh"], cwd=checkout, capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PORT": str(port), "HOST": "127.0.0.1"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and f"PORT={port + 1}" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (checkout / ".venv" / "pip.log").exists(), "it stopped before setting anything up"


def test_serve_help_documents_port_and_the_models_directory(checkout):
    r = subprocess.run(["bash", "scripts/serve.sh", "--help"], cwd=checkout, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0
    for setting in ("PORT", "HOST", "MUSETALK_MODELS_DIR", "/ui/", "/readyz"):
        assert setting in r.stdout, setting
    bad = subprocess.run(["bash", "scripts/serve.sh"], cwd=checkout, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PORT": "30x0"})
    assert bad.returncode == 2 and "PORT must be a number" in bad.stderr
