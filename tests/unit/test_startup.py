"""Start-up sequencing and the state folder's lock (issue 11, faults 16 and 17).

The server binds every listener before anything serves; any failure after the first listener
is up (a port taken, a shared table that cannot be made, ``listeners.json`` that cannot be
written, a worker process that does not start) stops what was started, accepts nothing, reports
one line naming what failed (also on twistd's status pipe), and stops the reactor. A second
server on a locked state folder is refused, naming the holder's pid.

The listeners here bind real loopback sockets through a MemoryReactorClock that is never run,
so "accepting" is visible as "registered for reading" in the reactor.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.application import service
from twisted.internet import defer, error, protocol, tcp
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from pop3coexist.interfaces import IStartStop
from pop3coexist.service import ListenerService, Pop3CoexistService
from pop3coexist.startup import StartupReport, StateInUse, StateLock


class _Reactor(MemoryReactorClock):
    """A memory reactor whose listenTCP binds a real loopback socket (never accepted from)."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,  # noqa: N802
                  interface: str = "") -> tcp.Port:
        p = tcp.Port(port, factory, backlog, interface, self)
        p.startListening()
        return p


class _Recorder(service.Service):
    """Stands for the delivery runner: records whether it was ever started."""

    started = False

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.started = True


@implementer(IStartStop)
class _BrokenTable:
    """A shared table that cannot be created."""

    def start(self) -> None:
        raise OSError(errno.EISDIR, "Is a directory", "/state/run/connections-pop3.table")

    def close(self) -> None:
        pass


class _Supervisor(service.Service):
    """Stands for the WorkerSupervisor: ``outcome`` is what start_workers gives."""

    def __init__(self, outcome: defer.Deferred) -> None:
        self.outcome = outcome
        self.served = False

    def start_workers(self, ports: list) -> defer.Deferred:
        return self.outcome

    def serve(self) -> defer.Deferred:
        self.served = True
        return defer.succeed(None)  # every worker said "serving"

    def pids(self) -> list[int]:
        return [4242]


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def _server(tmp_path: Path, descriptions: list[str], reactor: _Reactor,
            twistd: dict | None = None) -> tuple[Pop3CoexistService, _Recorder]:
    config = SimpleNamespace(server=SimpleNamespace(state_dir=tmp_path, run_dir=tmp_path / "run"))
    top = Pop3CoexistService(config, reactor, StartupReport(twistd))  # type: ignore[arg-type]
    for i, desc in enumerate(descriptions):
        top.add_listener(ListenerService(desc, protocol.Factory.forProtocol(protocol.Protocol),
                                         f"role{i}", reactor=reactor))
    runner = _Recorder()
    runner.setServiceParent(top)
    return top, runner


def _accepting(top: Pop3CoexistService, reactor: _Reactor) -> list[bool]:
    readers = reactor.getReaders()
    return [ls.port is not None and ls.port in readers for ls in top.listeners]


def _start(top: Pop3CoexistService) -> None:
    """What twistd does: privilegedStartService, then startService."""
    top.privilegedStartService()
    top.startService()


def _pipe_text(r: int) -> bytes:
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    return data


def test_port_taken_stops_everything_and_reports_the_listener(tmp_path: Path) -> None:
    """With the second listener's port taken: the first (bound) listener never accepts, the
    delivery runner never starts, listeners.json is not written, the status pipe gets
    ``1 cannot listen on tcp:N... (role1): Address already in use``, the reactor stops, and
    stopping the service frees the first port."""
    taken, port = _taken_port()
    reactor = _Reactor()
    r, w = os.pipe()
    twistd = {"statusPipe": w}
    top, runner = _server(tmp_path, ["tcp:0:interface=127.0.0.1",
                                     f"tcp:{port}:interface=127.0.0.1"], reactor, twistd)
    try:
        _start(top)
        assert twistd["statusPipe"] is None  # taken from twistd: it must not say "0"
        assert top.report.failed
        assert _accepting(top, reactor) == [False, False]
        assert not runner.started
        assert not (tmp_path / "run" / "listeners.json").exists()
        assert _pipe_text(r) == (f"1 cannot listen on tcp:{port}:interface=127.0.0.1 (role1): "
                                 "Address already in use").encode()
        reactor.run()  # the stop was asked for "when running"
        assert reactor.hasStopped
        first = top.listeners[0].bound_port()
        top.stopService()
        reactor.advance(0)
        again = socket.socket()
        again.bind(("127.0.0.1", first))  # released
        again.close()
    finally:
        taken.close()


