"""Run a policy coroutine as far as it goes without waiting (issue 17: CPU per message).

Most SMTP decisions of a message are known at once: a recipient found in the caches
(``policy.delivery._lookup_cached``), MAIL from an ordinary client, the idle stages of
``policy.stages``. Running such a coroutine with ``defer.ensureDeferred`` still builds the
inlineCallbacks machinery and the Deferred callbacks around a result that is already there.

``run_now(coro)`` steps the coroutine on the caller's stack. When it finishes without waiting
(every Deferred it awaited had fired: ``Deferred.__await__`` then returns the result at once),
the answer is a Deferred fired already (``defer.succeed`` / ``defer.fail``), which the caller
may take at once (``Deferred.called``). When it waits on a Deferred that has not fired (a
thread hop, a directory look-up, a milter, a refresh of the domain list), the rest runs with
``defer.ensureDeferred`` as before: the same code gives the same answers in the same order
either way, only the scaffolding differs.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet import defer

T = TypeVar("T")


def run_now(coro: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
    """A Deferred of ``coro``'s result: fired already when ``coro`` ran to its end without
    waiting (its exception as a failure), else firing when it ends (see the module
    docstring). ``coro`` must await only Deferreds and coroutines (this code base's one
    async style)."""
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return defer.succeed(done.value)
    except BaseException:
        return defer.fail()
    return defer.ensureDeferred(_rest(coro, waiting))


async def _rest(coro: Coroutine[Any, Any, T], waiting: Any) -> T:
    """The rest of ``coro`` after it yielded ``waiting`` (a Deferred it awaits): each result
    (or exception) is handed back in, until the coroutine returns."""
    while True:
        try:
            value = await waiting
        except BaseException as e:  # noqa: BLE001 - the coroutine decides what it catches
            try:
                waiting = coro.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(value)
            except StopIteration as done:
                return done.value
