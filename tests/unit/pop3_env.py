"""Shared set-up for the POP3 unit tests: config, fakes, a factory on a task.Clock, and a
StringTransport that records STLS (startTLS) and what was written before it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from pop3coexist.config import Config, DomainsConfig, Pop3Config, ServerConfig
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.pop3.factory import POP3ServerFactory
from tests.support.dialogue import take
from tests.support.fakes import FakeChecker, FakeMailStore, crlf_size, sync_run_blocking

HOST = "pop.contoso.test"
TED = "ted@pop.contoso.test"
TED_PW = "ted secret 1"
AMY = "amy@pop.contoso.test"
AMY_PW = "amy-pw"
TLS_OPTIONS = object()  # stands in for a CertificateOptions; StringTransport never uses it

MSG1 = b"From: a@example.test\nSubject: one\n\nline 1\n.dotted\nline 3\n"
MSG2 = b"Subject: two\r\n\r\nbody\r\n"


class TLSTransport(StringTransport):
    """Records a startTLS call: the options given and the bytes written before it."""

    tls_options: Any = None
    written_before_tls: bytes | None = None

    def startTLS(self, options: Any) -> None:  # noqa: N802
        self.tls_options = options
        self.written_before_tls = self.value()


def make_config(require_secure_auth: bool = False, idle_timeout: float = 600.0,
                sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")) -> Config:
    return Config(
        server=ServerConfig(HOST, Path("/nonexistent/state")),
        pop3=Pop3Config(require_secure_auth=require_secure_auth, idle_timeout=idle_timeout,
                        auth_failure_delay=2.0, auth_failure_delay_max=30.0,
                        sasl_mechanisms=sasl_mechanisms),
        domains=DomainsConfig(local=(HOST,)),
    )


class Env:
    """A factory over fakes on a Clock; ``connect()`` gives (protocol, transport) greeted."""

    def __init__(self, *, secrets: bool = True, tls: bool = False, implicit_tls: bool = False,
                 require_secure_auth: bool = False, limiter: ConnectionLimiter | None = None,
                 idle_timeout: float = 600.0, chunk_size: int | None = None,
                 sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")) -> None:
        self.clock = task.Clock()
        self.store = FakeMailStore()
        self.store.add(TED, MSG1, MSG2)
        self.store.add(AMY)
        self.checker = FakeChecker({TED: TED_PW, AMY: AMY_PW}, local_domains=(HOST,),
                                   offers_secrets=secrets)
        self.throttle = AuthThrottle(self.clock, base=2.0, maximum=30.0)
        self.factory = POP3ServerFactory(
            make_config(require_secure_auth, idle_timeout, sasl_mechanisms), self.store, self.checker,
            tls_options=TLS_OPTIONS if (tls or implicit_tls) else None,
            implicit_tls=implicit_tls, reactor=self.clock, run_blocking=sync_run_blocking,
            throttle=self.throttle, limiter=limiter,
        )
        if chunk_size is not None:
            self.factory.chunk_size = chunk_size

    def connect(self, peer: str = "192.0.2.10") -> tuple[Any, TLSTransport, bytes]:
        proto = self.factory.buildProtocol(None)
        transport = TLSTransport(peerAddress=IPv4Address("TCP", peer, 40000),
                                 hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
        proto.makeConnection(transport)
        return proto, transport, take(transport)

    def login(self, peer: str = "192.0.2.10") -> tuple[Any, TLSTransport]:
        proto, transport, _ = self.connect(peer)
        proto.dataReceived(f"USER {TED}\r\nPASS {TED_PW}\r\n".encode())
        assert take(transport).endswith(b"messages (%d octets)\r\n" % self.total(TED))
        return proto, transport

    def total(self, address: str) -> int:
        return sum(crlf_size(m) for m in self.store.messages(address))


def timestamp(greeting: bytes) -> bytes:
    m = re.search(rb"(<[^>]*>)\r\n$", greeting)
    assert m, greeting
    return m.group(1)


def apop_digest(magic: bytes, secret: str) -> bytes:
    return hashlib.md5(magic + secret.encode()).hexdigest().encode()
