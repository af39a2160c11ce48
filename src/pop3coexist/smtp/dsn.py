"""Delivery status notifications: RFC 3464 reports in an RFC 6522 multipart/report. No I/O
except ``read_original``.

A report is one message per queued message and kind (failed, delayed, relayed, delivered)
listing only the recipients it is about. It goes to the envelope sender from the null sender
``<>`` (so a report that fails is never reported again), with ``Auto-Submitted`` (RFC 3834).
RET=FULL returns the whole message, RET=HDRS only its header; with no RET a failure report
returns the whole message (up to ``MAX_RETURN`` bytes) and other reports the header.
NOTIFY (RFC 3461 section 4.1) decides which recipients are reported; no NOTIFY means
FAILURE,DELAY. Reports read the queue's typed state (store/envelope.py ``Envelope`` and
``Recipient``); ``report_envelope`` gives the submission dict the queue's ``enqueue`` takes.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from pathlib import Path

from pop3coexist.store.envelope import Envelope, Recipient

MAX_RETURN = 2 * 1024 * 1024

_KIND_NOTIFY = {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS", "delivered": "SUCCESS"}
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Relayed Mail Delivery Report",
    "delivered": "Successful Mail Delivery Report",
}
_INTROS = {
    "failed": "Your message could not be delivered to the recipients below.\r\n"
    "This is a permanent error; the message will not be retried.",
    "delayed": "Delivery of your message to the recipients below has been delayed.\r\n"
    "It is still in the queue and will be retried; you do not need to send it again.",
    "relayed": "Your message was passed on to the recipients' mail system, which does not\r\n"
    "send delivery notifications. No further notification will be sent.",
    "delivered": "Your message was delivered to the recipients below.",
}
_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


# --------------------------------------------------------------------------- xtext (RFC 3461 4)


def xtext_encode(text: str) -> str:
    """RFC 3461 xtext: ``+``, ``=``, controls, space and non-ASCII as ``+XX``."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (malformed ``+`` sequences are kept as they are)."""
    return re.sub(
        r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text
    )


def split_orcpt(orcpt: str | None) -> tuple[str, str] | None:
    """ORCPT as the ESMTP server stores it (``type;address``, already xtext-decoded, or a bare
    address) to (type, address)."""
    if not orcpt:
        return None
    if ";" in orcpt:
        kind, _, value = orcpt.partition(";")
        return kind.strip() or "rfc822", value.strip()
    return "rfc822", orcpt


def orcpt_param(orcpt: str | None) -> str | None:
    """The ``ORCPT=`` value to pass on to a next hop that offers DSN."""
    parts = split_orcpt(orcpt)
    if parts is None:
        return None
    return f"{parts[0]};{xtext_encode(parts[1])}"


# --------------------------------------------------------------------------- policy


def wants_notice(rcpt: Recipient, kind: str) -> bool:
    """Whether NOTIFY asks for a report of ``kind`` (a ``Notice``) for this recipient (no
    NOTIFY: failures and delays)."""
    notify = rcpt.notify
    if notify is None:
        notify = ["FAILURE", "DELAY"]
    notify = [n.upper() for n in notify]
    if "NEVER" in notify:
        return False
    return _KIND_NOTIFY[kind] in notify


def include_full(env: Envelope, kind: str) -> bool:
    """Return the whole message (True) or only its header (False)."""
    ret = env.ret
    if ret == "FULL":
        return True
    if ret == "HDRS":
        return False
    return kind == "failed"


def read_original(path: Path, full: bool, limit: int = MAX_RETURN, offset: int = 0) -> bytes:
    """The original message, or its header section, as CRLF text. Blocking. ``offset``:
    octets at the start of the file to leave out (a local-only ``Return-Path`` line)."""
    try:
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            data = f.read(limit + 1)
    except OSError:
        return b""
    if full and len(data) <= limit:
        return _crlf(data)
    return _crlf(_headers(data))


def _headers(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep) // 2]
    return data