def test_all_bound_then_serving_and_listeners_json(tmp_path: Path) -> None:
    """When every step succeeds the listeners accept only at the end, after the runner
    started; listeners.json names the bound ports; the status pipe gets ``0``."""
    reactor = _Reactor()
    r, w = os.pipe()
    top, runner = _server(tmp_path, ["tcp:0:interface=127.0.0.1"] * 2, reactor,
                          {"statusPipe": w})
    top.privilegedStartService()
    assert _accepting(top, reactor) == [False, False]  # bound, paused
    top.startService()
    assert runner.started
    assert _accepting(top, reactor) == [True, True]
    assert _pipe_text(r) == b"0"
    record = json.loads((tmp_path / "run" / "listeners.json").read_text())
    assert record["listeners"] == {"role0": [top.listeners[0].bound_port()],
                                   "role1": [top.listeners[1].bound_port()]}
    top.stopService()
    reactor.advance(0)
    assert not (tmp_path / "run" / "listeners.json").exists()


def test_shared_table_failure_names_the_file(tmp_path: Path) -> None:
    """A shared table that cannot be created: nothing serves, nothing else starts, and the
    line names the table file."""
    reactor = _Reactor()
    top, runner = _server(tmp_path, ["tcp:0:interface=127.0.0.1"], reactor)
    top.limiters = {"pop3": _BrokenTable()}
    _start(top)
    assert top.report.outcome == ("cannot create a table shared with the worker processes: "
                                  "[Errno 21] Is a directory: "
                                  "'/state/run/connections-pop3.table'")
    assert not runner.started
    assert _accepting(top, reactor) == [False]
    top.stopService()
    reactor.advance(0)


def test_worker_failure_stops_runner_and_never_serves(tmp_path: Path) -> None:
    """A worker that ends before it listens: the workers are never told to serve, the main
    process's listeners never accept, the line says why, and stopping stops the runner."""
    reactor = _Reactor()
    workers: defer.Deferred = defer.Deferred()
    top, runner = _server(tmp_path, ["tcp:0:interface=127.0.0.1"], reactor)
    top.supervisor = _Supervisor(workers)
    top.supervisor.setServiceParent(top)
    _start(top)
    assert top.report.outcome is None  # waiting for the workers
    assert _accepting(top, reactor) == [False]
    workers.errback(RuntimeError("worker 2 (pid 99) ended with exit status 3 before it "
                                 "listened"))
    assert top.report.outcome == ("the worker processes did not start: worker 2 (pid 99) "
                                  "ended with exit status 3 before it listened")
    assert not top.supervisor.served
    assert _accepting(top, reactor) == [False]
    assert not (tmp_path / "run" / "listeners.json").exists()
    top.stopService()
    reactor.advance(0)
    assert not runner.running


def test_workers_ready_then_everyone_serves(tmp_path: Path) -> None:
    """Once every worker listens, the workers are told to serve, the main process accepts,
    and listeners.json lists the worker pids."""
    reactor = _Reactor()
    top, _ = _server(tmp_path, ["tcp:0:interface=127.0.0.1"], reactor)
    top.supervisor = _Supervisor(defer.succeed(None))
    top.supervisor.setServiceParent(top)
    _start(top)
    assert top.report.outcome == "ok"
    assert top.supervisor.served
    assert _accepting(top, reactor) == [True]
    record = json.loads((tmp_path / "run" / "listeners.json").read_text())
    assert record["workers"] == [os.getpid(), 4242]
    top.stopService()
    reactor.advance(0)


def test_unwritable_listeners_json_fails_the_start(tmp_path: Path) -> None:
    """``run`` that is a file, not a folder: listeners.json cannot be written, so the start
    fails naming it, and the listeners stop accepting."""
    (tmp_path / "run").write_text("not a folder")
    reactor = _Reactor()
    top, _ = _server(tmp_path, ["tcp:0:interface=127.0.0.1"], reactor)
    _start(top)
    assert top.report.failed
    assert f"cannot write {tmp_path / 'run' / 'listeners.json'}" in str(top.report.outcome)
    assert _accepting(top, reactor) == [False]
    top.stopService()
    reactor.advance(0)


