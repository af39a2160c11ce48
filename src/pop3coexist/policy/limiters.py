"""Which connection limiter and failed-log-in throttle each process uses.

With ``server.workers`` = 1 the limiters (policy/connlimit.py) and throttles
(policy/throttle.py) live in the one process. With more, every process counts in tables
shared through files under ``<state_dir>/run/`` (policy/sharedlimit.py,
policy/sharedthrottle.py): the main process (worker 0) creates them when the server starts
(``TableLimiter.start``, after twistd's ``--uid`` switch), each worker process opens them, and
the worker supervisor (workers.py) resets a dead worker's counts with ``limiter_table``.
Built by service.py for the main process and by worker.py (through ``service.make_frontends``)
for each worker process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zope.interface import implementer

from pop3coexist.config import Config
from pop3coexist.interfaces import ISharedConnectionLimiter, IStartStop


def limiter_table(config: Config, protocol: str) -> Path:
    """The shared connection-count table of ``protocol`` ("pop3", "smtp" or "imap") when
    ``server.workers`` > 1 (policy/sharedlimit.py)."""
    return config.server.state_dir / "run" / f"connections-{protocol}.table"


def make_limiters(config: Config, worker: int) -> dict[str, Any]:
    """One connection limiter per protocol: in-process for one worker, shared (a table all
    worker processes count in) for several."""
    from pop3coexist.policy.connlimit import ConnectionLimiter

    limits = {
        "pop3": (config.pop3.max_connections, config.pop3.max_connections_per_client),
        "smtp": (config.smtp.max_connections, config.smtp.max_connections_per_client),
        "imap": (config.imap.max_connections, config.imap.max_connections_per_client),
    }
    if config.server.workers <= 1:
        return {name: ConnectionLimiter(*lim) for name, lim in limits.items()}
    if worker == 0:
        return {name: TableLimiter(config, name, *lim) for name, lim in limits.items()}
    from pop3coexist.policy.sharedlimit import SharedConnectionLimiter

    return {
        name: SharedConnectionLimiter(limiter_table(config, name), worker, *lim)
        for name, lim in limits.items()
    }


@implementer(ISharedConnectionLimiter, IStartStop)
class TableLimiter:
    """The main process's view of a shared connection table, made when the server starts
    (``start``): after twistd has switched to its ``--uid``/``--gid``, so the table belongs to
    the user the workers run as. Before that no connection is accepted, and none is counted."""

    def __init__(self, config: Config, name: str, total: int, per_client: int) -> None:
        self.config = config
        self.name = name
        self.total = total
        self.per_client = per_client
        self.real: Any = None

    def start(self) -> None:
        """Create the table afresh (before any worker starts) and open it as worker 0."""
        from pop3coexist.policy.sharedlimit import (
            SharedConnectionLimiter,
            create_table,
            recommended_slots,
        )

        path = limiter_table(self.config, self.name)
        create_table(path, self.config.server.workers, recommended_slots(self.total))
        self.real = SharedConnectionLimiter(path, 0, self.total, self.per_client)

    @property
    def open(self) -> int:
        return self.real.open if self.real is not None else 0

    def acquire(self, client: str) -> bool:
        return self.real is not None and self.real.acquire(client)

    def release(self, client: str) -> None:
        if self.real is not None:
            self.real.release(client)

    def busier_than_others(self) -> bool:
        return self.real is not None and self.real.busier_than_others()

    def close(self) -> None:
        """Close the table (the server stops); idempotent."""
        if self.real is not None:
            self.real.close()


def make_throttles(config: Config, reactor: Any, worker: int) -> dict[str, Any]:
    """The failed log-in delay of each protocol: in-process for one worker; for several, in a
    table every process shares (policy/sharedthrottle.py), made by the main process (worker 0)
    when the server starts."""
    from pop3coexist.policy.throttle import AuthThrottle

    delays = {
        "pop3": (config.pop3.auth_failure_delay, config.pop3.auth_failure_delay_max),
        "smtp": (config.smtp.auth_failure_delay, config.smtp.auth_failure_delay_max),
        "imap": (config.imap.auth_failure_delay, config.imap.auth_failure_delay_max),
    }
    if config.server.workers <= 1:
        return {name: AuthThrottle(reactor, base=b, maximum=m) for name, (b, m) in delays.items()}
    from pop3coexist.policy.sharedthrottle import SharedAuthThrottle

    run = config.server.state_dir / "run"
    return {
        name: SharedAuthThrottle(reactor, run / f"auth-failures-{name}.table", base=b, maximum=m,
                                 create=worker == 0)
        for name, (b, m) in delays.items()
    }
