"""The IMAP4rev1 server protocol (RFC 3501) with IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE
(RFC 6851), NAMESPACE (RFC 2342), ID (RFC 2971), LITERAL+ (RFC 7888), ENABLE (RFC 5161),
SPECIAL-USE (RFC 6154), QUOTA (RFC 2087), UNSELECT (RFC 3691) and CHILDREN (RFC 3348).

``IMAPServer`` is one session over ``interfaces.IAccountFolders`` / ``IFolderView`` (the
folders of the account that logged in); it holds the IMAP-only state (sequence numbers, the
expunges and flag changes not yet told to the client) and no policy: log-ins go through the
factory's checker, throttle (``LoginGate``) and the store's lock rule; file formats are the
store's (store/folders.py). Every store call runs off the reactor (``run_blocking``).
This module holds the session's I/O, command dispatch and the any-state commands; the
commands of each state are mixins: ``login.LoginCommands`` (STARTTLS, LOGIN, AUTHENTICATE),
``mailboxes.MailboxCommands`` (folders, APPEND, IDLE, QUOTA), ``selected.SelectedCommands``
(FETCH, STORE, SEARCH, COPY, MOVE, EXPUNGE); parse.py reads commands, fetch.py and message.py
build FETCH/SEARCH answers.

Why not ``twisted.mail.imap4.IMAP4Server``: it runs pipelined commands concurrently (their
replies can interleave), rebuilds BODY[] from a parsed header dict (the octets differ from
RFC822.SIZE: synchronising clients refetch or fail), does not read quoted-string escapes in
its astring parser, answers "BAD Server error: <exception text>", and its IDLE never reports
anything. What is kept of Twisted: the LineReceiver/TimeoutMixin machinery and the IMAP
modified UTF-7 codec.

Commands are handled one at a time, in order: lines (and literals) that arrive meanwhile are
read and queued. The client learns of other sessions' changes (POP3's deletions included) at
its next command, at NOOP/CHECK and every ``POLL_INTERVAL`` seconds during IDLE: ``EXISTS`` and
``RECENT`` for new mail, ``FETCH (FLAGS ...)`` for changed flags, and ``EXPUNGE`` for removed
messages (held back during FETCH, STORE and SEARCH, RFC 3501 section 7.4.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from pop3coexist.errors import StoreError
from pop3coexist.imap.common import (
    MAX_LINE,
    MAX_LITERALS,
    POLL_INTERVAL,
    Refuse,
    _printable,
    _text,
    log,
    resp_text,
    valid_tag,
)
from pop3coexist.imap.login import LoginCommands, PasswordCredentials
from pop3coexist.imap.mailboxes import MailboxCommands
from pop3coexist.imap.parse import (
    LITERAL_RE,
    BadSyntax,
    tokenize,
)
from pop3coexist.imap.selected import Selected, SelectedCommands
from pop3coexist.interfaces import IScramKeyStore

__all__ = ["IMAPServer", "PasswordCredentials", "POLL_INTERVAL", "Selected"]


class IMAPServer(LoginCommands, MailboxCommands, SelectedCommands, LineReceiver, TimeoutMixin):
    """One IMAP session; see the module docstring. ``factory``: ``IMAPServerFactory``."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE
    factory: Any

    def __init__(self) -> None:
        self.state = "unauth"  # unauth, auth, selected, logout
        self.secure = False
        self.account: Any = None
        self.address = ""
        self.sel: Selected | None = None
        self._buf = bytearray()  # the command read so far (lines and literals)
        self._literal_left = 0
        self._literals = 0  # literals of the command being read
        self._queue: list[bytes] = []
        self._busy = False
        self._gone = False
        self._acquired = False
        self._sasl: Any = None  # (tag, generator step function) while AUTHENTICATE runs
        self._idle: Any = None  # (tag, idle.IdleHub key or None) during IDLE
        self._refresh_lock = defer.DeferredLock()
        self.peer = ""

    # ------------------------------------------------------------------ connection
    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        f = self.factory
        self.callLater = f.reactor.callLater
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.secure = bool(f.implicit_tls)
        if not f.limiter.acquire(self.peer):
            log.warn("IMAP connection from {peer} refused: too many connections", peer=self.peer)
            self._gone = True
            self.transport.write(b"* BYE [UNAVAILABLE] too many connections, try later\r\n")
            self.transport.loseConnection()
            return
        self._acquired = True
        self.setTimeout(f.config.imap.idle_timeout)
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] " +
                  f.hostname.encode("ascii", "replace") + b" IMAP4rev1 ready")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        self._gone = True
        self.setTimeout(None)
        self._stop_idle()
        if self._acquired:
            self._acquired = False
            self.factory.limiter.release(self.peer)

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.send(b"* BYE autologout; idle for too long")
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.send(b"* BYE line too long")
        self.transport.loseConnection()

    # ------------------------------------------------------------------ output
    def send(self, line: bytes) -> None:
        if not self._gone:
            self.transport.write(line + b"\r\n")

    def tagged(self, tag: bytes, status: str, text: str, code: str = "") -> None:
        """``tag status [code] text``; the text and code pass ``resp_text`` (client input
        they quote never adds a line or an 8-bit octet to the response)."""
        c = f"[{resp_text(code, 0)}] " if code else ""
        self.send(tag + f" {status} {c}{resp_text(text)}".encode("ascii"))

    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS",
                "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE", "QUOTA", "SASL-IR"]
        if self.state == "unauth":
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STARTTLS")
            if not self._clear_text_allowed():
                caps.append("LOGINDISABLED")
            caps += [f"AUTH={m}" for m in self.mechanisms()]
        return " ".join(caps).encode("ascii")

    def _clear_text_allowed(self) -> bool:
        return self.secure or not self.factory.config.imap.require_secure_auth

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms offered now (``imap.sasl_mechanisms`` allowing), as POP3 offers
        them: PLAIN, LOGIN where clear text is allowed, CRAM-MD5 where the checker keeps
        shared secrets, SCRAM-SHA-256 where it keeps SCRAM keys (``IScramKeyStore``)."""
        checker = self.factory.checker
        mechs = ["PLAIN", "LOGIN"] if self._clear_text_allowed() else []
        if checker.offers_secrets:  # IAccountChecker declares it
            mechs.append("CRAM-MD5")
        if IScramKeyStore.providedBy(checker) and checker.offers_scram:
            mechs.append("SCRAM-SHA-256")
        allowed = self.factory.config.imap.sasl_mechanisms
        return [m for m in mechs if m in allowed]

    # ------------------------------------------------------------------ input
    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._gone:
            return
        self.resetTimeout()
        self._buf += line
        m = LITERAL_RE.search(line)
        if m and not self._sasl:
            size = int(m.group(1))
            self._literals += 1
            too_big = len(self._buf) + size > self.factory.max_literal
            if too_big or self._literals > MAX_LITERALS:
                tag = bytes(self._buf.split(b" ", 1)[0])
                self._buf = bytearray()
                self._literals = 0
                if m.group(2):  # LITERAL+: the octets follow anyway; read and drop them
                    self._literal_left = -size
                    if size:
                        self.setRawMode()
                tag = tag if valid_tag(tag) else b"*"
                if too_big:
                    self.tagged(tag, "NO", "literal too large", "TOOBIG")
                else:
                    self.tagged(tag, "BAD", f"more than {MAX_LITERALS} literals in one command")
                return
            self._buf += b"\r\n"
            if not m.group(2):
                self.send(b"+ go ahead")
            if size:
                self._literal_left = size
                self.setRawMode()
            return
        command, self._buf = bytes(self._buf), bytearray()
        self._literals = 0
        if self._busy or self._queue:
            self._queue.append(command)
            return
        self.handle(command)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.resetTimeout()
        if self._literal_left < 0:  # dropping an oversized LITERAL+
            take = min(len(data), -self._literal_left)
            self._literal_left += take
            rest = data[take:]
            if self._literal_left == 0:
                self.setLineMode(rest)
            return
        take = data[: self._literal_left]
        self._buf += take
        self._literal_left -= len(take)
        if self._literal_left == 0:
            self.setLineMode(data[len(take):])

    def _next(self) -> None:
        while self._queue and not self._busy and not self._gone:
            self.handle(self._queue.pop(0))

    def handle(self, command: bytes) -> None:
        """One complete command (its literals included)."""
        if self._sasl is not None:
            self._sasl_answer(command)
            return
        if self._idle is not None:
            tag, _ = self._idle
            if command.strip().upper() != b"DONE":
                self.send(b"* BAD expected DONE")
                return
            self._stop_idle()
            self.tagged(tag, "OK", "IDLE terminated")
            return
        tag, _, rest = command.partition(b" ")
        if not rest or not valid_tag(tag):
            self.send(b"* BAD missing tag or command")
            return
        name, _, args_raw = rest.partition(b" ")
        name_s = name.decode("latin-1").upper()
        uid = False
        if name_s == "UID":
            sub, _, args_raw = args_raw.partition(b" ")
            name_s = sub.decode("latin-1").upper()
            uid = True
            if name_s not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                self.tagged(tag, "BAD", "unknown UID command")
                return
        handler = getattr(self, "do_" + name_s, None) if name_s.isalpha() else None
        if handler is None:
            self.tagged(tag, "BAD", "unknown command")
            return
        needs = getattr(handler, "states", ("unauth", "auth", "selected"))
        if self.state not in needs:
            self.tagged(tag, "BAD", f"{name_s} not allowed now")
            return
        try:
            args = tokenize(args_raw) if name_s != "AUTHENTICATE" else args_raw.split()
        except BadSyntax as e:
            self.tagged(tag, "BAD", str(e))
            return
        self._busy = True
        d = defer.ensureDeferred(self._run(handler, tag, name_s, args, uid))
        d.addBoth(self._done)

    async def _run(self, handler: Callable[..., Any], tag: bytes, name: str, args: list,
                   uid: bool) -> None:
        try:
            if name in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                result = handler(tag, args, uid)
            else:
                result = handler(tag, args)
            if hasattr(result, "__await__"):
                await result
        except BadSyntax as e:
            self.tagged(tag, "BAD", str(e) or "syntax error")
        except Refuse as e:
            self.tagged(tag, "NO", str(e), e.code)
        except TypeError:
            self.tagged(tag, "BAD", f"wrong arguments for {name}")
        except StoreError as e:
            code = getattr(e, "code", "") or "SERVERBUG"
            if code == "SERVERBUG":
                log.failure("IMAP {cmd} for {user} failed", cmd=name, user=self.address)
                self.tagged(tag, "NO", "temporary server failure, try again later",
                            "UNAVAILABLE")
            else:
                self.tagged(tag, "NO", str(e), code)
        except Exception:
            log.failure("IMAP {cmd} for {user} failed", cmd=name, user=self.address)
            self.tagged(tag, "NO", "temporary server failure, try again later", "UNAVAILABLE")

    def _done(self, _: Any) -> None:
        self._busy = False
        if self.line_mode and not self._gone:
            self._next()

    def blocking(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return self.factory.run_blocking(f, *args)

    # ------------------------------------------------------------------ any state
    async def do_CAPABILITY(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.send(b"* CAPABILITY " + self.capabilities())
        self.tagged(tag, "OK", "CAPABILITY completed")

    async def do_NOOP(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "NOOP completed")

    async def do_LOGOUT(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.send(b"* BYE logging out")
        self.tagged(tag, "OK", "LOGOUT completed")
        self.state = "logout"
        self.transport.loseConnection()

    async def do_ID(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1 or not (isinstance(args[0], list) or args[0] == "NIL"):
            raise BadSyntax("ID takes a list or NIL")
        if isinstance(args[0], list):
            pairs = args[0]
            client = {_text(pairs[i]): _text(pairs[i + 1]) if isinstance(pairs[i + 1], bytes)
                      else None for i in range(0, len(pairs) - 1, 2)}
            log.info("IMAP client {peer} ID {id}", peer=self.peer,
                     id={_printable(k): _printable(v or "") for k, v in list(client.items())[:8]})
        self.send(b'* ID ("name" "pop3coexist" "vendor" "pop3coexist")')
        self.tagged(tag, "OK", "ID completed")
