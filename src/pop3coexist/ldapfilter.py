"""LDAP search filters (RFC 4515): escaping values, building filters, parsing them for the wire.

Every value that comes from outside (a log-in name, a recipient address) goes through
``escape_value`` before it is put into a filter string, so ``*``, ``(``, ``)``, ``\\`` and NUL
cannot change what the filter means (LDAP injection). Non-ASCII octets are escaped too, so a
filter string is always plain ASCII.

``parse_filter`` turns a filter string (the configured ``user_filter`` combined with escaped
values) into ldaptor's ``pureldap`` filter objects with the assertion values as raw octets
(ldaptor's own parser decodes ``\\xx`` escapes one octet per character, which breaks UTF-8).
No I/O here.
"""

from __future__ import annotations

import re

from ldaptor.protocols import pureldap

__all__ = [
    "FilterError",
    "escape_value",
    "equals",
    "any_of",
    "all_of",
    "negate",
    "parse_filter",
]

# RFC 4515 section 3: these must be escaped in an assertion value; we escape every octet
# outside printable ASCII as well.
_SPECIAL = frozenset(b"*()\\\x00")
_ATTR_RE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)(?:;[A-Za-z0-9-]+)*\Z")
_OID_RE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)\Z")


class FilterError(ValueError):
    """A filter string is not valid RFC 4515; str() says where."""


def escape_value(value: str | bytes) -> str:
    """Escape an assertion value per RFC 4515 (``*`` -> ``\\2a`` and so on).

    A str is encoded as UTF-8 first. Printable ASCII other than ``* ( ) \\`` is kept as is;
    every other octet becomes ``\\xx`` (lower-case hex).
    """
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    out = []
    for octet in raw:
        if octet in _SPECIAL or octet < 0x20 or octet > 0x7E:
            out.append(f"\\{octet:02x}")
        else:
            out.append(chr(octet))
    return "".join(out)


def _check_attr(attr: str) -> str:
    if not _ATTR_RE.match(attr):
        raise FilterError(f"{attr!r} is not an attribute description")
    return attr


def equals(attr: str, value: str | bytes) -> str:
    """``(attr=value)`` with the value escaped."""
    return f"({_check_attr(attr)}={escape_value(value)})"


def any_of(*filters: str) -> str:
    """``(|f1 f2 ...)``; a single filter is returned as is."""
    if not filters:
        raise FilterError("an OR needs at least one filter")
    return filters[0] if len(filters) == 1 else "(|" + "".join(filters) + ")"


def all_of(*filters: str) -> str:
    """``(&f1 f2 ...)``; a single filter is returned as is."""
    if not filters:
        raise FilterError("an AND needs at least one filter")
    return filters[0] if len(filters) == 1 else "(&" + "".join(filters) + ")"


def negate(filter_text: str) -> str:
    """``(!f)``."""
    return "(!" + filter_text + ")"