def test_cannot_listen_error_without_socket_error(tmp_path: Path) -> None:
    """A listener that fails without an OS error still yields one line naming it."""

    class _Refusing(_Reactor):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50,  # noqa: N802
                      interface: str = "") -> tcp.Port:
            raise error.CannotListenError(interface, port, "refused by test")

    reactor = _Refusing()
    top, _ = _server(tmp_path, ["tcp:7:interface=127.0.0.1"], reactor)
    _start(top)
    assert str(top.report.outcome).startswith("cannot listen on tcp:7:interface=127.0.0.1 "
                                              "(role0): ")


# ---------------------------------------------------------------- the state folder's lock


def test_second_lock_is_refused_naming_the_pid(tmp_path: Path) -> None:
    """While one StateLock holds a state folder, another is refused with a message naming
    the holder's pid and the lock file; after release it can be taken."""
    first = StateLock.acquire(tmp_path)
    try:
        with pytest.raises(StateInUse) as caught:
            StateLock.acquire(tmp_path)
        text = str(caught.value)
        assert f"(pid {os.getpid()};" in text
        assert str(tmp_path / "run" / "server.lock") in text
        assert (tmp_path / "run" / "server.lock").read_text() == f"{os.getpid()}\n"
    finally:
        first.release()
    StateLock.acquire(tmp_path).release()


