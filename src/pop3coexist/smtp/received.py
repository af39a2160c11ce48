"""The trace fields (RFC 5321 section 4.4, RFC 3848), hop counting and the header boundary.

``received_header`` builds the Received field this server prepends to every message it
accepts; ``return_path_field`` the Return-Path field added at final delivery (local mailboxes
only, never in a copy relayed onward). ``HopCounter`` follows a message's header section as
it streams past: it counts the Received lines, so the server can refuse a looping message
(``554 5.4.6``) without holding it in memory, and says where the header section ends
(``is_header_field``: RFC 5322 sections 2.2 and 3.6.8), so the server can insert the empty
line when content does not start with a header field. Lines are LF-terminated: messages are
stored with LF line ends (Maildir convention).
"""

from __future__ import annotations

import datetime
import email.utils
import re

_HELO_SAFE = re.compile(rb"[^\x21-\x7e]|[()\\]")
# RFC 5322 section 3.6.8: field-name = 1*ftext (printable US-ASCII except ":"), then ":";
# white space before the colon is the obsolete syntax of section 4.5, which readers accept.
# The name is the match's group (issue 17: one regex call gives "is a field" and its name).
_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")

FIELD, CONTINUATION, END, BODY = "field", "continuation", "end", "body"


def is_header_field(line: bytes) -> bool:
    """True when ``line`` (without its line end) starts a header field: a field name of
    printable US-ASCII other than ``:`` followed by ``:`` (RFC 5322 sections 2.2, 3.6.8).
    An indented line, an empty line, an mbox ``From `` line or 8-bit text are not."""
    return _FIELD_RE.match(line) is not None


def field_name(line: bytes) -> bytes:
    """The lower-case field name of a header field line (``is_header_field`` is true)."""
    return line.split(b":", 1)[0].rstrip(b" \t").lower()


def return_path_field(sender: str) -> bytes:
    """``Return-Path: <reverse-path>`` as an LF-terminated line (RFC 5321 section 4.4): added
    by the server that makes the final delivery; ``<>`` for the null sender."""
    clean = sender.replace("\r", "").replace("\n", "")
    return f"Return-Path: <{clean}>\n".encode("utf-8", "surrogateescape")


def with_keyword(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` protocol keyword of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def _clean(text: str, limit: int = 100) -> str:
    """Printable ASCII without comment-breaking characters (the HELO name is client text)."""
    raw = text.encode("ascii", "replace")[:limit]
    return _HELO_SAFE.sub(b"?", raw).decode("ascii") or "unknown"


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None = None,
    tls: str | None = None,
    when: float,
) -> bytes:
    """The Received header as LF-terminated bytes.

    ``recipient`` is named only when the message has exactly one (RFC 5321 section 7.2: do not
    disclose the other recipients). ``tls`` is a short description like ``TLSv1.3:AES256``.
    """
    ip = _clean(client_ip, 60)
    date = received_date(when)
    lines = [f"Received: from {_clean(helo)} ([{ip}])"]
    by = f"\tby {hostname} (pop3coexist) with {protocol}"
    if tls:
        by += f" ({_clean(tls, 80)})"
    lines.append(f"{by} id {queue_id}")
    if recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("ascii")


_DATES: dict[int, str] = {}  # whole second -> its RFC 5322 date (issue 17: one format a second)


def received_date(when: float) -> str:
    """The RFC 5322 date-time of ``when`` (seconds since the epoch) in UTC, as the Received
    field gives it: ``Mon, 30 Nov 2026 23:57:39 +0000``; formatted once per whole second."""
    second = int(when // 1)
    date = _DATES.get(second)
    if date is None:
        if len(_DATES) >= 64:
            _DATES.clear()
        date = _DATES[second] = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(second, datetime.UTC))
    return date


class HopCounter:
    """Counts ``Received:`` header fields in a message's header section, line by line.

    Feed each line (without its line end) until ``in_header`` turns False at the first empty
    line (or at a line that cannot be a header field). ``count`` is then the number of hops.
    """

    def __init__(self) -> None:
        self.count = 0
        self.in_header = True
        self.fields = 0  # header fields seen so far
        self.name = b""  # the lower-case name of the last FIELD (``field_name`` of its line)

    def line(self, line: bytes) -> str:
        """Look at one line; return what it is: ``FIELD`` (a header field starts),
        ``CONTINUATION`` (a folded line of the field before it), ``END`` (the empty line that
        ends the header section) or ``BODY`` (the header section has ended without an empty
        line: this line, which is no header field, is the first body line; RFC 5322 section
        2.1). After the header section every line is ``BODY``."""
        if not self.in_header:
            return BODY
        if line == b"":
            self.in_header = False
            return END
        if line[:1] in (b" ", b"\t") and self.fields:
            return CONTINUATION  # folded (RFC 5322 section 2.2.3)
        m = _FIELD_RE.match(line)  # is_header_field, with the name
        if m is None:
            self.in_header = False  # not a header field: the body has begun
            return BODY
        self.fields += 1
        name = self.name = m.group(1).lower()
        if name == b"received":
            self.count += 1
        return FIELD
