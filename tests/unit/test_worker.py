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
    monkeypatch.setattr(service._SharedAcceptPort, "_accept_one",
                        lambda self: accepted.append("accept"))
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


def test_serve_fires_once_every_worker_accepts_or_ended() -> None:
    """``serve()`` (after which the main process writes listeners.json) fires only when every
    live worker answered ``serving`` to its ``serve`` line, or ended meanwhile: a test or
    client that reads listeners.json and finds the main process stopped still gets its
    connection accepted by a worker (stop 27's CI: the worker had not been told yet)."""
    from twisted.python.failure import Failure

    from pop3coexist.workers import WorkerSupervisor, _WorkerProtocol

    config = SimpleNamespace(server=SimpleNamespace(workers=3))
    sup = WorkerSupervisor(config, reactor=object())  # type: ignore[arg-type]
    sup._cleanup = lambda proto: None  # type: ignore[method-assign]  # no tables here
    one, two = _WorkerProtocol(sup, 1), _WorkerProtocol(sup, 2)
    for n, proto in ((1, one), (2, two)):
        proto.makeConnection(_ChildTransport())  # type: ignore[arg-type]
        sup.workers[n] = proto
        proto.childDataReceived(3, b"ready\n")
    done = sup.serve()
    assert one.transport.written == two.transport.written == [(0, b"serve\n")]
    assert not done.called
    one.childDataReceived(3, b"serving\n")
    assert not done.called
    two.processEnded(Failure(RuntimeError("killed")))  # ended instead: no wait for it
    assert done.called


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


def test_a_replaced_worker_changes_the_recorded_pids(monkeypatch) -> None:  # noqa: ANN001
    """The supervisor reports its live workers when they change while serving: a worker that
    ends is left out at once (no dead pid in listeners.json), its replacement is in once it
    accepts (its ``serving`` line after ``serve``)."""
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from pop3coexist.workers import WorkerSupervisor

    class Reactor(Clock):
        pids = iter([5001, 5002])

        def spawnProcess(self, proto, executable, args, env, childFDs):  # noqa: ANN001, N802, N803
            transport = _ChildTransport()
            transport.pid = next(self.pids)
            proto.makeConnection(transport)

    reactor = Reactor()
    config = SimpleNamespace(server=SimpleNamespace(workers=2), path=None)
    sup = WorkerSupervisor(config, reactor=reactor)  # type: ignore[arg-type]
    monkeypatch.setattr(sup, "_cleanup", lambda proto: None)  # no tables or spool here
    recorded: list[list[int]] = []
    sup.on_change = lambda: recorded.append(sup.pids())
    sup.startService()
    first = sup._spawn(1)
    first.childDataReceived(3, b"ready\n")
    sup.serve()
    assert sup.pids() == [5001] and recorded == []
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    assert recorded == [[]] and sup.pids() == []
    reactor.advance(30)  # past the restart delay
    new = sup.workers[1]
    assert new.pid == 5002 and recorded == [[]]  # spawned, not listening yet
    new.childDataReceived(3, b"ready\n")
    assert new.transport.written == [(0, b"serve\n")] and recorded == [[]]  # told, not yet
    new.childDataReceived(3, b"serving\n")
    assert recorded == [[], [5002]] and sup.pids() == [5002]
    sup.stopService()


def _classic(event: dict, system: str) -> str:
    from twisted.logger import formatEventAsClassicLogText

    return formatEventAsClassicLogText({**event, "log_system": system}) or ""


def test_a_worker_event_line_gives_the_main_log_the_same_line_and_mail_fields() -> None:
    """A worker's event, sent as one lean line (``encode_worker_event``), is written to the
    main log as the same text line as the event itself would give there (text, time, level,
    namespace, a failure's traceback); a mail event keeps the fields the mail log reads."""
    from twisted.logger import Logger, globalLogPublisher
    from twisted.python.failure import Failure

    from pop3coexist import events
    from pop3coexist.workers import _WorkerProtocol, encode_worker_event

    captured: list[dict] = []
    log = Logger(namespace="pop3coexist.smtp.server", observer=captured.append)
    log.info("SMTP {queue_id} accepted from {client}: {{braces}} kept", mail_event=events.ACCEPTED,
             queue_id="Q1", client="127.0.0.1", sender="a@b.test", size=42,
             recipients=["x@y.test", "z@y.test"], listener="smtp")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it broke for {who}", Failure(), who="me")
    lines = [encode_worker_event(e) for e in captured]
    for line in lines:
        assert line is not None and line.endswith(b"\n") and line.count(b"\n") == 1
    published: list[dict] = []
    globalLogPublisher.addObserver(published.append)
    try:
        proto = _WorkerProtocol(supervisor=None, number=2)  # type: ignore[arg-type]
        proto.pid = 4242
        data = b"".join(lines)  # type: ignore[arg-type]
        for i in range(0, len(data), 7):  # split anywhere: lines are joined again
            proto.childDataReceived(1, data[i:i + 7])
    finally:
        globalLogPublisher.removeObserver(published.append)
    assert len(published) == 2
    for original, got in zip(captured, published, strict=True):
        want = _classic(original, f"worker 2: {original['log_namespace']}"
                                  f"#{original['log_level'].name}")
        assert _classic(got, got["log_system"]) == want
    assert "{braces} kept" in _classic(published[0], "x")
    assert "ZeroDivisionError" in _classic(published[1], "x")
    mail = published[0]
    assert events.name_of(mail) == events.ACCEPTED and mail["worker_event"] == 2
    assert events.expand(mail) == events.expand(captured[0])
    assert mail["worker_pid"] == 4242


