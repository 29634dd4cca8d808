"""One settings tree (lipsync_runner/config.py): every environment variable is read there, once,
and docs/configuration.md is generated from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lipsync_runner.config import ApiLimits, RunnerSettings, ServiceSettings, Settings, env_names, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def test_the_settings_page_is_generated_from_the_code():
    """Regenerate with `python -m lipsync_runner.config > docs/configuration.md`."""
    assert DOC.read_text() == settings_markdown(), "docs/configuration.md is stale: regenerate it"


def test_the_page_names_every_variable_of_every_section():
    text = DOC.read_text()
    for section in Settings.model_fields.values():
        for field in section.annotation.model_fields:
            for name in env_names(section.annotation, field):
                assert f"`{name}`" in text, name


def test_each_variable_belongs_to_one_field_of_one_section():
    seen: dict[str, str] = {}
    for section_name, section in Settings.model_fields.items():
        for field in section.annotation.model_fields:
            for name in env_names(section.annotation, field):
                assert name not in seen, f"{name} is read by {seen[name]} and {section_name}.{field}"
                seen[name] = f"{section_name}.{field}"
    assert {"LIP_SYNC_BBOX_SHIFT", "LIP_SYNC_DEBUG", "MUSETALK_MODELS_DIR", "LIP_SYNC_FFMPEG"} <= set(seen)


def test_the_tree_reads_the_environment(monkeypatch):
    monkeypatch.setenv("LIP_SYNC_BBOX_SHIFT", "-7")
    monkeypatch.setenv("LIP_SYNC_MAX_QUEUED_JOBS", "3")
    monkeypatch.setenv("LIP_SYNC_MAX_VIDEO_BYTES", "1234")
    monkeypatch.setenv("MUSETALK_MODELS_DIR", "/models")
    settings = Settings()
    assert settings.runner.bbox_shift == -7
    assert settings.service.max_queued_jobs == 3
    assert settings.limits.max_video_bytes == 1234
    assert str(settings.runner.models_dir) == "/models" and not settings.models_from_store


def test_bbox_shift_and_debug_have_one_home_each():
    assert "bbox_shift" in RunnerSettings.model_fields and "bbox_shift" not in ApiLimits.model_fields
    assert "debug" in ServiceSettings.model_fields and "debug" not in ApiLimits.model_fields


_ENV_READ = re.compile(r"""os\.(?:environ\.get|environ\s*\[|getenv)\(""")


@pytest.mark.parametrize("path", [ROOT / "service.py", *sorted((ROOT / "lipsync_runner").rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_reads_the_environment_itself(path):
    """Only config.py reads variables (a library's own switch set with setdefault is not a read)."""
    if path.name == "config.py":
        return
    assert not _ENV_READ.search(path.read_text()), f"{path.relative_to(ROOT)} reads the environment itself"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert "BaseSettings" not in bases, f"{node.name} in {path.name}: settings live in config.py"
