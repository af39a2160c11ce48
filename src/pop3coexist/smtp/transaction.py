"""MAIL and RCPT of an ESMTP session: the parameters are parsed here (SIZE, BODY, RET, ENVID,
AUTH; NOTIFY, ORCPT: RFC 1870, 6152, 3461, 4954); every decision is the session's avatar's
(``policy.delivery``: ``validate_from``, ``validate_to``, ``begin``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure

from pop3coexist.address import Address
from pop3coexist.interfaces import IDeliveryTransaction, SMTPSession
from pop3coexist.policy.delivery import MailOptions
from pop3coexist.policy.relay import parse_sender
from pop3coexist.smtp.params import KEYWORD_RE, split_path, xtext_decode
from pop3coexist.smtp.session import (
    RCPT_LOCAL_ERROR,
    fail,
    reply_for,
)


class MailCommands:
    """MAIL and RCPT (mixed into ESMTPServer)."""

    # ------------------------------------------------------------------ MAIL

    def smtp_MAIL(self, arg: str):
        cfg = self.factory.config.smtp
        if self._helo is None:
            raise fail(503, "5.5.1", "Send HELO or EHLO first")
        if self._txn is not None:
            raise fail(503, "5.5.1", "Sender already specified")
        if self.factory.auth_required and self.user is None:
            raise fail(530, "5.7.0", "Authentication required")
        if self._messages >= cfg.max_messages_per_connection:
            self._hangup(fail(421, "4.7.0", f"{self.hostname} Too many messages in this session, "
                                              "closing connection"))
            return None
        inner, params = split_path(arg, "FROM:")
        sender = None if inner == "" else parse_sender(inner)
        opts: dict[str, Any] = {}
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise fail(501, "5.5.4", "Syntax: SIZE=octets")
                opts["size"] = int(value)
                if 0 < cfg.max_message_size < opts["size"]:  # 0: no fixed maximum (RFC 1870)
                    raise fail(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise fail(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
                opts["body"] = value.upper()
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise fail(501, "5.5.4", "Syntax: RET=FULL or RET=HDRS")
                opts["ret"] = value.upper()
            elif key == "ENVID":
                if value is None:
                    raise fail(501, "5.5.4", "Syntax: ENVID=xtext")
                envid = xtext_decode(value)
                if not envid or len(envid) > 100 or any(not 0x20 <= ord(c) < 0x7F for c in envid):
                    raise fail(501, "5.5.4", "ENVID must be 1 to 100 printable characters")
                opts["envid"] = envid
            elif key == "AUTH":
                if value is None:
                    raise fail(501, "5.5.4", "Syntax: AUTH=mailbox")
                xtext_decode(value)  # validated; RFC 4954 section 5 lets us ignore it
            else:
                raise fail(555, "5.5.4", f"Unsupported parameter {key}")
        avatar = self.delivery
        options = MailOptions(**opts)
        # one step, so a plain callback (not a coroutine: MAIL is on every message's path);
        # a decision fired already (no log-in rule to look up, no milter) is taken at once
        d = avatar.validate_from(self._session(), sender, options)
        if d.called and not isinstance(d.result, Failure):
            self._mail_ok(d.result, avatar, sender, options)
            return None
        return d.addCallbacks(self._mail_ok, self._mail_refused, (avatar, sender, options), None,
                              (sender,))

    def _mail_ok(self, _: None, avatar: Any, sender: Address | None,
                 options: MailOptions) -> None:
        """The avatar let ``sender`` start a transaction: answer MAIL."""
        if self.delivery is not avatar:  # the log-in changed meanwhile
            self._error(fail(553, "5.7.1", f"Sender address <{sender or ''}> is not yours"))
            return
        self._txn = avatar.begin(self._session(), sender, options)
        self._reply(250, "2.1.0", f"Sender <{sender or ''}> OK")

    def _mail_refused(self, failure: Failure, sender: Address | None) -> None:
        self._error(reply_for(failure))

    def _session(self, helo: str | None = None) -> SMTPSession:
        """What the delivery policy knows of this session (interfaces.SMTPSession), made
        again only when the EHLO name, TLS or the log-in changed (the listener's address is
        asked once). ``helo``: the EHLO name being given (the HELO step's view, which the
        session's own view is once the EHLO succeeds: made once for both, issue 17)."""
        if helo is None:
            helo = self._helo
        cached = self._session_facts
        if (cached is not None and cached.helo == helo and cached.tls == self.secure
                and cached.auth_type == self.auth_type):
            return cached
        if cached is None:
            host = self.transport.getHost()
            listener = host.host if isinstance(host, (IPv4Address, IPv6Address)) else None
        else:
            listener = cached.listener_ip
        tls_version = None
        if self.secure:
            info = self._tls_info()  # "TLSv1.3:cipher"
            tls_version = info.split(":", 1)[0] if info else None
        self._session_facts = SMTPSession(self.client_ip, helo, listener, tls=self.secure,
                                          client_port=self.client_port,
                                          auth_type=self.auth_type, tls_version=tls_version)
        return self._session_facts

    # ------------------------------------------------------------------ RCPT

    def smtp_RCPT(self, arg: str):
        cfg = self.factory.config.smtp
        txn = self._txn
        if txn is None:
            raise fail(503, "5.5.1", "Need MAIL command first")
        inner, params = split_path(arg, "TO:")
        notify: list[str] | None = None
        orcpt: str | None = None
        for key, value in params.items():
            if key == "NOTIFY":
                items = (value or "").upper().split(",")
                if not value or (
                    "NEVER" in items and len(items) > 1
                ) or any(i not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for i in items) or len(
                    set(items)
                ) != len(items):
                    raise fail(501, "5.5.4", "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY")
                notify = items
            elif key == "ORCPT":
                addr_type, semi, xtext = (value or "").partition(";")
                if not semi or not KEYWORD_RE.match(addr_type) or not xtext:
                    raise fail(501, "5.5.4", "Syntax: ORCPT=addr-type;xtext")
                orcpt = f"{addr_type.lower()};{xtext_decode(xtext)}"
            else:
                raise fail(555, "5.5.4", f"Unsupported parameter {key}")
        if inner == "":
            raise fail(501, "5.1.3", "Bad recipient address syntax: empty")
        if len(txn.recipients) >= cfg.max_recipients:
            raise fail(452, "4.5.3", "Too many recipients")
        # ask the avatar where the recipient goes (policy/delivery.py), then answer: one
        # step, so a plain callback (RCPT is on every message's path)
        d = self.delivery.validate_to(
            self._session(), inner, txn.options.size, txn.sender,  # sender: a list's rule
        )
        if d.called and not isinstance(d.result, Failure):  # decided at once (the caches)
            self._rcpt_ok(d.result, txn, notify, orcpt)
            return None
        return d.addCallbacks(self._rcpt_ok, self._rcpt_refused, (txn, notify, orcpt))

    def _rcpt_ok(self, decision: Any, txn: IDeliveryTransaction, notify: list[str] | None,
                 orcpt: str | None) -> None:
        if self._txn is not txn:  # RSET or a new session meanwhile
            return
        txn.add_recipient(decision, notify, orcpt)
        self._reply(250, "2.1.5", f"Recipient <{decision.given}> OK")

    def _rcpt_refused(self, failure: Failure) -> None:
        self._error(reply_for(failure, RCPT_LOCAL_ERROR, "SMTP recipient lookup failed"))

