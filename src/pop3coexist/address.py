"""Mail addresses: strict parsing and normalisation (RFC 5321 section 4.1.2). No I/O.

Everything that compares or stores an address goes through here, so the classic relay tricks
(percent hack, source routes, bang paths, quoted ``"a@b"@local``, double ``@``, trailing dots)
are decided in one place: they are either refused or parsed to what they really say.

``parse_address`` takes the whole RFC 5321 ``Mailbox`` production: a Dot-string or a
Quoted-string (quoted pairs, spaces) local part, then a Domain or an address literal
(``[192.0.2.1]``, ``[IPv6:2001:db8::1]``). Forms that are valid syntax but that this server
will not take raise ``AddressRefused`` (a policy refusal, not a syntax error); non-ASCII
characters raise ``AddressNeedsUTF8`` (valid only with SMTPUTF8, RFC 6531, not offered here).
``strip_source_route`` takes the rest of a ``Path``: an RFC 5321 source route
(``@a.example,@b.example:``) in front of the Mailbox is checked and dropped (section 4.1.1.3 and
appendix C: servers SHOULD ignore it), so only the Mailbox decides where mail goes.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 atext (RFC 5322 section 3.2.3)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# RFC 5321 section 4.1.2 Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) or a
# quoted-pairSMTP (backslash then %d32-126)
_QUOTED_RE = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_SNUM_RE = re.compile(r"[0-9]{1,3}\Z")
_IPV6_HEX_RE = re.compile(r"[0-9A-Fa-f]{1,4}\Z")  # RFC 5321 IPv6-hex
# Standardized-tag = Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig (RFC 5321 section 4.1.2)
_TAG_RE = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]\Z")
_DCONTENT_RE = re.compile(r"[\x21-\x5a\x5e-\x7e]+\Z")  # RFC 5321 dcontent
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL
# Mailbox names we create: a conservative subset of dot-atom, lower case, no leading dot.
_MAILBOX_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-](?:[a-z0-9!#$%&'*+=?^_`{|}~.-]{0,63})\Z")

MAX_LOCAL = 64  # RFC 5321 section 4.5.3.1.1
MAX_MAILBOX = 254  # RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its <>


class AddressError(ValueError):
    """The text is not an address we accept; str() says why."""


class AddressRefused(AddressError):
    """The text is a valid RFC 5321 Mailbox, but of a form this server refuses as policy
    (a domain name that is not fully qualified or that is an IP address without brackets, an
    address literal of an unknown tag)."""


class AddressNeedsUTF8(AddressError):
    """The text has non-ASCII characters: an internationalised address (RFC 6531), which needs
    the SMTPUTF8 extension that this server does not offer."""


@dataclass(frozen=True)
class Address:
    """A parsed mailbox ``local@domain``.

    ``local`` is the local part in its canonical wire form: a Dot-string as given, or (when
    ``quoted``) a Quoted-string with only ``"`` and ``\\`` escaped. A quoted local part whose
    content is a valid Dot-string is stored unquoted (``"ted"`` is ``ted``, RFC 5321 section
    4.1.2 says they are the same mailbox). ``domain`` is a lower-case domain name or an address
    literal in canonical form (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
    """

    local: str
    domain: str
    quoted: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-folded ``local@domain`` for lookups (local parts are compared without case)."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def literal(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP address of an address-literal domain, or None for a domain name."""
        return literal_ip(self.domain)


def literal_ip(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address inside a canonical address literal (``[1.2.3.4]``, ``[IPv6:...]``), or
    None when ``domain`` is not one."""
    if not domain.startswith("[") or not domain.endswith("]"):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        return None


def normalise_domain(name: str) -> str:
    """Return a domain name in canonical form (lower case) or raise AddressError.

    A trailing dot, empty labels, address literals and non-ASCII names are refused; a name
    of one label only, or one whose last label is all digits (``192.0.2.1`` without brackets:
    RFC 1123 section 2.1 says a host name never has that form; an address is written as a
    literal, ``[192.0.2.1]``), raises AddressRefused (valid RFC 5321 syntax, not a name we
    accept).
    """
    if not isinstance(name, str) or not name:
        raise AddressError("empty domain")
    return _normalise_domain(name)


@functools.lru_cache(maxsize=4096)
def _normalise_domain(name: str) -> str:
    """``normalise_domain`` of a non-empty str; its answers are kept (a server sees the same
    few domains over and over; an error is not kept)."""
    lowered = name.lower()
    if len(lowered) > 253:
        raise AddressError("domain name too long")
    labels = lowered.split(".")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise AddressError(f"domain {name!r} has an invalid label {label!r}")
    if len(labels) < 2:
        raise AddressRefused(f"domain {name!r} is not fully qualified")
    if labels[-1].isdigit():
        raise AddressRefused(f"domain {name!r} is an IP address: write it as an address literal "
                             f"[{lowered}]")
    return lowered


def normalise_literal(text: str) -> str:
    """Return an RFC 5321 address-literal (``[...]``) in canonical form or raise AddressError.

    The grammar is RFC 5321 section 4.1.3's, exactly: an IPv4-address-literal (four Snums, each
    one to three digits of value 0-255, leading zeros allowed) or ``IPv6:`` (the tag in any case)
    and an IPv6-addr: IPv6-full (eight groups of one to four hex digits), IPv6-comp (``::`` and
    at most six groups beside it), IPv6v4-full (six groups, then an IPv4 literal) or IPv6v4-comp
    (``::`` and at most four groups beside it, then an IPv4 literal). No zone index, no other
    spelling that a general IP parser would take (``1:2:3:4:5:6::7`` has seven groups beside its
    ``::``: refused). They give ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` (compressed, RFC 5952
    lower-case hex, which is always inside the grammar again). A General-address-literal
    (``[tag:content]``, tag an Ldh-str, content dcontent) is valid syntax but raises
    AddressRefused: no other tag is standardised.
    """
    if not (text.startswith("[") and text.endswith("]")) or len(text) < 3:
        raise AddressError("malformed address literal")
    inner = text[1:-1]
    ipv4 = _ipv4_literal(inner)
    if ipv4 is not None:
        return f"[{ipv4}]"
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+){3}", inner):
        raise AddressError(f"address literal {text} is not an IPv4 address")
    tag, colon, content = inner.partition(":")
    if not colon or not _TAG_RE.match(tag) or not content:
        raise AddressError(f"malformed address literal {text}")
    if tag.lower() == "ipv6":
        canonical = _ipv6_addr(content)
        if canonical is None:
            raise AddressError(f"address literal {text} is not an IPv6 address")
        return f"[IPv6:{canonical}]"
    if not _DCONTENT_RE.match(content):
        raise AddressError(f"malformed address literal {text}")
    raise AddressRefused(f"address literal {text}: only IPv4 and IPv6 literals are accepted")


def _ipv4_literal(text: str) -> str | None:
    """``IPv4-address-literal = Snum 3("." Snum)`` (RFC 5321 section 4.1.3; Snum is 1*3DIGIT of
    value 0-255) in dotted-decimal form without leading zeros, or None when ``text`` is not one
    (``1.2.3.256`` is not one either)."""
    parts = text.split(".")
    if len(parts) != 4 or not all(_SNUM_RE.match(p) for p in parts):
        return None
    if any(int(p) > 255 for p in parts):
        return None
    return ".".join(str(int(p)) for p in parts)


def _hex_groups_ok(text: str, full: int, most: int) -> bool:
    """True when ``text`` is ``full`` IPv6-hex groups joined by ``:``, or groups, one ``::`` and
    groups with at most ``most`` groups in all (RFC 5321 IPv6-full / IPv6-comp with full=8,
    most=6; the hex parts of IPv6v4-full / IPv6v4-comp with full=6, most=4)."""
    if "::" in text:
        left, sep, right = text.partition("::")
        groups = (left.split(":") if left else []) + (right.split(":") if right else [])
        limit = most
    else:
        groups = text.split(":")
        if len(groups) != full:
            return False
        limit = full
    return len(groups) <= limit and all(_IPV6_HEX_RE.match(g) for g in groups)


def _ipv6_addr(content: str) -> str | None:
    """The compressed form of an RFC 5321 ``IPv6-addr`` (section 4.1.3), or None when
    ``content`` is not one; see ``normalise_literal``."""
    head, colon, tail = content.rpartition(":")
    if not colon:
        return None
    if "." in tail:  # IPv6v4-full / IPv6v4-comp: hex part, then an IPv4-address-literal
        ipv4 = _ipv4_literal(tail)
        if ipv4 is None:
            return None
        # "::" right before the IPv4 part belongs to the hex part; a single ":" separates
        hexpart = head + colon if head.endswith(":") else head
        if not _hex_groups_ok(hexpart, full=6, most=4):
            return None
        text = f"{hexpart}:{ipv4}" if not hexpart.endswith("::") else hexpart + ipv4
    else:
        if not _hex_groups_ok(content, full=8, most=6):
            return None
        text = content
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:  # pragma: no cover - the grammar above is stricter than ipaddress
        return None


def is_valid_mailbox_name(local: str) -> bool:
    """True when ``local`` is a mailbox name we create (1-64 characters, see REFERENCE)."""
    return bool(_MAILBOX_NAME_RE.match(local)) and ".." not in local and not local.endswith(".")


def unquote_local(quoted: str) -> str:
    """The content of a Quoted-string local part: quotes removed, quoted pairs resolved."""
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def quote_local(content: str) -> str:
    """The canonical wire form of a local part with this content: a Dot-string when it is
    one, else a Quoted-string escaping only ``"`` and ``\\`` (RFC 5321 section 4.1.2)."""
    if _DOT_ATOM_RE.match(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_address(text: str) -> Address:
    """Parse an RFC 5321 ``Mailbox`` (no angle brackets) strictly; see the module docstring.

    Raises AddressError (a syntax error: a source route (a Mailbox has none: see
    ``strip_source_route``), bang paths inside a domain, a second ``@`` outside quotes, trailing
    dots, control characters, an unquoted space), its subclass AddressRefused (valid syntax,
    refused as policy) or AddressNeedsUTF8 (non-ASCII characters). A quoted local part is never
    split again at an inner ``@`` or ``%``: the domain is what follows the closing quote.
    """
    if not text or len(text) > MAX_MAILBOX:
        raise AddressError("address missing or too long")
    if _CONTROL_RE.search(text):
        raise AddressError("address has control characters")
    if not text.isascii():
        raise AddressNeedsUTF8("address has non-ASCII characters")
    if text.startswith("@"):
        raise AddressError("source routes are not accepted")
    if text.startswith('"'):
        m = _QUOTED_RE.match(text)
        if not m:
            raise AddressError("malformed quoted local part")
        rest = text[m.end():]
        if not rest.startswith("@"):
            raise AddressError("malformed quoted local part" if rest else "address has no domain")
        if len(m.group(0)) > MAX_LOCAL:  # the limit is on the local part as written
            raise AddressError(f"local part longer than {MAX_LOCAL} characters")
        local = quote_local(unquote_local(m.group(0)))
        domain = rest[1:]
    else:
        if " " in text:
            raise AddressError("address has spaces outside quotes")
        at = text.rfind("@")
        if at <= 0:
            raise AddressError("address has no domain")
        local, domain = text[:at], text[at + 1 :]
        if not _DOT_ATOM_RE.match(local):
            raise AddressError("malformed local part")
    if len(local) > MAX_LOCAL:
        raise AddressError(f"local part longer than {MAX_LOCAL} characters")
    if domain.startswith("["):
        domain = normalise_literal(domain)
    elif " " in domain:
        raise AddressError("address has spaces outside quotes")
    else:
        domain = normalise_domain(domain)
    return Address(local, domain, local.startswith('"'))


def strip_source_route(text: str) -> str:
    """The Mailbox of the inside of an RFC 5321 ``Path``: ``[ A-d-l ":" ] Mailbox``.

    A source route (``A-d-l = At-domain *( "," At-domain )``, ``At-domain = "@" Domain``, as in
    ``@a.example,@b.example:ted@pop.contoso.test``) is checked and dropped: RFC 5321 section
    4.1.1.3 and appendix C say servers SHOULD ignore it, so the Mailbox alone decides where
    the mail goes (and the relay rules judge that Mailbox's domain). Raises AddressError for a
    malformed route or a path over RFC 5321 section 4.5.3.1.3's 256 octets. Text that does
    not start with ``@`` is returned as it is.
    """
    if not text.startswith("@"):
        return text
    if len(text) > MAX_MAILBOX:
        raise AddressError("address missing or too long")
    route, colon, mailbox = text.partition(":")
    if not colon or not mailbox:
        raise AddressError("malformed source route")
    for at_domain in route.split(","):
        if not at_domain.startswith("@"):
            raise AddressError("malformed source route")
        labels = at_domain[1:].lower().split(".")
        if not all(_LABEL_RE.match(label) for label in labels):
            raise AddressError("malformed source route")
    return mailbox


def parse_path(text: str) -> Address | None:
    """Parse a MAIL FROM / RCPT TO path ``<...>``; ``<>`` gives None (the null sender). A
    source route is dropped (``strip_source_route``)."""
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be in angle brackets")
    inner = text[1:-1]
    if inner == "":
        return None
    return parse_address(strip_source_route(inner))


def login_to_address(login: str, local_domains: list[str] | tuple[str, ...]) -> tuple[str, str] | None:
    """Map a log-in name to ``(mailbox, domain)``, both lower case, or None (the README's rule).

    The full address in any case is accepted; the bare local part only when there is exactly
    one local domain.
    """
    if not login or len(login) > 254 or any(ord(c) <= 0x20 or ord(c) > 0x7E for c in login):
        return None
    login = login.lower()
    if "@" in login:
        local, _, domain = login.rpartition("@")
        try:
            domain = normalise_domain(domain)
        except AddressError:
            return None
    else:
        if len(local_domains) != 1:
            return None
        local, domain = login, local_domains[0].lower()
    if not is_valid_mailbox_name(local):
        return None
    return local, domain
