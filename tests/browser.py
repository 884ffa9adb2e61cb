"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for pages a person looks at.

Every request the page makes is recorded, and so is every console message, so a test can
say "no console error, nothing fetched from outside 127.0.0.1". Screenshots go to
``test-artifacts/`` (``MLOPS_TUNE_TEST_ARTIFACTS`` to move it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MLOPS_TUNE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: without the background-networking flags Chromium calls Google's hosts at start
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


@dataclass
class Page:
    page: Any
    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)

    @property
    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind == "error"]

    def outside_requests(self) -> list[str]:
        """Requests to anything but a local file, 127.0.0.1, a blob: or a data: URL."""
        local = ("file://", "http://127.0.0.1", "blob:", "data:", "about:")
        return [url for url in self.requests if not url.startswith(local)]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


def require_chromium() -> None:
    from tests.conftest import IN_CI

    missing = [what for what, ok in (("Debian's chromium", Path(CHROMIUM).exists()),
                                     ("playwright (dev extra)", _has_playwright())) if not ok]
    if missing:
        message = f"browser tests need {' and '.join(missing)} (.ci/run installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """One headless Chromium; :func:`open_page` opens pages in it."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(chromium: Any, url: str, width: int = 1280, height: int = 1400) -> Page:
    page = chromium.new_page(viewport={"width": width, "height": height})
    seen = Page(page)
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on("console", lambda message: seen.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: seen.console.append(("error", str(error))))
    page.goto(url, wait_until="load")
    return seen
