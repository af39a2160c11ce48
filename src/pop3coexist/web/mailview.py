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

Hostile mail is read in bounded time and never makes a message unreadable: the MIME structure
is parsed with the fast ``compat32`` policy (the default policy's header objects cost about a
millisecond a part: 10,000 parts took 19 s), header values decoded by ``_unraw`` (RFC 2047
words; 8-bit octets as UTF-8, else Windows-1252); at most ``MAX_PARTS`` leaves are listed
(``MessageView.truncated`` says more exist); a message with more than ``MAX_MULTIPARTS``
multipart or message/rfc822 parts (a nesting bomb the parser would recurse into until
RecursionError) is shown as its header and raw text; a charset that is not a text encoding or
fails to decode (``idna``, ``rot13``, an unknown name) falls back to Latin-1; a media type
that is not a plain ``type/subtype`` token pair becomes ``application/octet-stream``.
"""

from __future__ import annotations

import base64
import codecs
import email.header
import email.parser
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_TEXT = 2 * 1024 * 1024  # characters of one part shown at most
MAX_PARTS = 500  # leaves of one message listed (and downloadable) at most
MAX_MULTIPARTS = 200  # multipart/message parts at most before the structure is not parsed
MAX_DEPTH = 20  # multipart levels entered at most
_TOKEN_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,100}\Z")
_CONTAINER = re.compile(rb"(?im)^content-type:[ \t]*(?:\r?\n[ \t]+)?[\"']?(?:multipart|message)/")


class _RawCompat(email.policy.Compat32):
    """compat32 that hands header values back as parsed (8-bit octets as surrogates, for
    ``_unraw``), not as ``Header`` objects that would turn them into U+FFFD."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_COMPAT = _RawCompat()
# Python codecs that are no IANA charset of mail: they would turn text into nonsense
_NOT_MAIL_CHARSETS = {"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined"}


def _clean(value: Any) -> str:
    try:
        text = str(value) if value is not None else ""
    except Exception:
        text = ""
    return _CONTROL.sub("", text).replace("\r", "").replace("\n", " ").strip()


def _header(msg: Any, name: str) -> str:
    """A header field of a compat32-parsed message, decoded (``_unraw``) and cleaned."""
    try:
        raw = msg.get(name)
    except Exception:
        raw = None
    return _clean(_unraw(str(raw))) if raw is not None else ""


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
    truncated: bool = False  # more parts than listed, or a structure too deep to parse

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.attachment]


def _parse(data: bytes, headersonly: bool = False) -> Any:
    """``data`` parsed with ``_COMPAT`` (header values raw, for ``_header``)."""
    return email.parser.BytesParser(policy=_COMPAT).parsebytes(data, headersonly=headersonly)


def _structure(data: bytes) -> Any:
    """The whole message parsed with compat32 (fast; header values stay raw), or None when it
    holds more than MAX_MULTIPARTS containers (a nesting bomb: shown as raw text)."""
    if len(_CONTAINER.findall(data, 0, len(data))) > MAX_MULTIPARTS:
        return None
    try:
        return _parse(data)
    except RecursionError:  # pragma: no cover - MAX_MULTIPARTS keeps the parser shallow
        return None


