"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the stored keys, the server side of the exchange, and the
credentials a finished exchange hands to the account checker. Built on ``scramp``.

- ``ScramKeys``: what an account store keeps instead of the password (RFC 5802 section 3:
  salt, iteration count, StoredKey, ServerKey); ``derive_keys(password)`` makes them.
- ``ScramExchange``: one server-side exchange, no I/O and no framing: ``client_first(data)``
  returns a Deferred firing with the server-first message (the keys are looked up through the
  ``IScramKeyStore`` given, off the reactor thread); ``client_final(data)`` checks the
  client's proof and returns the server-final message (``v=``); ``credentials()`` then
  returns ``ScramCredentials``. A malformed message or a wrong proof raises ``ScramFailure``
  (a failed log-in, delayed like any other). An unknown user gets decoy keys (a salt derived
  from the name with a per-process secret), so the exchange cannot tell whether an account
  exists; the proof then fails.
- ``ScramCredentials`` (``IScramCredentials``): the log-in name and the StoredKey the client
  proved it knows. The checker accepts them only while that StoredKey is still the account's
  (a password changed mid-exchange fails the log-in).

Channel binding (SCRAM-SHA-256-PLUS) is not offered: a client sending the ``p`` flag fails;
``y`` and ``n`` are accepted (RFC 5802 section 6). Acting for another identity (an ``a=``
authzid other than the user) is refused. Nothing here logs or ``repr``s a key or a proof.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from pop3coexist.interfaces import IScramCredentials, IScramKeyStore

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # RFC 7677 section 4: at least 4096
MAX_ITERATIONS = 1_000_000  # a corrupt entry must not make a log-in spin for minutes
_MECHS: list[Any] = []  # the scramp.ScramMechanism, made at first use (_mech)
_DECOY_SECRET = secrets.token_bytes(32)

__all__ = ["MECHANISM", "ScramCredentials", "ScramExchange", "ScramFailure", "ScramKeys",
           "derive_keys"]


def _mech() -> Any:
    """scramp's ScramMechanism for SCRAM-SHA-256. scramp (with asn1crypto: 3.7 MB of RSS in
    every serving process) is imported at the first SCRAM exchange or key derivation, not at
    start: most processes never need it (issue 18, the IDLE memory target)."""
    if not _MECHS:
        from scramp import ScramMechanism

        _MECHS.append(ScramMechanism(MECHANISM))
    return _MECHS[0]


def _scram_exception() -> type[Exception]:
    from scramp import ScramException

    return ScramException


class ScramFailure(Exception):
    """The exchange failed: a malformed message or a wrong proof. ``str()`` is for the log
    and never holds a key or a proof."""


@dataclass(frozen=True)
class ScramKeys:
    """One account's SCRAM-SHA-256 keys (RFC 5802 section 3); the repr shows no key."""

    salt: bytes = field(repr=False)
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


def derive_keys(password: str, iterations: int = DEFAULT_ITERATIONS,
                salt: bytes | None = None) -> ScramKeys:
    """The SCRAM-SHA-256 keys of ``password`` (SASLprep applied by scramp; a new random
    16-byte salt unless one is given). Takes a few milliseconds per 1,000 iterations."""
    salt_out, stored, server, i = _mech().make_auth_info(password, iteration_count=iterations,
                                                      salt=salt)
    return ScramKeys(bytes(salt_out), int(i), bytes(stored), bytes(server))


def _decoy(username: str) -> ScramKeys:
    """Keys for a name that has none: a stable salt (the same name gets the same salt), keys
    nobody can prove."""
    salt = hmac.new(_DECOY_SECRET, b"salt\0" + username.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).digest()[:16]
    return ScramKeys(salt, DEFAULT_ITERATIONS, secrets.token_bytes(32), secrets.token_bytes(32))


