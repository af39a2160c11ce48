"""web/budget.py ByteBudget: bounded bytes of messages parsed at once in web mail."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from pop3coexist.web.budget import ByteBudget


def _hold(budget: ByteBudget, size: int, log: list, name: str) -> tuple[defer.Deferred, defer.Deferred]:
    """Start a parse of ``size`` bytes that runs until the returned ``release`` fires."""
    release: defer.Deferred = defer.Deferred()

    async def run() -> None:
        async with budget.taking(size):
            log.append(name)
            await release

    return defer.ensureDeferred(run()), release


def test_parses_share_the_budget_in_order_and_a_large_one_runs_alone():
    """Parses that fit run at once; one that does not fit waits, and later ones queue behind
    it (first come, first served, so a large message is never starved); a message larger
    than the whole budget runs alone; every byte comes back, also after an error."""
    budget, log = ByteBudget(100), []
    a, ra = _hold(budget, 60, log, "a")
    b, rb = _hold(budget, 30, log, "b")
    big, rbig = _hold(budget, 500, log, "big")
    c, rc = _hold(budget, 5, log, "c")  # fits, but waits behind big
    assert log == ["a", "b"] and budget.taken == 90
    ra.callback(None)
    assert log == ["a", "b"]
    rb.callback(None)
    assert log == ["a", "b", "big"] and budget.taken == 100
    rbig.callback(None)
    assert log == ["a", "b", "big", "c"]
    rc.callback(None)
    assert budget.taken == 0 and all(d.called for d in (a, b, big, c))

    async def failing() -> None:
        async with budget.taking(50):
            raise ValueError("a parse failed")

    d = defer.ensureDeferred(failing())
    assert isinstance(d.result.value, ValueError)
    d.addErrback(lambda f: None)
    assert budget.taken == 0
    with pytest.raises(ValueError):
        ByteBudget(0)
