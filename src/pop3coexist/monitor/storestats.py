"""Mailbox count, messages and octets per domain, for the metrics, at a bounded cost.

Counting the store means listing every mailbox's ``new/`` and ``cur/`` (sizes come from the
``,S=`` field of the names, so no file is opened or stat()ed unless a name lacks it). A
scrape never does that: ``StoreStats.figures()`` returns the last reading at once and, when
that reading is older than ``refresh`` seconds, starts one new reading in a thread (never two
at a time). The first scrape after start may see empty figures; ``store_stats_age_seconds``
says how old the figures are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

log = Logger()

Figures = dict[str, tuple[int, int, int]]  # domain -> (mailboxes, messages, octets)


def read_store(store: Any) -> Figures:
    """Blocking: (mailboxes, messages, octets) per domain of ``store`` (an IMailStore)."""
    out: Figures = {}
    for domain in store.list_domains():
        boxes = messages = octets = 0
        try:
            names = store.list_mailboxes(domain)
        except Exception:  # noqa: BLE001 - removed meanwhile
            continue
        for box in names:
            try:
                count, size = store.usage(domain, box)
            except Exception:  # noqa: BLE001 - removed meanwhile
                continue
            boxes += 1
            messages += count
            octets += size
        out[domain] = (boxes, messages, octets)
    return out


class StoreStats:
    """The cached reading (see the module docstring). ``run_blocking(f)`` runs ``f`` in a
    thread and returns a Deferred (``threads.deferToThread``); ``clock`` gives seconds."""

    def __init__(self, store: Any, refresh: float,
                 run_blocking: Callable[..., Any], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.store = store
        self.refresh = refresh
        self.run_blocking = run_blocking
        self.clock = clock
        self._figures: Figures = {}
        self._taken: float | None = None
        self._reading = False

    def figures(self) -> tuple[Figures, float]:
        """The last reading and its age in seconds (0 before the first); starts a new reading
        when it is older than ``refresh``. Never blocks. Any thread may call."""
        now = self.clock()
        if self._taken is None or now - self._taken >= self.refresh:
            self.start_reading()
        age = 0.0 if self._taken is None else now - self._taken
        return dict(self._figures), age

    def start_reading(self) -> None:
        """Start a reading unless one runs."""
        if self._reading:
            return
        self._reading = True
        try:
            d = self.run_blocking(read_store, self.store)
        except Exception:  # noqa: BLE001 - no thread available: try at the next scrape
            self._reading = False
            return
        d.addCallbacks(self._done, self._failed)

    def _done(self, figures: Figures) -> None:
        self._figures = figures
        self._taken = self.clock()
        self._reading = False

    def _failed(self, failure: Any) -> None:
        self._reading = False
        log.warn("metrics: cannot count the mailboxes: {why}", why=failure.getErrorMessage())