def test_the_worker_log_writer_writes_each_event_as_one_whole_line() -> None:
    """``worker.LogWriter`` writes each event with one write of a whole line (nothing kept in
    a buffer, so a kill -9 of the worker loses no logged line), and never raises."""
    from twisted.logger import Logger

    from pop3coexist.worker import LogWriter

    r, w = os.pipe()
    try:
        writer = LogWriter(w)
        log = Logger(namespace="t", observer=writer)
        for i in range(50):
            log.info("line {i} {pad}", i=i, pad="x" * 500)
        data = os.read(r, 1 << 20)
        lines = data.split(b"\n")
        assert lines.pop() == b"" and len(lines) == 50
        from pop3coexist.workers import decode_worker_event

        texts = [decode_worker_event(line)["log_text"] for line in lines]  # type: ignore[index]
        assert all(text.startswith(f"line {i} ") for i, text in enumerate(texts))
        os.close(r)
        r = -1
        log.info("the main process is gone")  # EPIPE: ignored (SIGPIPE is ignored by Python)
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)


def test_a_workers_event_line_is_the_same_json_as_before() -> None:
    """encode_worker_event's one encoder made once (issue 17) writes the bytes json.dumps
    wrote: compact separators, non-ASCII escaped, values JSON cannot hold as their str()."""
    import json
    from pathlib import PurePosixPath

    from twisted.logger import LogLevel

    from pop3coexist.workers import encode_worker_event

    event = {"log_format": "SMTP {queue_id} accepted from <{sender}>", "log_level": LogLevel.info,
             "log_namespace": "pop3coexist.smtp.server", "log_time": 1796093191.5,
             "mail_event": "accepted", "queue_id": "Q1", "sender": "jörg@example.test",
             "recipients": ["a@b.test"], "client": PurePosixPath("/run/sock")}
    line = encode_worker_event(event)
    record = {"w": 1, "t": 1796093191.5, "l": "info", "n": "pop3coexist.smtp.server",
              "x": "SMTP Q1 accepted from <jörg@example.test>"}
    assert line is not None
    decoded = json.loads(line)
    record["m"] = decoded["m"]
    assert line == json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
    assert decoded["m"]["client"] == "/run/sock" and "\\u00f6" in line.decode()


def _through_the_pipe(captured: list[dict], fields: bool) -> tuple[list[bytes], list[dict]]:
    """Encode ``captured`` as a worker does (``fields``: the main process writes a mail log),
    feed the lines to the main process's side in odd pieces; (lines, events published)."""
    from twisted.logger import globalLogPublisher

    from pop3coexist.workers import _WorkerProtocol, encode_worker_event

    lines = [encode_worker_event(e, fields) for e in captured]
    published: list[dict] = []
    globalLogPublisher.addObserver(published.append)
    try:
        proto = _WorkerProtocol(supervisor=None, number=1)  # type: ignore[arg-type]
        proto.pid = 77
        data = b"".join(line for line in lines if line is not None)
        for i in range(0, len(data), 5):
            proto.childDataReceived(1, data[i:i + 5])
    finally:
        globalLogPublisher.removeObserver(published.append)
    return lines, published  # type: ignore[return-value]


