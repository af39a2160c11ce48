"""The IMAP4rev1 server protocol (RFC 3501) with IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE
(RFC 6851), NAMESPACE (RFC 2342), ID (RFC 2971), LITERAL+ (RFC 7888), ENABLE (RFC 5161),
SPECIAL-USE (RFC 6154), QUOTA (RFC 2087), UNSELECT (RFC 3691) and CHILDREN (RFC 3348).

``IMAPServer`` is one session over ``interfaces.IAccountFolders`` / ``IFolderView`` (the
folders of the account that logged in); it holds the IMAP-only state (sequence numbers, the
expunges and flag changes not yet told to the client) and no policy: log-ins go through the
factory's checker, throttle (``LoginGate``) and the store's lock rule; file formats are the
store's (store/folders.py). Every store call runs off the reactor (``run_blocking``).

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

import base64
import binascii
import hmac
from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from pop3coexist.errors import AuthUnavailable, NoSuchMailbox, StoreError
from pop3coexist.identity.logins import login_locked
from pop3coexist.imap import fetch as fetchmod
from pop3coexist.imap.message import astring
from pop3coexist.imap.parse import (
    LITERAL_RE,
    BadSyntax,
    format_seqset,
    parse_datetime,
    parse_seqset,
    tokenize,
)

log = Logger(namespace="pop3coexist.imap")

MAX_LINE = 65536
POLL_INTERVAL = 2.0  # seconds between mailbox checks during IDLE
SEPARATOR = "."
IMPLEMENTATION = "pop3coexist"
_NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}  # RFC 3501 section 7.4.1 (not in their UID form)
PERMANENT = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"


@implementer(IUsernamePassword)
class PasswordCredentials:
    """LOGIN, AUTHENTICATE PLAIN and LOGIN credentials; never shows the password."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: str | bytes) -> bool:  # noqa: N802 (zope name)
        given = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        return hmac.compare_digest(given, self.password.encode("utf-8"))

    def __repr__(self) -> str:
        return f"<PasswordCredentials username={self.username!r}>"


