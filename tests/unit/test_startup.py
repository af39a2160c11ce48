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

    def serve(self) -> None:
        self.served = True

    def pids(self) -> list[int]:
        return [4242]


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def _server(tmp_path: Path, descriptions: list[str], reactor: _Reactor,
            twistd: dict | None = None) -> tuple[Pop3CoexistService, _Recorder]:
    config = SimpleNamespace(server=SimpleNamespace(state_dir=tmp_path))
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
