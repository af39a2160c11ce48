"""Failed log-in delays per source address, shared by POP3 and SMTP AUTH, and the gate that
every password check passes.

After each failed log-in from an address, the next reply to that address is delayed a little
longer (base, doubling, capped); a success from that address resets it. The delay is per source
address, not per user name, so an attacker slows down while the real user, coming from
elsewhere, is never locked out. Time comes from an injected clock (IReactorTime).

The delay also holds before the next *check* (``admit_delay``): a source with failures gets its
next password checked only once its current delay has passed, one check per delay however many
connections it opens (and in every worker process, with the shared table). So each source's
guessing rate is bounded by the schedule (one guess, then base, 2 x base, ... up to the
maximum).

``LoginGate`` orders the checks of one process (the expensive part: scrypt, or a directory
round trip): every unknown source's check waits for one of ``concurrency`` places (half the
CPUs, at least one), and a place is free again only as long after a check as the check took.
Checks from unknown sources (guessers from many addresses among them) therefore never take more
than half of the places' time. A source whose last log-in succeeded (``trusted``) never queues
behind them: it has ``concurrency`` places of its own, free again as soon as its check ends, so
a real user polling from a known address gets in at once (issue 16 item 4,
tests/integration/test_login_abuse.py) while a reconnect storm from one trusted address (an
office behind NAT, a client opening many IMAP connections) runs at most that many checks at
once: scrypt takes 16 MiB and a CPU for ~80 ms per check, and ten at once doubled the process.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from pop3coexist.interfaces import IAuthThrottle


@dataclass
class _Entry:
    failures: int
    last: float
    trusted: bool = False


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
        entry.trusted = False
        self._entries[source] = entry
        if len(self._entries) > self.max_entries:
            self._prune(now)
        return self._delay(entry.failures)

    def _delay(self, failures: int) -> float:
        if self.base <= 0 or failures <= 0:
            return 0.0
        return min(self.maximum, self.base * (2 ** min(failures - 1, 62)))

    def success(self, source: str) -> None:
        """A successful log-in from ``source`` clears its failures and marks it trusted."""
        self._entries[source] = _Entry(0, self.clock.seconds(), True)
        if len(self._entries) > self.max_entries:
            self._prune(self.clock.seconds())

    def admit_delay(self, source: str) -> float:
        """See IAuthThrottle."""
        now = self.clock.seconds()
        entry = self._entries.get(source)
        if entry is None or entry.failures == 0 or now - entry.last > self.forget_after:
            return 0.0
        wait = entry.last + self._delay(entry.failures) - now
        if wait > 0:
            return wait
        entry.last = now  # this check takes the slot: the next one waits a whole delay
        return 0.0

    def trusted(self, source: str) -> bool:
        """See IAuthThrottle."""
        entry = self._entries.get(source)
        return (entry is not None and entry.trusted
                and self.clock.seconds() - entry.last <= self.forget_after)

    def failures(self, source: str) -> int:
        """Failures recorded for ``source`` and not yet forgotten."""
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


def _noop() -> None:
    return None


_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LoginGate:
    """Where every password check of one process waits its turn (see the module docstring).

    ``enter(source)`` returns a Deferred firing with a ``release`` callable once the check may
    run: after the source's failure delay (``IAuthThrottle.admit_delay``) and after one of
    ``concurrency`` places is free (first come, first served): the shared places for unknown
    sources, the trusted sources' own places for a ``trusted`` one. Call ``release()`` as soon
    as the check has an outcome (before any delayed reply); it may be called more than once.
    An unknown source's place is free again after as long as the check took (at most 5 s), so
    unknown sources get at most half of each place's time; a trusted one's at once.
    """

    @classmethod
    def for_throttle(cls, throttle: Any, clock: Any) -> LoginGate:
        """The one gate of ``throttle`` in this process (listeners that share a throttle,
        such as POP3 and POP3S, share its gate and its places)."""
        gate = _GATES.get(throttle)
        if gate is None:
            gate = _GATES[throttle] = cls(throttle, clock)
        return gate

    def __init__(self, throttle: Any, clock: Any, concurrency: int | None = None) -> None:
        self.throttle = throttle
        self.clock = clock
        self.concurrency = concurrency or max(1, (os.cpu_count() or 2) // 2)
        self._places = defer.DeferredSemaphore(self.concurrency)
        self._trusted_places = defer.DeferredSemaphore(self.concurrency)

    @property
    def waiting(self) -> int:
        """Checks waiting for a place now."""
        return len(self._places.waiting)

    def enter(self, source: str) -> defer.Deferred:
        """Deferred firing with ``release`` (see the class docstring)."""
        return defer.ensureDeferred(self._enter(source))

    async def _enter(self, source: str) -> Callable[[], None]:
        while True:
            wait = self.throttle.admit_delay(source)
            if wait <= 0:
                break
            await task.deferLater(self.clock, wait, _noop)
        if self.throttle.trusted(source):
            await self._trusted_places.acquire()
            return _Once(self._trusted_places.release)
        await self._places.acquire()
        started = self.clock.seconds()
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                took = self.clock.seconds() - started
                if took > 0:
                    self.clock.callLater(min(took, 5.0), self._places.release)
                else:  # no time passed (a check answered at once): free at once
                    self._places.release()

        return release


class _Once:
    """``release`` for a trusted source's place: frees it at the first call only."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], Any]) -> None:
        self._release: Callable[[], Any] | None = release

    def __call__(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