def _crlf(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def enhanced_of(reply: str | None, default: str) -> str:
    """The RFC 3463 code in an SMTP reply (``550 5.1.1 ...``), or ``default``."""
    if reply:
        parts = reply.split()
        if len(parts) > 1 and _ENHANCED_RE.match(parts[1]):
            return parts[1]
    return default


# --------------------------------------------------------------------------- the report


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


def _clean(text: str) -> str:
    """One header-safe line: no CR/LF nor any other control character, ASCII only."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", " ".join(str(text).split()))
    return text.encode("ascii", "replace").decode("ascii")


def status_of(rcpt: Recipient, kind: str) -> str:
    """The DSN Status field for a recipient."""
    st = rcpt.status
    if st and _ENHANCED_RE.match(st):
        return st
    if kind == "failed":
        return enhanced_of(rcpt.last_reply, "5.0.0")
    if kind == "delayed":
        return enhanced_of(rcpt.last_reply, "4.0.0")
    return "2.0.0"


def diagnostic_of(rcpt: Recipient) -> str | None:
    """The Diagnostic-Code field: ``smtp; <reply>`` from a remote server, or ours."""
    diag = rcpt.diagnostic
    if diag:
        return _clean(diag)
    reply = rcpt.last_reply
    if not reply:
        return None
    if rcpt.remote_mta:
        return "smtp; " + _clean(reply)
    return "X-Pop3coexist; " + _clean(reply)


def build_report(
    kind: str,
    env: Envelope,
    recipients: list[Recipient],
    reporting_mta: str,
    original: bytes,
    now: float,
    full: bool | None = None,
) -> bytes:
    """One RFC 3464 report of ``kind`` about ``recipients`` of the queued message ``env``.

    ``original`` is the text from ``read_original`` (the whole message or its header).
    """
    if kind not in _KIND_NOTIFY:
        raise ValueError(f"unknown report kind {kind!r}")
    if full is None:
        full = include_full(env, kind)
    sender = env.sender or ""
    boundary = f"=_report_{secrets.token_hex(12)}"
    msgid = f"<{secrets.token_hex(12)}.dsn@{reporting_mta}>"
    action = {"failed": "failed", "delayed": "delayed", "relayed": "relayed", "delivered": "delivered"}[kind]

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(sender)}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("7bit" if original.isascii() else "8bit"),
    ]

    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        _INTROS[kind],
        "",
    ]
    for r in recipients:
        line = f"<{_clean(r.address)}>"
        diag = r.last_reply or r.diagnostic
        if diag:
            line += f": {_clean(diag)}"
        human.append(line)

    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if env.envid:
        per_message.append(f"Original-Envelope-Id: {_clean(env.envid)}")
    if env.received_from:
        per_message.append(f"X-Pop3coexist-Received-From: {_clean(env.received_from)}")
    per_message.append(f"Arrival-Date: {_date(float(env.arrival or now))}")

    blocks = []
    for r in recipients:
        b = []
        orcpt = split_orcpt(r.orcpt)
        if orcpt:
            b.append(f"Original-Recipient: {_clean(orcpt[0])};{_clean(orcpt[1])}")
        b.append(f"Final-Recipient: rfc822; {_clean(r.address)}")
        b.append(f"Action: {action}")
        b.append(f"Status: {status_of(r, kind)}")
        if r.remote_mta:
            b.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        diag = diagnostic_of(r)
        if diag:
            b.append(f"Diagnostic-Code: {diag}")
        if r.last_attempt:
            b.append(f"Last-Attempt-Date: {_date(float(r.last_attempt))}")
        if kind == "delayed" and r.will_retry_until:
            b.append(f"Will-Retry-Until: {_date(float(r.will_retry_until))}")
        blocks.append(b)

    crlf = "\r\n"
    parts: list[str] = []
    parts.append(crlf.join(head) + crlf + crlf)
    parts.append("This is a MIME-encapsulated message." + crlf + crlf)
    parts.append(f"--{boundary}{crlf}")
    parts.append(
        "Content-Type: text/plain; charset=us-ascii" + crlf
        + "Content-Description: Notification" + crlf + crlf
        + crlf.join(human) + crlf + crlf
    )
    parts.append(f"--{boundary}{crlf}")
    parts.append(
        "Content-Type: message/delivery-status" + crlf
        + "Content-Description: Delivery report" + crlf + crlf
        + crlf.join(per_message) + crlf
    )
    for b in blocks:
        parts.append(crlf + crlf.join(b) + crlf)
    parts.append(crlf)
    text = "".join(parts).encode("ascii")
    if full:
        orig_head = (
            f"--{boundary}{crlf}Content-Type: message/rfc822{crlf}"
            f"Content-Description: Undelivered message{crlf}{crlf}"
        )
    else:
        orig_head = (
            f"--{boundary}{crlf}Content-Type: text/rfc822-headers{crlf}"
            f"Content-Description: Message headers{crlf}{crlf}"
        )
    body = original if original.endswith(b"\r\n") or not original else original + b"\r\n"
    return text + orig_head.encode("ascii") + body + f"{crlf}--{boundary}--{crlf}".encode("ascii")


def report_envelope(env: Envelope, now: float) -> dict:
    """The submission (IOutboundQueue.enqueue) for a report about ``env``: from ``<>``, to its
    sender, NOTIFY=NEVER."""
    return {
        "sender": "",
        "recipients": [{"address": env.sender, "orcpt": None, "notify": ["NEVER"]}],
        "ret": None,
        "envid": None,
        "received_from": f"delivery report for queue id {env.id or '?'}",
        "arrival": now,
        "hops": 0,
    }
