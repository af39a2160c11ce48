"""The ManageSieve server (RFC 5804): users list, upload, check, activate, rename and delete
their Sieve scripts from a mail client (Thunderbird's Sieve add-on, Roundcube, sieve-connect).

``ManageSieveFactory`` holds what every session shares: the config, the checker (the same
``IAccountChecker`` as POP3), the store (mailboxes, locks), the script store
(``ISieveScripts``), POP3's failed-log-in throttle (``IAuthThrottle``), TLS options and the
``run_blocking`` that moves store calls off the reactor. ``ManageSieveProtocol`` is one
session; it holds no policy: scripts are validated by ``policy.sieve.parse`` (the parser
the rules stage runs), quotas come from ``[managesieve]``.

Protocol notes (RFC 5804):

- the greeting and the answer to CAPABILITY list IMPLEMENTATION, SIEVE (the extensions of
  ``policy.sieve.EXTENSIONS``), SASL (PLAIN and LOGIN; empty before STARTTLS when
  ``require_tls``), STARTTLS (before TLS, with [tls]), MAXREDIRECTS, VERSION "1.0"; after
  STARTTLS the server sends them again without being asked (section 2.2);
- strings are quoted (``\\"`` and ``\\\\`` escapes) or literals ``{N+}`` / ``{N}`` followed by
  CRLF and N octets; the server never waits for a continuation;
- AUTHENTICATE "PLAIN" / "LOGIN" with or without an initial response; a challenge is a
  quoted base64 string, the client's answer a string or ``"*"`` to cancel (section 2.1);
- PUTSCRIPT and CHECKSCRIPT answer ``NO "line N: ..."`` for a script that does not parse;
  HAVESPACE and PUTSCRIPT answer ``NO (QUOTA/MAXSIZE)`` or ``NO (QUOTA/MAXSCRIPTS)``;
  unknown or active scripts get ``NO (NONEXISTENT)``, ``NO (ALREADYEXISTS)``, ``NO (ACTIVE)``;
- every password check passes POP3's log-in gate (``policy.throttle.LoginGate``: a source with
  failures is checked once per delay, unknown sources share limited places); a failed log-in
  waits POP3's throttle delay before its NO (per source address); a locked mailbox or domain,
  or an account with no mailbox here, cannot log in;
- an idle session is closed (``idle_timeout``) with ``BYE``; past ``max_connections`` (or
  ``max_connections_per_client`` from one address) a new session gets ``BYE`` at once.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from pop3coexist.errors import AuthUnavailable, NoSuchMailbox
from pop3coexist.identity.credentials import PasswordCredentials
from pop3coexist.identity.logins import login_locked
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.sieve import EXTENSIONS, SieveSyntaxError, parse
from pop3coexist.policy.throttle import LoginGate
from pop3coexist.store.sievestore import BadScriptName, ScriptError, check_name

log = Logger(namespace="pop3coexist.managesieve")

MAX_LINE = 8192
IMPLEMENTATION = "pop3coexist"


class ProtocolError(ValueError):
    """A command line the server cannot read: answered NO, the session goes on."""


def quote(text: str) -> str:
    """A quoted string (RFC 5804 section 4), or a literal when it cannot be quoted."""
    if any(c in text for c in "\r\n\0") or len(text) > 1024:
        data = text.encode("utf-8")
        return f"{{{len(data)}}}\r\n{text}"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_TOKEN = re.compile(rb'\s*(?:"((?:[^"\\\r\n]|\\.)*)"|\{(\d+)\+?\}$|([^\s"{}()]+))')


def _tokens(line: bytes) -> tuple[list[str], int | None]:
    """The strings and atoms of one line, and the size of a literal that ends it (or None)."""
    out: list[str] = []
    pos = 0
    line = line.rstrip(b" ")
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            raise ProtocolError("cannot read the command line")
        pos = m.end()
        if m.group(1) is not None:
            raw = re.sub(rb"\\(.)", rb"\1", m.group(1))
            out.append(_utf8(raw))
        elif m.group(2) is not None:
            return out, int(m.group(2))
        else:
            out.append(_utf8(m.group(3)))
    return out, None


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("strings are UTF-8 (RFC 5804 section 1.6)") from None


class ManageSieveProtocol(LineReceiver, TimeoutMixin):
    """One ManageSieve session (see the module docstring)."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: ManageSieveFactory) -> None:
        self.factory = factory
        self.callLater = factory.reactor.callLater  # TimeoutMixin's clock: the factory's
        self.user: tuple[str, str] | None = None  # (domain, mailbox) once logged in
        self.address = ""
        self.secure = False
        self._args: list[str] = []
        self._literal_left = 0
        self._literal = bytearray()
        self._sasl: tuple[str, list[str]] | None = None  # (mechanism, answers so far)
        self._busy = False
        self._queued: list[bytes] = []
        self._gone = False
        self._acquired = False  # counted by the factory's connection limiter
        self._gone_early = False

    # ------------------------------------------------------------------ connection
    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        if not self.factory.limiter.acquire(self.peer):
            log.warn("ManageSieve connection from {peer} refused: too many connections",
                     peer=self.peer)
            self._gone_early = True
            self.send('BYE "too many connections, try again later"')
            self.transport.loseConnection()
            return
        self._acquired = True
        self.setTimeout(self.factory.config.managesieve.idle_timeout)
        self.send_capabilities()
        self.ok(f"{IMPLEMENTATION} ManageSieve ready")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        self._gone = True
        self.setTimeout(None)
        if self._acquired:
            self._acquired = False
            self.factory.limiter.release(self.peer)

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.send('BYE "idle for too long"')
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.send('BYE "line too long"')
        self.transport.loseConnection()

    # ------------------------------------------------------------------ replies
    def send(self, text: str) -> None:
        if not self._gone:
            self.transport.write(text.encode("utf-8") + b"\r\n")

    def ok(self, text: str, code: str = "") -> None:
        self.send("OK " + (f"({code}) " if code else "") + quote(text))

    def no(self, text: str, code: str = "") -> None:
        self.send("NO " + (f"({code}) " if code else "") + quote(text))

    def capabilities(self) -> list[tuple[str, str | None]]:
        cfg = self.factory.config
        sasl = "" if (cfg.managesieve.require_tls and not self.secure) else "PLAIN LOGIN"
        caps: list[tuple[str, str | None]] = [
            ("IMPLEMENTATION", IMPLEMENTATION),
            ("SIEVE", " ".join(EXTENSIONS)),
            ("SASL", sasl),
        ]
        if self.factory.tls_options is not None and not self.secure:
            caps.append(("STARTTLS", None))
        caps += [("MAXREDIRECTS", str(cfg.sieve.max_redirects)), ("VERSION", "1.0")]
        if self.user is not None:
            caps.append(("OWNER", self.address))
        return caps

    def send_capabilities(self) -> None:
        for name, value in self.capabilities():
            self.send(quote(name) + ("" if value is None else " " + quote(value)))

    # ------------------------------------------------------------------ reading
    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._gone_early:
            return
        self.resetTimeout()
        if self._busy:  # one command at a time: pipelined lines wait their turn
            self._queued.append(line)
            return
        try:
            args, literal = _tokens(line)
        except ProtocolError as e:
            self._args = []
            self.no(str(e))
            return
        self._args += args
        if literal is not None:
            if literal > self.factory.max_literal:
                self._args = []
                self.send('BYE "literal too large"')
                self.transport.loseConnection()
                return
            self._literal_left = literal
            self._literal = bytearray()
            if literal == 0:
                self._args.append("")
                return
            self.setRawMode()
            return
        args, self._args = self._args, []
        self.dispatch(args)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.resetTimeout()
        take = data[: self._literal_left]
        self._literal += take
        self._literal_left -= len(take)
        if self._literal_left:
            return
        try:
            self._args.append(bytes(self._literal).decode("utf-8"))
        except UnicodeDecodeError:
            self._args.append("\ufffd")  # a script that is not UTF-8 fails to parse
        self._literal = bytearray()
        self.setLineMode(data[len(take):])

    def dispatch(self, args: list[str]) -> None:
        if self._sasl is not None:
            self.sasl_answer(args)
            return
        if not args:
            self.no("empty command")
            return
        name, rest = args[0].upper(), args[1:]
        handler = getattr(self, "do_" + name, None) if name.isalpha() else None
        if handler is None:
            self.no(f"unknown command {name[:20]}")
            return
        if name not in ("CAPABILITY", "LOGOUT", "NOOP", "STARTTLS", "AUTHENTICATE") and \
                self.user is None:
            self.no("log in first (AUTHENTICATE)")
            return
        try:
            d = handler(*rest)
        except TypeError:
            self.no(f"wrong number of arguments for {name}")
            return
        if isinstance(d, defer.Deferred):
            self._busy = True
            d.addErrback(self._failed, name)
            d.addBoth(self._done)

    def _failed(self, failure: Failure, name: str) -> None:
        if failure.check(ScriptError):
            self.no(str(failure.value), failure.value.code)
            return
        log.failure("ManageSieve {cmd} for {user} failed", failure, cmd=name, user=self.address)
        self.no("temporary server failure, try again later", "TRYLATER")

    def _done(self, _: Any) -> None:
        self._busy = False
        while self._queued and not self._busy and not self._gone and self.line_mode:
            self.lineReceived(self._queued.pop(0))

    def blocking(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return self.factory.run_blocking(f, *args)

    # ------------------------------------------------------------------ any state
    def do_CAPABILITY(self) -> None:  # noqa: N802 (RFC 5804's name)
        self.send_capabilities()
        self.ok("Capability completed")

    def do_NOOP(self, tag: str | None = None) -> None:  # noqa: N802
        if tag is not None:
            self.ok("Done", "TAG " + quote(tag))
        else:
            self.ok("Done")

    def do_LOGOUT(self) -> None:  # noqa: N802
        self.ok("Logout completed")
        self.transport.loseConnection()

    def do_STARTTLS(self) -> None:  # noqa: N802
        if self.factory.tls_options is None or self.secure:
            self.no("STARTTLS is not available now")
            return
        if self._queued or self.line_mode is False:
            self.no("nothing may follow STARTTLS before the handshake")
            return
        self.ok("Begin TLS negotiation now")
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True
        self.clearLineBuffer()  # RFC 5804 2.2: nothing sent before the handshake counts
        self.send_capabilities()
        self.ok("TLS negotiation successful")

    # ------------------------------------------------------------------ log-in
    def do_AUTHENTICATE(self, mechanism: str, initial: str | None = None) -> None:  # noqa: N802
        if self.user is not None:
            self.no("already logged in")
            return
        mech = mechanism.upper()
        if mech not in ("PLAIN", "LOGIN"):
            self.no(f"mechanism {mech[:20]} is not offered")
            return
        if self.factory.config.managesieve.require_tls and not self.secure:
            self.no("use STARTTLS first: no clear-text password on this connection",
                    "ENCRYPT-NEEDED")
            return
        self._sasl = (mech, [])
        if initial is not None:
            self.sasl_answer([initial])
        elif mech == "PLAIN":
            self.send('""')
        else:
            self.send(quote(base64.b64encode(b"Username:").decode()))

    def sasl_answer(self, args: list[str]) -> None:
        assert self._sasl is not None
        mech, answers = self._sasl
        if len(args) != 1 or args[0] == "*":
            self._sasl = None
            self.no("authentication cancelled")
            return
        try:
            raw = base64.b64decode(args[0].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            self._sasl = None
            self.no("the SASL answer is not base64")
            return
        answers.append(raw.decode("utf-8", "replace"))
        if mech == "LOGIN" and len(answers) == 1:
            self.send(quote(base64.b64encode(b"Password:").decode()))
            return
        self._sasl = None
        if mech == "PLAIN":
            parts = answers[0].split("\0")
            if len(parts) != 3:
                self.no("malformed PLAIN answer (RFC 4616)")
                return
            authzid, user, password = parts
            if authzid and authzid.lower() != user.lower():
                user, password = user, "\0refused-authzid\0"  # no proxy log-ins
        else:
            user, password = answers[0], answers[1]
        self._busy = True
        d = defer.ensureDeferred(self.login(user, password, mech))
        d.addBoth(self._done)

    async def login(self, user: str, password: str, mech: str) -> None:
        """Check the credentials through the log-in gate (policy.throttle.LoginGate: the
        source's failure delay first, then a place among the process's checks, as for POP3,
        IMAP and SMTP AUTH); a locked or absent mailbox cannot log in."""
        f = self.factory
        creds = PasswordCredentials(user, password)
        release = await f.gate.enter(self.peer)
        try:
            avatar = await defer.maybeDeferred(f.checker.requestAvatarId, creds)
            if isinstance(avatar, bytes):
                avatar = avatar.decode("ascii")
            address = str(avatar).lower()
            box, _, domain = address.rpartition("@")
            usable = await self.blocking(_usable, f.store, domain, box)
            if not usable:
                raise _Refused()
        except AuthUnavailable:
            release()
            log.info("ManageSieve log-in {user} from {peer} by {mech}: temporary failure",
                     user=_printable(user), peer=self.peer, mech=mech)
            self.no("the accounts cannot be read now, try again later", "TRYLATER")
            return
        except Exception as e:
            release()  # the check has its outcome: the place is not held through the delay
            if not isinstance(e, _Refused):
                log.info("ManageSieve log-in {user}: {why}", user=_printable(user),
                         why=type(e).__name__)
            delay = f.throttle.failure_delay(self.peer)
            log.info("ManageSieve log-in {user} from {peer} by {mech}: refused",
                     user=_printable(user), peer=self.peer, mech=mech)
            if delay > 0:
                await task.deferLater(f.reactor, delay, lambda: None)
            self.no("Authentication failed")
            return
        release()
        f.throttle.success(self.peer)
        self.user, self.address = (domain, box), address
        log.info("ManageSieve log-in {address} from {peer} by {mech}: success",
                 address=address, peer=self.peer, mech=mech)
        self.ok("Logged in")

    # ------------------------------------------------------------------ scripts
    def _space_error(self, name: str, size: int, scripts: list) -> tuple[str, str] | None:
        cfg = self.factory.config.managesieve
        if size > cfg.max_script_size:
            return "QUOTA/MAXSIZE", f"a script may have {cfg.max_script_size} octets at most"
        names = {n for n, _, _ in scripts}
        if name not in names and len(names) >= cfg.max_scripts:
            return "QUOTA/MAXSCRIPTS", f"{cfg.max_scripts} scripts at most"
        return None

    def do_HAVESPACE(self, name: str, size: str) -> defer.Deferred | None:  # noqa: N802
        if not (size.isascii() and size.isdigit()):
            self.no("HAVESPACE needs a number of octets")
            return None
        try:
            name = check_name(name)
        except BadScriptName as e:
            self.no(str(e))
            return None

        async def run() -> None:
            scripts = await self.blocking(self.factory.scripts.list_scripts, *self.user)
            err = self._space_error(name, int(size), scripts)
            if err:
                self.no(err[1], err[0])
            else:
                self.ok("Putscript would succeed")

        return defer.ensureDeferred(run())

    def do_PUTSCRIPT(self, name: str, text: str) -> defer.Deferred | None:  # noqa: N802
        try:
            name = check_name(name)
        except BadScriptName as e:
            self.no(str(e))
            return None

        async def run() -> None:
            scripts = self.factory.scripts
            listed = await self.blocking(scripts.list_scripts, *self.user)
            err = self._space_error(name, len(text.encode("utf-8")), listed)
            if err:
                self.no(err[1], err[0])
                return
            problem = await self.blocking(_check, text)
            if problem:
                self.no(problem)
                return
            await self.blocking(scripts.put_script, *self.user, name, text)
            log.info("ManageSieve {user}: PUTSCRIPT \"{name}\" ({n} octets)", user=self.address,
                     name=name, n=len(text.encode("utf-8")))
            self.ok("Script stored")

        return defer.ensureDeferred(run())

    def do_CHECKSCRIPT(self, text: str) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            problem = await self.blocking(_check, text)
            if problem:
                self.no(problem)
            else:
                self.ok("Script is valid")

        return defer.ensureDeferred(run())

    def do_LISTSCRIPTS(self) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            for name, active, _ in await self.blocking(self.factory.scripts.list_scripts,
                                                       *self.user):
                self.send(quote(name) + (" ACTIVE" if active else ""))
            self.ok("Listscripts completed")

        return defer.ensureDeferred(run())

    def do_GETSCRIPT(self, name: str) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            text = await self.blocking(self.factory.scripts.get_script, *self.user, name)
            data = text.encode("utf-8")
            if not self._gone:
                self.transport.write(b"{%d}\r\n" % len(data) + data + b"\r\n")
            self.ok("Getscript completed")

        return defer.ensureDeferred(run())

    def do_SETACTIVE(self, name: str) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            scripts = self.factory.scripts
            if name:  # a stored script that no longer parses is not activated
                text = await self.blocking(scripts.get_script, *self.user, name)
                problem = await self.blocking(_check, text)
                if problem:
                    self.no(f"the script does not parse: {problem}")
                    return
            await self.blocking(scripts.set_active, *self.user, name)
            log.info("ManageSieve {user}: SETACTIVE \"{name}\"", user=self.address, name=name)
            self.ok("Setactive completed" if name else "No script is active now")

        return defer.ensureDeferred(run())

    def do_DELETESCRIPT(self, name: str) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            await self.blocking(self.factory.scripts.delete_script, *self.user, name)
            log.info("ManageSieve {user}: DELETESCRIPT \"{name}\"", user=self.address, name=name)
            self.ok("Deletescript completed")

        return defer.ensureDeferred(run())

    def do_RENAMESCRIPT(self, old: str, new: str) -> defer.Deferred:  # noqa: N802
        async def run() -> None:
            await self.blocking(self.factory.scripts.rename_script, *self.user, old, new)
            self.ok("Renamescript completed")

        return defer.ensureDeferred(run())

    def do_UNAUTHENTICATE(self) -> None:  # noqa: N802 (RFC 5804 section 2.14.1)
        self.user, self.address = None, ""
        self.ok("Unauthenticate completed")


class _Refused(Exception):
    pass


def _usable(store: Any, domain: str, box: str) -> bool:
    """Blocking: the account has a mailbox here and its log-in is not locked."""
    try:
        if not store.mailbox_exists(domain, box):
            return False
    except (NoSuchMailbox, ValueError):
        return False
    return not login_locked(store, f"{box}@{domain}")


def _check(text: str) -> str | None:
    """Blocking (parsing a large script takes a while): None or ``"line N: ..."``."""
    try:
        parse(text)
    except SieveSyntaxError as e:
        return str(e)
    return None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:100]


class ManageSieveFactory(protocol.ServerFactory):
    """See the module docstring. ``throttle``: POP3's ``IAuthThrottle`` (shared)."""

    def __init__(self, config: Any, store: Any, checker: Any, scripts: Any, throttle: Any,
                 tls_options: Any = None, reactor: Any = None,
                 run_blocking: Callable[..., defer.Deferred] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.store = store
        self.checker = checker
        self.scripts = scripts
        self.throttle = throttle
        self.gate = LoginGate.for_throttle(throttle, reactor)  # every password check waits its turn here
        self.tls_options = tls_options
        self.reactor = reactor
        if run_blocking is None:

            def run_blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self.run_blocking = run_blocking
        self.max_literal = config.managesieve.max_script_size + 4096
        m = config.managesieve
        self.limiter = ConnectionLimiter(m.max_connections, m.max_connections_per_client)

    def buildProtocol(self, addr: Any) -> ManageSieveProtocol:  # noqa: N802 (Twisted's name)
        p = ManageSieveProtocol(self)
        p.factory = self
        return p