def _saslname(text: str) -> str:
    """RFC 5802 section 5.1: ``=2C`` is a comma, ``=3D`` an equals sign; any other ``=`` is
    an error."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "=":
            code = text[i + 1:i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise ScramFailure("malformed user name in SCRAM client-first message")
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@implementer(IScramCredentials)
class ScramCredentials:
    """A finished, proven SCRAM exchange: ``username`` (str) and the ``stored_key`` proven."""

    def __init__(self, username: str, stored_key: bytes) -> None:
        self.username = username
        self._stored_key = stored_key

    def matches(self, keys: ScramKeys | None) -> bool:
        """True when ``keys`` are the keys the client proved (constant-time compare)."""
        return keys is not None and hmac.compare_digest(keys.stored_key, self._stored_key)

    def __repr__(self) -> str:
        return f"<ScramCredentials username={self.username!r}>"


class ScramExchange:
    """One server-side SCRAM-SHA-256 exchange; see the module docstring."""

    def __init__(self, store: Any) -> None:
        assert IScramKeyStore.providedBy(store), "ScramExchange needs an IScramKeyStore"
        self._store = store
        self._server: Any = None
        self._keys: ScramKeys | None = None
        self.username: str | None = None
        self._proven = False

    def __repr__(self) -> str:
        return f"<ScramExchange username={self.username!r}>"

    def client_first(self, data: bytes) -> defer.Deferred:
        """Start the exchange with the client-first message (bytes, base64 already removed);
        a Deferred firing with the server-first message (bytes), or failing ScramFailure."""
        return defer.ensureDeferred(self._client_first(data))

    async def _client_first(self, data: bytes) -> bytes:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramFailure("SCRAM client-first message is not UTF-8") from None
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramFailure("malformed SCRAM client-first message")
        names: list[str] = []

        def record(user: str) -> tuple[bytes, bytes, bytes, int]:
            names.append(user)
            decoy = _decoy(user)
            return decoy.salt, decoy.stored_key, decoy.server_key, decoy.iterations

        try:  # scramp checks the whole message; this pass only learns the user name
            _mech().make_server(record).set_client_first(text)
        except _scram_exception() as e:
            raise ScramFailure(f"SCRAM client-first message refused: {_reason(e)}") from None
        username = _saslname(names[0])
        if not username:
            raise ScramFailure("empty user name in SCRAM client-first message")
        authzid = parts[1]
        if authzid:
            if not authzid.startswith("a=") or _saslname(authzid[2:]).lower() != username.lower():
                raise ScramFailure("SCRAM authorization identity differs from the user name")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
            raise ScramFailure("control character in the SCRAM user name")
        self.username = username
        keys = await self._store.scram_keys(username)
        if keys is None or not 1 <= keys.iterations <= MAX_ITERATIONS:
            keys = _decoy(username)
        self._keys = keys
        server = _mech().make_server(
            lambda _user: (keys.salt, keys.stored_key, keys.server_key, keys.iterations))
        try:
            server.set_client_first(text)
            first = server.get_server_first()
        except _scram_exception() as e:
            raise ScramFailure(f"SCRAM client-first message refused: {_reason(e)}") from None
        self._server = server
        return first.encode("utf-8")

    def client_final(self, data: bytes) -> bytes:
        """Check the client-final message (proof); return the server-final message (bytes).
        Raises ScramFailure for a malformed message or a wrong proof."""
        if self._server is None or self._proven:
            raise ScramFailure("SCRAM message out of order")
        try:
            self._server.set_client_final(data.decode("utf-8"))
            final = self._server.get_server_final()
        except (_scram_exception(), UnicodeDecodeError) as e:
            raise ScramFailure(f"SCRAM proof refused: {_reason(e)}") from None
        self._proven = True
        return final.encode("utf-8")

    def credentials(self) -> ScramCredentials:
        """The proven credentials (after ``client_final``)."""
        if not self._proven or self._keys is None or self.username is None:
            raise ScramFailure("SCRAM exchange not finished")
        return ScramCredentials(self.username, self._keys.stored_key)


def _reason(e: Exception) -> str:
    if isinstance(e, _scram_exception()):
        text = str(e.args[0]) if e.args else "refused"
        return text.split("\n")[0][:120]
    return e.__class__.__name__