# --------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str) -> FilterError:
        return FilterError(f"invalid LDAP filter at position {self.pos}: {message} in {self.text!r}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"expected {ch!r}")
        self.pos += 1

    def filter(self):
        self.expect("(")
        ch = self.peek()
        if ch == "&" or ch == "|":
            self.pos += 1
            items = []
            while self.peek() == "(":
                items.append(self.filter())
            if not items:
                raise self.fail("empty AND/OR")
            result = pureldap.LDAPFilter_and(items) if ch == "&" else pureldap.LDAPFilter_or(items)
        elif ch == "!":
            self.pos += 1
            result = pureldap.LDAPFilter_not(self.filter())
        else:
            result = self.item()
        self.expect(")")
        return result

    def value_until_close(self) -> str:
        """The raw (still escaped) text up to the closing parenthesis."""
        end = self.text.find(")", self.pos)
        if end < 0:
            raise self.fail("missing ')'")
        raw = self.text[self.pos : end]
        if "(" in raw:
            raise self.fail("unescaped '(' in a value")
        self.pos = end
        return raw

    def unescape(self, raw: str) -> bytes:
        out = bytearray()
        i = 0
        while i < len(raw):
            c = raw[i]
            if c == "\\":
                pair = raw[i + 1 : i + 3]
                if len(pair) != 2 or not all(h in "0123456789abcdefABCDEF" for h in pair):
                    raise self.fail("'\\' must be followed by two hex digits")
                out.append(int(pair, 16))
                i += 3
                continue
            if c == "*":
                raise self.fail("unescaped '*'")
            out += c.encode("utf-8")
            i += 1
        return bytes(out)

    def item(self):
        start = self.pos
        while self.peek() and self.peek() not in "=~<>:()":
            self.pos += 1
        attr = self.text[start : self.pos]
        op = self.peek()
        if op == ":":
            return self.extensible(attr)
        if not attr:
            raise self.fail("missing attribute name")
        _check_attr_parse(self, attr)
        desc = pureldap.LDAPAttributeDescription(attr)
        if op in "~<>" and op:
            self.pos += 1
            self.expect("=")
            value = pureldap.LDAPAssertionValue(self.unescape(self.value_until_close()))
            cls = {
                "~": pureldap.LDAPFilter_approxMatch,
                ">": pureldap.LDAPFilter_greaterOrEqual,
                "<": pureldap.LDAPFilter_lessOrEqual,
            }[op]
            return cls(attributeDesc=desc, assertionValue=value)
        self.expect("=")
        raw = self.value_until_close()
        if raw == "*":
            return pureldap.LDAPFilter_present(attr)
        if "*" not in raw:
            return pureldap.LDAPFilter_equalityMatch(
                attributeDesc=desc, assertionValue=pureldap.LDAPAssertionValue(self.unescape(raw))
            )
        parts = raw.split("*")
        subs = []
        if parts[0]:
            subs.append(pureldap.LDAPFilter_substrings_initial(self.unescape(parts[0])))
        for middle in parts[1:-1]:
            if not middle:
                raise self.fail("'**' in a substring filter")
            subs.append(pureldap.LDAPFilter_substrings_any(self.unescape(middle)))
        if parts[-1]:
            subs.append(pureldap.LDAPFilter_substrings_final(self.unescape(parts[-1])))
        return pureldap.LDAPFilter_substrings(type=attr, substrings=subs)

    def extensible(self, attr: str):
        # attr [":dn"] [":" rule] ":=" value  /  [":dn"] ":" rule ":=" value
        if attr:
            _check_attr_parse(self, attr)
        dn = False
        rule = None
        while True:
            self.expect(":")
            if self.peek() == "=":
                self.pos += 1
                break
            start = self.pos
            while self.peek() and self.peek() not in ":=()":
                self.pos += 1
            word = self.text[start : self.pos]
            if word.lower() == "dn" and not dn and rule is None:
                dn = True
            elif rule is None and _OID_RE.match(word):
                rule = word
            else:
                raise self.fail(f"unexpected {word!r} in an extensible match")
        if not attr and rule is None:
            raise self.fail("an extensible match needs an attribute or a matching rule")
        value = self.unescape(self.value_until_close())
        return pureldap.LDAPFilter_extensibleMatch(
            matchingRule=rule, type=attr or None, matchValue=value, dnAttributes=dn or None
        )


def _check_attr_parse(parser: _Parser, attr: str) -> None:
    if not _ATTR_RE.match(attr):
        raise parser.fail(f"{attr!r} is not an attribute description")


def parse_filter(text: str):
    """Parse an RFC 4515 filter string into a ``pureldap`` filter (values as raw octets).

    A filter without the outer parentheses (``objectClass=user``) is accepted, as OpenLDAP's
    tools do. Raises FilterError on anything malformed.
    """
    if not isinstance(text, str):
        raise FilterError("a filter is a string")
    text = text.strip()
    if not text:
        raise FilterError("empty LDAP filter")
    if not text.startswith("("):
        text = "(" + text + ")"
    if any(ord(c) < 0x20 for c in text):
        raise FilterError("control characters in an LDAP filter must be escaped")
    parser = _Parser(text)
    result = parser.filter()
    if parser.pos != len(text):
        raise parser.fail("text after the end of the filter")
    return result
