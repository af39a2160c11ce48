"""Header-section edits over a stored message's bytes (a primitive: imports nothing of ours).

A message here is what the spool and the Maildir files keep: the RFC 5322 header section, an
empty line, the body, with LF line ends (CRLF is read too, and an edit keeps the line end the
message uses). A header field is its first line plus any folded continuation lines (lines
starting with a space or a tab, RFC 5322 section 2.2.3). Field names compare without regard to
case. Occurrences count from 1 among the fields of one name, as the milter protocol's
``SMFIR_CHGHEADER`` does (Sendmail's libmilter ``smfi_chgheader``); positions count from 0
among all fields, as ``SMFIR_INSHEADER`` does.

The functions take and return whole messages as ``bytes``; none does I/O. They raise
``ValueError`` for a field name that is not a valid RFC 5322 field name, or a value that
holds a line end not followed by white space (which would forge a second field).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 section 3.6.8 ftext
_BAD_FOLD = re.compile(rb"\r?\n(?![ \t])")


def _eol(message: bytes) -> bytes:
    first = message.find(b"\n")
    return b"\r\n" if first > 0 and message[first - 1:first] == b"\r" else b"\n"


def split(message: bytes) -> tuple[list[bytes], bytes]:
    """``(fields, rest)``: the header fields, each with its folded lines and line ends, and
    everything from the empty line that ends the header section (that line included; empty
    when the message has no body). A first line that is no header field ends the section
    (RFC 5322 section 2.1)."""
    fields: list[bytes] = []
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = message[pos:line_end]
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif b":" in line and _NAME.match(line.split(b":", 1)[0]):
            fields.append(line)
        else:
            break
        pos = line_end
    return fields, message[pos:]


def field_name(field: bytes) -> str:
    """The name of one field as ``split`` returns it, in lower case."""
    return field.split(b":", 1)[0].decode("ascii").lower()


def field_value(field: bytes) -> str:
    """The unfolded value of one field, without the leading space and the line end."""
    value = field.split(b":", 1)[1]
    value = re.sub(rb"\r?\n([ \t])", rb"\1", value).rstrip(b"\r\n")
    return value.lstrip(b" \t").decode("utf-8", "surrogateescape")


def values(message: bytes, name: str) -> list[str]:
    """The unfolded values of every field named ``name``, in order."""
    fields, _ = split(message)
    key = name.lower()
    return [field_value(f) for f in fields if field_name(f) == key]


def _make(name: str, value: str, eol: bytes) -> bytes:
    raw_name = name.encode("ascii")
    if not _NAME.match(raw_name):
        raise ValueError(f"not a header field name: {name!r}")
    raw = value.encode("utf-8", "surrogateescape")
    if _BAD_FOLD.search(raw) or raw.endswith((b"\n", b"\r")) or b"\r" in raw.replace(b"\r\n", b""):
        raise ValueError(f"header field {name} has a line end that is not a fold")
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", eol)
    sep = b": " if raw and raw[:1] not in (b" ", b"\t") else b":"
    return raw_name + sep + raw + eol


def _join(fields: list[bytes], rest: bytes, eol: bytes) -> bytes:
    if rest and not rest.startswith((b"\n", b"\r\n")):
        rest = eol + rest  # a body with no empty line before it keeps it a body (RFC 5322 2.1)
    return b"".join(fields) + rest


def insert_header(message: bytes, index: int, name: str, value: str) -> bytes:
    """The message with a new field at position ``index`` (0: the top; past the end: after
    the last field), as milter ``SMFIR_INSHEADER``."""
    eol = _eol(message)
    fields, rest = split(message)
    fields.insert(max(0, index), _make(name, value, eol))
    return _join(fields, rest, eol)


def add_header(message: bytes, name: str, value: str) -> bytes:
    """The message with a new field after the last one (milter ``SMFIR_ADDHEADER``)."""
    fields, _ = split(message)
    return insert_header(message, len(fields), name, value)


def prepend_header(message: bytes, name: str, value: str) -> bytes:
    """The message with a new field at the top (trace fields, ``Authentication-Results``)."""
    return insert_header(message, 0, name, value)


def change_header(message: bytes, name: str, occurrence: int, value: str | None) -> bytes:
    """The message with the ``occurrence``-th (from 1) field named ``name`` given ``value``,
    or removed when ``value`` is None or empty (milter ``SMFIR_CHGHEADER``); unchanged when
    there is no such occurrence. The field keeps the spelling of its name."""
    eol = _eol(message)
    fields, rest = split(message)
    key = name.lower()
    seen = 0
    for i, f in enumerate(fields):
        if field_name(f) == key:
            seen += 1
            if seen == occurrence:
                if value:  # the field keeps its name as the message spells it
                    fields[i] = _make(f.split(b":", 1)[0].decode("ascii"), value, eol)
                else:
                    del fields[i]
                break
    return _join(fields, rest, eol)


def remove_headers(message: bytes, name: str,
                   where: Callable[[str], bool] | None = None) -> bytes:
    """The message without the fields named ``name`` whose unfolded value ``where`` accepts
    (all of them when ``where`` is None)."""
    eol = _eol(message)
    fields, rest = split(message)
    key = name.lower()
    kept = [f for f in fields
            if field_name(f) != key or (where is not None and not where(field_value(f)))]
    return _join(kept, rest, eol)


def replace_body(message: bytes, body: bytes) -> bytes:
    """The message with its header section kept and ``body`` after the empty line (milter
    ``SMFIR_REPLBODY``; ``body`` uses the message's line ends or CRLF, made to match)."""
    eol = _eol(message)
    fields, _ = split(message)
    if eol == b"\n":
        body = body.replace(b"\r\n", b"\n")
    return b"".join(fields) + eol + body
