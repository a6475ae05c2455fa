"""Fixtures of the browser tests: the system Chromium driven by Playwright, and where screenshots are kept.

Playwright drives the system Chromium (Debian's `chromium` package, which CI installs); its own browser
downloads are never used. Screenshots go to $GDA_TEST_ARTIFACTS when set (CI keeps that folder), else to the
test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.fail(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=found, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[[Page, str], Path]:
    """Saves a full-page screenshot of a page under the given file name and prints where it went."""
    folder = Path(os.environ["GDA_TEST_ARTIFACTS"]) if os.environ.get("GDA_TEST_ARTIFACTS") else tmp_path

    def take(page: Page, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        page.screenshot(path=path, full_page=True)
        print(f"screenshot: {path}")
        return path

    return take
