"""Real peers for the outbound tests: an aiosmtpd smart host (STARTTLS, AUTH PLAIN / LOGIN /
CRAM-MD5, per-recipient replies) in a background thread, Postfix's smtp-sink as a fault
injector, and a runner that starts the OutboundService in a subprocess.

Everything listens on OS-picked loopback ports. Nothing sleeps to wait for a result: callers
poll with ``wait_until`` and a deadline.

Run ``python -m tests.support.smarthost outbound CONFIG LOG`` to run only the delivery runner
of a config (used by the integration tests, which kill it with SIGKILL on purpose).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# --------------------------------------------------------------------------- aiosmtpd


@dataclass
class Received:
    """One message the smart host accepted. ``peer``: the address the client connected from
    (what an SPF check of the envelope sender tests, RFC 7208 section 4.1 <ip>); ``helo``: the
    name it gave in EHLO / HELO (<helo>)."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    content: bytes
    tls: bool
    login: str | None
    peer: str | None = None
    helo: str | None = None


@dataclass
class SmartHost:
    """An aiosmtpd server in its own thread and event loop.

    ``users``: log-in -> password (AUTH offered after STARTTLS only, as aiosmtpd defaults;
    ``auth_require_tls=False`` offers it in clear text too, as an Exchange 2003 smart host
    without a certificate does); ``mechanisms``: which of PLAIN, LOGIN, CRAM-MD5 to offer;
    ``rcpt_replies``: address -> reply line for RCPT (default 250); ``port``: bind this port
    (0: the OS picks); ``dsn``: advertise DSN (RFC 3461) and take RET/ENVID on MAIL and
    NOTIFY/ORCPT on RCPT (recorded in ``mail_options`` / ``rcpt_options``); without it those
    parameters get aiosmtpd's 555. ``address``: the loopback address to bind (127.0.0.x: MX
    hosts of a test DNS zone need distinct addresses).
    """

    cert: Path | None = None
    key: Path | None = None
    users: dict[str, str] = field(default_factory=dict)
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    port: int = 0
    hostname: str = "smarthost.test"
    auth_require_tls: bool = True
    dsn: bool = False
    address: str = "127.0.0.1"
    gate: threading.Event | None = None  # RCPT waits (in a thread) until it is set
    received: list[Received] = field(default_factory=list)
    commands: list[tuple[str, bool]] = field(default_factory=list)  # (verb, inside TLS)
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)  # (mechanism, success)

    def start(self) -> SmartHost:
        from aiosmtpd.smtp import SMTP

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        tls_context = None
        if self.cert is not None:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(str(self.cert), str(self.key))
        handler = _DsnHandler(self) if self.dsn else _Handler(self)
        smtp_class = _dsn_smtp_class() if self.dsn else SMTP
        excluded = [m for m in ("PLAIN", "LOGIN", "CRAM-MD5") if m not in self.mechanisms]
        if not self.users:
            excluded = ["PLAIN", "LOGIN", "CRAM-MD5"]

        def factory() -> SMTP:
            return smtp_class(
                handler,
                hostname=self.hostname,
                tls_context=tls_context,
                require_starttls=False,
                auth_require_tls=self.auth_require_tls,
                auth_exclude_mechanism=excluded,
                authenticator=handler.authenticate,
                loop=self._loop,
            )

        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                self._loop.create_server(factory, sock=sock)
            )
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="aiosmtpd", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if getattr(self, "_loop", None) is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def hop(self) -> str:
        return f"[{self.address}]:{self.port}"

    def wait_for(self, n: int, timeout: float = 20.0) -> list[Received]:
        wait_until(lambda: len(self.received) >= n, timeout, f"{n} messages at the smart host")
        return self.received


class _Handler:
    def __init__(self, host: SmartHost) -> None:
        self.host = host

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult

        if mechanism == "CRAM-MD5":
            ok = auth_data is not None
            self.host.auth_attempts.append((mechanism, ok))
            return AuthResult(success=ok, handled=False, auth_data=auth_data)
        login = auth_data.login.decode()
        ok = self.host.users.get(login) == auth_data.password.decode()
        self.host.auth_attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> Any:
        from aiosmtpd.smtp import AuthResult

        challenge = f"<{secrets.token_hex(8)}@{self.host.hostname}>".encode()
        answer = await server.challenge_auth(challenge)
        if not isinstance(answer, bytes) or b" " not in answer:
            self.host.auth_attempts.append(("CRAM-MD5", False))
            return AuthResult(success=False, handled=False)
        user, _, digest = answer.partition(b" ")
        secret = self.host.users.get(user.decode(), "")
        expected = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest().encode()
        ok = bool(secret) and hmac.compare_digest(expected, digest)
        self.host.auth_attempts.append(("CRAM-MD5", ok))
        return AuthResult(success=ok, handled=False, auth_data=user.decode() if ok else None)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.host.commands.append(("MAIL", session.ssl is not None))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.host.commands.append(("RCPT", session.ssl is not None))
        if self.host.gate is not None and not self.host.gate.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self.host.gate.wait)
        reply = self.host.rcpt_replies.get(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.host.commands.append(("DATA", session.ssl is not None))
        login = session.auth_data if isinstance(session.auth_data, str) else None
        self.host.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), list(envelope.mail_options),
                     list(envelope.rcpt_options), envelope.original_content or envelope.content,
                     session.ssl is not None, login,
                     session.peer[0] if session.peer else None, session.host_name)
        )
        return "250 2.0.0 OK queued"


