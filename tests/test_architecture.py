"""The house (docs/architecture.md): rooms along the data path, imports pointing one way.

The rules are import-linter contracts in pyproject.toml; this runs them, and checks what import
tools cannot see: that only the vocabulary and the entry points sit at the package's top level,
and that every folder of code is a package (a folder without __init__.py is skipped by grimp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lipsync_runner"
VOCABULARY = {"params.py", "errors.py", "config.py"}
ENTRY_POINTS = {"__init__.py", "__main__.py", "cli.py"}
ROOMS = ["serving", "api", "ui", "integration", "jobs", "storage", "inputs", "pipeline", "faces", "render", "models",
         "audio", "media"]


def _lint_imports() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def contracts() -> subprocess.CompletedProcess:
    return _lint_imports()


def test_every_import_contract_is_kept(contracts):
    assert contracts.returncode == 0, contracts.stdout[-4000:] + contracts.stderr[-2000:]
    assert "0 broken" in contracts.stdout


@pytest.mark.parametrize("name", ["Layers", "No import cycles", "The worker path", "The client SDK"])
def test_the_contract_is_checked(contracts, name):
    """A contract that silently stopped being checked (renamed, dropped) would keep the suite green."""
    kept = [line for line in contracts.stdout.splitlines() if "KEPT" in line or "BROKEN" in line]
    assert any(line.startswith(name) for line in kept), contracts.stdout


def test_only_the_vocabulary_and_the_entry_points_sit_at_the_top():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules <= VOCABULARY | ENTRY_POINTS, sorted(modules - VOCABULARY - ENTRY_POINTS)


def test_every_room_is_a_package_and_is_in_the_layers():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ROOMS)
    for folder in [PACKAGE, *[p for p in PACKAGE.rglob("*") if p.is_dir()]]:
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)} has no __init__.py"
    layers = (ROOT / "pyproject.toml").read_text()
    for room in ROOMS:
        assert f'"lipsync_runner.{room}' in layers or f"| lipsync_runner.{room}" in layers, room


def test_a_broken_rule_is_found(tmp_path):
    """The checker is live: a stage that imports the HTTP layer breaks the layers contract."""
    bad = PACKAGE / "media" / "_architecture_probe.py"
    bad.write_text("from lipsync_runner.api import rest  # noqa: F401\n")
    try:
        result = _lint_imports()
    finally:
        bad.unlink()
    assert result.returncode != 0
    assert "lipsync_runner.media is not allowed to import lipsync_runner.api" in result.stdout


def test_every_code_path_the_docs_name_exists():
    """Moved code leaves no stale map behind: each lipsync_runner/... path in the docs is a real file."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
    missing = {(page.name, path) for page in pages
               for path in re.findall(r"lipsync_runner/[\w/]+\.py", page.read_text()) if not (ROOT / path).exists()}
    assert not missing, sorted(missing)
