"""IMAP dates (RFC 3501 section 9 ``date`` and ``date-time``): exactly the grammar's forms are
taken, with their calendar checked; every other form, an impossible moment included, is
BadSyntax (a tagged BAD), never another exception (the imap_parse fuzz harness found an
OverflowError from a year of 40 digits)."""

from __future__ import annotations

import calendar

import pytest

from pop3coexist.imap.parse import BadSyntax, parse_date, parse_datetime


@pytest.mark.parametrize(("text", "expected"), [
    (b"1-Feb-1994", (1994, 2, 1)),
    (b"01-feb-1994", (1994, 2, 1)),
    (b"29-Feb-2024", (2024, 2, 29)),
    (b"31-Dec-9999", (9999, 12, 31)),
    ("7-JUL-1996", (1996, 7, 7)),
])
def test_search_dates_of_the_grammar_are_taken(text, expected):
    """``date-day "-" date-month "-" date-year`` (1-2 digits, a month name in any case, 4
    digits) gives the epoch seconds of that day's UTC midnight."""
    assert parse_date(text) == calendar.timegm((*expected, 0, 0, 0))


@pytest.mark.parametrize("text", [
    b"", b"1-Feb-94", b"1-Feb-19940", b"001-Feb-1994", b"1-Febr-1994", b"1-Xyz-1994",
    b"30-Feb-2024", b"29-Feb-2023", b"0-Jan-2000", b"32-Jan-2000", b"1-Jan-0000",
    b"+1-Jan-2000", b"1_0-Jan-2000", b"1-Jan-2_000", b"\xd9\xa3-Jan-2000", b"1 -Jan-2000",
    b"1-Jan-" + b"6" * 40, b"1-Jan-2000-", b"1-Jan-2000 ",
])
def test_search_dates_outside_the_grammar_are_bad_syntax(text):
    """Short or long years, bad month names, impossible days, signs, underscores, non-ASCII
    digits, a year of 40 digits and trailing text are BadSyntax, never another exception."""
    with pytest.raises(BadSyntax):
        parse_date(text)


@pytest.mark.parametrize(("text", "expected"), [
    (b"17-Jul-1996 02:44:25 -0700", calendar.timegm((1996, 7, 17, 9, 44, 25))),
    (b" 7-Jul-1996 02:44:25 +0000", calendar.timegm((1996, 7, 7, 2, 44, 25))),
    (b"30-Nov-2026 12:00:00 +0130", calendar.timegm((2026, 11, 30, 10, 30, 0))),
    (b"31-Dec-1998 23:59:60 +0000", calendar.timegm((1998, 12, 31, 23, 59, 59))),
])
def test_append_date_times_of_the_grammar_are_taken(text, expected):
    """``date-time`` (day fixed or 1-2 digits, time, zone) gives epoch seconds in UTC; a leap
    second counts as second 59."""
    assert parse_datetime(text) == float(expected)


@pytest.mark.parametrize("text", [
    b"30-Nov-666666666666666666666666666666666666626 12:40:0 +00",  # the fuzzer's input
    b"30-Nov-2026 24:00:00 +0000", b"30-Nov-2026 12:60:00 +0000", b"30-Nov-2026 12:00:61 +0000",
    b"30-Nov-2026 12:00:00 +0060", b"30-Nov-2026 12:00:00 0000", b"30-Nov-2026 12:00 +0000",
    b"31-Nov-2026 12:00:00 +0000", b"30-Nov-2026 1:00:00 +0000", b"30-Nov-2026 12:00:00 +000",
    b"30-Nov-2026  12:00:00 +0000", b"30-Nov-2026 12:00:00 +0000 x", b"\xff", b"",
])
def test_append_date_times_outside_the_grammar_are_bad_syntax(text):
    """Impossible hours, minutes, seconds or zones, missing parts, doubled spaces, trailing
    text and undecodable octets are BadSyntax, never another exception."""
    with pytest.raises(BadSyntax):
        parse_datetime(text)
