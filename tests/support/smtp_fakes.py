"""Test doubles for the ESMTP server tests: an outbound queue, a TLS-capable StringTransport,
a config builder, and a ready-made factory wired to the in-memory fakes.

- ``FakeQueue`` (IOutboundQueue): records ``(message bytes, envelope)`` for each enqueue;
  ``fail`` makes enqueue raise.
- ``TLSStringTransport``: a StringTransport that provides ITLSTransport; ``startTLS`` records
  the call (``tls_started``) so STARTTLS can be tested byte by byte without real TLS.
- ``smtp_config(**smtp_keys)`` / ``make_factory(...)``: a Config with one local domain
  ``pop.contoso.test``, a relay domain ``exchange.northwindtraders.test``, relay network
  192.0.2.0/24, and a factory on ``task.Clock`` with synchronous ``run_blocking``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pop3coexist.config import (
    Config,
    DomainsConfig,
    RelayConfig,
    RemoteDomain,
    ServerConfig,
    SmtpConfig,
)
from pop3coexist.interfaces import IOutboundQueue
from tests.support.fakes import FakeChecker, FakeMailStore, sync_run_blocking

HOST = "pop.contoso.test"
RELAY_DOMAIN = "exchange.northwindtraders.test"


@implementer(IOutboundQueue)
class FakeQueue:
    """See IOutboundQueue. ``items`` holds ``(bytes, envelope)``; ``woken`` counts wake()."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, dict]] = []
        self.fail: BaseException | None = None
        self.woken = 0

    def enqueue(self, source: Any, envelope: dict) -> str:
        if self.fail is not None:
            raise self.fail
        self.items.append((Path(source).read_bytes(), envelope))
        return f"q{len(self.items)}"

    def wake(self) -> None:
        self.woken += 1


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport on which STARTTLS can be started (recorded, not performed)."""

    tls_started = False
    tls_written_before = b""

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:  # noqa: N802
        self.tls_started = True
        self.tls_written_before = self.value()


def smtp_config(tmp: Path | None = None, **smtp: Any) -> Config:
    """A Config for the SMTP tests; keyword arguments override [smtp] keys."""
    state = tmp or Path("/nonexistent/state")
    return Config(
        server=ServerConfig(hostname=HOST, state_dir=state),
        smtp=replace(SmtpConfig(), **smtp),
        domains=DomainsConfig(local=(HOST,), remote=(RemoteDomain(RELAY_DOMAIN, True, None),)),
        relay=RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),), authenticated=True),
    )


def make_factory(config: Config | None = None, store: FakeMailStore | None = None,
                 checker: FakeChecker | None = None, queue: FakeQueue | None = None,
                 tls: bool = True, mode: str = "mx", clock: task.Clock | None = None, **kw: Any):
    """An SMTPServerFactory on the fakes; returns (factory, store, checker, queue, clock)."""
    from pop3coexist.smtp.server import SMTPServerFactory

    config = config or smtp_config()
    if store is None:
        store = FakeMailStore()
        store.add(f"ted@{HOST}")
        store.add(f"ann@{HOST}")
    checker = checker or FakeChecker({f"ted@{HOST}": "secret1", f"ann@{HOST}": "secret2"},
                                     aliases={f"theodore@{HOST}": f"ted@{HOST}"})
    queue = queue or FakeQueue()
    clock = clock or task.Clock()
    factory = SMTPServerFactory(
        config, store, checker, queue, tls_options=object() if tls else None, mode=mode,
        reactor=clock, run_blocking=sync_run_blocking, **kw,
    )
    return factory, store, checker, queue, clock


def open_session(factory: Any, peer: str = "203.0.113.5", tls_capable: bool = True):
    """Build a protocol and connect it to a (TLS-capable) StringTransport; return both."""
    proto = factory.buildProtocol(None)
    cls = TLSStringTransport if tls_capable else StringTransport
    transport = cls(peerAddress=IPv4Address("TCP", peer, 40000),
                    hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    return proto, transport


# --------------------------------------------------------------------------- real server


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def source_env() -> dict[str, str]:
    """The environment for running the server from this checkout (no install needed)."""
    import os

    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = f"{root / 'src'}{os.pathsep}{root}"
    return env


def make_server(root: Path, **kw: Any):
    """A ServerProcess: the installed plugin when there is one, else this checkout's source."""
    from tests.support.server import ServerProcess, plugin_installed

    if plugin_installed():
        return ServerProcess(root, **kw)
    return _SourceServerProcess(root, **kw)


def _source_server_class():
    import sys

    from tests.support.server import ServerProcess

    class SourceServerProcess(ServerProcess):
        """ServerProcess that runs twistd and the admin tool from the checkout (PYTHONPATH)."""

        def env(self) -> dict[str, str]:
            return source_env()

        def admin_command(self) -> list[str]:
            return [sys.executable, "-m", "pop3coexist.admin.cli"]

    return SourceServerProcess


def _SourceServerProcess(root: Path, **kw: Any):  # noqa: N802 (a class factory)
    return _source_server_class()(root, **kw)
