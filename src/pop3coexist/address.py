"""Mail addresses: strict parsing and normalisation (RFC 5321 section 4.1.2). No I/O.

Everything that compares or stores an address goes through here, so the classic relay tricks
(percent hack, source routes, bang paths, quoted ``"a@b"@local``, double ``@``, trailing dots)
are decided in one place: they are either refused or parsed to what they really say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 atext (RFC 5322 section 3.2.3)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_RE = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# Mailbox names we create: a conservative subset of dot-atom, lower case, no leading dot.
_MAILBOX_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-](?:[a-z0-9!#$%&'*+=?^_`{|}~.-]{0,63})\Z")


class AddressError(ValueError):
    """The text is not an address we accept; str() says why."""


@dataclass(frozen=True)
class Address:
    """A parsed mailbox ``local@domain``; ``domain`` is lower case, ``local`` as given."""

    local: str
    domain: str
    quoted: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-folded ``local@domain`` for lookups (local parts are compared without case)."""
        return f"{self.local.lower()}@{self.domain}"


def normalise_domain(name: str) -> str:
    """Return a domain name in canonical form (lower case) or raise AddressError.

    A trailing dot, empty labels, address literals and non-ASCII names are refused.
    """
    if not isinstance(name, str) or not name:
        raise AddressError("empty domain")
    lowered = name.lower()
    if len(lowered) > 253:
        raise AddressError("domain name too long")
    labels = lowered.split(".")
    if len(labels) < 2:
        raise AddressError(f"domain {name!r} is not fully qualified")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise AddressError(f"domain {name!r} has an invalid label {label!r}")
    return lowered


def is_valid_mailbox_name(local: str) -> bool:
    """True when ``local`` is a mailbox name we create (1-64 characters, see REFERENCE)."""
    return bool(_MAILBOX_NAME_RE.match(local)) and ".." not in local and not local.endswith(".")


def parse_address(text: str) -> Address:
    """Parse an RFC 5321 ``Mailbox`` (no angle brackets) strictly.

    Source routes, bang paths inside a domain, address literals, unqualified names, a second
    ``@``, trailing dots and non-ASCII are refused. A quoted local part is kept (quoted=True)
    and is never split again at an inner ``@`` or ``%``.
    """
    if not text or len(text) > 254:
        raise AddressError("address missing or too long")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise AddressError("address has spaces, control or non-ASCII characters")
    if text.startswith("@"):
        raise AddressError("source routes are not accepted")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address has no domain")
    local, domain = text[:at], text[at + 1 :]
    if domain.startswith("["):
        raise AddressError("address literals are not accepted")
    domain = normalise_domain(domain)
    quoted = False
    if local.startswith('"'):
        if not _QUOTED_RE.match(local):
            raise AddressError("malformed quoted local part")
        quoted = True
    elif not _DOT_ATOM_RE.match(local):
        raise AddressError("malformed local part")
    if len(local) > 64:
        raise AddressError("local part longer than 64 characters")
    return Address(local, domain, quoted)


def parse_path(text: str) -> Address | None:
    """Parse a MAIL FROM / RCPT TO path ``<...>``; ``<>`` gives None (the null sender)."""
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be in angle brackets")
    inner = text[1:-1]
    if inner == "":
        return None
    return parse_address(inner)


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
