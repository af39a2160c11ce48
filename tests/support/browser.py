"""Headless Chromium for the browser tests (web mail, its attack tests, the admin console):
Debian's ``chromium`` and ``chromium-driver`` driven by Selenium, never a downloaded browser.

``chromium()`` finds both programs (a missing one fails the test in CI, skips it elsewhere);
``headless_chrome(width, height)`` starts a browser of that window size in pixels with a
30 s page-load timeout; the caller quits it.

A click that submits a form or follows a link replaces the page while the test goes on: for a
moment the element asked for is on neither page (``NoSuchElementException``) or was found on
the old one and is gone before its text is read (``StaleElementReferenceException``).
``element_text`` reads such an element as "" and ``wait_for`` treats both errors as "not yet",
so a test never fails on that moment; a wait that times out says which page the browser shows.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
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


def _replaced_page_errors() -> tuple[type[Exception], ...]:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return NoSuchElementException, StaleElementReferenceException


def element_text(drv: Any, by: str, value: str) -> str:
    """The text of the first element ``drv.find_elements(by, value)`` finds; "" when there is
    none or while the page is being replaced (module docstring)."""
    try:
        found = drv.find_elements(by, value)
        return found[0].text if found else ""
    except _replaced_page_errors():
        return ""


def describe_page(drv: Any) -> str:
    """One line naming the page the browser shows: URL, title and the start of its text
    (for a failure message; never a cookie)."""
    from selenium.webdriver.common.by import By

    try:
        body = " ".join(element_text(drv, By.TAG_NAME, "body").split())[:300]
        return f"{drv.current_url} (title {drv.title!r}): {body!r}"
    except Exception as e:  # the browser itself is gone: say so rather than hide the wait
        return f"(the browser did not answer: {type(e).__name__})"


def wait_for(drv: Any, predicate: Callable[[], Any], timeout: float = 20.0,
             what: str = "condition") -> Any:
    """Poll ``predicate`` (every 10-200 ms) until it returns something true and return it;
    an element missing or stale while the page is replaced counts as false. After ``timeout``
    seconds: AssertionError naming ``what`` and the page shown (``describe_page``)."""
    errors = _replaced_page_errors()
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            value = predicate()
        except errors:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; the browser "
                                 f"shows {describe_page(drv)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def present(drv: Any, by: str, value: str, timeout: float = 20.0) -> Any:
    """The first element ``(by, value)`` finds once it is there and not stale (after a
    navigating click the new page may not be loaded yet); AssertionError as ``wait_for``
    after ``timeout`` s."""
    def live() -> Any:
        found = drv.find_elements(by, value)
        # reading the text raises StaleElementReferenceException for one of the old page's
        return found[0] if found and found[0].text is not None else None

    return wait_for(drv, live, timeout, f"an element {by}={value!r}")