class Refuse(Exception):
    """A command refused with NO (``code``: a response code such as TRYCREATE)."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.code = code


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise BadSyntax("expected a string")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:100]


class Selected:
    """The selected folder as this session knows it: ``uids`` in sequence order (position + 1
    is the message sequence number), ``msgs`` by UID, the UIDs gone but not yet reported."""

    def __init__(self, name: str, view: Any, readonly: bool) -> None:
        self.name = name
        self.view = view
        self.readonly = readonly
        self.uids: list[int] = []
        self.msgs: dict[int, Any] = {}
        self.recent: set[int] = set()
        self.gone: set[int] = set()

    def seq_of(self, uid: int) -> int:
        return self.uids.index(uid) + 1


class IMAPServer(LineReceiver, TimeoutMixin):
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
        self._queue: list[bytes] = []
        self._busy = False
        self._gone = False
        self._acquired = False
        self._sasl: Any = None  # (tag, generator step function) while AUTHENTICATE runs
        self._idle: Any = None  # (tag, LoopingCall) during IDLE
        self._enabled: set[str] = set()
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
        c = f"[{code}] " if code else ""
        self.send(tag + f" {status} {c}{text}".encode())

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
        """The SASL mechanisms offered now (``imap.sasl_mechanisms`` allowing): PLAIN, LOGIN
        where clear text is allowed, CRAM-MD5 where the checker keeps shared secrets."""
        mechs = ["PLAIN", "LOGIN"] if self._clear_text_allowed() else []
        if self.factory.checker.offers_secrets:  # IAccountChecker declares it
            mechs.append("CRAM-MD5")
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
            if len(self._buf) + size > self.factory.max_literal:
                tag = bytes(self._buf.split(b" ", 1)[0])[:64]
                self._buf = bytearray()
                if m.group(2):  # LITERAL+: the octets follow anyway; read and drop them
                    self._literal_left = -size
                    self.setRawMode()
                self.tagged(tag or b"*", "NO", "literal too large", "TOOBIG")
                return
            self._buf += b"\r\n"
            if not m.group(2):
                self.send(b"+ go ahead")
            if size:
                self._literal_left = size
                self.setRawMode()
            return
        command, self._buf = bytes(self._buf), bytearray()
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
            tag, loop = self._idle
            if command.strip().upper() != b"DONE":
                self.send(b"* BAD expected DONE")
                return
            self._stop_idle()
            self.tagged(tag, "OK", "IDLE terminated")
            return
        tag, _, rest = command.partition(b" ")
        if not tag or not rest or any(c in tag for c in b'(){%*"\\+') or len(tag) > 64:
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

    # ------------------------------------------------------------------ not authenticated
    async def do_STARTTLS(self, tag: bytes, args: list) -> None:  # noqa: N802
        if self.factory.tls_options is None or self.secure:
            raise BadSyntax("STARTTLS not available")
        if self._queue or self._buf:  # RFC 3501 section 11.1: nothing may follow in plain text
            self._queue.clear()
            self._buf = bytearray()
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

    # ------------------------------------------------------------------ authenticated
    def _name(self, value: Any) -> str:
        name = _text(value)
        if name.upper() == "INBOX":
            return "INBOX"
        return name

    async def do_ENABLE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if not args:
            raise BadSyntax("ENABLE needs a capability")
        self.send(b"* ENABLED")  # none of ours needs enabling (CONDSTORE/UTF8 not offered)
        self.tagged(tag, "OK", "ENABLE completed")
    do_ENABLE.states = ("auth",)  # RFC 5161 section 3.1  # type: ignore[attr-defined]

    async def do_NAMESPACE(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.send(b'* NAMESPACE (("" ".")) NIL NIL')
        self.tagged(tag, "OK", "NAMESPACE completed")
    do_NAMESPACE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> None:  # noqa: N802
        if len(args) < 1:
            raise BadSyntax("SELECT mailbox")
        name = self._name(args[0])
        self.sel = None
        self.state = "auth"
        view = await self.blocking(self.account.open_folder, name)
        sel = Selected(name, view, readonly)
        msgs = await self.blocking(view.sync)
        if not readonly:
            await self.blocking(view.claim_recent, msgs)
        sel.uids = [m.uid for m in msgs]
        sel.msgs = {m.uid: m for m in msgs}
        sel.recent = {m.uid for m in msgs if m.recent} if not readonly else set()
        validity, uidnext = await self.blocking(lambda: (view.uidvalidity, view.uidnext))
        self.sel, self.state = sel, "selected"
        self.send(b"* FLAGS (" + PERMANENT.encode() + b")")
        self.send(b"* OK [PERMANENTFLAGS (" + PERMANENT.encode() + b" \\*)] flags")
        self.send(b"* %d EXISTS" % len(sel.uids))
        self.send(b"* %d RECENT" % len(sel.recent))
        unseen = next((i + 1 for i, u in enumerate(sel.uids)
                       if "\\Seen" not in sel.msgs[u].flags), None)
        if unseen:
            self.send(b"* OK [UNSEEN %d] first unseen" % unseen)
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % validity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % uidnext)
        self.tagged(tag, "OK", "EXAMINE completed" if readonly else "SELECT completed",
                    "READ-ONLY" if readonly else "READ-WRITE")
    do_SELECT.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_EXAMINE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_SELECT(tag, args, readonly=True)
    do_EXAMINE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_CREATE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("CREATE mailbox")
        await self.blocking(self.account.create, self._name(args[0]))
        self.tagged(tag, "OK", "CREATE completed")
    do_CREATE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_DELETE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("DELETE mailbox")
        await self.blocking(self.account.delete, self._name(args[0]))
        self.tagged(tag, "OK", "DELETE completed")
    do_DELETE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_RENAME(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 2:
            raise BadSyntax("RENAME old new")
        await self.blocking(self.account.rename, self._name(args[0]), self._name(args[1]))
        self.tagged(tag, "OK", "RENAME completed")
    do_RENAME.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SUBSCRIBE(self, tag: bytes, args: list, on: bool = True) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("SUBSCRIBE mailbox")
        await self.blocking(self.account.subscribe, self._name(args[0]), on)
        self.tagged(tag, "OK", "SUBSCRIBE completed" if on else "UNSUBSCRIBE completed")
    do_SUBSCRIBE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_SUBSCRIBE(tag, args, on=False)
    do_UNSUBSCRIBE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> None:  # noqa: N802
        select_opts: list = []
        if args and isinstance(args[0], list):  # RFC 5258 selection options (SPECIAL-USE)
            select_opts = [str(o).upper() for o in args.pop(0)]
        if len(args) < 2:
            raise BadSyntax("LIST reference pattern")
        ref, pattern = _text(args[0]), _text(args[1]) if not isinstance(args[1], list) else ""
        if not lsub and pattern == "":
            self.send(b'* LIST (\\Noselect) "." ""')
            self.tagged(tag, "OK", "LIST completed")
            return
        acc = self.account
        names, subs = await self.blocking(lambda: (acc.list_folders(), acc.subscriptions()))
        full = ref + pattern
        regex = _pattern(full)
        word = b"LSUB" if lsub else b"LIST"
        for name in names:
            if not regex.match(name):
                continue
            attrs = []
            if any(n.startswith(name + SEPARATOR) for n in names):
                attrs.append("\\HasChildren")
            else:
                attrs.append("\\HasNoChildren")
            special = acc.special_use(name)
            if "SPECIAL-USE" in select_opts and not special:
                continue
            if special:
                attrs.append(special)
            if lsub and name not in subs and name != "INBOX":
                continue
            if "SUBSCRIBED" in select_opts:
                if name not in subs:
                    continue
                attrs.append("\\Subscribed")
            self.send(b"* " + word + b" (" + " ".join(attrs).encode() + b') "." ' +
                      astring(name))
        self.tagged(tag, "OK", f"{word.decode()} completed")
    do_LIST.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_LSUB(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_LIST(tag, args, lsub=True)
    do_LSUB.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_STATUS(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 2 or not isinstance(args[1], list):
            raise BadSyntax("STATUS mailbox (items)")
        name = self._name(args[0])
        view = await self.blocking(self.account.open_folder, name)
        msgs = await self.blocking(view.sync)
        values = {"MESSAGES": len(msgs), "RECENT": sum(1 for m in msgs if m.recent),
                  "UIDNEXT": view.uidnext, "UIDVALIDITY": view.uidvalidity,
                  "UNSEEN": sum(1 for m in msgs if "\\Seen" not in m.flags)}
        out = []
        for item in args[1]:
            key = str(item).upper()
            if key not in values:
                raise BadSyntax(f"unknown STATUS item {key[:20]}")
            out.append(f"{key} {values[key]}")
        self.send(b"* STATUS " + astring(name) + b" (" + " ".join(out).encode() + b")")
        self.tagged(tag, "OK", "STATUS completed")
    do_STATUS.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_APPEND(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) < 2:
            raise BadSyntax("APPEND mailbox [(flags)] [date-time] message")
        name = self._name(args[0])
        flags: list[str] = []
        date = None
        rest = args[1:]
        if rest and isinstance(rest[0], list):
            flags = [str(f) for f in rest.pop(0)]
        if len(rest) == 2 and isinstance(rest[0], bytes):
            date = parse_datetime(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise BadSyntax("APPEND needs the message as a literal")
        data = rest[0]
        validity, uid = await self.blocking(self.account.append, name, data, flags, date)
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "APPEND completed", f"APPENDUID {validity} {uid}")
    do_APPEND.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_IDLE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.refresh(expunges=True)
        self.send(b"+ idling")
        loop = task.LoopingCall(self._idle_poll)
        loop.clock = self.factory.reactor
        self._idle = (tag, loop)
        loop.start(POLL_INTERVAL, now=False).addErrback(lambda f: None)
    do_IDLE.states = ("auth", "selected")  # type: ignore[attr-defined]

    def _idle_poll(self) -> defer.Deferred | None:
        if self._idle is None or self._busy or self.sel is None:
            return None
        return defer.ensureDeferred(self.refresh(expunges=True)).addErrback(
            lambda f: log.failure("IMAP IDLE poll failed", f))

    def _stop_idle(self) -> None:
        if self._idle is not None:
            _, loop = self._idle
            self._idle = None
            if loop.running:
                loop.stop()

    async def do_GETQUOTAROOT(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("GETQUOTAROOT mailbox")
        name = self._name(args[0])
        if not await self.blocking(self.account.exists, name):
            raise Refuse(f"no folder {name}", "NONEXISTENT")
        self.send(b"* QUOTAROOT " + astring(name) + b' ""')
        await self._quota_line()
        self.tagged(tag, "OK", "GETQUOTAROOT completed")
    do_GETQUOTAROOT.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_GETQUOTA(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1 or _text(args[0]) != "":
            raise Refuse("the only quota root is \"\"", "NONEXISTENT")
        await self._quota_line()
        self.tagged(tag, "OK", "GETQUOTA completed")
    do_GETQUOTA.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SETQUOTA(self, tag: bytes, args: list) -> None:  # noqa: N802
        raise Refuse("quotas are set by the administrator (pop3coexist-admin mailbox quota)",
                     "NOPERM")
    do_SETQUOTA.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def _quota_line(self) -> None:
        used, limit = await self.blocking(self.account.quota)
        if limit is None:
            self.send(b'* QUOTA "" ()')
        else:  # RFC 2087: units of 1024 octets
            self.send(b'* QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))

    # ------------------------------------------------------------------ selected
    async def refresh(self, expunges: bool) -> None:
        """Tell the client what changed in the selected folder (module docstring)."""
        sel = self.sel
        if sel is None:
            return
        msgs = await self.blocking(sel.view.sync_if_changed)
        if self.sel is not sel or self._gone or msgs is None:
            return  # unchanged since this session last looked
        now = {m.uid: m for m in msgs}
        for uid in sel.uids:
            if uid not in now:
                sel.gone.add(uid)
        if expunges and sel.gone:
            for uid in sorted(sel.gone, key=sel.seq_of, reverse=True):
                self.send(b"* %d EXPUNGE" % sel.seq_of(uid))
                sel.uids.remove(uid)
                sel.msgs.pop(uid, None)
                sel.recent.discard(uid)
            sel.gone.clear()
        for uid in sel.uids:
            m = now.get(uid)
            old = sel.msgs.get(uid)
            if m is not None and old is not None and m.flags != old.flags:
                old.flags, old.sub, old.name = m.flags, m.sub, m.name
                self.send(b"* %d FETCH (FLAGS (%s))" % (sel.seq_of(uid), self._flags(uid)))
            elif m is not None and old is not None:
                old.sub, old.name = m.sub, m.name
        known = set(sel.uids)
        fresh = [m for m in msgs if m.uid not in known and m.uid > (sel.uids[-1] if sel.uids
                                                                    else 0)]
        if fresh:
            if not sel.readonly:
                await self.blocking(sel.view.claim_recent, fresh)
                sel.recent.update(m.uid for m in fresh if m.recent)
            for m in fresh:
                sel.uids.append(m.uid)
                sel.msgs[m.uid] = m
            self.send(b"* %d EXISTS" % len(sel.uids))
            self.send(b"* %d RECENT" % len(sel.recent))

    def _flags(self, uid: int) -> bytes:
        sel = self.sel
        assert sel is not None
        flags = sorted(sel.msgs[uid].flags)
        if uid in sel.recent:
            flags.append("\\Recent")
        return " ".join(flags).encode("utf-8")

    def _targets(self, spec: Any, uid: bool) -> list[int]:
        """UIDs named by a sequence set (``uid``: a UID set), in sequence order."""
        sel = self.sel
        assert sel is not None
        if not isinstance(spec, str):
            raise BadSyntax("missing sequence set")
        if uid:
            largest = sel.uids[-1] if sel.uids else 0
            if spec.endswith("*") and not sel.uids:
                return []
            wanted = set(parse_seqset(spec, max(largest, 1)))
            if "*" in spec and sel.uids:
                wanted.add(largest)
            return [u for u in sel.uids if u in wanted]
        if not sel.uids:
            raise BadSyntax("no messages")
        numbers = parse_seqset(spec, len(sel.uids))
        if numbers[-1] > len(sel.uids):
            raise BadSyntax("no such message")
        return [sel.uids[n - 1] for n in numbers]

    async def do_CHECK(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "CHECK completed")
    do_CHECK.states = ("selected",)  # type: ignore[attr-defined]

    async def do_CLOSE(self, tag: bytes, args: list) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if not sel.readonly:
            msgs = await self.blocking(sel.view.sync)
            doomed = [m for m in msgs if "\\Deleted" in m.flags]
            await self.blocking(sel.view.expunge, doomed)
        self.sel, self.state = None, "auth"
        self.tagged(tag, "OK", "CLOSE completed")
    do_CLOSE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_UNSELECT(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.sel, self.state = None, "auth"
        self.tagged(tag, "OK", "UNSELECT completed")
    do_UNSELECT.states = ("selected",)  # type: ignore[attr-defined]

    async def do_EXPUNGE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        await self.refresh(expunges=True)
        targets = self._targets(args[0], True) if uid else sel.uids
        doomed = [sel.msgs[u] for u in targets if "\\Deleted" in sel.msgs[u].flags]
        await self.blocking(sel.view.expunge, doomed)
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "EXPUNGE completed")
    do_EXPUNGE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        await self.refresh(expunges=uid)
        if args and str(args[0]).upper() == "CHARSET":
            charset = _text(args[1]).upper() if len(args) > 1 else ""
            if charset not in ("UTF-8", "US-ASCII"):
                raise Refuse("charset not supported", "BADCHARSET (UTF-8 US-ASCII)")
            args = args[2:]
        query = fetchmod.compile_search(args)
        found = await self.blocking(fetchmod.search, sel, query, list(sel.uids))
        numbers = found if uid else [sel.seq_of(u) for u in found]
        self.send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers))
        self.tagged(tag, "OK", "SEARCH completed")
    do_SEARCH.states = ("selected",)  # type: ignore[attr-defined]

    async def do_FETCH(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if len(args) != 2:
            raise BadSyntax("FETCH sequence-set items")
        await self.refresh(expunges=uid)
        items = fetchmod.compile_fetch(args[1], uid)
        targets = self._targets(args[0], uid)
        sets_seen = fetchmod.sets_seen(items) and not sel.readonly
        batch = 50
        for i in range(0, len(targets), batch):
            chunk = [sel.msgs[u] for u in targets[i:i + batch]]
            blobs = await self.blocking(fetchmod.fetch_many, sel.view, chunk, items, sets_seen)
            if self.sel is not sel or self._gone:
                return
            for msg, blob in zip(chunk, blobs, strict=True):
                if blob is None:
                    continue  # gone meanwhile: reported as EXPUNGE at a later command
                seq = sel.seq_of(msg.uid)
                recent = msg.uid in sel.recent
                blob = blob.replace(b"\x00RECENT\x00", b" \\Recent" if recent else b"")
                blob = blob.replace(b"\x00RECENT0\x00", b"\\Recent" if recent else b"")
                self.transport.write(b"* %d FETCH (" % seq + blob + b")\r\n")
        self.tagged(tag, "OK", "FETCH completed")
    do_FETCH.states = ("selected",)  # type: ignore[attr-defined]

    async def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if len(args) != 3:
            raise BadSyntax("STORE sequence-set item flags")
        if sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        await self.refresh(expunges=uid)
        item = str(args[1]).upper()
        mode, _, silent = item.partition(".")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS") or silent not in ("", "SILENT"):
            raise BadSyntax("STORE item must be FLAGS, +FLAGS or -FLAGS[.SILENT]")
        flags = args[2] if isinstance(args[2], list) else [args[2]]
        flags = [str(f) for f in flags]
        if any(not isinstance(f, str) or not f for f in flags):
            raise BadSyntax("bad flag")
        targets = [sel.msgs[u] for u in self._targets(args[0], uid)]
        await self.blocking(fetchmod.store_flags, sel.view, targets, mode, flags)
        for msg in targets:
            if silent:
                continue
            extra = b" UID %d" % msg.uid if uid else b""
            self.send(b"* %d FETCH (FLAGS (%s)%s)" % (sel.seq_of(msg.uid), self._flags(msg.uid),
                                                      extra))
        self.tagged(tag, "OK", "STORE completed")
    do_STORE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_COPY(self, tag: bytes, args: list, uid: bool = False, move: bool = False  # noqa: N802
                      ) -> None:
        sel = self.sel
        assert sel is not None
        if len(args) != 2:
            raise BadSyntax("COPY sequence-set mailbox")
        if move and sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        await self.refresh(expunges=uid or move)
        name = self._name(args[1])
        if not await self.blocking(self.account.exists, name):
            raise Refuse(f"no folder {name}", "TRYCREATE")
        targets = [sel.msgs[u] for u in self._targets(args[0], uid)]
        used, limit = await self.blocking(self.account.quota)
        size = sum(await self.blocking(lambda: [sel.view.size(m) for m in targets]))
        if limit is not None and used + size > limit:
            raise Refuse("over quota", "OVERQUOTA")
        dest = await self.blocking(self.account.open_folder, name)
        pairs = await self.blocking(sel.view.copy_to, targets, dest)
        code = ""
        if pairs:
            code = (f"COPYUID {dest.uidvalidity} {format_seqset([a for a, _ in pairs])} "
                    f"{format_seqset([b for _, b in pairs])}")
        if move:
            if code:
                self.send(b"* OK [" + code.encode() + b"] moved")
            await self.blocking(sel.view.expunge, [sel.msgs[a] for a, _ in pairs])
            await self.refresh(expunges=True)
            self.tagged(tag, "OK", "MOVE completed")
            return
        self.tagged(tag, "OK", "COPY completed", code)
    do_COPY.states = ("selected",)  # type: ignore[attr-defined]

    async def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        await self.do_COPY(tag, args, uid, move=True)
    do_MOVE.states = ("selected",)  # type: ignore[attr-defined]


class _Refused(Exception):
    pass


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


def _pattern(pattern: str) -> Any:
    """A LIST pattern (``*`` any, ``%`` any but the separator) as a regular expression."""
    import re

    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(r"[^.]*")
        else:
            out.append(re.escape(ch))
    text = "".join(out)
    if pattern.upper().startswith("INBOX"):
        return re.compile(r"(?i:INBOX)" + text[5:] + r"\Z")
    return re.compile(text + r"\Z")

