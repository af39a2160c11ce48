"""Outbound connection limits for the delivery runner (smtp/outbound.py): at most
``smarthost.max_connections`` connections in total and ``max_connections_per_host`` per next
hop, handed out first come, first served, without a busy hop holding up the others.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer

from pop3coexist.policy.connlimit import ConnectionLimiter


class HopLimiter:
    """Connection slots in total and per next hop (keyed by ``NextHop.key``); ``acquire``
    waits (FIFO per hop) for a slot, ``release`` gives it back and wakes whoever can go."""

    def __init__(self, total: int, per_host: int) -> None:
        self._limiter = ConnectionLimiter(total, per_host)
        self._waiting: deque[tuple[str, defer.Deferred[None]]] = deque()

    @property
    def open(self) -> int:
        """Slots in use."""
        return self._limiter.open

    def acquire(self, key: str) -> defer.Deferred[None]:
        """A Deferred that fires once a slot for hop ``key`` is ours (at once when free and
        nobody waits for that hop)."""
        if not any(k == key for k, _ in self._waiting) and self._limiter.acquire(key):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((key, d))
        return d

    def release(self, key: str) -> None:
        """Give back a slot of hop ``key``; grant waiting requests that now fit, in order."""
        self._limiter.release(key)
        blocked: set[str] = set()
        granted = []
        for item in self._waiting:
            if self._limiter.open >= self._limiter.total:
                break
            k = item[0]
            if k in blocked:
                continue
            if self._limiter.acquire(k):
                granted.append(item)
            else:
                blocked.add(k)
        for item in granted:
            self._waiting.remove(item)
            item[1].callback(None)
