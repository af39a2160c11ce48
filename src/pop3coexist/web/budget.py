"""``ByteBudget``: how many bytes of messages web mail parses at once.

Parsing a message for display (MIME structure, decoded parts, sanitised HTML) or to cut one
attachment out of it holds several times the message's size in memory for a moment (about
ten times for a 50 MB message with base64 attachments). Each parse takes its message's size
from the budget and gives it back when done; one that does not fit waits its turn, in order.
A message larger than the whole budget runs alone, so it is never refused. Peak memory of
concurrent parses is then bounded by a few times ``max(budget, largest message)`` instead of
growing with the number of users opening large messages at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from twisted.internet import defer


class ByteBudget:
    """At most ``limit`` bytes (``int`` >= 1) taken at once; see the module docstring."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the budget must be at least one byte")
        self.limit = limit
        self.taken = 0
        self._waiting: deque[tuple[int, defer.Deferred]] = deque()

    def _fits(self, size: int) -> bool:
        return self.taken == 0 or self.taken + size <= self.limit

    @asynccontextmanager
    async def taking(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes (capped at ``limit``) of the budget for the block's length;
        waits first (first come, first served) when they are not free."""
        size = max(0, min(size, self.limit))
        if self._waiting or not self._fits(size):
            d: defer.Deferred = defer.Deferred()
            self._waiting.append((size, d))
            await d
        else:
            self.taken += size
        try:
            yield
        finally:
            self.taken -= size
            self._wake()

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, d = self._waiting.popleft()
            self.taken += size
            d.callback(None)
