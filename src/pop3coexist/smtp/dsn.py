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

Every line of a report that carries a value from outside (the bounce's own header fields, the
per-message and per-recipient fields, the lines of the human-readable part) is written by one
function, ``field``: whatever the value holds (CR, LF, NUL, other controls, Unicode line and
format characters, lone surrogates, non-ASCII, any length), the result is one logical line of
the field's syntax (RFC 3464 section 2, RFC 3461 xtext, RFC 6533 ``utf-8`` addresses, RFC 2047
for a non-ASCII ``To``), folded below 998 octets (RFC 5322 section 2.1.1). No value can add a
field, a per-recipient block, a MIME part or a boundary.
"""

from __future__ import annotations

import base64
import email.quoprimime
import email.utils
import re
import secrets
import unicodedata
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
_ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # used with fullmatch only


# --------------------------------------------------------------------------- xtext (RFC 3461 4)


def xtext_encode(text: str) -> str:
    """RFC 3461 xtext: ``+``, ``=``, controls, space and non-ASCII as ``+XX`` (of the UTF-8
    octets; an undecodable octet kept by ``surrogateescape`` as itself). Never raises."""
    try:
        octets = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no octet
        octets = text.encode("utf-8", "replace")
    out = []
    for byte in octets:
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
        if len(parts) > 1 and _ENHANCED_RE.fullmatch(parts[1]):
            return parts[1]
    return default


# --------------------------------------------------------------------------- the report


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


# --------------------------------------------------------------------------- field safety

MAX_LINE = 998  # octets in a line, CRLF not counted (RFC 5322 section 2.1.1)
# Which syntax each field of a report has (RFC 3464 section 2.2 and 2.3, RFC 5322 section 3.6);
# a name not listed is free text. ``None`` is a line of the human-readable part.
_SYNTAX = {
    "To": "mailbox",
    "From": "mailer-daemon",
    "Message-ID": "msg-id",
    "Reporting-MTA": "mta",
    "Remote-MTA": "mta",
    "Original-Envelope-Id": "envid",
    "Original-Recipient": "typed-address",
    "Final-Recipient": "address",
    "Status": "status",
    "Diagnostic-Code": "typed-text",
    None: "human",
}
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext
_HOST_RE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")
_PLAIN_RE = re.compile(r"[\x20-\x7e]*")


def _unsafe(ch: str) -> bool:
    """A character no report line may carry as it is: ASCII and C1 controls, Unicode format
    characters (bidi overrides, zero-width), line and paragraph separators, surrogates (the
    ``surrogateescape`` form of undecodable octets), private and unassigned code points."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def _text(value: object, ascii_only: bool) -> str:
    """One line of text: runs of white space (CR and LF among them) become one space, unsafe
    characters ``?``; with ``ascii_only`` other non-ASCII characters are written as RFC 6533
    ``\\x{HEX}``."""
    text = " ".join(str(value).split())
    if _PLAIN_RE.fullmatch(text):
        return text
    out = []
    for ch in text:
        if _unsafe(ch):
            out.append("?")
        elif ascii_only and ord(ch) > 0x7E:
            out.append(f"\\x{{{ord(ch):X}}}")
        else:
            out.append(ch)
    return "".join(out)


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 section 3 ``utf-8-addr-xtext``: an address with non-ASCII characters (or
    characters outside xtext) in a ``message/delivery-status`` field; every character but
    QCHAR (``!`` to ``~`` less ``+``, ``=`` and ``\\``) as ``\\x{HEX}``."""
    out = []
    for ch in address:
        if 0x21 <= ord(ch) <= 0x7E and ch not in "+=\\":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _embedded(m: re.Match) -> str:
    """One RFC 6533 ``\\x{HEX}`` decoded (kept as it is when it names no character)."""
    point = int(m.group(1), 16)
    return chr(point) if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF else m.group(0)


def _printable(value: str) -> bool:
    return bool(value) and _PLAIN_RE.fullmatch(value) is not None


def _address(address: str) -> str:
    """``rfc822; addr`` for a printable ASCII address, else RFC 6533 ``utf-8; <xtext>``."""
    if _printable(address) and address.strip() == address:
        return f"rfc822; {address}"
    return f"utf-8; {utf8_addr_xtext(address)}"


def _host(value: object) -> str:
    """A host name or address literal: IDNA for non-ASCII names, anything else left out."""
    text = _text(value, ascii_only=False).replace(" ", "")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            text = _text(text, ascii_only=True)
    return _HOST_RE.sub("", text)[:255] or "unknown"


def _encoded_words(text: str) -> str:
    """RFC 2047 ``=?utf-8?b?...?=`` words, each under 76 characters."""
    raw = text.encode("utf-8", "replace")
    words, chunk = [], b""
    for ch in text:
        b = ch.encode("utf-8", "replace")
        if len(chunk) + len(b) > 45:
            words.append(chunk)
            chunk = b""
        chunk += b
    if chunk or not raw:
        words.append(chunk)
    return " ".join(f"=?utf-8?b?{base64.b64encode(w).decode('ascii')}?=" for w in words)


def _value(syntax: str, value: object) -> str:
    """``value`` made safe for ``syntax`` (see ``_SYNTAX``); one logical line, unfolded."""
    if syntax == "human":
        return _text(value, ascii_only=False)
    raw = str(value)
    if syntax == "mailbox":
        if _printable(raw) and not re.search(r"[<>]", raw) and raw.strip() == raw or raw == "":
            return f"<{raw}>"
        # RFC 6857 section 3.1.10: an address that cannot be written becomes an empty group
        return f"{_encoded_words(_text(raw, ascii_only=False))} :;"
    if syntax == "mailer-daemon":
        return f"Mail Delivery System <MAILER-DAEMON@{_host(raw)}>"
    if syntax == "msg-id":
        left, _, host = raw.rpartition("@")
        return f"<{re.sub(r'[^A-Za-z0-9.]', '', left) or 'dsn'}@{_host(host)}>"
    if syntax == "mta":
        return f"dns; {_host(raw)}"
    if syntax == "envid":
        # RFC 3461 section 4.4: ENVID is xtext on the wire; printable text is written as it is
        return raw if _printable(raw) and " " not in raw else xtext_encode(raw)
    if syntax == "address":
        return _address(raw)
    if syntax == "typed-address":
        kind, _, address = raw.partition(";")
        kind, address = kind.strip(), address.strip()
        if kind.lower() == "utf-8":  # already utf-8-addr-xtext or -unitext: decode once
            address = re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", _embedded, address)
        if kind.lower() in ("rfc822", "utf-8") or not _ATOM_RE.fullmatch(kind):
            return _address(address).replace("; ", ";", 1)
        return f"{kind};{_text(address, ascii_only=True)}"
    if syntax == "status":
        return raw if _ENHANCED_RE.fullmatch(raw) else "4.0.0"
    if syntax == "typed-text":
        kind, _, text = raw.partition(";")
        kind = kind.strip()
        if not _ATOM_RE.fullmatch(kind):
            kind, text = "X-Pop3coexist", raw
        return f"{kind}; {_text(text.strip(), ascii_only=True)}"
    return _text(raw, ascii_only=True)


def _fold(line: str) -> list[str]:
    """``line`` cut into physical lines of at most MAX_LINE octets (UTF-8), at spaces where
    it can be (RFC 5322 section 2.2.3); a continuation line starts with a space."""
    if len(line) <= MAX_LINE // 4 or len(line.encode("utf-8")) <= MAX_LINE:
        return [line]
    out: list[str] = []
    rest = line
    limit = MAX_LINE // 4  # characters: at most 4 octets each, so every piece fits
    while len(rest.encode("utf-8")) > MAX_LINE:
        cut = rest.rfind(" ", 1, limit)
        if cut <= 0:
            cut = limit  # a token longer than a line: cut it (the space is a fold)
        out.append(rest[:cut])
        rest = " " + rest[cut:].lstrip(" ")
    out.append(rest)
    return out


def field(name: str | None, value: object) -> str:
    """The one way a value reaches a report: the line ``name: value`` (``name`` None: a line
    of the human-readable part) with ``value`` made safe for that field's syntax (RFC 3464,
    RFC 3461 xtext, RFC 6533, RFC 2047), folded with CRLF SP below 998 octets. Never raises;
    the result holds no CR or LF but its folds, no control character, and is ASCII except
    for a human-readable line."""
    syntax = _SYNTAX.get(name, "text")
    text = _value(syntax, value)
    line = text if name is None else f"{name}: {text}"
    return "\r\n".join(_fold(line))


def status_of(rcpt: Recipient, kind: str) -> str:
    """The DSN Status field for a recipient."""
    st = rcpt.status
    if st and _ENHANCED_RE.fullmatch(st):
        return st
    if kind == "failed":
        return enhanced_of(rcpt.last_reply, "5.0.0")
    if kind == "delayed":
        return enhanced_of(rcpt.last_reply, "4.0.0")
    return "2.0.0"


def diagnostic_of(rcpt: Recipient) -> str | None:
    """The Diagnostic-Code value (``smtp; <reply>`` from a remote server, or ours), as it is:
    ``field`` makes it safe."""
    diag = rcpt.diagnostic
    if diag:
        return diag
    reply = rcpt.last_reply
    if not reply:
        return None
    if rcpt.remote_mta:
        return "smtp; " + reply
    return "X-Pop3coexist; " + reply


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
    msgid = f"{secrets.token_hex(12)}.dsn@{reporting_mta}"
    action = {"failed": "failed", "delayed": "delayed", "relayed": "relayed", "delivered": "delivered"}[kind]

    head = [
        field("From", reporting_mta),
        field("To", sender),
        field("Subject", _SUBJECTS[kind]),
        field("Date", _date(now)),
        field("Message-ID", msgid),
        field("Auto-Submitted", "auto-replied"),
        field("MIME-Version", "1.0"),
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("7bit" if original.isascii() else "8bit"),
    ]

    human = [
        field(None, f"This is the mail system at {_host(reporting_mta)}."),
        "",
        _INTROS[kind],
        "",
    ]
    for r in recipients:
        line = f"<{r.address}>"
        diag = r.last_reply or r.diagnostic
        if diag:
            line += f": {diag}"
        human.append(field(None, line))

    per_message = [field("Reporting-MTA", reporting_mta)]
    if env.envid:
        per_message.append(field("Original-Envelope-Id", env.envid))
    if env.received_from:
        per_message.append(field("X-Pop3coexist-Received-From", env.received_from))
    per_message.append(field("Arrival-Date", _date(float(env.arrival or now))))

    blocks = []
    for r in recipients:
        b = []
        orcpt = split_orcpt(r.orcpt)
        if orcpt:
            b.append(field("Original-Recipient", f"{orcpt[0]};{orcpt[1]}"))
        b.append(field("Final-Recipient", r.address))
        b.append(field("Action", action))
        b.append(field("Status", status_of(r, kind)))
        if r.remote_mta:
            b.append(field("Remote-MTA", r.remote_mta))
        diag = diagnostic_of(r)
        if diag:
            b.append(field("Diagnostic-Code", diag))
        if r.last_attempt:
            b.append(field("Last-Attempt-Date", _date(float(r.last_attempt))))
        if kind == "delayed" and r.will_retry_until:
            b.append(field("Will-Retry-Until", _date(float(r.will_retry_until))))
        blocks.append(b)

    crlf = "\r\n"
    notification = crlf.join(human) + crlf + crlf
    if notification.isascii():
        text_head = "Content-Type: text/plain; charset=us-ascii" + crlf
    else:  # RFC 6533 section 6.1: the human-readable part may be UTF-8; kept 7-bit here
        text_head = ("Content-Type: text/plain; charset=utf-8" + crlf
                     + "Content-Transfer-Encoding: quoted-printable" + crlf)
        octets = notification.encode("utf-8").decode("latin-1")  # quoprimime wants octets
        notification = email.quoprimime.body_encode(octets, eol=crlf) + crlf
    parts: list[str] = []
    parts.append(crlf.join(head) + crlf + crlf)
    parts.append("This is a MIME-encapsulated message." + crlf + crlf)
    parts.append(f"--{boundary}{crlf}")
    parts.append(text_head + "Content-Description: Notification" + crlf + crlf + notification)
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