def _unraw(text: str) -> str:
    """A compat32 header value: 8-bit octets (kept as surrogates) read as UTF-8, else
    Windows-1252; RFC 2047 encoded words decoded."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return text
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", "replace")
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # a broken encoded word: shown as written
            pass
    return text


def decode_text(payload: bytes, charset: str | None) -> str:
    """``payload`` decoded with the part's ``charset`` when that names a text encoding that
    can decode it (undecodable octets replaced), else as Latin-1; at most MAX_TEXT
    characters."""
    payload = payload[: MAX_TEXT * 4]
    name = (charset or "us-ascii").strip().lower()
    try:
        info = codecs.lookup(name)
        if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_MAIL_CHARSETS:
            raise LookupError(name)
        text = payload.decode(info.name, "replace")
    except Exception:  # LookupError, or a codec that cannot "replace" (idna, punycode)
        text = payload.decode("latin-1")
    return text[:MAX_TEXT]


def _text_of(part: Any) -> str:
    try:
        payload = part.get_payload(decode=True) or b""
    except Exception:
        payload = b""
    if not isinstance(payload, bytes):
        payload = b""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return decode_text(payload, charset)


def content_type(part: Any) -> str:
    """The part's media type, lower case, when it is a ``type/subtype`` token pair; else
    ``application/octet-stream`` (it goes into a Content-Type header of ours)."""
    try:
        kind = part.get_content_type()
    except Exception:
        kind = ""
    return kind if _TOKEN_TYPE.match(kind) else "application/octet-stream"


def _filename(part: Any) -> str:
    try:
        name = part.get_filename() or ""
    except Exception:
        name = ""
    if isinstance(name, tuple):  # an RFC 2231 value compat32 could not decode
        name = name[2] if len(name) == 3 else ""
    name = _clean(_unraw(str(name))).replace("/", "_").replace("\\", "_")
    return name[:200]


def _leaves(msg: Any) -> list[tuple[int, Any]]:
    """(index, part) of every leaf, depth first (at most MAX_PARTS, at most MAX_DEPTH levels
    entered); an attached message (message/rfc822) is one leaf (downloaded whole), never
    entered."""
    out: list[tuple[int, Any]] = []
    counter = 0
    stack: list[tuple[Any, int]] = [(msg, 0)]
    while stack and len(out) < MAX_PARTS:
        p, depth = stack.pop()
        counter += 1
        payload = p.get_payload() if p.get_content_maintype() == "multipart" else None
        if isinstance(payload, list) and depth < MAX_DEPTH:
            stack.extend((sub, depth + 1) for sub in reversed(payload))
        else:
            out.append((counter - 1, p))
    return out


def _count_leaves(msg: Any) -> int:
    n = 0
    for p in msg.walk():
        if not p.is_multipart() or p.get_content_maintype() != "multipart":
            n += 1
    return n


def _head(data: bytes) -> bytes:
    """The header section of ``data`` (up to and with the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[: end + len(sep)]
    return data


def parse_message(data: bytes) -> MessageView:
    """A ``MessageView`` of a whole message (see the module docstring)."""
    head = _parse(_head(data), headersonly=True)
    view = MessageView(
        subject=_header(head, "Subject"), from_=_header(head, "From"), to=_header(head, "To"),
        cc=_header(head, "Cc"), reply_to=_header(head, "Reply-To"), date=_header(head, "Date"),
        message_id=_header(head, "Message-ID"), references=_header(head, "References"))
    msg = _structure(data)
    if msg is None:
        body = data[len(_head(data)):]
        view.text = decode_text(body, "utf-8")
        view.truncated = True
        return view
    leaves = _leaves(msg)
    if len(leaves) >= MAX_PARTS and _count_leaves(msg) > MAX_PARTS:
        view.truncated = True
    for index, part in leaves:
        ctype = content_type(part)
        try:
            disposition = (part.get_content_disposition() or "").lower()
        except Exception:
            disposition = ""
        filename = _filename(part)
        cid = _clean(_unraw(str(part.get("Content-ID", "")))).strip("<>")
        size = _size(part)
        is_body_text = (ctype in ("text/plain", "text/html") and disposition != "attachment"
                        and not filename)
        if is_body_text and ctype == "text/plain" and view.text is None:
            view.text = _text_of(part)
        elif is_body_text and ctype == "text/html" and view.html is None:
            view.html = _text_of(part)
        attachment = not is_body_text
        if ctype == "message/rfc822" and not filename:
            filename = "message.eml"
        view.parts.append(Part(index, ctype, filename, size, attachment, cid))
        if cid:
            view.cid[cid] = index
    return view


def _size(part: Any) -> int:
    """The decoded size of a leaf, estimated from its encoded form (base64: 3/4) without
    decoding it (a 50 MB attachment is not decoded to show the message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return sum(_size(p) for p in payload)
    if not isinstance(payload, str):
        return 0
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte == "base64":
        n = len(payload) - payload.count("\n") - payload.count("\r") - payload.count(" ")
        return n * 3 // 4 - min(payload.count("="), 2)
    return len(payload)


def part(data: bytes, index: int) -> tuple[bytes, str, str] | None:
    """(decoded content, media type, file name) of leaf part ``index``, or None."""
    msg = _structure(data)
    if msg is None:
        return None
    for i, p in _leaves(msg):
        if i == index:
            ctype = content_type(p)
            if ctype == "message/rfc822":
                inner = p.get_payload()
                content = inner[0].as_bytes(policy=_COMPAT.clone(linesep="\r\n")) \
                    if isinstance(inner, list) and inner else b""
            else:
                try:
                    content = p.get_payload(decode=True) or b""
                except Exception:
                    content = b""
                if not isinstance(content, bytes):
                    content = b""
            return content, ctype, _filename(p) or f"part-{index}"
    return None


INLINE_TYPES = ("image/png", "image/gif", "image/jpeg", "image/webp")


def cid_images(data: bytes, max_bytes: int = 5 * 1024 * 1024) -> dict[str, str]:
    """Content-ID -> ``data:`` URI of the message's inline images (PNG, GIF, JPEG, WebP; at
    most ``max_bytes`` decoded in all), for ``<img src="cid:...">`` of its HTML part.

    Inlined, not linked: the sanitised HTML is shown in a sandboxed frame whose origin is
    opaque, so its requests are cross-site and the SameSite=Strict session cookie does not
    go with them (a part URL answered with the log-in page: cid: images never showed)."""
    msg = _structure(data)
    out: dict[str, str] = {}
    if msg is None:
        return out
    budget = max_bytes
    for _, p in _leaves(msg):
        cid = _clean(_unraw(str(p.get("Content-ID", "")))).strip("<>")
        ctype = content_type(p)
        if not cid or ctype not in INLINE_TYPES or cid in out:
            continue
        try:
            content = p.get_payload(decode=True) or b""
        except Exception:
            continue
        if not isinstance(content, bytes) or len(content) > budget:
            continue
        budget -= len(content)
        out[cid] = f"data:{ctype};base64," + base64.b64encode(content).decode("ascii")
    return out


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
