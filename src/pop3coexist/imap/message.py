"""One message as IMAP FETCH sees it (RFC 3501 sections 6.4.5 and 7.4.2): byte-exact
sections over the canonical CRLF form, ENVELOPE, BODYSTRUCTURE, and the IMAP string syntax.

``Part`` parses a message's bytes into a MIME tree with offsets, so ``BODY[1.2.MIME]``,
``BODY[HEADER.FIELDS (...)]``, ``BODY[TEXT]`` and partial fetches send exactly the octets of
the stored message (Twisted's IMAP4Server rebuilds headers from a parsed dict, so its
BODY[] differs from RFC822.SIZE and breaks synchronising clients: not used here). Pure
functions; no I/O.
"""

from __future__ import annotations

import email.message
import email.utils
import re
from email.header import decode_header, make_header

__all__ = ["Part", "astring", "envelope", "bodystructure", "quote", "literal", "nstring"]

_HEADER_END = re.compile(rb"\r\n\r\n")
_FIELD = re.compile(rb"^([^:\s]+)\s*:", re.M)


def quote(text: str | bytes) -> bytes:
    """An IMAP quoted string, or a literal when the text cannot be quoted."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if b"\r" in data or b"\n" in data or b"\0" in data or any(c > 0x7E for c in data):
        return literal(data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(data: bytes) -> bytes:
    """``{n}`` CRLF then the octets (RFC 3501 section 4.3)."""
    return b"{%d}\r\n" % len(data) + data


def nstring(value: str | bytes | None) -> bytes:
    """NIL or a string."""
    return b"NIL" if value is None else quote(value)


def astring(text: str) -> bytes:
    """An atom when the text is one, else a quoted string (mailbox names in LIST)."""
    data = text.encode("utf-8")
    if data and re.fullmatch(rb"[\x21-\x7e]+", data) and not re.search(rb'[(){ %*"\\\]]', data):
        return data
    return quote(data)


class Part:
    """A MIME part: ``header`` (bytes, with its final blank line), ``body``, content type,
    parameters and children (multipart parts, or the message of a message/rfc822)."""

    def __init__(self, data: bytes, default_type: str = "text/plain") -> None:
        m = _HEADER_END.search(data)
        if m:
            self.header, self.body = data[:m.end()], data[m.end():]
        elif data.startswith(b"\r\n"):
            self.header, self.body = b"\r\n", data[2:]
        else:
            self.header, self.body = data + (b"" if data.endswith(b"\r\n") or not data
                                             else b"\r\n"), b""
        self.fields = _parse_fields(self.header)
        ctype = self.get("content-type")
        maintype, subtype, params = _content_type(ctype, default_type)
        self.maintype, self.subtype, self.params = maintype, subtype, params
        self.children: list[Part] = []
        if maintype == "multipart" and params.get("boundary"):
            child_default = "message/rfc822" if subtype == "digest" else "text/plain"
            self.children = [Part(p, child_default) for p in
                             _split_multipart(self.body, params["boundary"].encode("latin-1"))]
        elif maintype == "message" and subtype == "rfc822":
            self.children = [Part(self.body)]

    def get(self, name: str) -> str | None:
        """The first field ``name`` (unfolded, str), or None."""
        for key, value in self.fields:
            if key == name.lower():
                return value
        return None

    def header_fields(self, names: list[str], negate: bool) -> bytes:
        """HEADER.FIELDS / HEADER.FIELDS.NOT: the matching raw lines and a blank line."""
        wanted = {n.lower() for n in names}
        out = []
        for key, raw in _raw_fields(self.header):
            if (key in wanted) != negate:
                out.append(raw)
        return b"".join(out) + b"\r\n"

    def section(self, spec: list[int], kind: str, names: list[str]) -> bytes | None:
        """The octets of ``BODY[spec.kind]`` (kind: "", HEADER, TEXT, MIME, HEADER.FIELDS,
        HEADER.FIELDS.NOT); None when the part does not exist."""
        part: Part = self
        for n in spec:
            if part.maintype == "message" and part.subtype == "rfc822" and part.children:
                part = part.children[0]
            if part.children and part.maintype == "multipart":
                if not 1 <= n <= len(part.children):
                    return None
                part = part.children[n - 1]
            elif n == 1:
                pass  # a non-multipart part's body is its part 1
            else:
                return None
        if kind == "MIME":
            return part.header
        target = part
        if spec and kind in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            if not (part.maintype == "message" and part.subtype == "rfc822" and part.children):
                return None
            target = part.children[0]
        if kind == "":
            return part.body if spec else part.header + part.body
        if kind == "HEADER":
            return target.header
        if kind == "TEXT":
            return target.body
        return target.header_fields(names, kind.endswith(".NOT"))


def _raw_fields(header: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for line in header.split(b"\r\n")[:-1]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line + b"\r\n")
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        out.append((name, line + b"\r\n"))
    return out


def _parse_fields(header: bytes) -> list[tuple[str, str]]:
    out = []
    for key, raw in _raw_fields(header):
        value = raw.split(b":", 1)[1] if b":" in raw else b""
        text = re.sub(rb"\r\n[ \t]", b" ", value).strip()
        out.append((key, text.decode("utf-8", "replace")))
    return out


def _content_type(value: str | None, default: str) -> tuple[str, str, dict[str, str]]:
    msg = email.message.Message()
    msg["Content-Type"] = value or default
    ctype = msg.get_content_type()
    if "/" not in ctype:
        ctype = default
    maintype, subtype = ctype.split("/", 1)
    params = {}
    for k, v in msg.get_params(failobj=[])[1:]:
        if isinstance(v, tuple):
            v = email.utils.collapse_rfc2231_value(v)
        params[k.lower()] = str(v)
    return maintype, subtype, params


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delim = b"--" + boundary
    parts: list[bytes] = []
    lines = body.split(b"\r\n")
    current: list[bytes] | None = None
    for line in lines:
        stripped = line.rstrip(b" \t")
        if stripped == delim + b"--":
            if current is not None:
                parts.append(b"\r\n".join(current))
            return parts
        if stripped == delim:
            if current is not None:
                parts.append(b"\r\n".join(current))
            current = []
            continue
        if current is not None:
            current.append(line)
    if current is not None:
        parts.append(b"\r\n".join(current))
    return parts


def _addresses(value: str | None) -> bytes:
    if not value:
        return b"NIL"
    out = []
    for name, addr in email.utils.getaddresses([value]):
        if not name and not addr:
            continue
        mailbox, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append(b"(" + b" ".join([nstring(name or None), b"NIL", nstring(mailbox or addr),
                                     nstring(host or None)]) + b")")
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def envelope(part: Part) -> bytes:
    """The ENVELOPE structure (RFC 3501 section 7.4.2)."""
    g = part.get
    sender = g("sender") or g("from")
    reply = g("reply-to") or g("from")
    return b"(" + b" ".join([
        nstring(g("date")), nstring(_raw_subject(part)), _addresses(g("from")),
        _addresses(sender), _addresses(reply), _addresses(g("to")), _addresses(g("cc")),
        _addresses(g("bcc")), nstring(g("in-reply-to")), nstring(g("message-id")),
    ]) + b")"


def _raw_subject(part: Part) -> str | None:
    return part.get("subject")


def decoded(value: str | None) -> str:
    """RFC 2047 decoded text of a header value (for SEARCH)."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def _params(params: dict[str, str]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(quote(k.upper()) + b" " + quote(v) for k, v in params.items()) + b")"


