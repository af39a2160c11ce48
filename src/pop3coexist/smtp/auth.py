"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195) and
SCRAM-SHA-256 (RFC 7677, over ``identity.scram``; its first step returns a Deferred while the
keys are looked up).

Each mechanism is a small state machine with no I/O: the protocol feeds it the decoded client
responses and gets back either a challenge to send (``334``) or the credentials to hand to the
``IAccountChecker`` (the same checker and realm as POP3). Malformed input raises
``SaslSyntaxError``. Nothing here keeps, logs or shows a password: credential objects have a
repr without the secret.
"""

from __future__ import annotations

import os
import time

from pop3coexist.identity.credentials import CramMD5Credentials as _Cram
from pop3coexist.identity.credentials import PasswordCredentials


class SaslSyntaxError(ValueError):
    """The client's SASL response is malformed (reply 501 5.5.2)."""


def _identity(name: bytes) -> bytes:
    """A user name from a client response; control characters (C0, DEL: CR and LF among them)
    raise SaslSyntaxError, so none reaches a stored session value or a log line."""
    if any(b < 0x20 or b == 0x7F for b in name):
        raise SaslSyntaxError("control character in the user name")
    return name


class Mechanism:
    """One AUTH exchange. ``start`` and ``step`` return bytes (a challenge) or credentials."""

    name = ""

    def start(self, initial: bytes | None) -> bytes | object:
        raise NotImplementedError

    def step(self, response: bytes) -> bytes | object:
        raise NotImplementedError


class Plain(Mechanism):
    """PLAIN: ``[authzid] NUL authcid NUL passwd``; an authzid other than authcid is refused."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> bytes | object:
        if initial is None:
            return b""
        return self.step(initial)

    def step(self, response: bytes) -> bytes | object:
        parts = response.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            raise SaslSyntaxError("PLAIN response must be authzid NUL authcid NUL password")
        authzid, authcid, password = parts
        _identity(authzid)
        _identity(authcid)
        if authzid and authzid.lower() != authcid.lower():
            # Acting for another user is not offered: treat as a failed log-in.
            return PasswordCredentials(authcid, b"\x00refused-authzid\x00" + os.urandom(8))
        return PasswordCredentials(authcid, password)


class Login(Mechanism):
    """LOGIN: ``Username:`` then ``Password:`` (an initial response is the user name)."""

    name = "LOGIN"

    def __init__(self) -> None:
        self.username: bytes | None = None

    def start(self, initial: bytes | None) -> bytes | object:
        if initial is None:
            return b"Username:"
        return self.step(initial)

    def step(self, response: bytes) -> bytes | object:
        if self.username is None:
            if not response:
                raise SaslSyntaxError("empty user name")
            self.username = _identity(response)
            return b"Password:"
        return PasswordCredentials(self.username, response)


class CramMD5(Mechanism):
    """CRAM-MD5: a ``<random.time@host>`` challenge, answered by ``user hex-hmac``."""

    name = "CRAM-MD5"

    def __init__(self, hostname: str) -> None:
        self.creds = _Cram(hostname.encode("ascii"))
        rnd = int.from_bytes(os.urandom(6), "big")
        self.creds.challenge = f"<{rnd}.{int(time.time())}@{hostname}>".encode("ascii")

    def start(self, initial: bytes | None) -> bytes | object:
        if initial is not None:
            raise SaslSyntaxError("CRAM-MD5 takes no initial response")
        return self.creds.challenge

    def step(self, response: bytes) -> bytes | object:
        parts = response.split(b" ")
        if len(parts) != 2 or not parts[0] or len(parts[1]) != 32:
            raise SaslSyntaxError("CRAM-MD5 response must be 'user digest'")
        try:
            int(parts[1], 16)
        except ValueError:
            raise SaslSyntaxError("CRAM-MD5 digest must be hexadecimal")
        _identity(parts[0])
        self.creds.setResponse(response)
        self.creds.response = self.creds.response.lower()
        return self.creds


class ScramSha256(Mechanism):
    """SCRAM-SHA-256: client-first (initial response, or after an empty ``334``), server-first,
    client-final, server-final (``v=``, sent as a ``334`` challenge), then an empty response.
    A malformed message or a wrong proof ends in credentials that no account matches, so it
    is a refused log-in (``535 5.7.8``, delayed) like a wrong password."""

    name = "SCRAM-SHA-256"

    def __init__(self, key_store) -> None:
        from pop3coexist.identity.scram import ScramExchange

        self.exchange = ScramExchange(key_store)
        self.stage = 0

    def start(self, initial: bytes | None) -> bytes | object:
        if not initial:
            return b""
        return self.step(initial)

    def _refused(self, _failure=None) -> object:
        from pop3coexist.identity.scram import ScramCredentials

        return ScramCredentials(self.exchange.username or "", b"")

    def _first_failed(self, failure) -> object:
        from pop3coexist.identity.scram import ScramFailure

        failure.trap(ScramFailure)  # anything else (the key store is down) stays a failure
        return self._refused()

    def step(self, response: bytes) -> bytes | object:
        from pop3coexist.identity.scram import ScramFailure

        stage, self.stage = self.stage, self.stage + 1
        try:
            if stage == 0:
                d = self.exchange.client_first(response)
                d.addErrback(self._first_failed)
                return d
            if stage == 1:
                return self.exchange.client_final(response)
            if response:
                return self._refused()
            return self.exchange.credentials()
        except ScramFailure:
            return self._refused()


def mechanism_names(offers_secrets: bool, scram_store=None) -> list[str]:
    """The mechanisms to advertise, in order; CRAM-MD5 only where the checker has the secret,
    SCRAM-SHA-256 only with a ``scram_store`` (an ``IScramKeyStore`` that offers it)."""
    names = ["PLAIN", "LOGIN"]
    if offers_secrets:
        names.append("CRAM-MD5")
    if scram_store is not None:
        names.append("SCRAM-SHA-256")
    return names


def make_mechanism(name: str, hostname: str, offers_secrets: bool,
                   scram_store=None) -> Mechanism | None:
    """A fresh exchange for ``name`` (any case), or None if it is not offered."""
    name = name.upper()
    if name not in mechanism_names(offers_secrets, scram_store):
        return None
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "SCRAM-SHA-256":
        return ScramSha256(scram_store)
    return CramMD5(hostname)
