"""SMTP AUTH (RFC 4954) in an ESMTP session: the mechanisms of ``smtp.auth``, the base64
exchange (a bad line gets 501 and the session goes on), and the log-in through the delivery
realm, whose avatar the session then holds. A refused log-in waits (``policy.throttle``).
"""

from __future__ import annotations

import base64
import binascii

from twisted.internet import defer, task
from twisted.python.failure import Failure

from pop3coexist.errors import AuthUnavailable
from pop3coexist.events import login_outcome
from pop3coexist.smtp import auth as sasl
from pop3coexist.smtp.mailevents import login_fields
from pop3coexist.smtp.session import (
    STATE_AUTH,
    STATE_COMMAND,
    fail,
    log,
    reply_for,
)


class AuthCommands:
    """AUTH and its exchange (mixed into ESMTPServer)."""

    # ------------------------------------------------------------------ AUTH

    def smtp_AUTH(self, arg: str):
        if not arg:
            raise fail(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if self._helo is None or not self._esmtp:
            raise fail(503, "5.5.1", "Send EHLO first")
        if self.user is not None:
            raise fail(503, "5.5.1", "Already authenticated")
        if self._txn is not None:
            raise fail(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self._auth_offered():
            raise fail(538, "5.7.11", "Encryption required for requested authentication mechanism")
        parts = arg.split(" ")
        if len(parts) > 2:
            raise fail(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mech = sasl.make_mechanism(parts[0], self.hostname, self.factory.offers_secrets,
                                   self.factory.scram_store)
        if mech is None:
            raise fail(504, "5.5.4", "Unrecognized authentication type")
        initial = None
        if len(parts) == 2:
            initial = b"" if parts[1] == "=" else self._b64(parts[1])
            if initial is None:
                return None
        self._mech = mech
        self._mech_name = parts[0].upper()
        return self._sasl(lambda: mech.start(initial))

    def _b64(self, text: str | bytes) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._state = STATE_COMMAND
            self._mech = None
            self._syntax_error(fail(501, "5.5.2", "Invalid base64 data"))
            return None

    def _auth_line(self, line: bytes):
        if line == b"*":
            self._state = STATE_COMMAND
            self._mech = None
            raise fail(501, "5.7.0", "Authentication cancelled")
        response = self._b64(line)
        if response is None:
            return None
        mech = self._mech
        assert mech is not None
        return self._sasl(lambda: mech.step(response))

    def _sasl(self, step):
        try:
            result = step()
        except sasl.SaslSyntaxError as e:
            self._state = STATE_COMMAND
            self._mech = None
            raise fail(501, "5.5.2", f"Invalid authentication response: {e}")
        if isinstance(result, defer.Deferred):  # SCRAM looks the keys up first
            return result.addCallbacks(lambda r: self._sasl(lambda: r), self._sasl_unavailable)
        if isinstance(result, bytes):
            self._state = STATE_AUTH
            self._reply(334, None, base64.b64encode(result).decode("ascii"))
            return None
        self._state = STATE_COMMAND
        method, self._mech = self._mech.name if self._mech else "-", None
        return self._login(result, method)

    def _sasl_unavailable(self, failure: Failure) -> None:
        self._state = STATE_COMMAND
        self._mech = None
        self._error(reply_for(failure, AuthUnavailable(), "SMTP AUTH: key lookup failed"))

    def _login(self, credentials, method: str = "-") -> defer.Deferred:
        """Log in through the delivery realm (the checker, then the locks); the session then
        holds the account's avatar."""
        return defer.ensureDeferred(self._log_in(credentials, method))

    async def _log_in(self, credentials, method: str = "-") -> None:
        factory = self.factory
        release = await factory.gate.enter(self.client_ip)  # policy.throttle.LoginGate
        if self._closing:  # the client left while it waited: spend no check on it
            release()
            return
        try:
            avatar = await factory.realm.login(credentials, self.delivery)
        except Exception:
            release()
            error = reply_for(Failure(), AuthUnavailable(), "SMTP AUTH: checker error")
            if error.code == 535:  # wrong credentials or a locked account (RFC 4954 section 6)
                delay = factory.throttle.failure_delay(self.client_ip)
                log.info("SMTP AUTH failed from {ip}", ip=self.client_ip, **login_fields(
                    self, "failed", getattr(credentials, "username", None), method, delay))
                await task.deferLater(factory.reactor, delay, self._error, error)
            else:
                log.info("SMTP AUTH from {ip}: {code} {enhanced}", ip=self.client_ip, code=error.code, enhanced=error.enhanced, **login_fields(self, login_outcome(error.code), getattr(credentials, "username", None), method))  # noqa: E501
                self._error(error)
            return
        release()
        factory.throttle.success(self.client_ip)
        self.delivery = avatar
        self.user = avatar.user
        self.auth_type = self._mech_name
        log.info("SMTP AUTH ok for {user} from {ip}", ip=self.client_ip,
                 **login_fields(self, "ok", avatar.user, method))
        self._reply(235, "2.7.0", "Authentication successful")

