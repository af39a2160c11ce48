"""IMAP command syntax (RFC 3501 section 9): a tokenizer for one complete command (its
literals already read), sequence sets, flag lists and dates. Pure functions; no I/O.

Tokens: ``Atom`` (str subclass; ``BODY.PEEK[HEADER.FIELDS (FROM)]<0.10>`` is one atom, the
bracket may hold spaces and parentheses), ``bytes`` for a quoted string or a literal, and
``list`` for a parenthesised list.
"""

from __future__ import annotations

import bisect
import datetime
import re
import time
from collections.abc import Iterator, Sequence

__all__ = ["Atom", "BadSyntax", "SeqSet", "tokenize", "parse_seqset", "parse_date", "format_date",
           "LITERAL_RE"]

LITERAL_RE = re.compile(rb"\{(\d{1,19})(\+?)\}\Z")
_ATOM_STOP = set(b' (){"\\') | set(range(0, 0x20)) | {0x7F}  # list wildcards % * allowed
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


class BadSyntax(ValueError):
    """The command cannot be read: answered BAD, the session goes on."""


class Atom(str):
    """An atom (or NIL, a number, a sequence set, a fetch attribute)."""

    __slots__ = ()


def tokenize(data: bytes) -> list:
    """The tokens of one command (without its tag); see the module docstring."""
    pos = 0
    stack: list[list] = [[]]
    n = len(data)
    while pos < n:
        c = data[pos]
        if c == 0x20:
            pos += 1
            continue
        if c == 0x28:  # (
            if len(stack) > MAX_DEPTH:
                raise BadSyntax(f"parentheses nested deeper than {MAX_DEPTH}")
            stack.append([])
            pos += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise BadSyntax("unbalanced parenthesis")
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif c == 0x22:  # "
            out = bytearray()
            pos += 1
            while True:
                if pos >= n:
                    raise BadSyntax("unterminated quoted string")
                ch = data[pos]
                if ch == 0x5C and pos + 1 < n:
                    out.append(data[pos + 1])
                    pos += 2
                elif ch == 0x22:
                    pos += 1
                    break
                elif ch in (0x0D, 0x0A):
                    raise BadSyntax("line end in a quoted string")
                else:
                    out.append(ch)
                    pos += 1
            stack[-1].append(bytes(out))
        elif c == 0x7B:  # { literal: {n}CRLF then n octets
            end = data.find(b"}\r\n", pos)
            if end < 0:
                raise BadSyntax("malformed literal")
            m = LITERAL_RE.match(data[pos:end + 1])
            if not m:
                raise BadSyntax("malformed literal")
            size = int(m.group(1))
            start = end + 3
            if start + size > n:
                raise BadSyntax("literal shorter than announced")
            stack[-1].append(data[start:start + size])
            pos = start + size
        else:
            start = pos
            depth = 0
            if c == 0x5C:  # a flag: "\\" atom (RFC 3501 flag-extension)
                pos += 1
            while pos < n:
                ch = data[pos]
                if ch == 0x5B:  # [
                    depth += 1
                elif ch == 0x5D:  # ]
                    if depth == 0:
                        break
                    depth -= 1
                elif depth == 0 and ch in _ATOM_STOP:
                    break
                elif depth and ch in (0x0D, 0x0A):
                    break
                pos += 1
            if pos == start:
                raise BadSyntax(f"unexpected character {chr(c)!r}")
            stack[-1].append(Atom(data[start:pos].decode("latin-1")))
    if len(stack) != 1:
        raise BadSyntax("unbalanced parenthesis")
    return stack[0]


MAX_NZ = 4294967295  # nz-number: a 32-bit unsigned number (RFC 3501 section 9)
MAX_DEPTH = 16  # parenthesis nesting of one command (SEARCH groups, BODY[...] lists)


class SeqSet:
    """A sequence set (RFC 3501 ``sequence-set``, section 9 ``seq-range`` and section 6.4.8)
    as sorted, merged, inclusive ``ranges``: memory is the number of ranges the client typed,
    never the numbers they span. ``*`` is ``largest`` and a range ``5:2`` is ``2:5``; a range
    reaching past ``largest`` is clipped to it (``largest:n`` when both ends are past it, so a
    UID set ``n:*`` always names the last message, section 6.4.8), so iterating one costs at
    most ``largest`` steps; ``highest`` keeps the largest number typed, for the caller that
    must refuse a message sequence number past the end (BAD)."""

    __slots__ = ("ranges", "highest")

    def __init__(self, ranges: list[tuple[int, int]], highest: int) -> None:
        self.ranges = ranges
        self.highest = highest  # the largest number typed (before clipping), ``*`` counted

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self.ranges, (n, MAX_NZ + 1)) - 1
        return i >= 0 and self.ranges[i][0] <= n <= self.ranges[i][1]

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeqSet):
            return self.ranges == other.ranges
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"SeqSet({self.ranges!r})"

    def select(self, ordered: Sequence[int]) -> list[int]:
        """The members of ``ordered`` (ascending numbers, a UID list) in this set, found by
        bisection per range: the work is the ranges plus the matches, not the span."""
        out: list[int] = []
        for lo, hi in self.ranges:
            a = bisect.bisect_left(ordered, lo)
            b = bisect.bisect_right(ordered, hi)
            out.extend(ordered[a:b])
        return out

    def positions(self, count: int) -> list[int]:
        """The 0-based indexes of message sequence numbers ``1..count`` in this set."""
        out: list[int] = []
        for lo, hi in self.ranges:
            out.extend(range(lo - 1, min(hi, count)))
        return out


