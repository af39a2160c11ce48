"""The greeting and session commands of an ESMTP session: EHLO / HELO and the extensions
advertised (only what is implemented), NOOP, RSET, QUIT, HELP, VRFY (RFC 5321 section 3.5.3:
nothing disclosed), EXPN, BDAT, and STARTTLS (RFC 3207: pipelined input after it is discarded
and the session starts over).
"""

from __future__ import annotations

from twisted.internet.interfaces import ITLSTransport
from twisted.python.failure import Failure

from pop3coexist.smtp import auth as sasl
from pop3coexist.smtp.session import (
    fail,
    reply_for,
)


class HelloCommands:
    """EHLO, HELO, NOOP, RSET, QUIT, HELP, VRFY, EXPN, BDAT, STARTTLS (mixed into ESMTPServer)."""

    # ------------------------------------------------------------------ greeting, extensions

    def _can_starttls(self) -> bool:
        return (
            self.factory.tls_options is not None
            and not self.secure
            and ITLSTransport.providedBy(self.transport)
        )

    def _auth_offered(self) -> bool:
        return not (self.factory.config.smtp.require_tls_for_auth and not self.secure)

    def extensions(self) -> list[str]:
        """The EHLO keywords, in the order they are advertised."""
        ext = [
            "PIPELINING",
            f"SIZE {self.factory.config.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self._can_starttls():
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(sasl.mechanism_names(self.factory.offers_secrets,
                                                                     self.factory.scram_store)))
        return ext

    def smtp_EHLO(self, arg: str):
        return self._hello(arg, esmtp=True)

    def smtp_HELO(self, arg: str):
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool):
        if not arg or " " in arg:
            raise fail(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self._txn = None
        self.delivery.reset()
        d = self.delivery.hello(self._session(arg))  # the content filters'
        if d.called and not isinstance(d.result, Failure):  # at once: no milter to wait for
            d.addErrback(lambda _f: None)
            self._hello_ok(arg, esmtp)
            return None
        return d.addCallbacks(lambda _: self._hello_ok(arg, esmtp),
                              lambda f: self._error(reply_for(f)))

    def _hello_ok(self, arg: str, esmtp: bool) -> None:
        self._helo = arg
        self._esmtp = esmtp
        greeting = f"{self.hostname} Hello [{self.client_ip}]"
        if esmtp:
            self._reply(250, None, "\n".join([greeting, *self.extensions()]))
        else:
            self._reply(250, None, greeting)

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(250, "2.0.0", "OK")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            raise fail(501, "5.5.4", "Syntax: RSET")
        self._txn = None
        self.delivery.reset()
        self._reply(250, "2.0.0", "OK")

    def smtp_QUIT(self, arg: str) -> None:
        self._reply(221, "2.0.0", f"{self.hostname} closing connection")
        self._closing = True
        self.transport.loseConnection()

    def smtp_HELP(self, arg: str) -> None:
        self._reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY")

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            raise fail(501, "5.5.4", "Syntax: VRFY address")
        # RFC 5321 section 3.5.3: do not disclose who exists
        self._reply(252, "2.5.0", "Cannot VRFY user; try RCPT to attempt delivery")

    def smtp_EXPN(self, arg: str) -> None:
        self._reply(502, "5.5.1", "EXPN not available")

    def smtp_BDAT(self, arg: str) -> None:
        self._reply(502, "5.5.1", "BDAT not available (no CHUNKING)")

    # ------------------------------------------------------------------ STARTTLS

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            raise fail(501, "5.5.4", "Syntax: STARTTLS")
        if self.secure:
            raise fail(503, "5.5.1", "TLS already active")
        if not self._can_starttls():
            raise fail(454, "4.7.0", "TLS not available")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 section 4.2: whatever the client pipelined after STARTTLS is discarded,
        # and the session starts over (no HELO, no transaction, no log-in).
        self._buf = b""
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True
        self._helo = None
        self._esmtp = False
        self._txn = None
        self.user = None
        self.auth_type = None
        self.delivery.reset()
        # the session's content-filter conversation goes on (policy/delivery.py)
        self.delivery = self.factory.realm.anonymous(self.delivery)

