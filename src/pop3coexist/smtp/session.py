"""The core of one ESMTP session (RFC 5321): connection, framing, replies, the command loop.

``Session`` is the base of ``smtp.server.ESMTPServer``; the commands are in their own modules
(``smtp.hello``, ``smtp.login``, ``smtp.transaction``, ``smtp.data``), mixed in there.
What it does: input is one byte buffer, answered strictly in order (a command that waits on a
Deferred holds the following pipelined ones, RFC 2920); a command or AUTH line ends at CRLF, or
at a bare LF with ``smtp.bare_newline = "normalize"``; a bare CR or another control character
is refused ``500 5.5.2``; too-long lines and too many errors are answered and counted.

``reply_for(failure)`` is the one place a failure becomes a reply: the failure's own
``errors.MailError`` (policy and store refusals, quota, directory unavailable, log-in refused),
or the command's local-error reply.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import ISSLTransport
from twisted.mail import smtp as tsmtp
from twisted.python.failure import Failure

from pop3coexist.errors import MailError, as_mail_error, volume_unreachable
from pop3coexist.events import FastLogger
from pop3coexist.interfaces import IDeliveryTransaction, IMessageDelivery, SMTPSession
from pop3coexist.netutil import send_now
from pop3coexist.smtp import auth as sasl
from pop3coexist.smtp import mailevents
from pop3coexist.smtp.incoming import MessageReader

log = FastLogger(namespace="pop3coexist.smtp.server")

MODES = ("mx", "submission", "smtps")
MAX_COMMAND_LINE = 2048  # RFC 5321 4.5.3.1.4 (512) plus room for extension parameters
MAX_AUTH_LINE = 12288  # RFC 4954 section 4
MAX_ERRORS = 20  # bad commands before we hang up
PAUSE_BUFFER = 1024 * 1024  # stop reading while a command waits and this much is buffered

STATE_COMMAND, STATE_AUTH, STATE_DATA = "command", "auth", "data"
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")  # C0 controls and DEL: never in a command line


def fail(code: int, enhanced: str, text: str) -> MailError:
    """A MailError to raise or reply with (a refusal of this front-end)."""
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
        volume = volume_unreachable(failure.value)
        if volume is not None:  # the shared volume's state, not a bug: one line
            log.error(why + ": the state folder cannot be reached: {volume}", volume=volume)
        else:
            log.failure(why, failure)
        return fallback
    return error



class Session(tsmtp.ESMTP):
    """The session core; ``smtp.server.ESMTPServer`` adds the commands."""

    """One SMTP session. See the module docstring for what differs from Twisted's ESMTP."""

    def __init__(self, factory: Any) -> None:
        super().__init__(chal={}, contextFactory=factory.tls_options)
        self.factory = factory
        cfg = factory.config
        self.host = cfg.server.hostname
        self.hostname = cfg.server.hostname
        self.timeout = cfg.smtp.idle_timeout
        self.callLater = factory.reactor.callLater  # TimeoutMixin uses it: task.Clock in tests
        self._seconds = factory.reactor.seconds
        self._last_input = 0.0  # when input last came in while no command waited (idle timer)
        self._buf = b""
        self._state = STATE_COMMAND
        self._busy = False
        self._pumping = False
        self._paused = False
        self._discarding = False
        self._closing = False
        self._acquired = False
        self.client_ip = ""
        self.client_port = 0
        self.secure = False
        self.user: str | None = None
        self.auth_type: str | None = None  # the SASL mechanism of the log-in
        self._mech_name: str | None = None  # the mechanism of the AUTH in progress
        self._helo: str | None = None
        self._session_facts: SMTPSession | None = None  # transaction.MailCommands._session
        self._esmtp = False
        self.delivery: IMessageDelivery = factory.realm.anonymous()  # the avatar
        self._txn: IDeliveryTransaction | None = None
        self._reader: MessageReader | None = None
        self._mech: sasl.Mechanism | None = None
        self._messages = 0
        self._errors = 0
        self._command_line = ("", "", None)  # last verb, argument, queue id (mail events)

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", "unix"))
        self.client_port = int(getattr(peer, "port", 0) or 0)
        mailevents.connected(self)
        if self.factory.mode == "smtps":
            # The service may already have wrapped the listener in TLS (TLSMemoryBIOFactory);
            # on a plain TCP transport the session starts TLS itself before the greeting.
            if not ISSLTransport.providedBy(self.transport):
                self.transport.startTLS(self.factory.tls_options)
            self.secure = True
        self._last_input = self._seconds()
        self.setTimeout(self.timeout)
        refusal = self.factory.connections.check(self.client_ip)
        if refusal is not None:
            self._hangup(refusal)
            return
        if not self.factory.limiter.acquire(self.client_ip):
            self._hangup(fail(421, "4.7.0", f"{self.hostname} Too many connections, try again later"))
            return
        self._acquired = True
        # the content filters' connect step (policy/delivery.py): fires at once without milters,
        # and the greeting goes out without a Deferred chain (issue 17)
        try:
            d = self.delivery.connect(self._session())
        except Exception:
            d = defer.fail()
        if d.called and not isinstance(d.result, Failure):
            self._greet(None)
            return
        self._wait(d.addCallbacks(self._greet, self._greet_refused))

    def _greet(self, _: object) -> None:
        self._send(f"220 {self.hostname} ESMTP pop3coexist")

    def _greet_refused(self, failure: Failure) -> None:
        error = reply_for(failure)
        if error.temporary:
            error = MailError(421, error.enhanced, f"{self.hostname} {error.text}")
        self._hangup(error)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._closing = True  # a pending commit still finishes; nothing more is read or armed
        mailevents.disconnected(self)
        self.setTimeout(None)
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        if self._acquired:
            self._acquired = False
            self.factory.limiter.release(self.client_ip)
        self.delivery.close()

    def timeoutConnection(self) -> None:
        """RFC 5321 section 4.5.3.2.7: the server closes an idle session.

        The timer is not moved at each input nor stopped while a command waits (a
        ``DelayedCall`` reset, cancel or new one per command costs more than the command's
        own checks, issue 17): input and the end of a wait note the time, and when the timer
        fires early it is set again for the rest of the idle time (while a command waits: for
        a whole idle time, as the wait does not count)."""
        if self._busy and not self._closing:
            self.setTimeout(self.timeout)
            return
        left = self._last_input + self.timeout - self._seconds()
        if left > 1e-6 and not self._closing:
            self.setTimeout(left)
            return
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        self._hangup(fail(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))

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
        mailevents.refused(self, error, *self._command_line)
        self._reply(error.code, error.enhanced, error.text)

    def _syntax_error(self, error: MailError) -> None:
        """A bad command or parameter: reply, count, and hang up after too many."""
        self._error(error)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._hangup(fail(421, "4.7.0", f"{self.hostname} Too many errors, closing connection"))

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._busy:
            self._last_input = self._seconds()  # the idle timer checks it (timeoutConnection)
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
                if self._state == STATE_DATA:
                    self._pump_data()
                    if self._state == STATE_DATA:
                        break
                    continue
                # A command line ends at LF: CRLF, or a bare LF (see _frame_error)
                i = self._buf.find(b"\n")
                limit = MAX_AUTH_LINE if self._state == STATE_AUTH else MAX_COMMAND_LINE
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
                if len(line) > limit and not (self._state == STATE_COMMAND and line[:5].upper() == b"AUTH "
                                              and len(line) <= MAX_AUTH_LINE):
                    self._line_too_long()
                    continue
                refusal = self._frame_error(line, bare_lf)
                if refusal is not None:
                    if self._state == STATE_AUTH:  # the exchange is over (RFC 4954 section 4)
                        self._state = STATE_COMMAND
                        self._mech = None
                    self._syntax_error(refusal)
                    continue
                try:
                    result = self._auth_line(line) if self._state == STATE_AUTH else self._command(line)
                except Exception:
                    self._error(reply_for(Failure()))
                    result = None
                # Deferred is an ABC (Awaitable): isinstance(None, Deferred) takes the slow
                # ABCMeta.__instancecheck__ path (~1% of a relaying process, issue 17)
                if result is not None and isinstance(result, defer.Deferred):
                    self._wait(result)
        finally:
            self._pumping = False
        if self._busy and len(self._buf) > PAUSE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _wait(self, d: defer.Deferred) -> None:
        """Hold the following input until ``d`` fires (answers strictly in order). A Deferred
        that has fired already (a decision made without I/O) is taken at once: the loop goes
        on without re-arming the idle timer."""
        now: list = []

        def grab(result):
            now.append(result)
            return result

        d.addBoth(grab)
        if now:
            d.addErrback(lambda _: None)  # handled here
            if isinstance(now[0], Failure):
                self._error(reply_for(now[0]))
            return
        self._busy = True

        def done(result):
            if isinstance(result, Failure):
                self._error(reply_for(result))
            self._busy = False
            if self._closing:
                return None
            self._last_input = self._seconds()  # idle from now (see timeoutConnection)
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
            return fail(500, "5.5.2", "Syntax error: bare <LF> received; "
                                       "end command lines with <CR><LF> (RFC 5321 section 2.3.8)")
        if b"\r" in line:
            return fail(500, "5.5.2", "Syntax error: bare <CR> received (RFC 5321 section 2.3.8)")
        if _CONTROL_RE.search(line):
            return fail(500, "5.5.2", "Syntax error: control character in command line")
        return None

    def _line_too_long(self) -> None:
        if self._state == STATE_AUTH:
            self._state = STATE_COMMAND
            self._mech = None
            self._syntax_error(fail(500, "5.5.6", "Authentication Exchange line is too long"))
        else:
            self._syntax_error(fail(500, "5.5.2", "Line too long"))

    def _command(self, line: bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            if line[:5].upper() not in (b"MAIL ", b"RCPT "):
                self._syntax_error(fail(500, "5.5.2", "Syntax error: command is not ASCII"))
                return None
            # an internationalised address (RFC 6531) without SMTPUTF8, which is not offered:
            # the path parser refuses it with 553 5.6.7, a parameter is 501 5.5.4; octets that
            # are not UTF-8 stay non-ASCII (surrogates) and are refused the same way
            text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        self._command_line = (verb.upper(), arg, None)
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self._syntax_error(fail(500, "5.5.2", "Command unrecognized"))
            return None
        try:
            return handler(arg.strip(" "))
        except MailError as e:
            if e.code in (500, 501, 555):
                self._syntax_error(e)
            else:
                self._error(e)
            return None