class _DsnHandler(_Handler):
    """_Handler that advertises DSN in its EHLO reply (RFC 3461 section 4)."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]


def _dsn_smtp_class() -> type:
    from aiosmtpd.smtp import SMTP

    class DsnSMTP(SMTP):
        """aiosmtpd's SMTP taking the DSN parameters (it refuses every unknown one with 555):
        they are left in the options the handler records."""

        def _getparams(self, params: Any) -> Any:
            result = super()._getparams(params)
            if result is not None:
                for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                    result.pop(key, None)
            return result

    return DsnSMTP


# --------------------------------------------------------------------------- smtp-sink


class SmtpSink:
    """Postfix's smtp-sink on a loopback port with fault options (``-r rcpt`` 4xx at RCPT,
    ``-f rcpt`` 5xx, ``-Q data`` 421 and disconnect, ``-q .`` disconnect, ``-w 5`` slow DATA).
    ``count_dir`` set: one file per transaction is dumped there (``-d``)."""

    def __init__(self, program: str, *options: str, dump_dir: Path | None = None) -> None:
        self.program = program
        self.options = list(options)
        self.dump_dir = dump_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> SmtpSink:
        from tests.support.programs import free_port

        for _ in range(5):
            self.port = free_port()
            args = [self.program, "-c", "-u", _user(), *self.options]
            if self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                args += ["-d", f"{self.dump_dir}/%Y%m%d%H/%M."]
            args += [f"127.0.0.1:{self.port}", "256"]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_until(lambda: _port_open(self.port) or self.proc.poll() is not None, 10,
                           "smtp-sink to listen")
            except AssertionError:
                pass
            if self.proc.poll() is None and _port_open(self.port):
                return self
        err = self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""
        raise RuntimeError(f"smtp-sink did not start: {err}")

    @property
    def hop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def dumped(self) -> list[Path]:
        if self.dump_dir is None:
            return []
        return [p for p in self.dump_dir.rglob("*") if p.is_file()]


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the runner


def write_config(
    directory: Path,
    smarthost: str,
    tls: str = "none",
    ca_file: Path | None = None,
    username: str = "",
    password: str | None = None,
    retry_intervals: tuple[str, ...] = ("1s",),
    extra: str = "",
    command_timeout: str = "30s",
    mx_port: int | None = None,
    max_connections_per_host: int | None = None,
) -> Path:
    """A config whose state lives in ``directory/state``; returns its path. ``mx_port``:
    ``smarthost.mx_port`` (direct delivery's port), left out when None; likewise
    ``max_connections_per_host``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[server]",
        'hostname = "pop.contoso.test"',
        f'state_dir = "{directory}/state"',
        "[smtp]",
        "listen = []",
        "[domains]",
        'local = ["pop.contoso.test"]',
        "[smarthost]",
        f'host = "{smarthost}"',
        f'tls = "{tls}"',
        f'command_timeout = "{command_timeout}"',
        'connect_timeout = "5s"',
    ]
    if mx_port is not None:
        lines.append(f"mx_port = {mx_port}")
    if max_connections_per_host is not None:
        lines.append(f"max_connections_per_host = {max_connections_per_host}")
    if ca_file is not None:
        lines.append(f'ca_file = "{ca_file}"')
    if username:
        pw = directory / "smarthost.secret"
        pw.write_text((password or "") + "\n")
        pw.chmod(0o600)
        lines += [f'username = "{username}"', f'password_file = "{pw}"']
    lines += [
        "[queue]",
        "retry_intervals = [" + ", ".join(f'"{i}"' for i in retry_intervals) + "]",
        'delay_notification = "1h"',
        'expiration = "1d"',
        extra,
    ]
    path = directory / "pop3coexist.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Runner:
    """The OutboundService of a config, in a subprocess (so it can be killed with -9)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.log_path = config_path.parent / "outbound.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Runner:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.smarthost", "outbound", str(self.config_path),
             str(self.log_path)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: "outbound queue started" in self.log() or self.proc.poll() is not None,
                   20, "the runner to start")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def enqueue(queue: Any, rcpts: list[str], body: bytes, sender: str = "a@example.org",
            **kw: Any) -> str:
    """Put one message into a FileQueue the way the ESMTP server does (spool file, fsync)."""
    spool = queue.root.parent / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    src = spool / f"in.{secrets.token_hex(8)}"
    with open(src, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    env = {"sender": sender, "recipients": [{"address": r, "orcpt": None, "notify": kw.pop("notify", None)}
                                            for r in rcpts],
           "ret": None, "envid": None, "received_from": "test", "arrival": time.time(), "hops": 1}
    env.update(kw)
    try:
        return queue.enqueue(src, env)
    finally:
        src.unlink()


def _outbound_main(config_path: str, log_path: str) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from pop3coexist.config import load_config
    from pop3coexist.mailauth.resolver import twisted_resolver
    from pop3coexist.smtp.hops import HopResolver
    from pop3coexist.smtp.outbound import OutboundService
    from pop3coexist.store.queue import FileQueue

    out = open(log_path, "a", buffering=1)  # noqa: SIM115
    globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    config = load_config(config_path)
    queue = FileQueue(config.server.queue_dir, config.server.hostname)
    # the resolvers of [dns], as service.py wires them (a test may point them at DnsServer)
    resolver = HopResolver(twisted_resolver(config.dns, reactor))
    svc = OutboundService(config, queue, reactor=reactor, poll_interval=0.1, resolver=resolver)
    reactor.callWhenRunning(svc.startService)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "outbound":
        _outbound_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m tests.support.smarthost outbound CONFIG LOG")
