"""The Prometheus metrics: their definitions, the observer that moves them from the mail
events (``pop3coexist.events``), and the registry a scrape reads.

Every serving process (the main one and each worker of ``server.workers``) counts its own
sessions, log-ins and messages in prometheus_client's multi-process mode: values live in
memory-mapped files under ``<state_dir>/run/metrics/`` (``PROMETHEUS_MULTIPROC_DIR``, set by
``enable_multiprocess`` in the main process before prometheus_client is imported; the workers
inherit it), and a scrape (main process only) sums them over every process, living or dead, so
a counter never goes back when a worker is replaced. Gauges of sessions use ``livesum``: a dead
worker's open sessions are dropped (``process_dead``). The queue and store figures are not
counted by events: ``StateCollector`` reads them when scraped (the store's from a cache, see
``monitor.storestats``).

``METRICS`` lists every metric name, type and labels (the README "Monitoring" table, the
example alert rules and the Grafana dashboard are tested against it).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pop3coexist import events

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "pop3coexist_"
# seconds from arrival to delivery: local delivery takes milliseconds, the queue hours
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400,
                   86400, float("inf"))

# name (without PREFIX) -> (type, labels, help); counters are exposed with "_total"
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sessions_open": ("gauge", ("protocol", "listener"), "Sessions open now"),
    "sessions": ("counter", ("protocol", "listener"), "Sessions opened"),
    "logins": ("counter", ("protocol", "method", "outcome"),
               "Log-ins by method and outcome (ok, failed, in_use, unavailable)"),
    "auth_throttled": ("counter", ("protocol",), "Refused log-ins whose reply the log-in "
                       "throttle delayed"),
    "messages_accepted": ("counter", ("listener",), "Messages accepted (250 after DATA)"),
    "messages_refused": ("counter", ("listener", "command", "code", "enhanced"),
                         "MAIL, RCPT and end-of-DATA refusals by reply code"),
    "message_bytes": ("counter", ("protocol", "direction"),
                      "Message octets: in = accepted by SMTP, out = sent by POP3 RETR/TOP"),
    "deliveries": ("counter", ("route", "outcome"),
                   "Recipient delivery outcomes (delivered, deferred, bounced, expired) per route"),
    "delivery_latency_seconds": ("histogram", ("route",),
                                 "Seconds from arrival to delivery, per route"),
    "worker_restarts": ("counter", (), "Worker processes that ended and were replaced"),
    "milter_verdicts": ("counter", ("milter", "verdict"), "Milter verdicts (reserved)"),
    "queue_messages": ("gauge", (), "Messages in the outbound queue"),
    "queue_oldest_age_seconds": ("gauge", (), "Age of the oldest queued message (0: empty)"),
    "mailboxes": ("gauge", ("domain",), "Mailboxes per local domain"),
    "store_messages": ("gauge", ("domain",), "Messages in the mailboxes per domain"),
    "store_bytes": ("gauge", ("domain",), "Octets in the mailboxes per domain"),
    "store_stats_age_seconds": ("gauge", (), "Age of the cached mailbox figures"),
    "up": ("gauge", (), "1 while the server answers scrapes"),
}


def exposed_names() -> set[str]:
    """Every sample family name a scrape can show (counters with ``_total``; histograms with
    ``_bucket``, ``_sum``, ``_count``)."""
    out: set[str] = set()
    for name, (kind, _labels, _help) in METRICS.items():
        full = PREFIX + name
        if kind == "counter":
            out.add(full + "_total")
        elif kind == "histogram":
            out.update({full + "_bucket", full + "_sum", full + "_count"})
        else:
            out.add(full)
    return out


def enable_multiprocess(directory: Path) -> None:
    """Main process, before prometheus_client is first imported: keep the metrics in files
    under ``directory`` (emptied: the counts of an earlier run are gone) and tell the worker
    processes (they inherit the environment)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in glob.glob(str(directory / "*.db")):
        os.unlink(old)
    os.environ[ENV] = str(directory)


def multiprocess_dir() -> str | None:
    """The multi-process folder of this process, or None (values in memory)."""
    return os.environ.get(ENV) or None


def process_dead(pid: int) -> None:
    """A worker ended: drop its live gauges (open sessions); its counters stay summed."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


class Metrics:
    """This process's metric objects (not registered anywhere: ``registry`` collects them)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # as in multi-process mode: no *_created samples
        self.objects: dict[str, Any] = {}
        for name, (kind, labels, doc) in METRICS.items():
            full = PREFIX + name
            if name in ("queue_messages", "queue_oldest_age_seconds", "mailboxes",
                        "store_messages", "store_bytes", "store_stats_age_seconds", "up"):
                continue  # read at scrape time by StateCollector
            if kind == "counter":
                obj = Counter(full, doc, labels, registry=None)
            elif kind == "histogram":
                obj = Histogram(full, doc, labels, buckets=LATENCY_BUCKETS, registry=None)
            else:
                obj = Gauge(full, doc, labels, registry=None, multiprocess_mode="livesum")
            self.objects[name] = obj

    def __getitem__(self, name: str) -> Any:
        return self.objects[name]


