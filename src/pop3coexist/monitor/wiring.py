"""Monitoring in a running process: the log observers (metrics, mail log) as a service.

``ObserverService`` adds its observers to Twisted's global log publisher while it runs and
removes them (closing the mail log file) when it stops. ``process_observers`` gives what a
process observes: every serving process counts its metrics (when ``[metrics] listen`` is
set); only the main process writes the mail log (workers' events reach it through
workers.py). ``metrics_site`` builds the HTTP site of ``[metrics] listen`` (main process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import globalLogPublisher

from pop3coexist.config import Config
from pop3coexist.monitor.maillog import MailLogObserver
from pop3coexist.monitor.metrics import Metrics, MetricsObserver


class ObserverService(service.Service):
    """Log observers that watch while the service runs (see the module docstring)."""

    name = "monitoring"

    def __init__(self, observers: list[Any]) -> None:
        self.observers = observers

    @property
    def mail_log(self) -> MailLogObserver | None:
        for o in self.observers:
            if isinstance(o, MailLogObserver):
                return o
        return None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        for o in self.observers:
            globalLogPublisher.addObserver(o)

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        super().stopService()
        for o in self.observers:
            globalLogPublisher.removeObserver(o)
        log_file = self.mail_log
        if log_file is not None:
            log_file.close()
        return None

    def reopen(self) -> None:
        """SIGHUP: reopen the mail log file (after logrotate moved it)."""
        log_file = self.mail_log
        if log_file is not None:
            log_file.open()


def process_observers(config: Config, main: bool) -> tuple[Metrics | None, list[Any]]:
    """This process's metrics (None when ``[metrics] listen`` is empty) and observers."""
    observers: list[Any] = []
    metrics = None
    if config.metrics.enabled:
        metrics = Metrics()
        observers.append(MetricsObserver(metrics))
    if main and config.log.mail_log:
        observers.append(MailLogObserver(config.log.mail_log, config.log.format))
    return metrics, observers


def metrics_site(config: Config, metrics: Metrics | None, store: Any, checker: Any,
                 listeners: Callable[[], tuple[bool, str]], reactor: Any) -> Any:
    """The ``/metrics`` and ``/healthz`` site of the main process."""
    from twisted.internet import threads

    from pop3coexist.monitor.http import (
        HealthPage,
        MetricsPage,
        check_accounts,
        check_queue,
        check_store,
        check_volume,
        make_site,
    )
    from pop3coexist.monitor.storestats import StoreStats

    def run_blocking(f: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    stats = StoreStats(store, config.metrics.store_refresh, run_blocking)
    reactor.callWhenRunning(stats.start_reading)  # the first count, before the first scrape
    queue_dir = config.server.queue_dir
    checks = {
        "store": lambda: check_store(store),
        "queue": lambda: check_queue(queue_dir),
        "directory": lambda: check_accounts(checker, config.auth.method,
                                            config.auth.directory.url),
    }
    if config.server.shared:  # several nodes over one state_dir (README "Several servers")
        state_dir, node = config.server.state_dir, config.server.node
        checks["volume"] = lambda: check_volume(state_dir, node)
    return make_site(MetricsPage(metrics, queue_dir, stats, run_blocking),
                     HealthPage(listeners, checks, run_blocking, reactor))
