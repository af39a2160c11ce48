"""The POP3 listener factory: what the service wiring creates for each POP3 or POP3S endpoint.

``POP3ServerFactory`` is a ``twisted.internet.protocol.ServerFactory`` building
``server.POP3Server`` sessions. It owns what sessions share: the cred Portal (the account
checker plus ``realm.Pop3Realm`` over the mail store), the TLS options for STLS, the
failed-log-in throttle, the connection limiter, the reactor (clock) and the ``run_blocking``
function that moves blocking store calls off the reactor thread.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer, threads
from twisted.internet.protocol import ServerFactory

from pop3coexist.config import Config
from pop3coexist.interfaces import IAccountChecker, IMailStore
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.throttle import AuthThrottle, LoginGate
from pop3coexist.pop3.realm import Pop3Realm
from pop3coexist.pop3.server import POP3Server
from pop3coexist.pop3.stream import CHUNK_SIZE


class POP3ServerFactory(ServerFactory):
    """Builds POP3 sessions for one listener.

    - ``tls_options``: a ``CertificateOptions`` (``tls.server_options``) for STLS; None means
      STLS is not offered.
    - ``implicit_tls``: the listener is already TLS (POP3S): sessions are secure from the
      first byte and do not offer STLS. Wrap the listener yourself (e.g. an ``ssl:`` endpoint
      or ``TLSMemoryBIOFactory``).
    - ``reactor``: the clock for idle timeouts and failed log-in delays (default: the global
      reactor); ``run_blocking(f, *args) -> Deferred`` defaults to ``threads.deferToThread``.
    - ``throttle`` / ``limiter``: shared with other listeners when given; otherwise made from
      ``config.pop3`` (auth_failure_delay[_max], max_connections[_per_client]).
    """

    protocol = POP3Server
    noisy = False
    chunk_size = CHUNK_SIZE

    def __init__(
        self,
        config: Config,
        store: IMailStore,
        checker: IAccountChecker,
        tls_options: Any = None,
        implicit_tls: bool = False,
        reactor: Any = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        throttle: AuthThrottle | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.store = store
        self.checker = checker
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.reactor = reactor
        self.run_blocking = run_blocking or threads.deferToThread
        self.hostname = config.server.hostname
        self.portal = Portal(Pop3Realm(store, self.run_blocking), [checker])
        p = config.pop3
        self.throttle = throttle if throttle is not None else AuthThrottle(
            reactor, base=p.auth_failure_delay, maximum=p.auth_failure_delay_max)
        self.gate = LoginGate.for_throttle(self.throttle, reactor)  # every password check waits its turn here
        self.limiter = limiter if limiter is not None else ConnectionLimiter(
            p.max_connections, p.max_connections_per_client)
        self._counter = itertools.count(1)

    def new_timestamp(self) -> bytes:
        """A unique ``<pid.counter.clock@hostname>`` (RFC 1939 APOP, RFC 2195 CRAM-MD5).

        Only ``A-Za-z0-9.@_+/-`` appear inside the brackets (mpop and other strict clients refuse anything else).
        """
        millis = int(self.reactor.seconds() * 1000)
        return f"<{os.getpid()}.{next(self._counter)}.{millis}@{self.hostname}>".encode("ascii")

    def buildProtocol(self, addr: Any) -> POP3Server:  # noqa: N802
        proto = self.protocol()
        proto.factory = self
        return proto
