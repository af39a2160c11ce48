"""The credentials every front-end hands to an account checker.

``PasswordCredentials`` implements ``twisted.cred.credentials.IUsernamePassword``: a user name
and clear-text password, from POP3 USER/PASS and AUTH PLAIN/LOGIN, SMTP AUTH PLAIN/LOGIN,
IMAP LOGIN and AUTHENTICATE, ManageSieve and the web log-in forms.

Shared-secret credentials that work on Python 3: APOP (RFC 1939) and CRAM-MD5 (RFC 2195).
Both classes implement ``twisted.cred.credentials.IUsernameHashedPassword``: an account checker
that keeps the shared secret calls ``checkPassword(secret)`` with it (str or bytes).

Why not Twisted's own classes:

- ``twisted.mail.pop3.APOPCredentials.checkPassword`` compares ``md5(...).hexdigest()`` (a str)
  with the client's digest (bytes), so it never succeeds on Python 3, it cannot take a str
  secret, and ``==`` is not a constant-time compare.
- ``twisted.cred.credentials.CramMD5Credentials`` makes its challenge with ``random`` (not a
  cryptographic source) and ``"None"`` as host name when none is given, raises a bare
  ``ValueError`` on a response without a space, needs a bytes secret and compares with ``==``.

The classes here keep the same constructors and attributes, so protocol code can use them in
place of Twisted's (``challengers = {b"CRAM-MD5": CramMD5Credentials}``). No secret is ever
kept on the object: only the client's digest/response, which ``repr`` does not show either.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from twisted.cred import credentials as tcredentials
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from zope.interface import implementer

__all__ = ["APOPCredentials", "CramMD5Credentials", "MalformedResponse", "PasswordCredentials",
           "apop_digest", "cram_md5_response"]

_HEX = frozenset(b"0123456789abcdef")


def _text(value: str | bytes) -> str:
    """``value`` as str: octets are read as UTF-8, any that are not kept as surrogate escapes
    (an SMTP AUTH password of other octets still compares by its exact octets)."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "surrogateescape")


@implementer(IUsernamePassword)
class PasswordCredentials:
    """A user name and clear-text password (given as str or UTF-8 bytes, kept as str);
    ``checkPassword(stored)`` takes the stored secret as str or bytes and compares the
    octets in constant time. ``repr`` never shows the password."""

    def __init__(self, username: str | bytes, password: str | bytes) -> None:
        self.username = _text(username)
        self.password = _text(password)

    def checkPassword(self, password: str | bytes) -> bool:  # noqa: N802 (zope interface name)
        return hmac.compare_digest(self.password.encode("utf-8", "surrogateescape"),
                                   _secret_bytes(password))

    def __repr__(self) -> str:
        return f"<PasswordCredentials username={self.username!r} password=<hidden>>"


class MalformedResponse(ValueError):
    """The client's CRAM-MD5 response is not ``user SP 32-hex-digits`` (RFC 2195 section 2)."""


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def apop_digest(magic: bytes, secret: str | bytes) -> bytes:
    """The APOP digest a client sends: lower-case hex MD5 of the greeting timestamp (with its
    angle brackets) followed by the shared secret (RFC 1939 section 7)."""
    return hashlib.md5(magic + _secret_bytes(secret), usedforsecurity=False).hexdigest().encode("ascii")


def cram_md5_response(challenge: bytes, secret: str | bytes) -> bytes:
    """The CRAM-MD5 digest: lower-case hex HMAC-MD5 of the challenge keyed by the shared secret
    (RFC 2195 section 2)."""
    return hmac.new(_secret_bytes(secret), challenge, hashlib.md5).hexdigest().encode("ascii")


def _normalise_hex(digest: bytes | str) -> bytes | None:
    """Lower-case 32-hex-digit digest as bytes, or None when it is not one."""
    if isinstance(digest, str):
        try:
            digest = digest.encode("ascii")
        except UnicodeEncodeError:
            return None
    digest = bytes(digest).lower()
    if len(digest) != 32 or not set(digest) <= _HEX:
        return None
    return digest


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """The APOP command's credentials (RFC 1939 section 7).

    ``magic`` is the timestamp of the greeting including the angle brackets, ``username`` the
    name as the client sent it, ``digest`` the 32 hex digits the client sent (any case).
    """

    def __init__(self, magic: bytes, username: bytes, digest: bytes) -> None:
        self.magic = magic
        self.username = username
        self.digest = digest

    def checkPassword(self, password: str | bytes) -> bool:
        """True when the digest is MD5(magic + password); compared in constant time."""
        given = _normalise_hex(self.digest)
        expected = apop_digest(self.magic, password)
        if given is None:
            # Still compare something of the same length, so a malformed digest takes as long.
            hmac.compare_digest(expected, expected)
            return False
        return hmac.compare_digest(given, expected)

    def __repr__(self) -> str:
        return f"<APOPCredentials username={self.username!r}>"


@implementer(IUsernameHashedPassword)
class CramMD5Credentials(tcredentials.CramMD5Credentials):
    """SASL CRAM-MD5 (RFC 2195) for POP3 AUTH and ESMTP AUTH.

    Use as a challenger class: ``CramMD5Credentials(host)``, then ``getChallenge()``,
    ``setResponse(decoded_client_line)``, ``moreChallenges()`` (always False), and the checker
    calls ``checkPassword(secret)``. ``setResponse`` raises ``MalformedResponse`` (a ValueError)
    when the response is not ``user SP digest``.
    """

    def __init__(self, host: bytes | str | None = None) -> None:
        super().__init__(host)

    def getChallenge(self) -> bytes:
        """An RFC 822 msg-id ``<random.time@host>`` (RFC 2195 section 2), made once per object
        from a cryptographic random source."""
        if self.challenge:
            return self.challenge
        host = self.host
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not host:
            host = "localhost"
        self.challenge = f"<{secrets.randbits(63)}.{int(time.time())}@{host}>".encode("ascii", "replace")
        return self.challenge

    def setResponse(self, response: bytes) -> None:
        """Take the client's decoded response ``user SP digest``. The user name may contain
        spaces (RFC 2195: the digest is after the last space)."""
        if isinstance(response, str):
            response = response.encode("utf-8")
        name, sep, digest = bytes(response).rstrip(b"\r\n").rpartition(b" ")
        if not sep or not name or not digest:
            raise MalformedResponse("CRAM-MD5 response must be a user name, a space and a digest")
        self.username = name
        self.response = digest

    def moreChallenges(self) -> bool:
        return False

    def checkPassword(self, password: str | bytes) -> bool:
        """True when the response is HMAC-MD5(password, challenge); compared in constant time."""
        if not self.challenge:
            return False
        expected = cram_md5_response(self.challenge, password)
        given = _normalise_hex(self.response or b"")
        if given is None:
            hmac.compare_digest(expected, expected)
            return False
        return hmac.compare_digest(given, expected)

    def __repr__(self) -> str:
        return f"<CramMD5Credentials username={self.username!r}>"