def _smtp_events() -> list[dict]:
    """One SMTP message's events as the worker logs them (connect, stored at debug level,
    accepted, disconnect), plus an event that is no mail event and one with no text."""
    from twisted.logger import Logger

    from pop3coexist import events

    captured: list[dict] = []
    log = Logger(namespace="pop3coexist.smtp.server", observer=captured.append)
    log.info("SMTP connect from {client} ({listener})", mail_event=events.CONNECT,
             protocol="smtp", listener="smtp", client="127.0.0.1")
    log.debug("SMTP {queue_id} stored in {mailboxes}", mail_event=events.STORED,
              queue_id="Q9", mailboxes=["ann@pop.test"])
    log.info("SMTP {id} accepted from {ip}: {size} octets, {n} recipients: caf\u00e9",
             id="Q9", ip="127.0.0.1", size=42, n=1, mail_event=events.ACCEPTED,
             protocol="smtp", listener="smtp", client="127.0.0.1", queue_id="Q9",
             sender="a@b.test", recipients=["ann@pop.test"], user=None)
    log.info("SMTP disconnect from {client} ({listener})", mail_event=events.DISCONNECT,
             protocol="smtp", listener="smtp", client="127.0.0.1")
    log.warn("a plain warning {x}", x="\x1f inside")
    log.info("", mail_event=events.CONNECT, client="127.0.0.1")  # no text: nothing to write
    return captured


def test_without_a_mail_log_a_worker_sends_lean_text_lines_that_give_the_same_main_log() -> None:
    """With no mail log in the main process (``fields`` False), every event of an SMTP message
    goes down the pipe as one lean text line (no JSON), and the main process publishes an
    event per line that renders as the same classic log line (time, ``[worker N: namespace#
    level]``, text, non-ASCII and a separator character in the text kept), in order; an event
    with no text writes nothing."""
    captured = _smtp_events()
    lines, published = _through_the_pipe(captured, fields=False)
    assert lines[-1] is None
    sent = [line for line in lines if line is not None]
    assert all(line.startswith(b"\x1e") and line.count(b"\n") == 1 for line in sent)
    assert not any(b'{"w":' in line for line in sent)
    assert len(published) == 5
    for original, got in zip(captured, published, strict=False):
        want = _classic(original, f"worker 1: {original['log_namespace']}"
                                  f"#{original['log_level'].name}")
        assert _classic(got, got["log_system"]) == want
        assert got["log_system"] == (f"worker 1: pop3coexist.smtp.server"
                                     f"#{original['log_level'].name}")
        assert got["worker_event"] == 1 and got["worker_pid"] == 77
    assert "caf\u00e9" in _classic(published[2], "x")


def test_with_a_mail_log_a_worker_sends_mail_events_with_their_fields() -> None:
    """With a mail log in the main process (``fields`` True), a worker's mail events go as
    JSON lines with the fields the mail log reads (its lines are the worker's own), and an
    event that is no mail event still goes lean; the text lines are the same either way."""
    from pop3coexist import events

    captured = _smtp_events()
    lines, published = _through_the_pipe(captured, fields=True)
    assert [line[:5] == b'{"w":' for line in lines[:5]] == [True] * 4 + [False]  # type: ignore[index]
    assert lines[-1] is not None and lines[-1].startswith(b'{"w":')  # a mail event, no text
    for original, got in zip(captured, published, strict=True):
        assert events.expand(got) == events.expand(original)
    lean, _ = _through_the_pipe(captured, fields=False)
    assert [_classic(e, "x") for e in published[:5]] == \
        [_classic(e, "x") for e in _through_the_pipe(captured, fields=False)[1]]
    assert lean[4] == lines[4]


def test_a_traceback_or_a_backslash_goes_as_json_even_without_a_mail_log() -> None:
    """An event whose text has a line break (a failure's traceback) or a backslash is sent in
    the JSON form even when lean lines are allowed (the lean form has no escapes), and the
    main log gets its whole text; a lean line cut short is logged as the worker's raw text,
    never dropped silently."""
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    captured: list[dict] = []
    log = Logger(namespace="pop3coexist.x", observer=captured.append)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    log.info("a path C:\\temp\\new")
    lines, published = _through_the_pipe(captured, fields=False)
    assert all(line.startswith(b'{"w":') for line in lines)  # type: ignore[union-attr]
    assert "ZeroDivisionError" in _classic(published[0], "x")
    assert _classic(published[1], "x").endswith("a path C:\\temp\\new\n")
    from twisted.logger import globalLogPublisher

    from pop3coexist.workers import _WorkerProtocol

    got: list[dict] = []
    globalLogPublisher.addObserver(got.append)
    try:
        proto = _WorkerProtocol(supervisor=None, number=1)  # type: ignore[arg-type]
        proto.childDataReceived(1, b"\x1e1.5\x1finfo\n")  # cut short: two fields
    finally:
        globalLogPublisher.removeObserver(got.append)
    assert len(got) == 1 and "worker 1: " in _classic(got[0], "x")