def parse_seqset(text: str, largest: int) -> SeqSet:
    """A sequence set (``SeqSet``; ``*`` being ``largest``, 0 for an empty folder). Raises
    BadSyntax for anything but ``nz-number`` / ``*`` ranges separated by commas."""
    if not isinstance(text, str) or not text:
        raise BadSyntax("missing sequence set")
    raw: list[tuple[int, int]] = []
    highest = 0
    for item in text.split(","):
        lo, colon, hi = item.partition(":")
        ends = []
        for end in ((lo, hi) if colon else (lo,)):
            if end == "*":
                ends.append(largest)
                highest = max(highest, largest)
                continue
            if not end.isdigit() or not end.isascii() or len(end) > 10 or end[0] == "0":
                raise BadSyntax(f"bad sequence set {text[:40]!r}")
            n = int(end)
            if n > MAX_NZ:
                raise BadSyntax(f"bad sequence set {text[:40]!r}")
            highest = max(highest, n)
            ends.append(n)
        a, b = min(ends), max(ends)
        if largest < 1:
            continue  # an empty folder: nothing to name (``highest`` tells what was typed)
        if a > largest:
            a = largest  # wholly past the end: the last one (section 6.4.8)
        raw.append((a, min(b, largest)))
    raw.sort()
    merged: list[tuple[int, int]] = []
    for a, b in raw:
        if merged and a <= merged[-1][1] + 1:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return SeqSet(merged, highest)


def format_seqset(numbers: list[int]) -> str:
    """A compact sequence set for ``numbers`` (COPYUID, APPENDUID)."""
    numbers = sorted(numbers)
    out = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(out)


# RFC 3501 section 9: date = date-text / DQUOTE date-text DQUOTE; date-text = date-day "-"
# date-month "-" date-year; date-day = 1*2DIGIT; date-year = 4DIGIT; date-time = DQUOTE
# date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE; time = 2DIGIT ":" 2DIGIT
# ":" 2DIGIT; zone = ("+" / "-") 4DIGIT. Digits are ASCII only (no int() leniency: "+1", "1_0").
_DATE_TEXT = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
_DATE_TIME = re.compile(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})")


def _epoch(day: bytes, month: bytes, year: bytes, hh: int = 0, mm: int = 0, ss: int = 0) -> int:
    """UTC epoch seconds of a checked calendar date and time; ValueError when no such moment
    (day 31 of a 30-day month, hour 24, minute 60; a leap second 60 counts as 59)."""
    name = month.decode("ascii").capitalize()
    if name not in _MONTHS or ss > 60:
        raise ValueError(name)
    moment = datetime.datetime(int(year), _MONTHS.index(name) + 1, int(day), hh, mm, min(ss, 59),
                               tzinfo=datetime.UTC)
    return int(moment.timestamp())


def parse_date(text: str | bytes) -> float:
    """A SEARCH date (``1-Feb-1994``, RFC 3501 section 9 ``date``) as the epoch seconds of its
    UTC midnight. Raises BadSyntax for anything else, an impossible date included."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    m = _DATE_TEXT.fullmatch(raw)
    try:
        if m is None:
            raise ValueError(raw)
        return float(_epoch(*m.groups()))
    except (ValueError, OverflowError):
        raise BadSyntax(f"bad date {raw[:30].decode('ascii', 'replace')!r}") from None


def parse_datetime(text: bytes) -> float:
    """An APPEND date-time (``"17-Jul-1996 02:44:25 -0700"``, RFC 3501 section 9
    ``date-time`` without its quotes) as epoch seconds. Raises BadSyntax for anything else,
    an impossible date, time or zone included."""
    m = _DATE_TIME.fullmatch(text.strip())
    try:
        if m is None:
            raise ValueError(text)
        d, mon, y, hh, mm, ss, sign, zh, zm = m.groups()
        if int(zm) > 59:
            raise ValueError(zm)
        base = _epoch(d, mon, y, int(hh), int(mm), int(ss))
        offset = (-1 if sign == b"-" else 1) * (int(zh) * 3600 + int(zm) * 60)
        return float(base - offset)
    except (ValueError, OverflowError):
        raise BadSyntax("bad date-time") from None


def format_date(seconds: float) -> str:
    """INTERNALDATE (``"17-Jul-1996 02:44:25 +0000"``), in UTC."""
    t = time.gmtime(seconds)
    return f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year} " \
           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
