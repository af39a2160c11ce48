"""The monitoring HTTP listener (``[metrics] listen``): ``/metrics`` and ``/healthz``.

- ``GET /metrics``: the Prometheus text exposition format (version 0.0.4) of every process's
  metrics (``monitor.metrics``), read in a thread so the reactor never waits for the files;
- ``GET /healthz``: JSON ``{"status": "ok"|"failing", "checks": {name: {"ok": bool,
  "detail": str}}}`` with status 200 when every check passes, else 503. The checks:
  ``listeners`` (every listener bound and accepting, every worker process alive),
  ``store`` (the mail root takes a fsynced probe file), ``queue`` (the queue folders can be
  listed and written), ``directory`` (the account source answers its self-check: the
  password file, the LDAP directory, PAM), and on a node of several sharing ``state_dir``
  (``server.local_dir`` set) ``volume`` (the shared volume takes, and gives back, this node's
  fsynced probe ``<state_dir>/nodes/<node_id>.alive``: false while the volume is unreachable,
  ENOTCONN or a stalled write, true again by itself when it returns). Each check has
  ``CHECK_TIMEOUT`` seconds.

Only the main process listens here; it serves nothing else (no mail protocol).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web import resource, server

from pop3coexist.monitor.metrics import StateCollector, make_registry, queue_figures

CHECK_TIMEOUT = 5.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _Async(resource.Resource):
    """A leaf resource whose answer comes from an ``async def answer(request)`` returning
    (status, content type, body)."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web's name)
        d = defer.ensureDeferred(self.answer(request))

        def done(result: tuple[int, bytes, bytes]) -> None:
            status, ctype, body = result
            if request.finished or getattr(request, "_disconnected", False):
                return
            request.setResponseCode(status)
            request.setHeader(b"content-type", ctype)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            done((500, b"text/plain; charset=utf-8",
                  f"error: {failure.getErrorMessage()}\n".encode()))

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    async def answer(self, request: Any) -> tuple[int, bytes, bytes]:
        raise NotImplementedError


class MetricsPage(_Async):
    """``/metrics`` (see the module docstring)."""

    def __init__(self, metrics: Any, queue_dir: Any, store_stats: Any,
                 run_blocking: Callable[..., Any]) -> None:
        super().__init__()
        self.metrics = metrics
        self.queue_dir = queue_dir
        self.store_stats = store_stats
        self.run_blocking = run_blocking

    async def answer(self, request: Any) -> tuple[int, bytes, bytes]:
        store = self.store_stats.figures() if self.store_stats is not None else ({}, 0.0)
        body = await self.run_blocking(self._render, store)
        return 200, CONTENT_TYPE, body

    def _render(self, store: Any) -> bytes:
        from prometheus_client import generate_latest

        queue = queue_figures(self.queue_dir)
        state = StateCollector(lambda: queue, lambda: store)
        return generate_latest(make_registry(self.metrics, state))


class HealthPage(_Async):
    """``/healthz`` (see the module docstring). ``checks`` maps a name to a blocking function
    that raises (with a clear message) when that part does not answer, or returns a detail
    string; ``listeners`` is called in the reactor thread and returns (ok, detail)."""

    def __init__(self, listeners: Callable[[], tuple[bool, str]],
                 checks: dict[str, Callable[[], str | None]],
                 run_blocking: Callable[..., Any], reactor: Any) -> None:
        super().__init__()
        self.listeners = listeners
        self.checks = checks
        self.run_blocking = run_blocking
        self.reactor = reactor

    async def _one(self, check: Callable[[], str | None]) -> dict[str, Any]:
        d = self.run_blocking(check)
        d.addTimeout(CHECK_TIMEOUT, self.reactor)
        try:
            detail = await d
        except defer.TimeoutError:
            return {"ok": False, "detail": f"no answer within {CHECK_TIMEOUT:g} s"}
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            return {"ok": False, "detail": str(e) or e.__class__.__name__}
        return {"ok": True, "detail": detail or "ok"}

    async def answer(self, request: Any) -> tuple[int, bytes, bytes]:
        results: dict[str, Any] = {}
        try:
            ok, detail = self.listeners()
        except Exception as e:  # noqa: BLE001
            ok, detail = False, str(e)
        results["listeners"] = {"ok": ok, "detail": detail}
        names = list(self.checks)
        answers = await defer.gatherResults(
            [defer.ensureDeferred(self._one(self.checks[n])) for n in names])
        results.update(zip(names, answers, strict=True))
        healthy = all(r["ok"] for r in results.values())
        body = json.dumps({"status": "ok" if healthy else "failing", "checks": results},
                          indent=1, sort_keys=True).encode() + b"\n"
        return (200 if healthy else 503), b"application/json", body


class _QuietSite(server.Site):
    """A Site that writes no access log line per request (a scrape every 15 s would fill
    the server's log)."""

    def log(self, request: Any) -> None:
        pass


def make_site(metrics_page: MetricsPage, health_page: HealthPage) -> server.Site:
    """The HTTP site: ``/metrics``, ``/healthz``, and a short index at ``/``."""
    root = resource.Resource()
    root.putChild(b"metrics", metrics_page)
    root.putChild(b"healthz", health_page)
    root.putChild(b"", resource.Resource())  # 404 elsewhere; "/" lists nothing
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


# --------------------------------------------------------------------------- the checks


def check_store(store: Any) -> str:
    """Blocking: the mail root takes a fsynced probe file (``IMailStore.check_writable``)."""
    store.check_writable()
    return "mail root writable"


def check_queue(queue_dir: Any) -> str:
    """Blocking: the queue folders can be listed and take a fsynced probe file."""
    import os
    import secrets
    from pathlib import Path

    root = Path(queue_dir)
    count = len(os.listdir(root / "env")) if (root / "env").is_dir() else 0
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe = tmp / f"probe.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return f"{count} message(s) queued"


def check_accounts(checker: Any, method: str, directory_url: str = "") -> str:
    """Blocking: the account source answers: its self-check (``interfaces.ISelfCheck``:
    password file readable, directory settings usable, PAM present) and, for the directory
    method, a TCP connection to the directory server."""
    import socket
    from urllib.parse import urlsplit

    from pop3coexist.interfaces import ISelfCheck

    if ISelfCheck.providedBy(checker):
        checker.check()
    if method == "directory" and directory_url:
        parts = urlsplit(directory_url)
        port = parts.port or (636 if parts.scheme.lower() == "ldaps" else 389)
        with socket.create_connection((parts.hostname or "127.0.0.1", port),
                                      timeout=CHECK_TIMEOUT - 1):
            pass
        return f"directory server {parts.hostname}:{port} answers"
    return f"{method} accounts readable"


def check_volume(state_dir: Any, node: str) -> str:
    """Blocking: the shared volume under ``state_dir`` takes this node's probe file
    (``nodes/<node>.alive``: written to a temporary name, fsynced, renamed into place and read
    back), so another node or an administrator also sees when this node last wrote. Raises
    OSError (ENOTCONN when the volume is cut off, EROFS without quorum) with the path."""
    import os
    import time
    from pathlib import Path

    from pop3coexist.fsutil import write_atomic

    folder = Path(state_dir) / "nodes"
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = folder / f"{node}.alive"
    text = f"{node} pid {os.getpid()} at {time.time():.3f}\n".encode()
    write_atomic(final, text, sync_dir=False)
    if final.read_bytes() != text:
        raise OSError(f"the probe {final} read back differs from what was written")
    took = (time.monotonic() - started) * 1000
    return f"shared volume writable by node {node} ({took:.0f} ms)"
