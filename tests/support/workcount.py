"""Deterministic work counters for tests of "bounded time" claims (speed itself is measured in
bench/, never asserted as a timing in a test).

``lines(prefixes, budget)`` is a context manager that counts the Python lines executed in this
thread by code of the modules whose ``__name__`` starts with one of ``prefixes``
(``sys.settrace``; the previous tracer, e.g. a coverage tool's, is put back afterwards). The
count is the same on a fast machine and on a loaded one, so it can be compared between an
input of size n and one of size 10n, or with a fixed bound. With ``budget`` set, the line
after the budget raises ``WorkBudgetExceeded`` (a BaseException, so an ``except Exception``
in the code under test does not swallow it): a loop that would run for hours fails at once. A block that fails after the budget ran out
(the code under test caught the exception, as a Deferred does) fails with WorkBudgetExceeded
too.

``calls(monkeypatch, owner, name)`` wraps ``owner.name`` (a function of a module or a class)
so that each call is counted; the wrapper is removed with the monkeypatch."""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest


class WorkBudgetExceeded(BaseException):
    """The code under test executed more lines than the test's budget allows."""


@dataclass
class Work:
    """Lines executed so far (``lines``) and whether the budget ran out (``exceeded``)."""

    lines: int = 0
    exceeded: bool = False


@contextmanager
def lines(prefixes: tuple[str, ...] = ("pop3coexist",),
          budget: int | None = None) -> Iterator[Work]:
    """Count the lines this thread executes in modules named ``prefixes...`` (see the module
    docstring); yields a ``Work`` read after the block. Raises WorkBudgetExceeded from the
    traced code once ``budget`` lines have run."""
    work = Work()
    me = threading.get_ident()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            work.lines += 1
            if budget is not None and work.lines > budget:
                work.exceeded = True
                raise WorkBudgetExceeded(f"more than {budget} lines executed")
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        if threading.get_ident() != me:
            return None
        name = frame.f_globals.get("__name__", "")
        return local if name.startswith(prefixes) else None

    before = sys.gettrace()
    sys.settrace(global_)
    try:
        yield work
    except BaseException as failure:
        if work.exceeded and not isinstance(failure, WorkBudgetExceeded):
            # the code under test caught the budget's exception (a Deferred does): say so
            raise WorkBudgetExceeded(f"more than {budget} lines executed") from failure
        raise
    finally:
        sys.settrace(before)


@dataclass
class Calls:
    """How often the wrapped function was called (``n``)."""

    n: int = 0


def calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Calls:
    """Wrap ``owner.name`` to count its calls (behaviour unchanged); returns the counter."""
    counter = Calls()
    real: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(real)
    def counted(*args: Any, **kw: Any) -> Any:
        counter.n += 1
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, counted)
    return counter