def test_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    """A lock file left by a dead process (a pid, no lock held) does not block a start; the
    new holder's pid replaces the old one."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "server.lock").write_text("999999999\n")
    lock = StateLock.acquire(tmp_path)
    try:
        assert (tmp_path / "run" / "server.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_report_without_twistd_is_quiet() -> None:
    """Outside twistd (no status pipe) the report only records the outcome, once."""
    report = StartupReport(None)
    report.hold()
    report.fail("first")
    report.fail("second")
    report.succeed()
    assert report.outcome == "first" and report.failed


# --------------------------------------------------------------------------- issue 11 re-run


def test_a_queue_that_cannot_start_stops_everything(tmp_path: Path) -> None:
    """Fault 16: the delivery runner's queue scan fails (its folder cannot be read or
    written): nothing ever accepts, listeners.json is not written, and the one line names the
    queue folder and the reason (the server used to go on serving with the queue dead)."""
    reactor = _Reactor()
    top, _ = _server(tmp_path, ["tcp:0:interface=127.0.0.1"], reactor)
    top.config.server.queue_dir = tmp_path / "queue"
    top.outbound = SimpleNamespace(started=defer.Deferred())
    _start(top)
    assert top.report.outcome is None  # waiting for the queue scan
    top.outbound.started.errback(OSError(errno.EEXIST, "File exists"))
    assert top.report.outcome == f"the outbound queue {tmp_path / 'queue'} cannot start: File exists"
    assert _accepting(top, reactor) == [False]
    assert not (tmp_path / "run" / "listeners.json").exists()
    top.stopService()
    reactor.advance(0)


def _state_problem(state: Path) -> str:
    from pop3coexist.errors import ConfigError
    from pop3coexist.startup import check_state_dir

    with pytest.raises(ConfigError) as info:
        check_state_dir(state)
    return str(info.value)


@pytest.mark.parametrize("file,words", [
    ("", "is a file where the server needs a folder"),
    ("run", "is a file where the server needs a folder"),
    ("mailroot", "is a file where the server needs a folder"),
    ("queue", "is a file where the server needs a folder"),
    ("queue/env", "is a file where the server needs a folder"),
])
def test_a_file_where_a_state_folder_should_be(tmp_path: Path, file: str, words: str) -> None:
    """Fault 16: a file in the place of the state folder or one of its folders is named before
    anything is created (the queue's case used to start a server with its queue dead)."""
    state = tmp_path / "var"
    target = state / file if file else state
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("")
    assert _state_problem(state) == f"[server.state_dir] {target} {words}; move it away"


@pytest.mark.parametrize("name", ["server.lock", "listeners.json", "connections-smtp.table"])
def test_a_folder_where_a_run_file_should_be(tmp_path: Path, name: str) -> None:
    """A folder where the server writes one of its run/ files is named."""
    (tmp_path / "run" / name).mkdir(parents=True)
    assert _state_problem(tmp_path) == (f"[server.state_dir] {tmp_path / 'run' / name} is a "
                                        "folder where the server writes a file; move it away")


def test_a_state_folder_below_a_file_cannot_be_created(tmp_path: Path) -> None:
    """A state_dir whose parent is a file cannot be created: the file is named."""
    (tmp_path / "f").write_text("")
    assert _state_problem(tmp_path / "f" / "var") == (
        f"[server.state_dir] cannot create the folder {tmp_path / 'f' / 'var'}: "
        f"{tmp_path / 'f'} is a file, not a folder")


def test_a_read_only_state_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    """A state folder that cannot be written (os.access says so: a read-only file system, or
    permissions) is named with the reason."""
    from pop3coexist import startup

    monkeypatch.setattr(startup.os, "access", lambda path, mode: False)
    assert _state_problem(tmp_path).startswith(f"[server.state_dir] the folder {tmp_path} "
                                               "cannot be written (")


def test_a_usable_or_missing_state_folder_passes(tmp_path: Path) -> None:
    """The control: a missing state folder under a writable parent, and a complete one, pass
    (and nothing is created by the check)."""
    from pop3coexist.startup import check_state_dir

    check_state_dir(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    for rel in ("run", "mailroot", "queue/msg", "queue/env", "queue/tmp"):
        (tmp_path / rel).mkdir(parents=True)
    check_state_dir(tmp_path)


def _unix_listener(path: Path, mode: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    os.chmod(path, mode)
    s.listen(5)
    s.setblocking(False)
    return s


def test_an_adopted_unix_socket_keeps_its_mode_and_file(tmp_path: Path) -> None:
    """Fault 12 (unix:PATH:mode=, and systemd's UNIX sockets): a worker process (or the server
    adopting a socket systemd passed) keeps the socket file's mode (Twisted's adoption made it
    0666), and when it stops listening leaves the file and the shared socket alone (Twisted
    unlinked the file and shut the socket down for every process)."""
    from twisted.internet import reactor

    from pop3coexist.service import adopt_stream_port

    path = tmp_path / "sub.sock"
    owner = _unix_listener(path, 0o660)
    port = adopt_stream_port(reactor, owner.fileno(), socket.AF_UNIX,
                             protocol.Factory.forProtocol(protocol.Protocol))
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
    finally:
        port.stopListening()
    assert path.exists()
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))  # the owner's socket still listens
    client.close()
    owner.close()


def test_a_stale_unix_socket_is_removed_only_when_nobody_listens(tmp_path: Path) -> None:
    """Fault 17 (a server killed with kill -9 leaves its socket file): with lockfile=0 a socket
    file nothing listens on is removed before the bind; one something listens on, or a
    file that is not a socket, stays (the bind then fails, naming the listener)."""
    from pop3coexist.service import remove_stale_unix_socket

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    assert remove_stale_unix_socket(f"unix:{stale}:lockfile=0") and not stale.exists()
    live = tmp_path / "live.sock"
    owner = _unix_listener(live, 0o666)
    assert not remove_stale_unix_socket(f"unix:{live}:lockfile=0") and live.exists()
    owner.close()
    plain = tmp_path / "plain.sock"
    plain.write_text("")
    assert not remove_stale_unix_socket(f"unix:{plain}:lockfile=0") and plain.exists()


def test_a_unix_listener_in_a_missing_folder_names_the_folder(tmp_path: Path) -> None:
    """A unix: listener whose folder does not exist fails naming the folder (it used to be
    "No such file or directory" about a lock file)."""
    reactor = _Reactor()
    top, _ = _server(tmp_path, [f"unix:{tmp_path}/nowhere/sub.sock"], reactor)
    _start(top)
    assert top.report.outcome == (f"cannot listen on unix:{tmp_path}/nowhere/sub.sock (role0): "
                                  f"the folder {tmp_path}/nowhere does not exist (create it "
                                  "first, or name another)")
    top.stopService()
    reactor.advance(0)


def test_the_text_log_time_stamps_are_the_same_once_cached_per_second(monkeypatch) -> None:  # noqa: ANN001
    """``cache_log_time_stamps`` gives twistd's text log the very stamps Twisted's own
    ``formatTime`` gives (times within one second, across seconds, None, a format with
    sub-second fields), and a line of the text observer is unchanged."""
    import random

    from twisted.logger import _file, formatTime, textFileLogObserver

    from pop3coexist.startup import cache_log_time_stamps

    monkeypatch.setattr(_file, "formatTime", _file.formatTime)  # restored after the test
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    event = {"log_format": "hello", "log_time": 1_700_000_000.25, "log_system": "s"}
    textFileLogObserver(Out())(event)
    assert cache_log_time_stamps(size=4) is True
    assert cache_log_time_stamps() is True  # once only
    textFileLogObserver(Out())(event)
    assert lines[0] == lines[1]
    rng = random.Random(17)
    base = 1_700_000_000.0
    for _ in range(300):
        when = base + rng.choice([0, 1, 2, 3600, 86400 * 180]) + rng.random()
        for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%H:%M:%S.%f", "%s"):
            assert _file.formatTime(when, fmt) == formatTime(when, fmt)
    assert _file.formatTime(None) == "-" and _file.formatTime(base, None) == "-"


def test_fast_log_text_gives_twisteds_text(monkeypatch):
    """``fast_log_text`` renders every event as Twisted's own ``_formatEvent`` does: plain and
    repeated fields, conversions, format specs, attribute and index look-ups, escaped braces,
    ``{call()}`` fields (Twisted calls them), bytes formats, flattened events, missing keys
    and values whose formatting raises (Twisted's "Unable to format event" text), no format."""
    from twisted.logger import Logger, _format, eventAsText
    from twisted.logger._flatten import flattenEvent

    from pop3coexist.startup import fast_log_text

    original = _format._formatEvent
    monkeypatch.setattr(_format, "_formatEvent", original)  # restored after the test

    class Thing:
        name = "thing"

        def __repr__(self) -> str:
            return "<Thing>"

        def hello(self) -> str:
            return "hi"

    class Bad:
        def __format__(self, spec: str) -> str:
            raise RuntimeError("no")

    events = [
        {"log_format": "SMTP connect from {client} ({listener})", "client": "127.0.0.1",
         "listener": "smtp"},
        {"log_format": "{a!r} {a!s} {n:>5} {n:05.1f} {{literal}} {a}", "a": "x", "n": 3.5},
        {"log_format": "{t.name} {d[k]} {l[0]} {t}", "t": Thing(), "d": {"k": 1}, "l": [7]},
        {"log_format": "{t.hello()} {f()}", "t": Thing(), "f": lambda: "called"},
        {"log_format": b"bytes {x}", "x": 1},
        {"log_format": "missing {nothere}"},
        {"log_format": "bad {b}", "b": Bad()},
        {"log_format": "{0}"},
        {"log_format": None},
        {},
        {"log_format": "stored in {mailboxes}", "mailboxes": ["a@b", "c@d"]},
    ]
    flat = {"log_format": "flat {x()}", "x": lambda: "value"}
    flattenEvent(flat)
    flat["x"] = lambda: "changed"
    events.append(flat)
    want = [original(dict(e)) for e in events]
    assert fast_log_text() is True
    assert fast_log_text() is True  # once only
    assert _format._formatEvent is not original
    got = [_format._formatEvent(dict(e)) for e in events]
    assert got == want
    assert "Unable to format event" in got[5]
    assert eventAsText({"log_format": "{a}", "a": 1}, includeTimestamp=False,
                       includeSystem=False) == "1"
    seen: list[str] = []
    log = Logger(observer=lambda e: seen.append(eventAsText(e, includeTimestamp=False,
                                                            includeSystem=False)))
    log.info("queued {id} for {who!r}", id="Q1", who="x@y")
    assert seen == ["queued Q1 for 'x@y'"]


def test_fast_log_lines_writes_twisteds_own_lines_and_emits_twisteds_own_events(monkeypatch) -> None:  # noqa: ANN001, E501
    """``fast_log_lines`` gives twistd's text log the very line Twisted's
    ``formatEventAsClassicLogText`` gives, for events with and without ``log_system``, a
    missing namespace or level, a multi-line text, no text, a failure, a system that is not
    a string; and ``Logger.emit`` builds the same event as Twisted's (same keys and values
    but the time), still reports an unknown level, and passes a ``log_trace`` on."""
    from twisted.logger import Logger, LogLevel, _file
    from twisted.logger._format import formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from pop3coexist.startup import fast_log_lines

    monkeypatch.setattr(_file, "formatEventAsClassicLogText", _file.formatEventAsClassicLogText)
    monkeypatch.setattr(Logger, "emit", Logger.emit)
    original_emit = Logger.emit
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    events = [
        {"log_format": "SMTP connect from {client}", "client": "127.0.0.1", "log_time": 1.5,
         "log_namespace": "pop3coexist.smtp.server", "log_level": LogLevel.info},
        {"log_format": "{log_text}", "log_text": "x", "log_time": 2.0,
         "log_system": "worker 1: a#debug", "log_level": LogLevel.debug},
        {"log_format": "two\nlines {a}", "a": "and\nthree", "log_time": 3.0},
        {"log_format": "no level", "log_namespace": None, "log_time": None},
        {"log_format": "", "log_time": 4.0},
        {"log_format": "it broke", "log_failure": failure, "log_time": 5.0},
        {"log_format": "odd system", "log_system": 42, "log_time": 6.0},
        {},
    ]

    def stamp(when: float | None) -> str:
        return _file.formatTime(when, _file.timeFormatRFC3339)

    want = [formatEventAsClassicLogText(dict(e), stamp) for e in events]
    assert fast_log_lines() is True
    assert fast_log_lines() is True  # once only
    assert _file.formatEventAsClassicLogText is not formatEventAsClassicLogText
    got = [_file.formatEventAsClassicLogText(dict(e), stamp) for e in events]
    assert got == want
    assert got[0].endswith(" [pop3coexist.smtp.server#info] SMTP connect from 127.0.0.1\n")
    assert got[4] is None and "ZeroDivisionError" in got[5]

    def events_of(emit) -> list[list]:  # noqa: ANN001
        seen: list[dict] = []
        trace: list = []
        monkeypatch.setattr(Logger, "emit", emit)
        log = Logger(namespace="n", source="src", observer=seen.append)
        log.info("hello {who}", who="you")
        log.emit("not a level", "bad")  # type: ignore[arg-type]
        log.warn("traced", log_trace=trace)
        assert trace == [(log, seen.append)]
        for e in seen:
            assert e.pop("log_logger") is log or e["log_namespace"] != "n"
            for k in ("log_time", "log_failure", "log_trace", "logger"):
                e.pop(k, None)
        return [sorted((k, repr(v)) for k, v in e.items()) for e in seen]

    fast_emit = Logger.emit
    assert fast_emit is not original_emit
    assert events_of(fast_emit) == events_of(original_emit)


def test_fast_log_context_gives_each_call_twisteds_own_log_context(monkeypatch) -> None:  # noqa: ANN001
    """``fast_log_context``'s ``callWithLogger`` (the reactor's wrapper of every I/O event)
    does what Twisted's does: the call sees the same log context (``system`` = the
    selectable's ``logPrefix()``, nested calls too), its result is returned, an exception is
    logged with that system and swallowed, ``KeyboardInterrupt`` passes, a ``logPrefix`` that
    raises is logged as Twisted logs it, and the context stack is as before afterwards."""
    from twisted.logger import globalLogPublisher
    from twisted.python import context, log

    from pop3coexist.startup import fast_log_context

    monkeypatch.setattr(log, "callWithLogger", log.callWithLogger)
    original = log.callWithLogger

    class Selectable:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix

        def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
            if self.prefix == "buggy":
                raise RuntimeError("no prefix")
            return self.prefix

    def run(call) -> list:  # noqa: ANN001
        seen: list = []
        published: list[dict] = []
        globalLogPublisher.addObserver(published.append)
        depth = len(context.theContextTracker.currentContext().contexts)

        def inner(x: int) -> int:
            seen.append(dict(context.get(log.ILogContext)))
            seen.append(call(Selectable("Inner,1"), lambda: dict(context.get(log.ILogContext))))
            log.msg("legacy message")
            return x * 2

        def boom() -> None:
            raise ValueError("it broke")

        def interrupt() -> None:
            raise KeyboardInterrupt

        try:
            seen.append(call(Selectable("SMTPServerFactory,3,127.0.0.1"), inner, 21))
            seen.append(call(Selectable("Port,7"), boom))
            seen.append(call(Selectable("buggy"), inner, 1))
            try:
                call(Selectable("Port,8"), interrupt)
            except KeyboardInterrupt:
                seen.append("interrupted")
            seen.append(len(context.theContextTracker.currentContext().contexts) == depth)
        finally:
            globalLogPublisher.removeObserver(published.append)
        texts = [(e.get("log_text") or e.get("log_format") or "").strip().splitlines()
                 for e in published]  # a traceback's frames differ: first and last lines
        seen.append([(e.get("log_system"), t[0], t[-1]) for e, t in zip(published, texts, strict=True)])
        return seen

    want = run(original)
    assert fast_log_context() is True
    assert fast_log_context() is True  # once only
    assert log.callWithLogger is not original
    got = run(log.callWithLogger)
    assert got == want
    assert got[0] == {"system": "SMTPServerFactory,3,127.0.0.1"} and got[1] == {"system": "Inner,1"}
    assert got[2] == 42 and got[3] is None and got[-2] is True
    assert ("Port,7", "Unhandled Error", "builtins.ValueError: it broke") in got[-1]
    assert ("SMTPServerFactory,3,127.0.0.1", "legacy message", "legacy message") in got[-1]
