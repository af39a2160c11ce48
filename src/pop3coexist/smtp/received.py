"""The Received trace header (RFC 5321 section 4.4, RFC 3848) and hop counting.

``received_header`` builds the header this server prepends to every message it accepts;
``HopCounter`` counts the Received lines of a message's header section as it streams past,
so the server can refuse a looping message (``554 5.4.6``) without holding it in memory.
Lines are LF-terminated: messages are stored with LF line ends (Maildir convention).
"""

from __future__ import annotations

import datetime
import email.utils
import re

_HELO_SAFE = re.compile(rb"[^\x21-\x7e]|[()\\]")


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
    date = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
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


class HopCounter:
    """Counts ``Received:`` header fields in a message's header section, line by line.

    Feed each line (without its line end) until ``in_header`` turns False at the first empty
    line (or at a line that cannot be a header field). ``count`` is then the number of hops.
    """

    def __init__(self) -> None:
        self.count = 0
        self.in_header = True

    def line(self, line: bytes) -> None:
        """Look at one header-section line."""
        if not self.in_header:
            return
        if line == b"":
            self.in_header = False
            return
        if line[:1] in (b" ", b"\t"):
            return  # folded continuation
        colon = line.find(b":")
        if colon <= 0 or b" " in line[:colon].rstrip():
            self.in_header = False  # not a header field: the body has begun
            return
        if line[:colon].rstrip().lower() == b"received":
            self.count += 1
