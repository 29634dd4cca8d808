"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright (never a download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("LIPSYNC_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch_chromium() -> Iterator:
    """The browser for a module's tests: skipped without one, but a failure on CI."""
    exe = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe, missing = None, "playwright is not installed (pip install -r requirements-dev.txt)"
    else:
        missing = "no chromium executable (apt-get install chromium, or set LIPSYNC_CHROMIUM)"
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests need a browser on CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()
