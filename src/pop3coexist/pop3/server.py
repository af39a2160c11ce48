"""The POP3 server protocol: RFC 1939 with CAPA (2449), STLS (2595), AUTH (5034) and response
codes (3206, 2449).

``POP3Server`` subclasses ``twisted.mail.pop3.POP3`` but replaces its command machine, whose
defects (APOP never succeeds, bad arguments drop the connection, racy pipelining, joke CAPA
tokens, no STLS) make it unusable as is. What it keeps: the TimeoutMixin idle timer.

How a session runs:

- Bytes are split into lines here (CRLF or bare LF). A line longer than ``LINE_MAX`` is
  discarded up to its line end and answered ``-ERR``; the session goes on.
- Lines wait in a queue and are handled strictly one at a time. A handler that returns a
  Deferred (log-in, failed log-in delay, reading a message, QUIT's commit) holds the queue
  until it fires, so pipelined commands (RFC 2449 PIPELINING) are answered in order and
  replies never interleave.
- After STLS is accepted, whatever the client sent after it in clear text is thrown away
  (RFC 2595 section 3.1 command injection defence).
- Log-ins go through a cred Portal (checker + ``realm.Pop3Realm``); replies carry RFC 3206
  codes ([AUTH], [IN-USE], [SYS/TEMP]); a failed log-in's -ERR is delayed by the AuthThrottle.
- DELE only marks; QUIT in TRANSACTION enters UPDATE and calls ``IMaildrop.commit``; a lost
  connection or idle timeout calls ``close()`` and deletes nothing.

The protocol never reads message files itself: ``stream.MessageProducer`` does, off the reactor
thread. It holds no policy: the factory hands it the throttle and connection limiter.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python.failure import Failure

from pop3coexist.errors import BadCredentials, MailError, as_mail_error, volume_unreachable
from pop3coexist.events import login_outcome
from pop3coexist.interfaces import (
    ICachedMessageOpen,
    ICachedMessageRead,
    IMaildrop,
    IScramKeyStore,
)
from pop3coexist.netutil import nothing_queued, send_now
from pop3coexist.pop3 import mailevents, sasl
from pop3coexist.pop3.stream import DotStuffer, MessageProducer, read_whole_cached, wire_form

if TYPE_CHECKING:
    from twisted.cred.portal import Portal

    from pop3coexist.config import Config
    from pop3coexist.interfaces import IAccountChecker
    from pop3coexist.policy.connlimit import ConnectionLimiter
    from pop3coexist.policy.throttle import AuthThrottle

log = Logger(namespace="pop3coexist.pop3")

CRLF = b"\r\n"
LINE_MAX = 4096  # any line, SASL responses included
COMMAND_MAX = 255  # octets of a command line including CRLF (RFC 2449 section 4)
AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

_OVERLONG = object()  # queue marker for a line that was too long
_NUMBER = re.compile(rb"[0-9]{1,9}")
_HEX32 = re.compile(rb"[0-9a-fA-F]{32}")
_VERB = re.compile(rb"[A-Za-z-]{1,16}")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_NO_CONTROLS = re.compile(rb"[^\x00-\x1f\x7f]*")

# Which commands each state accepts (RFC 1939 sections 4-6, RFC 2449, 2595, 5034).
_AUTH_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT"})
_TRANSACTION_COMMANDS = frozenset(
    {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "CAPA"}
)
_ALL_COMMANDS = _AUTH_COMMANDS | _TRANSACTION_COMMANDS
# The verbs as clients send them (upper or lower case) -> the command name: one dict look-up
# instead of a regex, a decode and an upper() per command (issue 17); any other spelling
# takes the general path.
_VERB_NAMES = {spelling.encode("ascii"): name for name in _ALL_COMMANDS
               for spelling in (name, name.lower())}
# RETR n and DELE n, two of every message a client fetches: with 1-9 ASCII digits after one
# space in TRANSACTION every check of the general path passes, so they go straight to their
# handler (issue 17); anything else takes the general path
_ONE_NUMBER = {"RETR": "pop3_RETR", "DELE": "pop3_DELE"}


class _Refuse(Exception):
    """Raised by a command handler: answer ``-ERR <text>`` and go on."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _printable(value: bytes | str, limit: int = 80) -> str:
    """A log-safe rendering of a client-supplied name (never used for secrets)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = "".join(c if c.isprintable() and c != " " else "?" for c in value)
    return value[:limit] + ("..." if len(value) > limit else "")


def _temporary(text: str) -> MailError:
    """A local error whose POP3 reply is ``-ERR [SYS/TEMP] <text>`` (RFC 3206 section 4)."""
    return MailError(451, "4.3.0", text, pop3="SYS/TEMP")


INTERNAL_ERROR = _temporary("internal server error")
_LOGIN_ERROR = _temporary("cannot open the mailbox now, try again later")


def reply_for(failure: Failure, fallback: MailError = INTERNAL_ERROR,
              why: str = "POP3 command failed", **fields: Any) -> MailError:
    """The failure a client is told of, for any failure of a command: its own ``MailError``
    (``pop3_reply()`` is the text after ``-ERR``: log-in refused ``[AUTH]``, mailbox in use
    ``[IN-USE]``, directory unavailable ``[SYS/TEMP]``; ``errors.as_mail_error``), or
    ``fallback`` after logging ``failure`` (``why`` with ``fields``) when it says nothing a
    client may see (a bug, an I/O error, a StoreError)."""
    error = as_mail_error(failure.value)
    if error is None:
        volume = volume_unreachable(failure.value)
        if volume is not None:  # the shared volume's state, not a bug: one line
            log.error(why + ": the state folder cannot be reached: {volume}", volume=volume,
                      **fields)
        else:
            log.failure(why, failure, **fields)
        return fallback
    return error


class SessionFactory(Protocol):
    """What a session uses of the factory that built it (``factory.POP3ServerFactory``
    provides it; the factory imports this module, never the other way round)."""

    config: Config
    checker: IAccountChecker
    portal: Portal
    hostname: str
    tls_options: Any  # None: STLS is not offered
    implicit_tls: bool
    reactor: Any
    run_blocking: Callable[..., defer.Deferred]
    throttle: AuthThrottle
    limiter: ConnectionLimiter
    chunk_size: int

    def new_timestamp(self) -> bytes:
        """A unique ``<...@hostname>`` for APOP and CRAM-MD5 (RFC 1939 section 7)."""
        ...


class POP3Server(pop3.POP3):
    """One POP3 session. Built by ``factory.POP3ServerFactory``, which sets ``factory``."""

    factory: SessionFactory

    def __init__(self) -> None:
        self.session_state = AUTHORIZATION
        self.secure = False
        self.magic: bytes | None = None
        self._buffer = b""
        self._discarding = False
        self._queue: deque[Any] = deque()
        self._waiting: defer.Deferred | None = None
        self._draining = False
        self._closing = False
        self._gone = False
        self._size_warned = False  # a stale size was logged once in this session
        self._acquired = False
        self._peer = "unknown"
        self._user: str | None = None
        self._sasl: Any = None
        self._mailbox: Any = None
        self._cached_open = False  # the mailbox provides ICachedMessageOpen (set at log-in)
        self._cached_read = False  # the mailbox provides ICachedMessageRead (set at log-in)
        self._logout: Any = None
        self._deleted: set[int] = set()
        self._finished = False  # commit or close done/started: do not close again
        self._producer: MessageProducer | None = None
        self._idle: float | None = 600.0
        self._seconds: Callable[[], float] = lambda: 0.0  # the reactor's clock (connectionMade)
        self._last_command = 0.0  # when the last command arrived (the idle timer checks it)
        self._octets_sent = 0  # message octets RETR and TOP sent (the disconnect event)

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:  # noqa: N802
        f = self.factory
        self.callLater = f.reactor.callLater  # TimeoutMixin uses this clock
        self._seconds = f.reactor.seconds
        # A reply is often a short status line followed by the message: without NODELAY,
        # Nagle's algorithm and the client's delayed ACK stall each RETR by ~40 ms.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
        # TimeoutMixin.setTimeout overwrites timeOut, so keep the configured value; 0 = none
        self._idle = f.config.pop3.idle_timeout or None
        peer = self.transport.getPeer()
        self._peer = str(getattr(peer, "host", None) or "local")
        mailevents.connected(self)
        if f.limiter is not None:
            if not f.limiter.acquire(self._peer):
                log.warn("POP3 connection from {peer} refused: too many connections", peer=self._peer)
                self._closing = True
                self.transport.write(b"-ERR [SYS/TEMP] too many connections" + CRLF)
                self.transport.loseConnection()
                return
            self._acquired = True
        self.secure = bool(f.implicit_tls or ISSLTransport.providedBy(self.transport))
        greeting = f"+OK {f.hostname} POP3 server ready".encode("ascii")
        if self._apop_offered():
            self.magic = f.new_timestamp()
            greeting += b" " + self.magic
        send_now(self.transport, greeting + CRLF)
        self._last_command = self._seconds()
        self.setTimeout(self._idle)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self._gone = True
        self._closing = True
        self._queue.clear()
        mailevents.disconnected(self, self._octets_sent)
        self.setTimeout(None)
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        if self._acquired:
            self._acquired = False
            self.factory.limiter.release(self._peer)
        self._release_mailbox()

    def _release_mailbox(self) -> None:
        """Release the maildrop lock without deleting anything (drop, timeout, failure)."""
        if self._logout is None or self._finished:
            return
        self._finished = True
        d = self.factory.run_blocking(self._logout)
        d.addErrback(lambda f: log.failure("releasing the maildrop of {box} failed", f,
                                           box=getattr(self._mailbox, "address", "?")))

    def timeoutConnection(self) -> None:  # noqa: N802
        """RFC 1939 section 3: autologout closes without UPDATE and without a reply.

        The timer is not moved at each command (a ``DelayedCall.reset`` per line costs more
        than the command's own checks, issue 17): each command notes the time, and when the
        timer fires after a command came in, it is set again for the rest of the idle time."""
        if self._idle is not None:
            left = self._last_command + self._idle - self._seconds()
            if left > 0:
                self.setTimeout(left)
                self.timeOut = self._idle
                return
        log.info("POP3 session from {peer} idle for {secs:.0f}s: closing", peer=self._peer,
                 secs=self._idle)
        self._closing = True
        self._queue.clear()
        self.transport.loseConnection()

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._closing:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                rest = data[start:] if start else data
                if len(rest) > LINE_MAX:
                    self._discarding = True
                else:
                    self._buffer = rest
                break
            line = data[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False
                self._queue.append(_OVERLONG)
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self._queue.append(_OVERLONG if len(line) > LINE_MAX else line)
        self._drain()

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        """Compatibility with LineOnlyReceiver users: queue one line."""
        self._queue.append(line)
        self._drain()

    def _drain(self) -> None:
        """Handle queued lines in order; stop while a handler's Deferred is pending."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and self._waiting is None and not self._closing:
                line = self._queue.popleft()
                self._last_command = self._seconds()
                try:
                    result = self._handle(line)
                except _Refuse as e:
                    self._err(e.text)
                    continue
                except Exception:
                    self._err(reply_for(Failure(), why="POP3 command handler failed").pop3_reply())
                    continue
                # Deferred is an ABC (Awaitable): isinstance(None, Deferred) takes the slow
                # ABCMeta check, a measurable part of each command (issue 17)
                if result is not None and isinstance(result, defer.Deferred):
                    self._waiting = result
                    self.setTimeout(None)
                    result.addErrback(self._handler_failed)
                    result.addBoth(self._resume)
        finally:
            self._draining = False

    def _handler_failed(self, failure: Failure) -> None:
        self._err(reply_for(failure).pop3_reply())

    def _resume(self, _: Any) -> None:
        self._waiting = None
        if self._gone:
            return
        if not self._closing:
            self.setTimeout(self._idle)
        self._drain()

    # ------------------------------------------------------------------ output

    def _write(self, data: bytes) -> None:
        if not self._gone:
            send_now(self.transport, data)

    def _ok(self, text: str = "") -> None:
        self._write(b"+OK" + (b" " + text.encode("ascii") if text else b"") + CRLF)

    def _err(self, text: str) -> None:
        self._write(b"-ERR " + text.encode("ascii") + CRLF)

    def _multiline(self, first: str, lines: list[bytes]) -> None:
        self._write(b"".join([b"+OK" + (b" " + first.encode("ascii") if first else b"") + CRLF]
                             + [line + CRLF for line in lines] + [b"." + CRLF]))

    # ------------------------------------------------------------------ dispatch

    def _handle(self, line: Any) -> Any:
        if line is _OVERLONG:
            if self._sasl is not None:
                self._sasl = None
            raise _Refuse("line too long")
        if self._sasl is not None:
            return self._sasl_response(line)
        verb, _, rest = line.partition(b" ")
        name = _VERB_NAMES.get(verb)
        if (name in _ONE_NUMBER and self.session_state == TRANSACTION and len(rest) < 10
                and rest.isdigit()):
            return getattr(self, _ONE_NUMBER[name])([rest])
        if name is None:
            if not _VERB.fullmatch(verb):
                if not _PRINTABLE.fullmatch(line):
                    raise _Refuse("invalid characters in command")
                raise _Refuse("unknown command")
            name = verb.decode("ascii").upper()
        if name != "AUTH" and len(line) + 2 > COMMAND_MAX:
            raise _Refuse("line too long")
        if name == "PASS":
            if not _NO_CONTROLS.fullmatch(rest):
                raise _Refuse("invalid characters in command")
        elif not _PRINTABLE.fullmatch(rest):
            raise _Refuse("invalid characters in command")
        if name not in _ALL_COMMANDS:
            raise _Refuse("unknown command")
        allowed = _AUTH_COMMANDS if self.session_state == AUTHORIZATION else _TRANSACTION_COMMANDS
        if self.session_state == UPDATE or name not in allowed:
            raise _Refuse(f"{name} not valid in the {self.session_state} state")
        handler = getattr(self, "pop3_" + name)
        if name == "PASS":
            return handler(rest)
        return handler(rest.split())

    # ------------------------------------------------------------------ capabilities

    def _checker(self) -> Any:
        return self.factory.checker

    def _secrets(self) -> bool:
        return bool(self._checker().offers_secrets)  # IAccountChecker declares it

    def _apop_offered(self) -> bool:
        return self.session_state == AUTHORIZATION and self._secrets()

    def _clear_text_allowed(self) -> bool:
        return self.secure or not self.factory.config.pop3.require_secure_auth

    def _stls_offered(self) -> bool:
        return (self.session_state == AUTHORIZATION and not self.secure
                and self.factory.tls_options is not None)

    def _scram(self) -> bool:
        checker = self._checker()
        return IScramKeyStore.providedBy(checker) and bool(checker.offers_scram)

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms offered now, strongest last (PLAIN LOGIN CRAM-MD5
        SCRAM-SHA-256), among those that ``pop3.sasl_mechanisms`` allows. SCRAM-SHA-256 only
        where the checker keeps SCRAM keys for every account (``IScramKeyStore``)."""
        mechs = ["PLAIN", "LOGIN"] if self._clear_text_allowed() else []
        if self._secrets():
            mechs.append("CRAM-MD5")
        if self._scram():
            mechs.append("SCRAM-SHA-256")
        allowed = self.factory.config.pop3.sasl_mechanisms
        return [m for m in mechs if m in allowed]

    def capabilities(self) -> list[bytes]:
        """RFC 2449 capability lines for the current state."""
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.session_state == AUTHORIZATION:
            if self._clear_text_allowed():
                caps.append(b"USER")
            mechs = self.mechanisms()
            if mechs:
                caps.append(("SASL " + " ".join(mechs)).encode("ascii"))
            if self._stls_offered():
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION pop3coexist")
        return caps

    def listCapabilities(self) -> list[bytes]:  # noqa: N802 (Twisted's name)
        return self.capabilities()

    def pop3_CAPA(self, args: list[bytes]) -> None:  # noqa: N802
        if args:
            raise _Refuse("syntax: CAPA")
        self._multiline("Capability list follows", self.capabilities())

    # ------------------------------------------------------------------ AUTHORIZATION

    def _need_clear_text(self) -> None:
        if not self._clear_text_allowed():
            raise _Refuse("[AUTH] clear-text log-in is not allowed here: use STLS first")

    def pop3_USER(self, args: list[bytes]) -> None:  # noqa: N802
        self._need_clear_text()
        if len(args) != 1:
            raise _Refuse("syntax: USER name")
        self._user = args[0].decode("ascii")
        self._ok("send PASS")

    def pop3_PASS(self, rest: bytes) -> Any:  # noqa: N802
        self._need_clear_text()
        if self._user is None:
            raise _Refuse("USER first")
        user, self._user = self._user, None
        if not rest:
            raise _Refuse("syntax: PASS password")
        try:
            password = rest.decode("utf-8")
        except UnicodeDecodeError:
            return self._login_failed(Failure(BadCredentials("password is not UTF-8")), user, "USER")
        return self._login(sasl.PasswordCredentials(user, password), user, "USER")

    def pop3_APOP(self, args: list[bytes]) -> Any:  # noqa: N802
        if self.magic is None or not self._secrets():
            raise _Refuse("APOP is not available")
        if len(args) != 2 or not _HEX32.fullmatch(args[1]):
            raise _Refuse("syntax: APOP name digest")
        name, digest = args
        creds = sasl.APOPCredentials(self.magic, name, digest.lower())
        return self._login(creds, name.decode("ascii"), "APOP")

    def pop3_AUTH(self, args: list[bytes]) -> Any:  # noqa: N802
        mechs = self.mechanisms()
        if not args:
            self._multiline("SASL mechanisms follow", [m.encode("ascii") for m in mechs])
            return None
        if len(args) > 2:
            raise _Refuse("syntax: AUTH mechanism [initial-response]")
        name = args[0].decode("ascii").upper()
        if name in ("PLAIN", "LOGIN") and not self._clear_text_allowed():
            raise _Refuse("[AUTH] clear-text authentication is not allowed here: use STLS first")
        if name not in mechs:
            raise _Refuse("unsupported SASL mechanism")
        initial: bytes | None = None
        if len(args) == 2:
            initial = self._b64(args[1], initial=True)
        if name == "PLAIN":
            mech: Any = sasl.PlainMechanism()
        elif name == "LOGIN":
            mech = sasl.LoginMechanism()
        elif name == "SCRAM-SHA-256":
            mech = sasl.ScramSha256Mechanism(self._checker())
        else:
            mech = sasl.CramMD5Mechanism(self.factory.new_timestamp(), self.factory.hostname)
        self._sasl = mech
        return self._sasl_step(mech.start(initial))

    @staticmethod
    def _b64(data: bytes, initial: bool = False) -> bytes:
        if initial and data == b"=":
            return b""
        try:
            return binascii.a2b_base64(data, strict_mode=True) if data else b""
        except (binascii.Error, ValueError):
            raise _Refuse("invalid base64 in SASL response") from None

    def _sasl_response(self, line: bytes) -> Any:
        mech = self._sasl
        if line.strip() == b"*":
            self._sasl = None
            raise _Refuse("authentication cancelled")
        try:
            data = self._b64(line.strip())
        except _Refuse:
            self._sasl = None
            raise
        return self._sasl_step(mech.step(data))

    def _sasl_step(self, step: Any) -> Any:
        method = "AUTH " + self._sasl.name
        if isinstance(step, defer.Deferred):  # SCRAM looks the keys up first
            return step.addCallbacks(self._sasl_step, self._sasl_lookup_failed,
                                     errbackArgs=(method,))
        if self._gone:
            self._sasl = None
            return None
        if isinstance(step, sasl.Challenge):
            self._write(b"+ " + base64.b64encode(step.data) + CRLF)
            return None
        self._sasl = None
        if isinstance(step, sasl.Fail):
            return self._login_failed(Failure(BadCredentials(step.reason)), "(unknown)", method)
        return self._login(step.credentials, step.username, method)

    def _sasl_lookup_failed(self, failure: Failure, method: str) -> Any:
        self._sasl = None
        return self._login_failed(failure, "(unknown)", method)

    def pop3_STLS(self, args: list[bytes]) -> None:  # noqa: N802
        if args:
            raise _Refuse("syntax: STLS")
        if self.secure:
            raise _Refuse("TLS is already active")
        if self.factory.tls_options is None:
            raise _Refuse("STLS is not available")
        self._ok("Begin TLS negotiation")
        # RFC 2595 section 3.1: forget everything sent in clear text after STLS, and what
        # the client said before (USER).
        self._queue.clear()
        self._buffer = b""
        self._discarding = False
        self._user = None
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True
        log.info("POP3 STLS from {peer}", peer=self._peer)

    # ------------------------------------------------------------------ log-in outcomes

    def _login(self, credentials: Any, user: str, method: str) -> defer.Deferred:
        d = defer.ensureDeferred(self._checked_login(credentials))
        d.addCallbacks(self._login_ok, self._login_failed,
                       callbackArgs=(user, method), errbackArgs=(user, method))
        return d

    async def _checked_login(self, credentials: Any) -> Any:
        """The portal log-in, after the source's turn at the gate (policy.throttle.LoginGate)."""
        release = await self.factory.gate.enter(self._peer)
        try:
            if self._gone:  # the client left while it waited: spend no check on it
                raise BadCredentials("connection closed before the check")
            return await self.factory.portal.login(credentials, None, IMaildrop)
        finally:
            release()

    def _login_ok(self, result: Any, user: str, method: str) -> None:
        _iface, avatar, logout = result
        if self._gone:
            self.factory.run_blocking(logout).addErrback(
                lambda f: log.failure("releasing a maildrop after a lost connection failed", f))
            return
        self._mailbox = avatar
        self._cached_open = ICachedMessageOpen.providedBy(avatar)
        self._cached_read = ICachedMessageRead.providedBy(avatar)
        self._logout = logout
        self._user = None
        self.session_state = TRANSACTION
        self.factory.throttle.success(self._peer)
        address = getattr(avatar, "address", user)
        log.info("POP3 log-in {address} from {peer} by {method}: success",
                 address=address, peer=self._peer,
                 **mailevents.login_fields(self, "ok", str(address), method))
        count, octets = self._totals()
        self._ok(f"{address} has {count} messages ({octets} octets)")

    def _login_failed(self, failure: Failure, user: str, method: str) -> Any:
        error = reply_for(failure, _LOGIN_ERROR, "POP3 log-in for {user} failed unexpectedly",
                          user=_printable(user))
        reply = error.pop3_reply()
        # a refused log-in (wrong credentials, locked mailbox) waits (RFC 2449 section 8.1.1)
        delay = self.factory.throttle.failure_delay(self._peer) if error.pop3 == "AUTH" else 0.0
        log.info("POP3 log-in {user} from {peer} by {method}: {reply}",
                 peer=self._peer, reply=reply, **mailevents.login_fields(
                     self, login_outcome(None, error.pop3), _printable(user), method, delay))
        if delay > 0 and not self._gone:
            return task.deferLater(self.factory.reactor, delay, self._err, reply)
        self._err(reply)
        return None

    # ------------------------------------------------------------------ TRANSACTION

    def _totals(self) -> tuple[int, int]:
        box = self._mailbox
        live = [i for i in range(len(box)) if i not in self._deleted]
        return len(live), sum(box.size(i) for i in live)

    def _index(self, arg: bytes) -> int:
        """A 1-based message number argument -> 0-based index of a live message."""
        if not _NUMBER.fullmatch(arg):
            raise _Refuse("invalid message number")
        n = int(arg)
        if not 1 <= n <= len(self._mailbox):
            raise _Refuse("no such message")
        if n - 1 in self._deleted:
            raise _Refuse(f"message {n} is deleted")
        return n - 1

    def pop3_STAT(self, args: list[bytes]) -> None:  # noqa: N802
        if args:
            raise _Refuse("syntax: STAT")
        count, octets = self._totals()
        self._ok(f"{count} {octets}")

    def pop3_LIST(self, args: list[bytes]) -> None:  # noqa: N802
        box = self._mailbox
        if len(args) > 1:
            raise _Refuse("syntax: LIST [message]")
        if args:
            i = self._index(args[0])
            self._ok(f"{i + 1} {box.size(i)}")
            return
        count, octets = self._totals()
        lines = [f"{i + 1} {box.size(i)}".encode("ascii")
                 for i in range(len(box)) if i not in self._deleted]
        self._multiline(f"{count} messages ({octets} octets)", lines)

    def pop3_UIDL(self, args: list[bytes]) -> None:  # noqa: N802
        box = self._mailbox
        if len(args) > 1:
            raise _Refuse("syntax: UIDL [message]")
        if args:
            i = self._index(args[0])
            self._ok(f"{i + 1} {box.uidl(i)}")
            return
        lines = [f"{i + 1} {box.uidl(i)}".encode("ascii")
                 for i in range(len(box)) if i not in self._deleted]
        self._multiline("unique-id listing follows", lines)

    def pop3_RETR(self, args: list[bytes]) -> defer.Deferred | None:  # noqa: N802
        if len(args) != 1:
            raise _Refuse("syntax: RETR message")
        i = self._index(args[0])
        size = self._mailbox.size(i)
        return self._send(i, f"{size} octets", None, size)

    def _send_whole(self, index: int, fileobj: Any, first: str, announced: int) -> bool:
        """RETR's short cut (``stream.read_whole_cached``, ``stream.wire_form``): the whole
        reply in one write, on the reactor, when the message fits in one chunk, the page cache
        has it and nothing is queued for this client (so at most one chunk can wait in memory:
        a client that pipelines RETRs without reading gets the streaming path, paused by the
        transport). Returns False, having sent nothing, when the stream must do it; closes
        ``fileobj`` when it sent the message."""
        if not nothing_queued(self.transport):
            return False
        try:
            data = read_whole_cached(fileobj, self.factory.chunk_size)
        except OSError:
            return False  # the stream reads again and reports what fails
        if data is None:
            return False
        fileobj.close()
        wire, octets = wire_form(data)
        send_now(self.transport, b"+OK " + first.encode("ascii") + CRLF + wire)
        self._sent(index, octets, announced)
        return True

    def _sent(self, index: int, octets: int, announced: int | None) -> None:
        """Count a message sent; warn once per session when its size was not the announced."""
        self._octets_sent += octets
        if announced is not None and octets != announced and not self._size_warned:
            # The size came from somewhere else than this file's bytes (a ,W= in the name
            # from another program or an older version, a file changed in place): a client
            # that trusts the count may lose step. Say so, once per session (a store full
            # of such names must not cost a log line per message); the sizes cannot be
            # taken back.
            self._size_warned = True
            log.warn("RETR {n} of {box}: {sent} octets sent, {said} announced (a stale size "
                     "in the Maildir file name?; not logged again in this session)",
                     n=index + 1, sent=octets,
                     said=announced, box=getattr(self._mailbox, "address", "?"))

    def pop3_TOP(self, args: list[bytes]) -> defer.Deferred | None:  # noqa: N802
        if len(args) != 2:
            raise _Refuse("syntax: TOP message lines")
        i = self._index(args[0])
        if not _NUMBER.fullmatch(args[1]):
            raise _Refuse("invalid number of lines")
        return self._send(i, "top of message follows", int(args[1]))

    def _send(self, index: int, first: str, body_lines: int | None,
              announced: int | None = None) -> defer.Deferred | None:
        f = self.factory
        mailbox = self._mailbox
        # the commonest case (RETR of a small message in the page cache, nothing queued for
        # this client): the stored bytes at once, no file object (ICachedMessageRead)
        if (self._cached_read and body_lines is None and announced is not None
                and nothing_queued(self.transport)):
            try:
                data = mailbox.read_message_cached(index, f.chunk_size)
            except OSError:
                data = None  # the paths below read again and report what fails
            if data is not None:
                wire, octets = wire_form(data)
                send_now(self.transport, b"+OK " + first.encode("ascii") + CRLF + wire)
                self._sent(index, octets, announced)
                return None
        # the common case: the kernel has the path cached and the reactor opens it at once
        cached = mailbox.open_message_cached(index) if self._cached_open else None
        if (cached is not None and body_lines is None and announced is not None
                and self._send_whole(index, cached, first, announced)):
            return None
        stuffer = DotStuffer(body_lines)

        def opened(fileobj: Any) -> Any:
            if self._gone:
                fileobj.close()
                return None
            # the +OK line goes out with the first chunk: one send for a small message
            self._producer = MessageProducer(self.transport, fileobj, stuffer,
                                             f.run_blocking, f.chunk_size,
                                             prefix=b"+OK " + first.encode("ascii") + CRLF)
            sent = self._producer.start()
            sent.addCallbacks(done, broken)
            return sent

        def cannot_open(failure: Failure) -> None:
            self._err(reply_for(failure, _temporary(f"cannot read message {index + 1} now"),
                                "opening message {n} of {box} failed", n=index + 1,
                                box=getattr(self._mailbox, "address", "?")).pop3_reply())

        def done(_: Any) -> None:
            self._producer = None
            self._sent(index, stuffer.octets, announced)

        def broken(failure: Failure) -> None:
            # Part of the message is out already: the only honest end is to drop the line.
            self._producer = None
            if not self._gone:
                self._closing = True
                self.transport.loseConnection()

        if cached is not None:
            return opened(cached)
        d = f.run_blocking(self._mailbox.open_message, index)
        d.addCallbacks(opened, cannot_open)
        return d

    def pop3_DELE(self, args: list[bytes]) -> None:  # noqa: N802
        if len(args) != 1:
            raise _Refuse("syntax: DELE message")
        i = self._index(args[0])
        self._deleted.add(i)
        self._write(b"+OK message %d deleted\r\n" % (i + 1))

    def pop3_NOOP(self, args: list[bytes]) -> None:  # noqa: N802
        if args:
            raise _Refuse("syntax: NOOP")
        self._ok()

    def pop3_RSET(self, args: list[bytes]) -> None:  # noqa: N802
        if args:
            raise _Refuse("syntax: RSET")
        self._deleted.clear()
        count, octets = self._totals()
        self._ok(f"maildrop has {count} messages ({octets} octets)")

    def pop3_QUIT(self, args: list[bytes]) -> Any:  # noqa: N802
        if args:
            raise _Refuse("syntax: QUIT")
        hostname = self.factory.hostname
        if self.session_state == AUTHORIZATION:
            self._ok(f"{hostname} POP3 server signing off")
            self._close()
            return None
        self.session_state = UPDATE
        self._finished = True
        deleted = set(self._deleted)
        left = len(self._mailbox) - len(deleted)
        d = self.factory.run_blocking(self._mailbox.commit, deleted)

        def committed(_: Any) -> None:
            log.info("POP3 {box} from {peer}: {n} deleted, {left} left",
                     box=getattr(self._mailbox, "address", "?"), peer=self._peer,
                     n=len(deleted), left=left)
            self._ok(f"{hostname} POP3 server signing off ({left} messages left)")
            self._close()

        def failed(failure: Failure) -> None:
            self._err(reply_for(failure, _temporary("some deleted messages were not removed"),
                                "POP3 UPDATE for {box} failed",
                                box=getattr(self._mailbox, "address", "?")).pop3_reply())
            self.factory.run_blocking(self._mailbox.close).addErrback(
                lambda f: log.failure("releasing the maildrop failed", f))
            self._close()

        d.addCallbacks(committed, failed)
        return d

    def _close(self) -> None:
        self._closing = True
        self._queue.clear()
        if not self._gone:
            self.transport.loseConnection()
