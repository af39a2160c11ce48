"""Credentials and SASL mechanisms for POP3 log-in (RFC 1939 APOP, RFC 5034 AUTH).

- ``PasswordCredentials`` (USER/PASS, AUTH PLAIN and AUTH LOGIN), ``APOPCredentials`` and
  ``CramMD5Credentials``: the identity package's classes (``pop3coexist.identity.credentials``),
  re-exported here for the POP3 code.
- ``PlainMechanism``, ``LoginMechanism``, ``CramMD5Mechanism``: server-side SASL state
  machines that know nothing of sockets or base64 framing. ``start(initial)`` and
  ``step(response)`` return a ``Challenge``, ``Done`` (credentials to check) or ``Fail``.

No object here ever puts a password or SASL payload into its ``repr`` or an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the POP3 code takes the credentials from here
from pop3coexist.identity.credentials import (  # noqa: F401 (re-exported)
    APOPCredentials,
    CramMD5Credentials,
    PasswordCredentials,
)

# --------------------------------------------------------------------------- SASL steps


@dataclass
class Challenge:
    """Send ``data`` (raw; the protocol base64-encodes it) and wait for a response."""

    data: bytes


@dataclass
class Done:
    """The exchange is over: check ``credentials``; ``username`` is for the log."""

    credentials: Any = field(repr=False)
    username: str


@dataclass
class Fail:
    """The exchange failed (malformed response): a failed log-in, ``reason`` is for the log."""

    reason: str


Step = Challenge | Done | Fail


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class PlainMechanism:
    """SASL PLAIN (RFC 4616): ``authzid NUL authcid NUL passwd``; authzid empty or = authcid."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Fail("malformed PLAIN response")
        authzid, authcid, passwd = (_utf8(p) for p in parts)
        if authzid is None or authcid is None or passwd is None:
            return Fail("PLAIN response is not UTF-8")
        if not authcid or not passwd:
            return Fail("empty PLAIN user name or password")
        if authzid and authzid.lower() != authcid.lower():
            return Fail("PLAIN authorization identity differs from the user name")
        return Done(PasswordCredentials(authcid, passwd), authcid)

    def __repr__(self) -> str:
        return "<PlainMechanism>"


class LoginMechanism:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""

    name = "LOGIN"
    USERNAME_PROMPT = b"Username:"
    PASSWORD_PROMPT = b"Password:"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(self.USERNAME_PROMPT)
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        text = _utf8(response)
        if text is None:
            return Fail("LOGIN response is not UTF-8")
        if self._username is None:
            if not text:
                return Fail("empty LOGIN user name")
            self._username = text
            return Challenge(self.PASSWORD_PROMPT)
        if not text:
            return Fail("empty LOGIN password")
        return Done(PasswordCredentials(self._username, text), self._username)

    def __repr__(self) -> str:
        return "<LoginMechanism>"


class CramMD5Mechanism:
    """CRAM-MD5 (RFC 2195): the challenge is a unique ``<...@host>``; no initial response."""

    name = "CRAM-MD5"

    def __init__(self, challenge: bytes, hostname: str) -> None:
        self.credentials = CramMD5Credentials(hostname)
        self.credentials.challenge = challenge

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return Fail("CRAM-MD5 takes no initial response")
        return Challenge(self.credentials.getChallenge())

    def step(self, response: bytes) -> Step:
        user, sep, digest = response.rpartition(b" ")
        if not sep or not user or len(digest) != 32:
            return Fail("malformed CRAM-MD5 response")
        try:
            int(digest, 16)
        except ValueError:
            return Fail("malformed CRAM-MD5 digest")
        name = _utf8(user)
        if name is None:
            return Fail("CRAM-MD5 user name is not UTF-8")
        self.credentials.setResponse(user + b" " + digest.lower())
        return Done(self.credentials, name)

    def __repr__(self) -> str:
        return "<CramMD5Mechanism>"


class ScramSha256Mechanism:
    """SCRAM-SHA-256 (RFC 7677) over ``identity.scram.ScramExchange``: client-first (as the
    initial response or after an empty challenge), server-first, client-final, server-final
    (``v=``, sent as a challenge, RFC 5034 section 4), then the client's empty response.
    ``start``/``step`` return a ``Step`` or, while the keys are looked up, a Deferred firing
    with one; a malformed message or a wrong proof is ``Fail`` (a refused log-in)."""

    name = "SCRAM-SHA-256"

    def __init__(self, key_store: Any) -> None:
        from pop3coexist.identity.scram import ScramExchange

        self._exchange = ScramExchange(key_store)
        self._stage = 0

    def start(self, initial: bytes | None) -> Any:
        if initial is None or initial == b"":
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> Any:
        from pop3coexist.identity.scram import ScramFailure

        stage, self._stage = self._stage, self._stage + 1
        try:
            if stage == 0:
                d = self._exchange.client_first(response)
                d.addCallback(Challenge)
                d.addErrback(_scram_failed)
                return d
            if stage == 1:
                return Challenge(self._exchange.client_final(response))
            if response:
                return Fail("SCRAM: the response to the server-final message must be empty")
            creds = self._exchange.credentials()
            return Done(creds, creds.username)
        except ScramFailure as e:
            return Fail(str(e))

    def __repr__(self) -> str:
        return "<ScramSha256Mechanism>"


def _scram_failed(failure: Any) -> Fail:
    """A ScramFailure becomes a refused log-in; anything else (the key store cannot be read)
    stays a failure."""
    from pop3coexist.identity.scram import ScramFailure

    failure.trap(ScramFailure)
    return Fail(str(failure.value))
