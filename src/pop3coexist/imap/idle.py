"""IDLE polls shared per folder (RFC 2177): ``IdleHub`` checks each folder that sessions of
this process IDLE on once every ``POLL_INTERVAL`` seconds, instead of one timer and one check
per session (1,000 sessions on 10 folders: 10 checks every 2 seconds, not 1,000, and no
``LoopingCall`` per session).

A check asks one of the folder's IDLE sessions (the longest waiting) to refresh itself
(``IMAPServer.idle_poll``: a stat of the folder, the disk read only when it changed); when
that session found a change, or when a session of the folder found one while running a
command (``changed``), every other IDLE session of the folder refreshes too and tells its
client (``EXISTS``, ``EXPUNGE``, ``FETCH (FLAGS ...)``), each from its own picture of the
folder. A folder is known by (account address, folder name): a session's key. No file
formats and no policy here: the sessions read the store.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import defer, task

from pop3coexist.imap.common import POLL_INTERVAL, log

__all__ = ["IdleHub", "idle_hub"]

_HUBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def idle_hub(clock: Any) -> IdleHub:
    """The process's ``IdleHub`` for ``clock`` (the reactor, or a ``task.Clock`` in tests)."""
    hub = _HUBS.get(clock)
    if hub is None:
        hub = _HUBS[clock] = IdleHub(clock)
    return hub


class _Watch:
    """The IDLE sessions of one folder (insertion order: the first is asked first), its timer,
    and whether a change was seen that they have not all been asked about."""

    __slots__ = ("dirty", "loop", "sessions")

    def __init__(self) -> None:
        self.sessions: dict[Any, None] = {}
        self.dirty = False
        self.loop: task.LoopingCall | None = None


class IdleHub:
    """One poll per folder for the IDLE sessions on it; see the module docstring. A session
    ``join``s when IDLE starts and ``leave``s when it ends (DONE, log-out, lost connection);
    it provides ``async idle_poll() -> bool`` (True: the folder had changed for it)."""

    def __init__(self, clock: Any, interval: float = POLL_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self._watches: dict[tuple, _Watch] = {}

    def join(self, key: tuple, session: Any) -> None:
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch()
            loop = task.LoopingCall(self._poll, key)
            loop.clock = self.clock
            watch.loop = loop
            loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("IMAP IDLE poll stopped", f))
        watch.sessions[session] = None

    def leave(self, key: tuple, session: Any) -> None:
        watch = self._watches.get(key)
        if watch is None:
            return
        watch.sessions.pop(session, None)
        if not watch.sessions:
            del self._watches[key]
            if watch.loop is not None and watch.loop.running:
                watch.loop.stop()

    def changed(self, key: tuple) -> None:
        """A session of the folder found it changed outside IDLE: ask every IDLE session."""
        watch = self._watches.get(key)
        if watch is not None:
            watch.dirty = True

    def folders(self) -> int:
        """How many folders are polled now."""
        return len(self._watches)

    def _poll(self, key: tuple) -> defer.Deferred | None:
        watch = self._watches.get(key)
        if watch is None or not watch.sessions:
            return None
        return defer.ensureDeferred(self._check(watch))

    async def _check(self, watch: _Watch) -> None:
        sessions = list(watch.sessions)
        if not watch.dirty:
            first = sessions.pop(0)
            if not await _ask(first) and not watch.dirty:
                return
        watch.dirty = False
        await defer.DeferredList([defer.ensureDeferred(_ask(s)) for s in sessions
                                  if s in watch.sessions])


async def _ask(session: Any) -> bool:
    try:
        return bool(await session.idle_poll())
    except Exception:
        log.failure("IMAP IDLE poll failed")
        return False
