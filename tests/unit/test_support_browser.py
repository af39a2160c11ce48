"""The browser tests' waits (``tests/support/browser.py``): a page being replaced by a click's
navigation (element missing, or stale before its text is read) is "not yet", never a failure;
a wait that times out names the page the browser shows. (Stop 26's CI failed on a
NoSuchElementException read while the console's server picker replaced the page.)"""

from __future__ import annotations

import pytest

pytest.importorskip("selenium")

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)

from tests.support.browser import element_text, present, wait_for  # noqa: E402


class _Element:
    def __init__(self, text: str, stale: bool = False) -> None:
        self._text, self._stale = text, stale

    @property
    def text(self) -> str:
        if self._stale:
            raise StaleElementReferenceException("gone")
        return self._text


class _Navigating:
    """A driver whose page is replaced over the first ``gap`` look-ups: look-ups in between
    see no element, then a stale one, then the new page's."""

    current_url = "http://127.0.0.1:1/mailboxes"
    title = "Mailboxes"

    def __init__(self, gap: int) -> None:
        self.calls, self.gap = 0, gap

    def find_elements(self, by: str, value: str) -> list[_Element]:
        self.calls += 1
        if by == "tag name":
            return [_Element("Server: this server  Mailboxes")]
        if self.calls < self.gap:
            return []
        if self.calls == self.gap:
            return [_Element("old", stale=True)]
        return [_Element("Server: server-b")]

    def find_element(self, by: str, value: str) -> _Element:
        found = self.find_elements(by, value)
        if not found:
            raise NoSuchElementException(value)
        return found[0]


def test_missing_and_stale_elements_read_as_empty_until_the_new_page() -> None:
    """element_text gives "" for a missing and for a stale element, then the new text."""
    drv = _Navigating(gap=3)
    assert [element_text(drv, "id", "server-label") for _ in range(4)] == [
        "", "", "", "Server: server-b"]


def test_wait_for_rides_over_the_replaced_page() -> None:
    """A predicate using find_element (which raises NoSuchElement, then reads a stale
    element) still ends with the new page's value; ``present`` returns the element."""
    drv = _Navigating(gap=4)
    assert wait_for(drv, lambda: "server-b" in drv.find_element("id", "server-label").text, 5)
    assert present(_Navigating(gap=2), "id", "server-label").text == "Server: server-b"


def test_a_timed_out_wait_names_the_page_shown() -> None:
    """After the timeout the AssertionError says what was awaited, the URL, the title and the
    start of the page's text."""
    drv = _Navigating(gap=10**9)
    with pytest.raises(AssertionError) as caught:
        wait_for(drv, lambda: drv.find_element("id", "server-label"), 0.05, "server B picked")
    text = str(caught.value)
    assert "server B picked" in text and "/mailboxes" in text and "Mailboxes" in text
    assert "Server: this server" in text
