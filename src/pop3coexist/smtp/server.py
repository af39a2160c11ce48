"""The ESMTP server (RFC 5321) over ``twisted.mail.smtp.ESMTP``: MX, submission and SMTPS.

``SMTPServerFactory`` builds one ``ESMTPServer`` per connection. The class keeps Twisted's
ESMTP skeleton (TimeoutMixin, ``host``, the ``extensions`` idea) but replaces its input
handling and commands, because the stock ones are unsafe for a real server:

- input is our own byte buffer, answered strictly in order: while a command waits on a
  Deferred (directory, disk) the following pipelined commands wait too (RFC 2920);
- a command or AUTH line ends at CRLF, or at a bare LF with ``smtp.bare_newline = "normalize"``
  (refused at once with ``"reject"``); a bare CR or another control character in it is refused
  (``500 5.5.2``), so none reaches a stored value (HELO name, AUTH identity, logs, Received);
- STARTTLS discards everything pipelined after it and resets the session (RFC 3207 4.2);
- ``AUTH`` with no argument, a bad mechanism or bad base64 gets a 5xx and the session goes on;
- EHLO advertises only what is implemented; every reply after the greeting and EHLO carries an
  enhanced status code (RFC 2034, RFC 3463);
- DATA is a byte stream into a spool file (``incoming.MessageReader``): only CRLF.CRLF ends it,
  and the 250 goes out only after ``incoming.GroupCommitter`` made it durable (one batch of
  syncs for every session whose DATA ended meanwhile).

The protocol parses and replies; it decides nothing about mail. Each session holds an avatar
of ``policy.delivery`` (``IMessageDelivery``: anonymous, or the account's after AUTH, from the
factory's ``DeliveryRealm``) and asks it one question per command: ``validate_from`` at MAIL
(sender ownership), ``validate_to`` at RCPT (relay rules, gateway, directory, mailbox, quota,
role addresses, address literals of this host), ``begin`` for the transaction, whose ``commit``
at the end of DATA runs the declared stages of ``policy.stages``. Connection control is
``policy.connections``', failed log-in delays ``policy.throttle``'s, concurrent connections
``policy.connlimit``'s.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp as tsmtp
from twisted.python.failure import Failure

from pop3coexist.address import Address
from pop3coexist.errors import AuthUnavailable, MailError, as_mail_error
from pop3coexist.interfaces import IDeliveryTransaction, IMessageDelivery, SMTPSession
from pop3coexist.netutil import send_now
from pop3coexist.policy.connections import ConnectionPolicy
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.delivery import DeliveryContext, DeliveryRealm, MailOptions
from pop3coexist.policy.relay import parse_sender
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.smtp import auth as sasl
from pop3coexist.smtp.incoming import GroupCommitter, MessageReader, SpoolWriter, new_queue_id
from pop3coexist.smtp.received import received_header, return_path_field, with_keyword

log = Logger()

MODES = ("mx", "submission", "smtps")
MAX_COMMAND_LINE = 2048  # RFC 5321 4.5.3.1.4 (512) plus room for extension parameters
MAX_AUTH_LINE = 12288  # RFC 4954 section 4
MAX_ERRORS = 20  # bad commands before we hang up
PAUSE_BUFFER = 1024 * 1024  # stop reading while a command waits and this much is buffered

_COMMAND, _AUTH, _DATA = "command", "auth", "data"
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")  # RFC 5321 esmtp-value
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")  # C0 controls and DEL: never in a command line


def _fail(code: int, enhanced: str, text: str) -> MailError:
    return MailError(code, enhanced, text)


LOCAL_ERROR = MailError(451, "4.3.0", "Local error in processing")
RCPT_LOCAL_ERROR = MailError(451, "4.3.0", "Local error in processing, try again later")


def reply_for(failure: Failure, fallback: MailError = LOCAL_ERROR,
              why: str = "SMTP command failed") -> MailError:
    """The reply for any failure of a command: the failure's own ``MailError`` (policy and
    store refusals, quota, directory unavailable, log-in refused: ``errors.as_mail_error``),
    or ``fallback`` (a local error, worded for the command) after logging ``failure`` with
    ``why`` when it says nothing a client may see (a bug, an I/O error, a StoreError)."""
    error = as_mail_error(failure.value)
    if error is None:
        log.failure(why, failure)
        return fallback
    return error


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext strictly; raise MailError 501 5.5.4 when it is malformed."""
    if not _XTEXT_RE.match(value):
        raise _fail(501, "5.5.4", "Malformed xtext value (RFC 3461 section 4)")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=VALUE`` parameters of MAIL or RCPT (keys upper case); 501 5.5.4 when malformed."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if item == "":
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.match(key) or (eq and not _VALUE_RE.match(value)):
            raise _fail(501, "5.5.4", "Malformed parameter")
        key = key.upper()
        if key in params:
            raise _fail(501, "5.5.4", f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def split_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """``FROM:<path> params`` -> (inside of the path, params); 501 5.5.4 when malformed.

    The path ends at the first ``>`` outside a quoted string: a Quoted-string local part may
    hold spaces, ``<``, ``>`` and quoted pairs (RFC 5321 section 4.1.2), and the parameters
    are only what follows the path.
    """
    usage = _fail(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>")
    if not arg[: len(keyword)].upper() == keyword:
        raise usage
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise usage
    quoted = False
    i = 1
    end = -1
    while i < len(rest):
        c = rest[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == ">":
            end = i
            break
        elif not quoted and c == "<":
            raise usage
        i += 1
    if end < 0:
        raise usage
    params = rest[end + 1 :]
    if params and not params.startswith(" "):
        raise usage
    return rest[1:end], parse_params(params)


class ESMTPServer(tsmtp.ESMTP):
    """One SMTP session. See the module docstring for what differs from Twisted's ESMTP."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__(chal={}, contextFactory=factory.tls_options)
        self.factory = factory
        cfg = factory.config
        self.host = cfg.server.hostname
        self.hostname = cfg.server.hostname
        self.timeout = cfg.smtp.idle_timeout
        self.callLater = factory.reactor.callLater  # TimeoutMixin uses it: task.Clock in tests
        self._buf = b""
        self._state = _COMMAND
        self._busy = False
        self._pumping = False
        self._paused = False
        self._discarding = False
        self._closing = False
        self._acquired = False
        self.client_ip = ""
        self.secure = False
        self.user: str | None = None
        self._helo: str | None = None
        self._esmtp = False
        self.delivery: IMessageDelivery = factory.realm.anonymous()  # the avatar
        self._txn: IDeliveryTransaction | None = None
        self._reader: MessageReader | None = None
        self._mech: sasl.Mechanism | None = None
        self._messages = 0
        self._errors = 0

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", "unix"))
        if self.factory.mode == "smtps":
            # The service may already have wrapped the listener in TLS (TLSMemoryBIOFactory);
            # on a plain TCP transport the session starts TLS itself before the greeting.
            if not ISSLTransport.providedBy(self.transport):
                self.transport.startTLS(self.factory.tls_options)
            self.secure = True
        self.setTimeout(self.timeout)
        refusal = self.factory.connections.check(self.client_ip)
        if refusal is not None:
            self._hangup(refusal)
            return
        if not self.factory.limiter.acquire(self.client_ip):
            self._hangup(_fail(421, "4.7.0", f"{self.hostname} Too many connections, try again later"))
            return
        self._acquired = True
        self._send(f"220 {self.hostname} ESMTP pop3coexist")

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._closing = True  # a pending commit still finishes; nothing more is read or armed
        self.setTimeout(None)
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        if self._acquired:
            self._acquired = False
            self.factory.limiter.release(self.client_ip)

    def timeoutConnection(self) -> None:
        # RFC 5321 section 4.5.3.2.7: the server closes an idle session
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        self._hangup(_fail(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))

    def _hangup(self, error: MailError) -> None:
        self._reply(error.code, error.enhanced, error.text)
        self._closing = True
        self.transport.loseConnection()

    # ------------------------------------------------------------------ output

    def _send(self, text: str) -> None:
        send_now(self.transport, text.encode("ascii", "replace") + b"\r\n")

    def _reply(self, code: int, enhanced: str | None, text: str) -> None:
        """Send a (possibly multi-line) reply; ``enhanced`` prefixes every line."""
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{enhanced} {line}" if enhanced else f"{code}{sep}{line}")
        send_now(self.transport, "\r\n".join(out).encode("ascii", "replace") + b"\r\n")

    def _error(self, error: MailError) -> None:
        self._reply(error.code, error.enhanced, error.text)

    def _syntax_error(self, error: MailError) -> None:
        """A bad command or parameter: reply, count, and hang up after too many."""
        self._error(error)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._hangup(_fail(421, "4.7.0", f"{self.hostname} Too many errors, closing connection"))

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._busy:
            self.resetTimeout()
        self._buf += data
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._busy and not self._closing and self._buf:
                if getattr(self.transport, "disconnecting", False):
                    return
                if self._state == _DATA:
                    self._pump_data()
                    if self._state == _DATA:
                        break
                    continue
                # A command line ends at LF: CRLF, or a bare LF (see _frame_error)
                i = self._buf.find(b"\n")
                limit = MAX_AUTH_LINE if self._state == _AUTH else MAX_COMMAND_LINE
                if i < 0:
                    if len(self._buf) > MAX_AUTH_LINE:
                        # no end of line in sight: refuse once, then skip to the next line end
                        if not self._discarding:
                            self._line_too_long()
                        self._discarding = True
                        self._buf = b""
                    break
                line, self._buf = self._buf[:i], self._buf[i + 1 :]
                bare_lf = not line.endswith(b"\r")
                if not bare_lf:
                    line = line[:-1]
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > limit and not (self._state == _COMMAND and line[:5].upper() == b"AUTH "
                                              and len(line) <= MAX_AUTH_LINE):
                    self._line_too_long()
                    continue
                refusal = self._frame_error(line, bare_lf)
                if refusal is not None:
                    if self._state == _AUTH:  # the exchange is over (RFC 4954 section 4)
                        self._state = _COMMAND
                        self._mech = None
                    self._syntax_error(refusal)
                    continue
                try:
                    result = self._auth_line(line) if self._state == _AUTH else self._command(line)
                except Exception:
                    self._error(reply_for(Failure()))
                    result = None
                if isinstance(result, defer.Deferred):
                    self._wait(result)
        finally:
            self._pumping = False
        if self._busy and len(self._buf) > PAUSE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _wait(self, d: defer.Deferred) -> None:
        """Hold the following input until ``d`` fires (answers strictly in order)."""
        self._busy = True
        self.setTimeout(None)

        def done(result):
            if isinstance(result, Failure):
                self._error(reply_for(result))
            self._busy = False
            if self._closing:
                return None
            self.setTimeout(self.timeout)
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._pump()
            return None

        d.addBoth(done)

    def _frame_error(self, line: bytes, bare_lf: bool) -> MailError | None:
        """Why a command or AUTH line (without its line end) is refused, or None.

        RFC 5321 section 2.3.8: a line ends with CRLF, and CR or LF alone must not appear. A
        bare LF ends the line with ``smtp.bare_newline = "normalize"`` (as Postfix 3.7+ does)
        and is refused with ``"reject"``; a CR inside the line and any other control character
        (C0 or DEL) are always refused, so none can reach a stored session value (HELO name,
        AUTH identity, a log line, the Received header). The line is not acted on and the
        session goes on (the refusal counts toward MAX_ERRORS).
        """
        if bare_lf and self.factory.config.smtp.bare_newline != "normalize":
            return _fail(500, "5.5.2", "Syntax error: bare <LF> received; "
                                       "end command lines with <CR><LF> (RFC 5321 section 2.3.8)")
        if b"\r" in line:
            return _fail(500, "5.5.2", "Syntax error: bare <CR> received (RFC 5321 section 2.3.8)")
        if _CONTROL_RE.search(line):
            return _fail(500, "5.5.2", "Syntax error: control character in command line")
        return None

    def _line_too_long(self) -> None:
        if self._state == _AUTH:
            self._state = _COMMAND
            self._mech = None
            self._syntax_error(_fail(500, "5.5.6", "Authentication Exchange line is too long"))
        else:
            self._syntax_error(_fail(500, "5.5.2", "Line too long"))

    def _command(self, line: bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            if line[:5].upper() not in (b"MAIL ", b"RCPT "):
                self._syntax_error(_fail(500, "5.5.2", "Syntax error: command is not ASCII"))
                return None
            # an internationalised address (RFC 6531) without SMTPUTF8, which is not offered:
            # the path parser refuses it with 553 5.6.7, a parameter is 501 5.5.4; octets that
            # are not UTF-8 stay non-ASCII (surrogates) and are refused the same way
            text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self._syntax_error(_fail(500, "5.5.2", "Command unrecognized"))
            return None
        try:
            return handler(arg.strip(" "))
        except MailError as e:
            if e.code in (500, 501, 555):
                self._syntax_error(e)
            else:
                self._error(e)
            return None

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
            ext.append("AUTH " + " ".join(sasl.mechanism_names(self.factory.offers_secrets)))
        return ext

    def smtp_EHLO(self, arg: str):
        return self._hello(arg, esmtp=True)

    def smtp_HELO(self, arg: str):
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            raise _fail(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self._helo = arg
        self._esmtp = esmtp
        self._txn = None
        greeting = f"{self.hostname} Hello [{self.client_ip}]"
        if esmtp:
            self._reply(250, None, "\n".join([greeting, *self.extensions()]))
        else:
            self._reply(250, None, greeting)

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(250, "2.0.0", "OK")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            raise _fail(501, "5.5.4", "Syntax: RSET")
        self._txn = None
        self._reply(250, "2.0.0", "OK")

    def smtp_QUIT(self, arg: str) -> None:
        self._reply(221, "2.0.0", f"{self.hostname} closing connection")
        self._closing = True
        self.transport.loseConnection()

    def smtp_HELP(self, arg: str) -> None:
        self._reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY")

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            raise _fail(501, "5.5.4", "Syntax: VRFY address")
        # RFC 5321 section 3.5.3: do not disclose who exists
        self._reply(252, "2.5.0", "Cannot VRFY user; try RCPT to attempt delivery")

    def smtp_EXPN(self, arg: str) -> None:
        self._reply(502, "5.5.1", "EXPN not available")

    def smtp_BDAT(self, arg: str) -> None:
        self._reply(502, "5.5.1", "BDAT not available (no CHUNKING)")

    # ------------------------------------------------------------------ STARTTLS

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            raise _fail(501, "5.5.4", "Syntax: STARTTLS")
        if self.secure:
            raise _fail(503, "5.5.1", "TLS already active")
        if not self._can_starttls():
            raise _fail(454, "4.7.0", "TLS not available")
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
        self.delivery = self.factory.realm.anonymous()

    # ------------------------------------------------------------------ AUTH

    def smtp_AUTH(self, arg: str):
        if not arg:
            raise _fail(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if self._helo is None or not self._esmtp:
            raise _fail(503, "5.5.1", "Send EHLO first")
        if self.user is not None:
            raise _fail(503, "5.5.1", "Already authenticated")
        if self._txn is not None:
            raise _fail(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self._auth_offered():
            raise _fail(538, "5.7.11", "Encryption required for requested authentication mechanism")
        parts = arg.split(" ")
        if len(parts) > 2:
            raise _fail(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mech = sasl.make_mechanism(parts[0], self.hostname, self.factory.offers_secrets)
        if mech is None:
            raise _fail(504, "5.5.4", "Unrecognized authentication type")
        initial = None
        if len(parts) == 2:
            initial = b"" if parts[1] == "=" else self._b64(parts[1])
            if initial is None:
                return None
        self._mech = mech
        return self._sasl(lambda: mech.start(initial))

    def _b64(self, text: str | bytes) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._state = _COMMAND
            self._mech = None
            self._syntax_error(_fail(501, "5.5.2", "Invalid base64 data"))
            return None

    def _auth_line(self, line: bytes):
        if line == b"*":
            self._state = _COMMAND
            self._mech = None
            raise _fail(501, "5.7.0", "Authentication cancelled")
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
            self._state = _COMMAND
            self._mech = None
            raise _fail(501, "5.5.2", f"Invalid authentication response: {e}")
        if isinstance(result, bytes):
            self._state = _AUTH
            self._reply(334, None, base64.b64encode(result).decode("ascii"))
            return None
        self._state = _COMMAND
        self._mech = None
        return self._login(result)

    def _login(self, credentials) -> defer.Deferred:
        """Log in through the delivery realm (the checker, then the locks); the session then
        holds the account's avatar."""
        return defer.ensureDeferred(self._log_in(credentials))

    async def _log_in(self, credentials) -> None:
        factory = self.factory
        try:
            avatar = await factory.realm.login(credentials)
        except Exception:
            error = reply_for(Failure(), AuthUnavailable(), "SMTP AUTH: checker error")
            if error.code == 535:  # wrong credentials or a locked account (RFC 4954 section 6)
                delay = factory.throttle.failure_delay(self.client_ip)
                log.info("SMTP AUTH failed from {ip}", ip=self.client_ip)
                await task.deferLater(factory.reactor, delay, self._error, error)
            else:
                self._error(error)
            return
        factory.throttle.success(self.client_ip)
        self.delivery = avatar
        self.user = avatar.user
        log.info("SMTP AUTH ok for {user} from {ip}", user=avatar.user, ip=self.client_ip)
        self._reply(235, "2.7.0", "Authentication successful")

    # ------------------------------------------------------------------ MAIL

    def smtp_MAIL(self, arg: str):
        cfg = self.factory.config.smtp
        if self._helo is None:
            raise _fail(503, "5.5.1", "Send HELO or EHLO first")
        if self._txn is not None:
            raise _fail(503, "5.5.1", "Sender already specified")
        if self.factory.mode == "submission" and self.user is None:
            raise _fail(530, "5.7.0", "Authentication required")
        if self._messages >= cfg.max_messages_per_connection:
            self._hangup(_fail(421, "4.7.0", f"{self.hostname} Too many messages in this session, "
                                              "closing connection"))
            return None
        inner, params = split_path(arg, "FROM:")
        sender = None if inner == "" else parse_sender(inner)
        opts: dict[str, Any] = {}
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise _fail(501, "5.5.4", "Syntax: SIZE=octets")
                opts["size"] = int(value)
                if 0 < cfg.max_message_size < opts["size"]:  # 0: no fixed maximum (RFC 1870)
                    raise _fail(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise _fail(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
                opts["body"] = value.upper()
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise _fail(501, "5.5.4", "Syntax: RET=FULL or RET=HDRS")
                opts["ret"] = value.upper()
            elif key == "ENVID":
                if value is None:
                    raise _fail(501, "5.5.4", "Syntax: ENVID=xtext")
                envid = xtext_decode(value)
                if not envid or len(envid) > 100 or any(not 0x20 <= ord(c) < 0x7F for c in envid):
                    raise _fail(501, "5.5.4", "ENVID must be 1 to 100 printable characters")
                opts["envid"] = envid
            elif key == "AUTH":
                if value is None:
                    raise _fail(501, "5.5.4", "Syntax: AUTH=mailbox")
                xtext_decode(value)  # validated; RFC 4954 section 5 lets us ignore it
            else:
                raise _fail(555, "5.5.4", f"Unsupported parameter {key}")
        return defer.ensureDeferred(self._mail(sender, MailOptions(**opts)))

    async def _mail(self, sender: Address | None, options: MailOptions) -> None:
        """Ask the avatar whether ``sender`` may start a transaction, then answer MAIL."""
        avatar = self.delivery
        try:
            await avatar.validate_from(self._session(), sender)
            if self.delivery is not avatar:  # the log-in changed meanwhile
                raise _fail(553, "5.7.1", f"Sender address <{sender or ''}> is not yours")
        except Exception:
            self._error(reply_for(Failure()))
            return
        self._txn = avatar.begin(self._session(), sender, options)
        self._reply(250, "2.1.0", f"Sender <{sender or ''}> OK")

    def _session(self) -> SMTPSession:
        """What the delivery policy knows of this session (interfaces.SMTPSession)."""
        host = self.transport.getHost()
        listener = host.host if isinstance(host, (IPv4Address, IPv6Address)) else None
        return SMTPSession(self.client_ip, self._helo, listener)

    # ------------------------------------------------------------------ RCPT

    def smtp_RCPT(self, arg: str):
        cfg = self.factory.config.smtp
        txn = self._txn
        if txn is None:
            raise _fail(503, "5.5.1", "Need MAIL command first")
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
                    raise _fail(501, "5.5.4", "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY")
                notify = items
            elif key == "ORCPT":
                addr_type, semi, xtext = (value or "").partition(";")
                if not semi or not _KEYWORD_RE.match(addr_type) or not xtext:
                    raise _fail(501, "5.5.4", "Syntax: ORCPT=addr-type;xtext")
                orcpt = f"{addr_type.lower()};{xtext_decode(xtext)}"
            else:
                raise _fail(555, "5.5.4", f"Unsupported parameter {key}")
        if inner == "":
            raise _fail(501, "5.1.3", "Bad recipient address syntax: empty")
        if len(txn.recipients) >= cfg.max_recipients:
            raise _fail(452, "4.5.3", "Too many recipients")
        return defer.ensureDeferred(self._rcpt(txn, inner, notify, orcpt))

    async def _rcpt(self, txn: IDeliveryTransaction, inner: str, notify: list[str] | None,
                    orcpt: str | None) -> None:
        """Ask the avatar where the recipient goes (policy/delivery.py), then answer RCPT."""
        try:
            decision = await self.delivery.validate_to(self._session(), inner, txn.options.size)
        except Exception:
            self._error(reply_for(Failure(), RCPT_LOCAL_ERROR, "SMTP recipient lookup failed"))
            return
        if self._txn is not txn:  # RSET or a new session meanwhile
            return
        txn.add_recipient(decision, notify, orcpt)
        self._reply(250, "2.1.5", f"Recipient <{decision.given}> OK")

    # ------------------------------------------------------------------ DATA

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            raise _fail(501, "5.5.4", "Syntax: DATA")
        txn = self._txn
        if txn is None:
            raise _fail(503, "5.5.1", "Need MAIL command first")
        if not txn.recipients:
            raise _fail(554, "5.5.1", "No valid recipients")
        cfg = self.factory.config.smtp
        queue_id = new_queue_id()
        try:
            spool = SpoolWriter(self.factory.store.spool_dir(), queue_id, lazy=True)
        except OSError as e:
            log.error("SMTP: cannot create a spool file: {err}", err=e)
            raise _fail(451, "4.3.0", "Local error in processing, try again later")
        self._queue_id = queue_id
        self._arrival = time.time()
        if txn.local_delivery:
            # final delivery here: Return-Path first (RFC 5321 section 4.4); the copy for the
            # outbound queue leaves it out (incoming.enqueue_spool)
            spool.write_local_prefix(return_path_field(str(txn.sender) if txn.sender else ""))
        spool.write(
            received_header(
                helo=self._helo or "unknown",
                client_ip=self.client_ip,
                hostname=self.hostname,
                protocol=with_keyword(self._esmtp, self.secure, self.user is not None),
                queue_id=queue_id,
                recipient=txn.recipients[0] if len(txn.recipients) == 1 else None,
                tls=self._tls_info(),
                when=self._arrival,
            )
        )
        self._reader = MessageReader(
            spool, cfg.max_message_size, cfg.max_hop_count,
            allow_bare_lf=cfg.bare_newline == "normalize",
        )
        self._state = _DATA
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")
        return None

    def _tls_info(self) -> str | None:
        if not self.secure:
            return None
        for obj in (self.transport, getattr(self.transport, "protocol", None)):
            conn = getattr(obj, "_tlsConnection", None)
            if conn is not None:
                try:
                    return f"{conn.get_protocol_version_name()}:{conn.get_cipher_name()}"
                except Exception:
                    return None
        return None

    def _pump_data(self) -> None:
        reader = self._reader
        assert reader is not None
        n = reader.feed(self._buf)
        if n is None:
            self._buf = b""
            return
        self._buf = self._buf[n:]
        self._state = _COMMAND
        self._reader = None
        d = self._end_of_data(reader)
        if d is not None:
            self._wait(d)

    def _end_of_data(self, reader: MessageReader) -> defer.Deferred | None:
        txn = self._txn
        self._txn = None
        assert txn is not None
        queue_id = self._queue_id
        if reader.error is not None:
            log.info("SMTP {id} refused: {reply}", id=queue_id, reply=reader.error.reply())
            txn.abort()
            self._error(reader.error)
            return None
        self._messages += 1
        txn.body(reader.sink, reader.size, reader.hops.count + 1, self._arrival,
                 f"{self._helo} ([{self.client_ip}])")
        return defer.ensureDeferred(self._commit(txn, reader, queue_id))

    async def _commit(self, txn: IDeliveryTransaction, reader: MessageReader,
                      queue_id: str) -> None:
        """The declared stages after DATA (policy/stages.py), then the reply."""
        try:
            await txn.commit()
        except Exception:
            self._error(reply_for(Failure()))
            return
        log.info(
            "SMTP {id} accepted from {ip}: {size} octets, {n} recipients",
            id=queue_id, ip=self.client_ip, size=reader.size, n=len(txn.recipients),
        )
        self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")


class SMTPServerFactory(protocol.ServerFactory):
    """Builds ESMTP sessions for one listener kind.

    ``mode``: ``"mx"`` (anonymous mail for local and relay domains; AUTH optional),
    ``"submission"`` (AUTH required before MAIL, 530 5.7.0), ``"smtps"`` (TLS from the first
    byte: either the listener is wrapped in ``TLSMemoryBIOFactory``, or on a plain TCP
    transport the session starts TLS itself before the greeting).
    ``run_blocking(f, *args)`` runs blocking store/queue calls off the reactor and returns a
    Deferred (default: the reactor's thread pool). ``throttle`` and ``limiter`` may be shared
    between listeners (one AuthThrottle with POP3, one ConnectionLimiter for all SMTP ports).
    ``realm`` gives each session its avatar (policy/delivery.py); ``resolve_host(name)``
    (blocking) finds the addresses of ``server.hostname`` for address literals.
    """

    def __init__(
        self,
        config,
        store,
        checker,
        queue,
        tls_options=None,
        mode: str = "mx",
        reactor=None,
        run_blocking=None,
        throttle: AuthThrottle | None = None,
        limiter: ConnectionLimiter | None = None,
        resolve_host=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "smtps" and tls_options is None:
            raise ValueError("mode 'smtps' needs tls_options")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.store = store
        self.checker = checker
        self.queue = queue
        self.tls_options = tls_options
        self.mode = mode
        self.reactor = reactor
        if run_blocking is None:

            def run_blocking(f, *args, **kwargs):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

        self.run_blocking = run_blocking
        # one batch of fsyncs for all sessions' messages that end meanwhile (incoming.py)
        self.committer = GroupCommitter(store, queue, run_blocking)
        smtp_cfg = config.smtp
        self.throttle = throttle or AuthThrottle(reactor, base=smtp_cfg.auth_failure_delay)
        self.limiter = limiter or ConnectionLimiter(
            smtp_cfg.max_connections, smtp_cfg.max_connections_per_client
        )
        self.connections = ConnectionPolicy(smtp_cfg.client_allow, smtp_cfg.client_deny)
        # every sender and recipient decision: the avatars of policy/delivery.py
        self.context = DeliveryContext(config, store, checker, self.committer, run_blocking,
                                       reactor, resolve_host)
        self.realm = DeliveryRealm(self.context)

    @property
    def offers_secrets(self) -> bool:
        return bool(self.checker.offers_secrets)  # IAccountChecker declares it

    def buildProtocol(self, addr) -> ESMTPServer:
        p = ESMTPServer(self)
        p.factory = self
        return p
