"""The console's graphs: samples of the metrics kept in memory, drawn server-side as SVG.

``Sampler`` reads, every ``[admin_web] graph_interval`` seconds (in a thread), the outbound
queue's length (``monitor.metrics.queue_figures``) and, when ``[metrics]`` is on, the
Prometheus counters every serving process keeps (``messages_accepted``, ``logins`` by outcome;
``monitor.metrics.make_registry`` sums the processes), into a ring buffer that holds
``graph_history`` seconds. ``series()`` turns them into the points the graphs page shows:
queue length, messages accepted per minute, log-ins (ok and failed) per minute.

``svg_chart`` draws one series as an inline ``<svg>`` element (no script, no style attribute:
the page's Content-Security-Policy stays strict); every text in it is escaped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from twisted.internet import task, threads
from twisted.logger import Logger

log = Logger()


@dataclass(frozen=True)
class Sample:
    """One reading: ``time`` (unix), ``queue`` (messages), and the counters since the server
    started (None without ``[metrics]``): ``accepted``, ``logins_ok``, ``logins_failed``."""

    time: float
    queue: int
    accepted: float | None
    logins_ok: float | None
    logins_failed: float | None


def read_counters(metrics: Any) -> tuple[float, float, float] | None:
    """(messages accepted, log-ins ok, log-ins failed) summed over every process and label,
    or None without metrics. Blocking (reads the multi-process files)."""
    if metrics is None:
        return None
    from pop3coexist.monitor.metrics import make_registry

    accepted = ok = failed = 0.0
    for family in make_registry(metrics, None).collect():
        for s in family.samples:
            if s.name == "pop3coexist_messages_accepted_total":
                accepted += s.value
            elif s.name == "pop3coexist_logins_total":
                if s.labels.get("outcome") == "ok":
                    ok += s.value
                else:
                    failed += s.value
    return accepted, ok, failed


class Sampler:
    """The ring buffer of samples (module docstring); ``start()`` begins sampling on
    ``reactor``; ``read()`` is one blocking reading (tests call it directly)."""

    def __init__(self, queue_dir: Path, metrics: Any, interval: float, history: float,
                 reactor: Any = None, now: Callable[[], float] = time.time) -> None:
        self.queue_dir = Path(queue_dir)
        self.metrics = metrics
        self.interval = interval
        self.samples: collections.deque[Sample] = collections.deque(
            maxlen=max(2, int(history / interval) + 1))
        self.reactor = reactor
        self.now = now
        self._loop: task.LoopingCall | None = None
        self._busy = False

    def read(self) -> Sample:
        from pop3coexist.monitor.metrics import queue_figures

        count, _oldest = queue_figures(self.queue_dir, self.now)
        counters = read_counters(self.metrics)
        accepted, ok, failed = counters if counters is not None else (None, None, None)
        return Sample(self.now(), count, accepted, ok, failed)

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("admin console graphs: sampling stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._busy:  # a slow disk: skip rather than pile up threads
            return
        self._busy = True
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.read)

        def done(sample: Sample) -> None:
            self.samples.append(sample)

        def failed(f: Any) -> None:
            log.failure("admin console graphs: a sample failed", f)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: setattr(self, "_busy", False))

    def series(self) -> dict[str, list[tuple[float, float]]]:
        """``{"queue", "accepted", "logins_ok", "logins_failed"}``: (time, value) points;
        the counters as rates per minute between consecutive samples (a counter that went
        back, after a restart, starts again at zero)."""
        samples = list(self.samples)
        out: dict[str, list[tuple[float, float]]] = {
            "queue": [(s.time, float(s.queue)) for s in samples],
            "accepted": [], "logins_ok": [], "logins_failed": []}
        for a, b in zip(samples, samples[1:], strict=False):
            span = b.time - a.time
            if span <= 0:
                continue
            for name in ("accepted", "logins_ok", "logins_failed"):
                x, y = getattr(a, name), getattr(b, name)
                if x is None or y is None:
                    continue
                out[name].append((b.time, max(0.0, y - x) * 60.0 / span))
        return out


def svg_chart(points: list[tuple[float, float]], title: str, unit: str,
              width: int = 640, height: int = 200) -> str:
    """One series as an inline SVG line chart with its title, the largest value and the
    time span; "no samples yet" when there are fewer than two points."""
    left, right, top, bottom = 48, 10, 24, 22
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" '
             f'viewBox="0 0 {width} {height}" width="100%">',
             f"<title>{escape(title)}</title>",
             f'<text x="{left}" y="15" font-size="13" fill="#1d232a">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#f6f8fa" '
             f'stroke="#d5dbe0"/>']
    if len(points) < 2:
        parts.append(f'<text x="{left + 8}" y="{top + h // 2}" font-size="12" '
                     f'fill="#5b6670">no samples yet</text></svg>')
        return "".join(parts)
    t0, t1 = points[0][0], points[-1][0]
    peak = max(v for _, v in points)
    scale = peak if peak > 0 else 1.0
    span = (t1 - t0) or 1.0
    coords = " ".join(f"{left + (t - t0) / span * w:.1f},{top + h - v / scale * h:.1f}"
                      for t, v in points)
    label = f"{peak:.0f}" if peak >= 10 or peak == int(peak) else f"{peak:.1f}"
    minutes = max(1, round(span / 60))
    parts += [f'<polyline fill="none" stroke="#1f5fa8" stroke-width="2" points="{coords}"/>',
              f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end" '
              f'fill="#5b6670">{escape(label)}</text>',
              f'<text x="{left - 4}" y="{top + h}" font-size="11" text-anchor="end" '
              f'fill="#5b6670">0</text>',
              f'<text x="{left}" y="{height - 6}" font-size="11" fill="#5b6670">'
              f'{minutes} min ago</text>',
              f'<text x="{left + w}" y="{height - 6}" font-size="11" text-anchor="end" '
              f'fill="#5b6670">now ({escape(unit)}, last {points[-1][1]:.1f})</text>',
              "</svg>"]
    return "".join(parts)
