"""smtp/serial.py SerialThread: blocking calls in order on one thread, results back through
the reactor's callFromThread, a clean stop, and the reactor's pool after it."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from twisted.python.failure import Failure

from pop3coexist.smtp.serial import SerialThread

DEADLINE = 10.0  # seconds to wait for the thread's hand-back (a deadline, not a sleep)


class FakePool:
    """The reactor pool's callInThreadWithCallback, run at once in the caller's thread."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.calls += 1
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor:
    """callFromThread into a queue the test drains in its own (the "reactor") thread."""

    def __init__(self) -> None:
        self.handed: queue.SimpleQueue = queue.SimpleQueue()
        self.triggers: list[tuple[str, str, Any]] = []
        self.pool = FakePool()

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        self.handed.put((f, a, kw))

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def getThreadPool(self) -> FakePool:
        return self.pool

    def run_one(self) -> None:
        f, a, kw = self.handed.get(timeout=DEADLINE)
        f(*a, **kw)


def test_calls_run_in_order_on_one_thread_and_results_come_back() -> None:
    """Each call runs after the ones made before it, all on the same thread (not the
    caller's), and its Deferred fires with the result only when the reactor runs the
    hand-back; the shutdown trigger is registered at the first call."""
    reactor = FakeReactor()
    serial = SerialThread(reactor, "test-serial")
    seen: list[tuple[int, str]] = []

    def work(n: int, tag: str = "") -> int:
        seen.append((n, threading.current_thread().name))
        return n * 10

    ds = [serial(work, n, tag="x") for n in range(5)]
    results: list[int] = []
    for d in ds:
        d.addCallback(results.append)
    for _ in ds:
        reactor.run_one()
    assert results == [0, 10, 20, 30, 40]
    assert [n for n, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"test-serial"}
    assert [(p, e) for p, e, _ in reactor.triggers] == [("during", "shutdown")]
    stopped = reactor.triggers[0][2]()
    reactor.run_one()
    assert stopped.called


def test_an_exception_fails_only_its_call() -> None:
    """A call that raises fails its own Deferred with that exception; the next call runs."""
    reactor = FakeReactor()
    serial = SerialThread(reactor, "test-serial")

    def boom() -> None:
        raise OSError("disk gone")

    failures: list[Failure] = []
    bad = serial(boom)
    bad.addErrback(failures.append)
    good = serial(lambda: "ok")
    reactor.run_one()
    reactor.run_one()
    assert failures and failures[0].check(OSError)
    assert good.result == "ok"
    serial.stop()
    reactor.run_one()


def test_stop_waits_for_queued_calls_then_uses_the_pool() -> None:
    """stop() fires after every call queued before it ran; a call after the stop runs in the
    reactor's pool; stopping a thread never started fires at once."""
    reactor = FakeReactor()
    serial = SerialThread(reactor, "test-serial")
    gate = threading.Event()
    first = serial(lambda: gate.wait(DEADLINE))
    stopped = serial.stop()
    assert not stopped.called
    gate.set()
    reactor.run_one()  # first's result
    reactor.run_one()  # the stop
    assert first.result is True and stopped.called
    late = serial(lambda: 7)
    reactor.run_one()
    assert late.result == 7 and reactor.pool.calls == 1
    assert SerialThread(FakeReactor(), "never").stop().called


@pytest.mark.parametrize("calls", [1, 50])
def test_many_calls_each_answered_once(calls: int) -> None:
    """Every call gets exactly one answer, whatever the number queued at once."""
    reactor = FakeReactor()
    serial = SerialThread(reactor, "test-serial")
    ds = [serial(lambda i=i: i) for i in range(calls)]
    for _ in range(calls):
        reactor.run_one()
    assert [d.result for d in ds] == list(range(calls))
    serial.stop()
    reactor.run_one()
    assert reactor.handed.empty()
