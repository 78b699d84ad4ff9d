"""A real browser for the slow tests: Playwright for Python driving Debian's Chromium.

Playwright's own browser download is not available here, so it is pointed at the system
Chromium (``apt-get install chromium``; ``LLMSLIM_CHROMIUM`` names another binary). ``make
test-slow`` installs both (``make browser``). Screenshots go to ``out/browser-tests/`` (or
``LLMSLIM_TEST_OUTPUT``), one folder per test, for people to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    path = os.environ.get("LLMSLIM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip(f"no Chromium at {path}: apt-get install -y chromium (or make browser)")
    return path


@contextmanager
def browser():
    """A headless Chromium; ``pytest.skip`` when Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2 (or make browser)")
    exe = chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def output_dir(request) -> Path:
    """Where a test leaves its screenshots: out/browser-tests/<test name>/ (emptied first)."""
    base = Path(os.environ.get("LLMSLIM_TEST_OUTPUT") or ROOT / "out" / "browser-tests")
    path = base / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class Console:
    """Collects a page's console errors and uncaught exceptions."""

    def __init__(self, page):
        self.errors: list[str] = []  # "text @ url" (the url of the script or resource it is about)
        self.exceptions: list[str] = []
        page.on("console", lambda m: self.errors.append(f"{m.text} @ {m.location.get('url', '')}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.exceptions.append(str(e)))

    def unexpected(self, allowed: str | None = None) -> list[str]:
        """Exceptions, and console errors other than those matching ``allowed`` (a regex)."""
        return self.exceptions + [e for e in self.errors if not (allowed and re.search(allowed, e))]
