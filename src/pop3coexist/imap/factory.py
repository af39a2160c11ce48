"""The IMAP listener factory: what the service wiring creates for each IMAP or IMAPS endpoint.

``IMAPServerFactory`` is a ``twisted.internet.protocol.ServerFactory`` building
``server.IMAPServer`` sessions. It owns what sessions share: the account checker (the same
``IAccountChecker`` as POP3), the mail store (mailboxes, locks, quotas), the folder store
(``IFolderStore``), the TLS options for STARTTLS, the failed-log-in throttle and its
``LoginGate``, the connection limiter, the reactor and ``run_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.protocol import ServerFactory

from pop3coexist.config import Config
from pop3coexist.imap.server import IMAPServer
from pop3coexist.interfaces import IAccountChecker, IFolderStore, IMailStore
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.throttle import AuthThrottle, LoginGate


class IMAPServerFactory(ServerFactory):
    """Builds IMAP sessions for one listener.

    - ``folders``: the ``IFolderStore`` (default: ``store.folders.MaildirFolders(store)``);
    - ``tls_options``: for STARTTLS (None: not offered); ``implicit_tls``: the listener is
      already TLS (IMAPS), sessions are secure from the first byte;
    - ``throttle`` / ``limiter``: shared with other listeners when given; otherwise made from
      ``config.imap``.
    """

    protocol = IMAPServer
    noisy = False

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
        folders: IFolderStore | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if folders is None:
            from pop3coexist.store.folders import MaildirFolders

            folders = MaildirFolders(store)
        self.config = config
        self.store = store
        self.checker = checker
        self.folders = folders
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.reactor = reactor
        self.run_blocking = run_blocking or threads.deferToThread
        self.hostname = config.server.hostname
        i = config.imap
        self.max_literal = i.max_literal
        self.throttle = throttle if throttle is not None else AuthThrottle(
            reactor, base=i.auth_failure_delay, maximum=i.auth_failure_delay_max)
        self.gate = LoginGate.for_throttle(self.throttle, reactor)
        self.limiter = limiter if limiter is not None else ConnectionLimiter(
            i.max_connections, i.max_connections_per_client)

    def buildProtocol(self, addr: Any) -> IMAPServer:  # noqa: N802 (Twisted's name)
        proto = self.protocol()
        proto.factory = self
        return proto
