"""Concurrent connection limits, in total and per client address (POP3 and SMTP listeners)."""

from __future__ import annotations

from zope.interface import implementer

from pop3coexist.interfaces import IConnectionLimiter


@implementer(IConnectionLimiter)
class ConnectionLimiter:
    """Counts open connections; ``acquire`` says whether one more may be served."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Count a new connection from ``client``; False (and nothing counted) if over a limit."""
        if self.open >= self.total or self._by_client.get(client, 0) >= self.per_client:
            return False
        self.open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return True

    def release(self, client: str) -> None:
        """Forget one connection from ``client`` (call once per successful acquire)."""
        n = self._by_client.get(client, 0)
        if n <= 0:
            return
        self.open -= 1
        if n == 1:
            del self._by_client[client]
        else:
            self._by_client[client] = n - 1
