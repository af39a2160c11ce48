"""Failed log-in delays per source address, shared by POP3 and SMTP AUTH.

After each failed log-in from an address, the next reply to that address is delayed a little
longer (base, doubling, capped); a success from that address resets it. The delay is per source
address, not per user name, so an attacker slows down while the real user, coming from
elsewhere, is never locked out. Time comes from an injected clock (IReactorTime).
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import implementer

from pop3coexist.interfaces import IAuthThrottle


@dataclass
class _Entry:
    failures: int
    last: float


@implementer(IAuthThrottle)
class AuthThrottle:
    """Tracks failures by source address and says how long to wait before answering."""

    def __init__(self, clock, base: float = 2.0, maximum: float = 30.0, forget_after: float = 900.0,
                 max_entries: int = 100_000) -> None:
        self.clock = clock
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}

    def failure_delay(self, source: str) -> float:
        """Record a failure from ``source``; return the seconds to wait before the -ERR/535."""
        now = self.clock.seconds()
        entry = self._entries.get(source)
        if entry is None or now - entry.last > self.forget_after:
            entry = _Entry(0, now)
        entry.failures += 1
        entry.last = now
        self._entries[source] = entry
        if len(self._entries) > self.max_entries:
            self._prune(now)
        if self.base <= 0:
            return 0.0
        return min(self.maximum, self.base * (2 ** (entry.failures - 1)))

    def success(self, source: str) -> None:
        """A successful log-in from ``source`` clears its record."""
        self._entries.pop(source, None)

    def failures(self, source: str) -> int:
        entry = self._entries.get(source)
        if entry is None or self.clock.seconds() - entry.last > self.forget_after:
            return 0
        return entry.failures

    def _prune(self, now: float) -> None:
        stale = [k for k, e in self._entries.items() if now - e.last > self.forget_after]
        for k in stale:
            del self._entries[k]
        while len(self._entries) > self.max_entries:
            self._entries.pop(next(iter(self._entries)))
