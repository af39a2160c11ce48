"""The listeners of a web front-end: the rule "TLS required except on loopback" and the
(role, endpoint description, factory) triples service.py binds.

The rule itself is checked when the config is read (``config.check_web_listeners``: a plain
``listen`` that is not loopback is a config error naming file, line and key); ``listeners``
checks it again (``config.is_loopback_endpoint``), so no caller can bind a plain HTTP port
on the network by mistake. A ``tls_listen`` entry is a plain TCP description wrapped in TLS
from the first byte with the server's reloadable ``[tls]`` options (SIGHUP reloads them).

Every listener counts its connections (``LimitedFactory`` over a ``policy.connlimit``
``ConnectionLimiter``): in total and per client address, like the mail listeners. One
connection past a limit gets ``503 Service Unavailable`` with ``Retry-After`` and is closed;
the others go on. A reverse proxy listed in ``trusted_proxies`` counts only towards the
total (every user behind it shares its address).
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from pop3coexist.config import is_loopback_endpoint
from pop3coexist.errors import ConfigError

log = Logger()

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 42\r\n\r\n"
        b"Too many connections; try again shortly.\r\n")


class _Busy(protocol.Protocol):
    """The answer to a connection past a limit: one 503, then the connection is closed."""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.write(BUSY)
        self.transport.loseConnection()


class _Counted(ProtocolWrapper):
    """A connection the limiter counted; released once when it closes."""

    key = ""

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        try:
            super().connectionLost(reason)
        finally:
            self.factory.limiter.release(self.key)


class LimitedFactory(WrappingFactory):
    """Wraps a web Site: at most the ``limiter``'s (an ``IConnectionLimiter``) connections
    in total and per client address; ``trusted_proxies`` (``ipaddress`` networks) count only
    in the total. ``name`` is the front-end, for the log."""

    protocol = _Counted

    def __init__(self, site: Any, limiter: Any, trusted_proxies: tuple = (),
                 name: str = "web") -> None:
        super().__init__(site)
        self.limiter = limiter
        self.trusted_proxies = tuple(trusted_proxies)
        self.name = name
        self._serial = itertools.count()

    def _key(self, host: str) -> str:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if any(ip in net for net in self.trusted_proxies):
            return f"{host}#{next(self._serial)}"  # a per-connection key: the total only
        return host

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        key = self._key(getattr(addr, "host", None) or "unix")
        if not self.limiter.acquire(key):
            log.info("{name}: connection from {peer} refused: too many connections",
                     name=self.name, peer=key)
            busy = _Busy()
            busy.factory = self
            return busy
        wrapped = super().buildProtocol(addr)
        if wrapped is None:
            self.limiter.release(key)
            return None
        wrapped.key = key
        return wrapped


def listeners(role: str, section: str, listen: tuple[str, ...], tls_listen: tuple[str, ...],
              site: Any, tls_options: Any, limiter: Any = None,
              trusted_proxies: tuple = ()) -> list[tuple[str, str, Any]]:
    """(role or role + "_tls", description, factory) for each listener of a front-end;
    ConfigError naming ``[section.listen]`` for a plain listener off loopback. With
    ``limiter`` (an ``IConnectionLimiter``) every listener of the front-end counts its
    connections in it (``LimitedFactory``)."""
    if limiter is not None:
        site = LimitedFactory(site, limiter, trusted_proxies, section)
    out: list[tuple[str, str, Any]] = []
    for desc in listen:
        if not is_loopback_endpoint(desc):
            raise ConfigError(f"[{section}.listen] {desc!r} is not a loopback address: use "
                              "tls_listen")
        out.append((role, desc, site))
    for desc in tls_listen:
        if tls_options is None:
            raise ConfigError(f"[{section}.tls_listen] needs [tls] certificate and private_key")
        out.append((role + "_tls", desc, TLSMemoryBIOFactory(tls_options, False, site)))
    return out
