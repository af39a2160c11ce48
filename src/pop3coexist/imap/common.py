"""What the IMAP session modules share: limits, the folder separator, the permanent flags,
``Refuse`` (a command answered NO with a response code) and argument helpers."""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger

from pop3coexist.imap.parse import BadSyntax

log = Logger(namespace="pop3coexist.imap")

MAX_LINE = 65536
MAX_LITERALS = 64  # literals in one command (its octets together stay under max_literal)
POLL_INTERVAL = 2.0  # seconds between mailbox checks during IDLE
SEPARATOR = "."
IMPLEMENTATION = "pop3coexist"
_NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}  # RFC 3501 section 7.4.1 (not in their UID form)
PERMANENT = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"

MAX_TAG = 64  # octets of a tag this server echoes; a longer one is answered untagged


def valid_tag(tag: bytes) -> bool:
    """True when ``tag`` (bytes) can be echoed in a tagged reply: 1 to MAX_TAG octets of
    ASTRING-CHAR other than ``+`` (RFC 3501 section 9: ``tag = 1*<any ASTRING-CHAR except
    "+">``). A command whose tag fails gets an untagged ``* BAD``: never a tagged reply
    with a tag the client did not send (a cut-down one would answer a command it never
    issued)."""
    return 0 < len(tag) <= MAX_TAG and not any(
        c in b'(){%*"\\+' or c < 0x21 or c > 0x7E for c in tag)


_NOT_TEXT_CHAR = re.compile(r"[^\x20-\x7e]")
MAX_RESP_TEXT = 300  # characters of a response's human-readable text


def resp_text(text: str, limit: int = MAX_RESP_TEXT) -> str:
    """``text`` as a response's ``resp-text`` may carry it (RFC 3501 section 9: ``TEXT-CHAR``
    is any 7-bit CHAR but CR and LF): every control character, CR, LF, NUL and non-ASCII
    character as ``?``, at most ``limit`` characters (0: any length, for response codes such
    as CAPABILITY). Texts quote what a client sent (a
    folder name from a literal, a SEARCH key); a CR LF in one split the response and let the
    client forge the lines after it."""
    if limit and len(text) > limit:
        text = text[:limit - 3] + "..."
    return _NOT_TEXT_CHAR.sub("?", text)


class Refuse(Exception):
    """A command refused with NO (``code``: a response code such as TRYCREATE)."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.code = code


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise BadSyntax("expected a string")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:100]
