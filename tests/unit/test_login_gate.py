"""The log-in gate and the check-side throttle (policy/throttle.py, policy/sharedthrottle.py):
a source with failures gets its next password checked only after its delay, one check per
delay however many connections it has; a source whose last log-in succeeded is trusted and
skips the queue; other sources share limited places, each free again only after as long as
its check took. Time is a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet import task

from pop3coexist.policy.sharedthrottle import SharedAuthThrottle
from pop3coexist.policy.throttle import AuthThrottle, LoginGate


@pytest.fixture(params=["memory", "shared"])
def throttle(request, tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    if request.param == "memory":
        yield AuthThrottle(clock, base=2.0, maximum=8.0)
        return
    t = SharedAuthThrottle(clock, tmp_path / "t.table", base=2.0, maximum=8.0, create=True)
    t.start()
    yield t
    t.close()


def test_admit_delay_takes_one_slot_per_delay(throttle):
    """No failures: no wait. After a failure the next check waits the delay; once it is
    admitted, a second parallel attempt waits a whole delay more."""
    clock = throttle.clock
    assert throttle.admit_delay("192.0.2.1") == 0.0
    assert throttle.failure_delay("192.0.2.1") == 2.0
    assert throttle.admit_delay("192.0.2.1") == pytest.approx(2.0)
    clock.advance(2.0)
    assert throttle.admit_delay("192.0.2.1") == 0.0  # taken
    assert throttle.admit_delay("192.0.2.1") == pytest.approx(2.0)  # the parallel one waits
    assert throttle.failure_delay("192.0.2.1") == 4.0
    assert throttle.admit_delay("192.0.2.1") == pytest.approx(4.0)
    assert throttle.admit_delay("192.0.2.9") == 0.0  # another source is not affected


def test_success_marks_a_source_trusted_until_it_fails(throttle):
    """success() clears the failures and trusts the source; a failure ends the trust; an
    unknown source is not trusted."""
    assert not throttle.trusted("192.0.2.2")
    throttle.failure_delay("192.0.2.2")
    throttle.success("192.0.2.2")
    assert throttle.trusted("192.0.2.2") and throttle.admit_delay("192.0.2.2") == 0.0
    throttle.failure_delay("192.0.2.2")
    assert not throttle.trusted("192.0.2.2")
    throttle.clock.advance(throttle.forget_after + 1)
    throttle.success("192.0.2.2")
    throttle.clock.advance(throttle.forget_after + 1)
    assert not throttle.trusted("192.0.2.2")  # forgotten


def test_gate_lets_trusted_sources_pass_a_full_queue(throttle):
    """With the one place taken by an unknown source, other unknown sources wait, a trusted
    source does not; the place frees only as long after the check as the check took."""
    clock = throttle.clock
    gate = LoginGate(throttle, clock, concurrency=1)
    first = gate.enter("198.51.100.1")
    release = first.result
    waiting = gate.enter("198.51.100.2")
    assert not waiting.called and gate.waiting == 1
    throttle.success("203.0.113.7")
    trusted = gate.enter("203.0.113.7")
    assert trusted.called
    trusted.result()
    clock.advance(0.3)  # the first check took 0.3 s
    release()
    release()  # twice is harmless
    assert not waiting.called
    clock.advance(0.3)
    assert waiting.called
    waiting.result()


def test_gate_waits_out_the_failure_delay(throttle):
    """A source with a failure enters only after its delay has passed."""
    clock = throttle.clock
    gate = LoginGate(throttle, clock, concurrency=4)
    throttle.failure_delay("198.51.100.3")
    d = gate.enter("198.51.100.3")
    assert not d.called
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    assert d.called
    d.result()


def test_trusted_sources_have_bounded_places_of_their_own(throttle):
    """A trusted source never queues behind unknown ones, but a storm of its connections runs
    at most ``concurrency`` checks at once (scrypt is 16 MiB and a CPU each): the next waits
    until one ends, and a trusted place is free again at once (no hold as for unknown ones);
    releasing twice frees one place only."""
    clock = throttle.clock
    gate = LoginGate(throttle, clock, concurrency=2)
    throttle.success("203.0.113.7")
    unknown = gate.enter("198.51.100.1")
    assert unknown.called
    storm = [gate.enter("203.0.113.7") for _ in range(4)]
    assert [d.called for d in storm] == [True, True, False, False]
    first = storm[0].result
    clock.advance(0.3)
    first()
    first()
    assert [d.called for d in storm] == [True, True, True, False]
    storm[1].result()
    assert storm[3].called
    storm[2].result()
    storm[3].result()
    unknown.result()
