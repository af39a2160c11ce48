"""Headless Chromium for the browser tests (web mail, its attack tests, the admin console):
Debian's ``chromium`` and ``chromium-driver`` driven by Selenium, never a downloaded browser.

``chromium()`` finds both programs (a missing one fails the test in CI, skips it elsewhere);
``headless_chrome(width, height)`` starts a browser of that window size in pixels with a
30 s page-load timeout; the caller quits it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from tests.support.programs import in_ci


def chromium() -> tuple[str, str]:
    """(browser binary, chromedriver path); pytest.fail in CI, pytest.skip elsewhere when
    either is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if not binary or not driver:
        message = "Debian's chromium and chromium-driver are not installed (.ci/debian-packages)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return binary, driver


def headless_chrome(width: int = 1100, height: int = 760) -> Any:
    """A headless Chromium WebDriver with a ``width`` x ``height`` pixel window."""
    binary, driver_path = chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--lang=en-US"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    drv.set_page_load_timeout(30)
    return drv
