"""``SerialThread``: one thread of its own that runs blocking calls one after the other, for
the callers that never have more than one such call running anyway: the SMTP group commit
(smtp/incoming.py ``GroupCommitter``: one batch at a time) and the delivery runner's grouped
queue calls (smtp/outbound.py ``GroupCall``: one removal or claim group at a time).

It is called like ``threads.deferToThreadPool(reactor, pool, f, *args, **kwargs)`` and returns
a Deferred that fires in the reactor thread with ``f``'s result or its Failure. The reason is
the cost of the hand-off (issue 17, relay profile): Twisted's thread pool passes each call
through a ``Team``, a coordinating ``LockWorker`` and a ``queue.Queue`` (a ``Condition`` and
its ``notify`` in Python), about 90-120 us of CPU per round trip on the bench machine; a
``queue.SimpleQueue`` (C) to a thread waiting on it, about half of that.

The thread is started at the first call and stopped during the reactor's shutdown, after the
calls queued before it have run (as the reactor's pool finishes its work), so that a batch in
progress ends its syncs before the process exits. A call made after that runs in the
reactor's pool instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.python.failure import Failure


class SerialThread:
    """Blocking calls in order on one thread of their own (module docstring). ``reactor``:
    an IReactorThreads (``callFromThread``, ``addSystemEventTrigger``, ``getThreadPool``);
    ``name``: the thread's name (seen in ``ps -L`` and py-spy)."""

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run ``f(*args, **kwargs)`` on the thread after the calls made before; a Deferred
        with its result (in the reactor thread)."""
        if self._stopped:
            return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f,
                                             *args, **kwargs)
        if self._thread is None:
            self._start()
        d: defer.Deferred = defer.Deferred()
        self._calls.put((f, args, kwargs, d))
        return d

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> defer.Deferred:
        """Let the calls queued so far run, then end the thread; the Deferred fires (in the
        reactor thread) when it has ended. Later calls go to the reactor's pool."""
        done: defer.Deferred = defer.Deferred()
        if self._stopped or self._thread is None:
            self._stopped = True
            done.callback(None)
            return done
        self._stopped = True
        self._calls.put(done)
        return done

    def _run(self) -> None:
        get = self._calls.get
        call_back = self._reactor.callFromThread
        while True:
            item = get()
            if type(item) is not tuple:  # stop()'s Deferred: every earlier call has run
                call_back(item.callback, None)
                return
            f, args, kwargs, d = item
            item = None
            try:
                result = f(*args, **kwargs)
            except BaseException:
                call_back(d.errback, Failure())
            else:
                call_back(d.callback, result)
            f = args = kwargs = d = result = None  # nothing kept alive while waiting