def bodystructure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY (RFC 3501 section 7.4.2)."""
    if part.maintype == "multipart" and part.children:
        inner = b"".join(bodystructure(c, extended) for c in part.children)
        out = inner + b" " + quote(part.subtype.upper())
        if extended:
            out += b" " + _params({k: v for k, v in part.params.items()}) + b" " + \
                _disposition(part) + b" NIL NIL"
        return b"(" + out + b")"
    params = {k: v for k, v in part.params.items()}
    if part.maintype == "text" and "charset" not in params:
        params["charset"] = "us-ascii"
    fields = [quote(part.maintype.upper()), quote(part.subtype.upper()), _params(params),
              nstring(part.get("content-id")), nstring(part.get("content-description")),
              quote((part.get("content-transfer-encoding") or "7BIT").upper()),
              b"%d" % len(part.body)]
    if part.maintype == "message" and part.subtype == "rfc822" and part.children:
        inner = part.children[0]
        fields += [envelope(inner), bodystructure(inner, extended), b"%d" % _lines(part.body)]
    elif part.maintype == "text":
        fields.append(b"%d" % _lines(part.body))
    if extended:
        fields += [b"NIL", _disposition(part), nstring(part.get("content-language")), b"NIL"]
    return b"(" + b" ".join(fields) + b")"


def _lines(body: bytes) -> int:
    """body-fld-lines: the lines of a body, a last one without its line end included."""
    return body.count(b"\r\n") + (1 if body and not body.endswith(b"\n") else 0)


def _disposition(part: Part) -> bytes:
    value = part.get("content-disposition")
    if not value:
        return b"NIL"
    msg = email.message.Message()
    msg["Content-Disposition"] = value
    params = msg.get_params(header="content-disposition", failobj=[]) or []
    if not params:
        return b"NIL"
    kind = params[0][0]
    rest = {}
    for k, v in params[1:]:
        if isinstance(v, tuple):
            v = email.utils.collapse_rfc2231_value(v)
        rest[k.lower()] = str(v)
    return b"(" + quote(kind.upper()) + b" " + _params(rest) + b")"



