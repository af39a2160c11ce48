"""The RFC 8601 ``Authentication-Results`` header field: written from a
``interfaces.SenderAuthentication``, and recognised when it names us (pure; no I/O).

A field written here looks like (folded, one ``resinfo`` a line)::

    Authentication-Results: pop.contoso.test;
        spf=pass smtp.mailfrom=ted@fabrikam.test;
        dkim=pass header.d=fabrikam.test header.s=mail header.b=AbCdEfGh;
        dmarc=pass (p=reject dis=none) header.from=fabrikam.test

``names_us`` tells whether a field's authserv-id is ours: RFC 8601 section 5 says a border MTA
MUST remove (or rename) such fields arriving from outside, since readers downstream trust them.
"""

from __future__ import annotations

import re

from pop3coexist.interfaces import MethodResult, SenderAuthentication

FIELD = "Authentication-Results"
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+\Z")  # RFC 2045 token (no tspecials)
_PVALUE = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+\Z")  # a token or local-part@domain


def quote_value(value: str) -> str:
    """``value`` as RFC 8601 writes a property value: as is when it is a token or an
    ``addr-spec`` of atoms (RFC 8601 section 2.2 ``pvalue``), else a quoted-string."""
    if value and (_TOKEN.match(value) or (_PVALUE.match(value) and value.count("@") <= 1)):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """An RFC 5322 comment: parentheses and backslashes escaped, line ends dropped."""
    text = re.sub(r"[\r\n]+", " ", text).strip()
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def resinfo(result: MethodResult) -> str:
    """``method=result (comment) ptype.property=value ...``."""
    parts = [f"{result.method}={result.result}"]
    if result.comment:
        parts.append(_comment(result.comment))
    parts += [f"{name}={quote_value(value)}" for name, value in result.properties]
    return " ".join(parts)


def format_value(authserv_id: str, found: SenderAuthentication) -> str:
    """The value of our field (folded with LF and a tab before each ``resinfo``)."""
    infos = [found.spf, *(found.dkim or (MethodResult("dkim", "none"),)), found.dmarc]
    return authserv_id + ";" + ";".join("\n\t" + resinfo(i) for i in infos)


def authserv_id_of(value: str) -> str:
    """The authserv-id of an unfolded field value (before any version and the first ``;``),
    lower case; comments (``(...)``) skipped."""
    value = re.sub(r"\([^()]*\)", " ", value)
    head = value.split(";", 1)[0].strip()
    return head.split()[0].strip('"').lower() if head else ""


def names_us(value: str, authserv_id: str) -> bool:
    """True when the field value carries ``authserv_id`` (RFC 8601 section 5)."""
    return authserv_id_of(value) == authserv_id.lower()
