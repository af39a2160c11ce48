"""The worker process's small parts: the supervisor turns a worker's JSON log lines into the
main log's events, shares accepts, makes the shared tables, says when to serve."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from zope.interface import implementer

from pop3coexist.interfaces import ISharedConnectionLimiter


def test_worker_log_lines_become_events_of_the_main_log() -> None:
    """A worker's JSON log line is re-published with ``log_system`` naming the worker, its
    namespace and level; a line that is not JSON is still logged, as text."""
    from twisted.logger import Logger, eventAsJSON, formatEventAsClassicLogText, globalLogPublisher

    from pop3coexist.workers import _WorkerProtocol

    events: list[dict] = []
    captured: list[dict] = []
    Logger(namespace="pop3coexist.x", observer=captured.append).warn("hello {who}", who="there")
    line = eventAsJSON(captured[0]).encode() + b"\nnot json\n"
    globalLogPublisher.addObserver(events.append)
    try:
        proto = _WorkerProtocol(supervisor=None, number=3)  # type: ignore[arg-type]
        proto.childDataReceived(1, line[:10])
        proto.childDataReceived(1, line[10:])
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEventAsClassicLogText(e) for e in events]
    assert "[worker 3: pop3coexist.x#warn] hello there" in texts[0]
    assert "worker 3: not json" in texts[1]


@implementer(ISharedConnectionLimiter)
class _Limiter:
    def __init__(self) -> None:
        self.busier = True

    def acquire(self, client: str) -> bool:
        return True

    def release(self, client: str) -> None:
        pass

    def busier_than_others(self) -> bool:
        return self.busier


class _Factory:
    def __init__(self) -> None:
        self.limiter = _Limiter()


def test_a_busier_process_leaves_a_new_connection_to_the_others_for_a_moment(monkeypatch) -> None:  # noqa: ANN001
    """A shared port in a process holding more connections than another stops reading for
    YIELD_DELAY instead of accepting; then it reads again and accepts whatever is still
    waiting (the other process may be busy or dead); it accepts one connection per wake-up."""
    from twisted.internet import tcp
    from twisted.internet.task import Clock

    from pop3coexist import service

    accepted: list[str] = []

    class Port(tcp.Port):
        def __init__(self) -> None:  # no socket: only the accept decision is under test
            self.factory = _Factory()
            self.reactor = Clock()
            self.connected = True
            self.disconnecting = False
            self.reading = True

        def stopReading(self) -> None:  # noqa: N802
            self.reading = False

        def startReading(self) -> None:  # noqa: N802
            self.reading = True

    port = Port()
    service.share_accepts(port)  # only exact tcp.Port instances are changed
    assert type(port) is Port
    port.__class__ = type("SharedPort", (service._SharedAcceptPort, Port), {})
    monkeypatch.setattr(tcp.Port, "doRead", lambda self: accepted.append("accept"))
    port.doRead()
    assert accepted == [] and not port.reading
    port.reactor.advance(service.YIELD_DELAY)
    assert port.reading
    port.doRead()  # still there after the pause: taken here
    assert accepted == ["accept"]
    port.factory.limiter.busier = False
    port.doRead()
    assert accepted == ["accept", "accept"]
    assert port.numberAccepts == 1
    port.numberAccepts = 40
    assert port.numberAccepts == 1


def test_the_main_process_makes_its_connection_tables_when_the_server_starts(tmp_path: Path) -> None:
    """With workers > 1 the main process's limiters open their shared tables only at start
    (after twistd's --uid switch, so the workers' user owns them); before that nothing is
    counted; afterwards a worker's limiter on the same table sees the main process's count."""
    from pop3coexist.config import parse_config
    from pop3coexist.policy.limiters import TableLimiter, limiter_table, make_limiters
    from pop3coexist.policy.sharedlimit import SharedConnectionLimiter

    config = parse_config(
        f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}"\nworkers = 2\n'
        '[pop3]\nmax_connections_per_client = 2\n'
    )
    (tmp_path / "run").mkdir()
    limiters = make_limiters(config, 0)
    pop3 = limiters["pop3"]
    assert isinstance(pop3, TableLimiter) and not limiter_table(config, "pop3").exists()
    assert not pop3.acquire("192.0.2.1") and pop3.open == 0
    pop3.start()
    assert pop3.acquire("192.0.2.1")
    worker = SharedConnectionLimiter(limiter_table(config, "pop3"), 1, 1000, 2)
    assert worker.acquire("192.0.2.1") and not worker.acquire("192.0.2.1")
    assert not pop3.busier_than_others() and pop3.open == 1
    pop3.release("192.0.2.1")
    assert worker.acquire("192.0.2.1")


class _ChildTransport:
    """Records what the main process writes to a worker's stdin."""

    pid = 4321

    def __init__(self) -> None:
        self.written: list[tuple[int, bytes]] = []

    def writeToChild(self, fd: int, data: bytes) -> None:  # noqa: N802
        self.written.append((fd, data))


def test_workers_are_told_to_serve_only_when_start_up_is_complete() -> None:
    """A worker that reports ``ready`` gets nothing on its stdin until the supervisor's
    ``serve()`` (start-up complete in every process); then it gets ``serve``; a replacement
    worker that becomes ready later gets ``serve`` at once."""
    from pop3coexist.workers import WorkerSupervisor, _WorkerProtocol

    config = SimpleNamespace(server=SimpleNamespace(workers=3))
    sup = WorkerSupervisor(config, reactor=object())  # type: ignore[arg-type]
    first = _WorkerProtocol(sup, 1)
    first.makeConnection(_ChildTransport())  # type: ignore[arg-type]
    sup.workers[1] = first
    first.childDataReceived(3, b"ready\n")
    assert first.ready.called and first.transport.written == []
    sup.serve()
    assert first.transport.written == [(0, b"serve\n")]
    replacement = _WorkerProtocol(sup, 2)
    replacement.makeConnection(_ChildTransport())  # type: ignore[arg-type]
    sup.workers[2] = replacement
    replacement.childDataReceived(3, b"rea")
    assert replacement.transport.written == []
    replacement.childDataReceived(3, b"dy\n")
    assert replacement.transport.written == [(0, b"serve\n")]


def test_watch_parent_passes_lines_and_stops_at_end_of_file() -> None:
    """The worker's stdin watcher hands each whole line (split across reads or not) to the
    reactor thread, and stops the reactor when the main process's end of the pipe closes."""
    import threading

    from pop3coexist.worker import watch_parent

    calls: list[tuple] = []
    done = threading.Event()

    class _Reactor:
        running = True

        def callFromThread(self, f, *args) -> None:  # noqa: N802, ANN001
            calls.append((getattr(f, "__name__", f), *args))
            if getattr(f, "__name__", "") == "_stop":
                done.set()

    lines: list[str] = []
    r, w = os.pipe()
    thread = watch_parent(_Reactor(), r, on_line=lines.append)
    os.write(w, b"ser")
    os.write(w, b"ve\nother\n")
    os.close(w)
    assert done.wait(30)
    thread.join(30)
    os.close(r)
    assert [c for c in calls if c[0] == "append"] == [("append", "serve"), ("append", "other")]
    assert calls[-1][0] == "_stop"
