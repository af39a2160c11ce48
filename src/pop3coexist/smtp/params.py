"""Parsing of MAIL and RCPT arguments: paths, ``KEY=VALUE`` parameters (RFC 5321 section 4.1.2)
and xtext (RFC 3461 section 4). Pure functions; malformed input raises ``errors.MailError``
``501 5.5.4``.
"""

from __future__ import annotations

import re

from pop3coexist.errors import MailError

KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")  # RFC 5321 esmtp-value
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def fail(code: int, enhanced: str, text: str) -> MailError:
    """A MailError to raise or reply with (a refusal of this front-end)."""
    return MailError(code, enhanced, text)


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext strictly; raise MailError 501 5.5.4 when it is malformed."""
    if not _XTEXT_RE.match(value):
        raise fail(501, "5.5.4", "Malformed xtext value (RFC 3461 section 4)")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=VALUE`` parameters of MAIL or RCPT (keys upper case); 501 5.5.4 when malformed."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if item == "":
            continue
        key, eq, value = item.partition("=")
        if not KEYWORD_RE.match(key) or (eq and not _VALUE_RE.match(value)):
            raise fail(501, "5.5.4", "Malformed parameter")
        key = key.upper()
        if key in params:
            raise fail(501, "5.5.4", f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def split_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """``FROM:<path> params`` -> (inside of the path, params); 501 5.5.4 when malformed.

    The path ends at the first ``>`` outside a quoted string: a Quoted-string local part may
    hold spaces, ``<``, ``>`` and quoted pairs (RFC 5321 section 4.1.2), and the parameters
    are only what follows the path.
    """
    if not arg[: len(keyword)].upper() == keyword:
        raise _usage(keyword)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise _usage(keyword)
    if '"' not in rest:  # no quoted string: the path ends at the first ">"
        end = rest.find(">")
        if "<" in rest[1:end if end >= 0 else None]:
            raise _usage(keyword)
    else:
        end = _quoted_path_end(rest, keyword)
    if end < 0:
        raise _usage(keyword)
    params = rest[end + 1 :]
    if params and not params.startswith(" "):
        raise _usage(keyword)
    return rest[1:end], parse_params(params) if params else {}


def _usage(keyword: str) -> MailError:
    return fail(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>")


def _quoted_path_end(rest: str, keyword: str) -> int:
    """The index of the ``>`` ending the path ``rest`` (which starts with ``<`` and holds a
    quoted string), or -1; a ``<`` outside quotes before it is a usage error."""
    quoted = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == ">":
            return i
        elif not quoted and c == "<":
            raise _usage(keyword)
        i += 1
    return -1