class MetricsObserver:
    """A Twisted log observer: moves the metrics from the mail events of this process.

    Events re-published from a worker's log (workers.py marks them ``worker_event``) are
    skipped: the worker counted them itself.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def __call__(self, event: Mapping[str, Any]) -> None:
        name = events.name_of(event)
        if name is None or event.get("worker_event"):
            return
        try:
            self._count(name, event)
        except Exception:  # noqa: BLE001 - an observer must never raise into the log system
            pass

    def _count(self, name: str, e: Mapping[str, Any]) -> None:
        m = self.m
        proto = str(e.get("protocol") or "smtp")
        listener = str(e.get("listener") or proto)
        if name == events.CONNECT:
            m["sessions"].labels(proto, listener).inc()
            m["sessions_open"].labels(proto, listener).inc()
        elif name == events.DISCONNECT:
            m["sessions_open"].labels(proto, listener).dec()
            if e.get("retr_octets"):
                m["message_bytes"].labels(proto, "out").inc(int(e["retr_octets"]))
        elif name == events.LOGIN:
            m["logins"].labels(proto, str(e.get("method") or "-"),
                               str(e.get("outcome") or "-")).inc()
            if float(e.get("delay") or 0) > 0:
                m["auth_throttled"].labels(proto).inc()
        elif name == events.ACCEPTED:
            m["messages_accepted"].labels(listener).inc()
            m["message_bytes"].labels("smtp", "in").inc(int(e.get("size") or 0))
        elif name == events.REFUSED:
            m["messages_refused"].labels(listener, str(e.get("command") or "-"),
                                         str(e.get("code") or "-"),
                                         str(e.get("enhanced") or "-")).inc()
        elif name == events.STORED:
            boxes = len(e.get("mailboxes") or ())
            if boxes:
                m["deliveries"].labels("local", events.DELIVERED).inc(boxes)
                m["delivery_latency_seconds"].labels("local").observe(
                    max(0.0, time.time() - float(e.get("arrival") or time.time())))
        elif name in (events.DELIVERED, events.DEFERRED, events.BOUNCED, events.EXPIRED):
            route = str(e.get("route") or "mx")
            m["deliveries"].labels(route, name).inc()
            if name == events.DELIVERED:
                m["delivery_latency_seconds"].labels(route).observe(float(e.get("delay") or 0))
        elif name == events.WORKER_RESTART:
            m["worker_restarts"].inc()
        elif name == events.MILTER:
            m["milter_verdicts"].labels(str(e.get("milter") or "-"),
                                        str(e.get("verdict") or "-")).inc()


class StateCollector:
    """A prometheus_client collector of what is read, not counted: the outbound queue (its
    length and oldest message, from the queue folder's names: ids start with the enqueue
    time), the mailbox figures per domain (``stats()``: a cached ``StoreStats`` reading, never
    a walk per scrape) and ``up``."""

    def __init__(self, queue_figures: Callable[[], tuple[int, float]],
                 store_figures: Callable[[], tuple[dict[str, tuple[int, int, int]], float]]
                 ) -> None:
        self.queue_figures = queue_figures
        self.store_figures = store_figures

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(PREFIX + name, METRICS[name][2], labels=list(labels))

        up = gauge("up")
        up.add_metric([], 1)
        yield up
        length, oldest = self.queue_figures()
        g = gauge("queue_messages")
        g.add_metric([], length)
        yield g
        g = gauge("queue_oldest_age_seconds")
        g.add_metric([], oldest)
        yield g
        per_domain, age = self.store_figures()
        boxes = gauge("mailboxes", ("domain",))
        msgs = gauge("store_messages", ("domain",))
        octets = gauge("store_bytes", ("domain",))
        for domain, (n_boxes, n_msgs, n_bytes) in sorted(per_domain.items()):
            boxes.add_metric([domain], n_boxes)
            msgs.add_metric([domain], n_msgs)
            octets.add_metric([domain], n_bytes)
        yield boxes
        yield msgs
        yield octets
        g = gauge("store_stats_age_seconds")
        g.add_metric([], age)
        yield g


def make_registry(metrics: Metrics | None, state: StateCollector | None) -> Any:
    """The registry a scrape reads: every process's files (multi-process mode) or this
    process's ``metrics`` (one process, tests), plus ``state``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=path)
    elif metrics is not None:
        for obj in metrics.objects.values():
            registry.register(obj)
    if state is not None:
        registry.register(state)
    return registry


def queue_figures(queue_dir: Path, now: Callable[[], float] = time.time) -> tuple[int, float]:
    """Blocking, cheap: (messages queued, age in seconds of the oldest) from the names in
    ``queue/env/`` and in each runner's ``queue/claimed/<owner>/`` (a listing each; an id's
    first 16 hex digits are its enqueue time in ns)."""
    names: list[str] = []
    folders = [queue_dir / "env"]
    try:
        folders += [queue_dir / "claimed" / d for d in os.listdir(queue_dir / "claimed")]
    except FileNotFoundError:
        pass
    for folder in folders:
        try:
            names += [n for n in os.listdir(folder) if n.endswith(".json")]
        except (FileNotFoundError, NotADirectoryError):
            continue
    if not names:
        return 0, 0.0
    oldest = min(names)[:16]
    try:
        age = max(0.0, now() - int(oldest, 16) / 1e9)
    except ValueError:
        age = 0.0
    return len(names), age
