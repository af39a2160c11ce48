"""Reading a stored message for web mail: header fields, the text to show, attachments.

``parse_message(data)`` gives a ``MessageView``: decoded ``subject``, ``from_``, ``to``,
``cc``, ``date`` (RFC 2047 words decoded, control characters dropped), ``message_id`` and
``references`` (for replies), the ``text`` (the first text/plain part that is not an
attachment) and ``html`` (the first text/html one), and ``parts``: every leaf part with an
index (its position in a depth-first walk, stable for the same bytes), so ``part(data, n)``
gives one back for download. Attachments are the leaf parts with ``Content-Disposition:
attachment``, a file name, or a type that is not text; an inline image with a Content-ID is
an attachment too, and ``cid`` maps its id to its index (for ``<img src="cid:...">``).

``summary(data)`` reads only the header section (folder lists): From, Subject, Date. Nothing
here touches files: the caller reads the bytes (store/folders.py) off the reactor.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_TEXT = 2 * 1024 * 1024  # characters of one part shown at most


def _clean(value: Any) -> str:
    try:
        text = str(value) if value is not None else ""
    except Exception:
        text = ""
    return _CONTROL.sub("", text).replace("\r", "").replace("\n", " ").strip()


def _header(msg: EmailMessage, name: str) -> str:
    try:
        return _clean(msg.get(name))
    except Exception:  # a malformed field the parser cannot decode: its raw form
        raw = msg.get_all(name, failobj=[""])[0]
        return _clean(raw)


@dataclass
class Part:
    """One leaf part: ``index``, ``content_type``, ``filename`` (may be ""), ``size``
    (decoded octets), ``attachment`` (listed for download), ``content_id``."""

    index: int
    content_type: str
    filename: str
    size: int
    attachment: bool
    content_id: str = ""


@dataclass
class MessageView:
    """A message as web mail shows it (see the module docstring)."""

    subject: str = ""
    from_: str = ""
    to: str = ""
    cc: str = ""
    reply_to: str = ""
    date: str = ""
    message_id: str = ""
    references: str = ""
    text: str | None = None
    html: str | None = None
    parts: list[Part] = field(default_factory=list)
    cid: dict[str, int] = field(default_factory=dict)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.attachment]


def _parse(data: bytes, headersonly: bool = False) -> EmailMessage:
    parser = email.parser.BytesParser(policy=email.policy.default)
    return parser.parsebytes(data, headersonly=headersonly)  # type: ignore[return-value]


def _text_of(part: EmailMessage) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "us-ascii"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("latin-1")
    return text[:MAX_TEXT]


def _filename(part: EmailMessage) -> str:
    try:
        name = part.get_filename() or ""
    except Exception:
        name = ""
    name = _clean(name).replace("/", "_").replace("\\", "_")
    return name[:200]


def _leaves(msg: EmailMessage) -> list[tuple[int, EmailMessage]]:
    """(index, part) of every leaf, depth first; an attached message (message/rfc822) is one
    leaf (downloaded whole), never entered."""
    out: list[tuple[int, EmailMessage]] = []
    counter = 0

    def visit(p: EmailMessage, depth: int) -> None:
        nonlocal counter
        counter += 1
        if p.get_content_maintype() == "multipart" and depth < 20:
            payload = p.get_payload()
            for sub in payload if isinstance(payload, list) else []:
                visit(sub, depth + 1)
        else:
            out.append((counter - 1, p))

    visit(msg, 0)
    return out


def parse_message(data: bytes) -> MessageView:
    """A ``MessageView`` of a whole message (see the module docstring)."""
    msg = _parse(data)
    view = MessageView(
        subject=_header(msg, "Subject"), from_=_header(msg, "From"), to=_header(msg, "To"),
        cc=_header(msg, "Cc"), reply_to=_header(msg, "Reply-To"), date=_header(msg, "Date"),
        message_id=_header(msg, "Message-ID"), references=_header(msg, "References"))
    for index, part in _leaves(msg):
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = _filename(part)
        cid = _clean(part.get("Content-ID", "")).strip("<>")
        try:
            payload = part.get_payload(decode=True) or b""
        except Exception:
            payload = b""
        is_body_text = (ctype in ("text/plain", "text/html") and disposition != "attachment"
                        and not filename)
        if is_body_text and ctype == "text/plain" and view.text is None:
            view.text = _text_of(part)
        elif is_body_text and ctype == "text/html" and view.html is None:
            view.html = _text_of(part)
        attachment = not is_body_text
        if ctype == "message/rfc822" and not filename:
            filename = "message.eml"
        view.parts.append(Part(index, ctype, filename, len(payload), attachment, cid))
        if cid:
            view.cid[cid] = index
    return view


def part(data: bytes, index: int) -> tuple[bytes, str, str] | None:
    """(decoded content, media type, file name) of leaf part ``index``, or None."""
    msg = _parse(data)
    for i, p in _leaves(msg):
        if i == index:
            if p.get_content_type() == "message/rfc822":
                inner = p.get_payload()
                content = inner[0].as_bytes(policy=email.policy.SMTP) \
                    if isinstance(inner, list) and inner else b""
            else:
                content = p.get_payload(decode=True) or b""
            return content, p.get_content_type(), _filename(p) or f"part-{index}"
    return None


@dataclass
class Summary:
    """What a folder list shows of a message."""

    from_: str
    subject: str
    date: str
    timestamp: float | None


def summary(head: bytes) -> Summary:
    """From, Subject and Date of a message's header section (the bytes up to the blank line
    are enough)."""
    msg = _parse(head, headersonly=True)
    date = _header(msg, "Date")
    ts = None
    try:
        parsed = email.utils.parsedate_to_datetime(date) if date else None
        ts = parsed.timestamp() if parsed else None
    except (TypeError, ValueError, IndexError, OverflowError):
        ts = None
    sender = _header(msg, "From")
    name, addr = email.utils.parseaddr(sender)
    return Summary(name or addr or sender, _header(msg, "Subject"), date, ts)
