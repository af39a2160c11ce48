"""Log-in for IMAP sessions (RFC 3501 sections 6.2.1-6.2.3, RFC 4959 SASL-IR): STARTTLS,
LOGIN, AUTHENTICATE PLAIN / LOGIN / CRAM-MD5 over the factory's checker and LoginGate, and the
rule that a locked or absent mailbox cannot log in. ``LoginCommands`` is a mixin of
``server.IMAPServer``."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.internet import defer, task

from pop3coexist.errors import AuthUnavailable, NoSuchMailbox
from pop3coexist.identity.credentials import PasswordCredentials
from pop3coexist.identity.logins import login_locked
from pop3coexist.imap.common import (
    Refuse,
    _printable,
    _text,
    log,
)
from pop3coexist.imap.parse import (
    BadSyntax,
)


class LoginCommands:
    """The not-authenticated state's commands (mixed into ``IMAPServer``)."""

    async def do_STARTTLS(self, tag: bytes, args: list) -> None:  # noqa: N802
        if self.factory.tls_options is None or self.secure:
            raise BadSyntax("STARTTLS not available")
        # RFC 3501 section 11.1 / RFC 2595 section 3.1: whatever the client sent after
        # STARTTLS in clear text is dropped, never run inside the TLS session (injection)
        self._queue.clear()
        self._buf = bytearray()
        self.clearLineBuffer()
        self.tagged(tag, "OK", "begin TLS negotiation now")
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True
    do_STARTTLS.states = ("unauth",)  # type: ignore[attr-defined]

    async def do_LOGIN(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 2 or isinstance(args[0], list) or isinstance(args[1], list):
            raise BadSyntax("LOGIN user password")
        if not self._clear_text_allowed():
            raise Refuse("use STARTTLS first", "PRIVACYREQUIRED")
        await self.login(tag, _text(args[0]), _text(args[1]), "LOGIN")
    do_LOGIN.states = ("unauth",)  # type: ignore[attr-defined]

    async def do_AUTHENTICATE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if not args or len(args) > 2:
            raise BadSyntax("AUTHENTICATE mechanism [initial-response]")
        mech = args[0].decode("latin-1").upper()
        if mech in ("PLAIN", "LOGIN") and not self._clear_text_allowed():
            raise Refuse("use STARTTLS first", "PRIVACYREQUIRED")
        if mech not in self.mechanisms():
            raise Refuse("unsupported mechanism", "CANNOT")
        initial = None
        if len(args) == 2:
            initial = b"" if args[1] == b"=" else self._b64(args[1])
            if initial is None:
                raise BadSyntax("bad base64")
        state: dict[str, Any] = {"mech": mech, "tag": tag, "answers": []}
        if mech == "CRAM-MD5":
            from pop3coexist.identity.credentials import CramMD5Credentials

            creds = CramMD5Credentials(self.factory.hostname)
            state["creds"] = creds
            self._sasl = state
            self.send(b"+ " + base64.b64encode(creds.getChallenge()))
            return
        if initial is not None:
            state["answers"].append(initial)
        self._sasl = state
        await self._sasl_continue()
    do_AUTHENTICATE.states = ("unauth",)  # type: ignore[attr-defined]

    @staticmethod
    def _b64(data: bytes) -> bytes | None:
        try:
            return binascii.a2b_base64(data, strict_mode=True) if data else b""
        except (binascii.Error, ValueError):
            return None

    def _sasl_answer(self, line: bytes) -> None:
        state = self._sasl
        if line.strip() == b"*":
            self._sasl = None
            self.tagged(state["tag"], "BAD", "authentication cancelled")
            return
        data = self._b64(line.strip())
        if data is None:
            self._sasl = None
            self.tagged(state["tag"], "BAD", "bad base64")
            return
        state["answers"].append(data)
        self._busy = True
        defer.ensureDeferred(self._sasl_continue()).addBoth(self._done)

    async def _sasl_continue(self) -> None:
        state = self._sasl
        mech, answers, tag = state["mech"], state["answers"], state["tag"]
        if mech == "PLAIN":
            if not answers:
                self.send(b"+ ")
                return
            self._sasl = None
            parts = answers[0].split(b"\0")
            if len(parts) != 3:
                self.tagged(tag, "BAD", "malformed PLAIN response")
                return
            authz, user, password = (p.decode("utf-8", "replace") for p in parts)
            if authz and authz.lower() != user.lower():
                password = "\0refused-authzid\0"  # no proxy log-ins
            await self.login(tag, user, password, "PLAIN")
        elif mech == "LOGIN":
            if len(answers) < 2:
                self.send(b"+ " + base64.b64encode(b"Username:" if not answers else
                                                   b"Password:"))
                return
            self._sasl = None
            await self.login(tag, answers[0].decode("utf-8", "replace"),
                             answers[1].decode("utf-8", "replace"), "LOGIN")
        elif mech == "SCRAM-SHA-256":
            await self._scram_step(state)
        else:  # CRAM-MD5
            self._sasl = None
            creds = state["creds"]
            try:
                creds.setResponse(answers[0])
            except ValueError:
                self.tagged(tag, "BAD", "malformed CRAM-MD5 response")
                return
            await self.login(tag, creds.username.decode("utf-8", "replace")
                             if isinstance(creds.username, bytes) else creds.username,
                             None, "CRAM-MD5", creds)

    async def _scram_step(self, state: dict[str, Any]) -> None:
        """SCRAM-SHA-256 (RFC 5802, RFC 7677) over ``identity.scram.ScramExchange``:
        client-first, server-first, client-final, server-final (``v=``, sent as a challenge:
        IMAP has no success data), then the client's empty answer. A malformed message or a
        wrong proof is a refused log-in, delayed like any other."""
        from pop3coexist.identity.scram import ScramExchange, ScramFailure

        answers, tag = state["answers"], state["tag"]
        exchange = state.setdefault("exchange", ScramExchange(self.factory.checker))
        try:
            if not answers:
                self.send(b"+ ")
            elif len(answers) == 1:
                first = await exchange.client_first(answers[0])
                self.send(b"+ " + base64.b64encode(first))
            elif len(answers) == 2:
                self.send(b"+ " + base64.b64encode(exchange.client_final(answers[1])))
            else:
                self._sasl = None
                if answers[2]:
                    raise ScramFailure("the answer to the server-final message must be empty")
                creds = exchange.credentials()
                await self.login(tag, creds.username, None, "SCRAM-SHA-256", creds)
        except ScramFailure:
            self._sasl = None
            await self.login(tag, "(scram)", None, "SCRAM-SHA-256", SCRAM_FAILED)

    async def login(self, tag: bytes, user: str, password: str | None, mech: str,
                    creds: Any = None) -> None:
        """Check the credentials through the factory's gate (one check at a time per source,
        the failure delay first); a locked or absent mailbox cannot log in."""
        f = self.factory
        if creds is None:
            creds = PasswordCredentials(user, password or "")
        release = await f.gate.enter(self.peer)
        try:
            try:
                if creds is SCRAM_FAILED:
                    raise _Refused()
                avatar = await defer.maybeDeferred(f.checker.requestAvatarId, creds)
                if isinstance(avatar, bytes):
                    avatar = avatar.decode("ascii")
                address = str(avatar).lower()
                box, _, domain = address.rpartition("@")
                account = await self.blocking(_open_account, f.store, f.folders, domain, box)
            except AuthUnavailable:
                log.info("IMAP log-in {user} from {peer} by {mech}: temporary failure",
                         user=_printable(user), peer=self.peer, mech=mech)
                self.tagged(tag, "NO", "the accounts cannot be read now, try later",
                            "UNAVAILABLE")
                return
            except Exception as e:
                release()  # the check has its outcome: the place is not held through the delay
                if not isinstance(e, _Refused):
                    log.info("IMAP log-in {user}: {why}", user=_printable(user),
                             why=type(e).__name__)
                delay = f.throttle.failure_delay(self.peer)
                log.info("IMAP log-in {user} from {peer} by {mech}: refused",
                         user=_printable(user), peer=self.peer, mech=mech)
                if delay > 0:
                    await task.deferLater(f.reactor, delay, lambda: None)
                self.tagged(tag, "NO", "authentication failed", "AUTHENTICATIONFAILED")
                return
        finally:
            release()
        f.throttle.success(self.peer)
        self.account, self.address, self.state = account, address, "auth"
        log.info("IMAP log-in {address} from {peer} by {mech}: success", address=address,
                 peer=self.peer, mech=mech)
        self.tagged(tag, "OK", "logged in", "CAPABILITY " + self.capabilities().decode())


class _Refused(Exception):
    pass


SCRAM_FAILED = object()  # stands for the credentials of a SCRAM exchange that failed


def _open_account(store: Any, folders: Any, domain: str, box: str) -> Any:
    """Blocking: the account's folders, Sent/Drafts/Trash/Junk made at its first log-in;
    _Refused when it has no mailbox here or its log-in is locked."""
    try:
        if not store.mailbox_exists(domain, box):
            raise _Refused()
    except (NoSuchMailbox, ValueError):
        raise _Refused() from None
    if login_locked(store, f"{box}@{domain}"):
        raise _Refused()
    account = folders.open_account(domain, box)
    account.ensure_special_folders()
    return account
