"""Decisions made at once (issue 17: the Deferred machinery on the per-message SMTP path).

``policy.inline.run_now`` steps a policy coroutine on the caller's stack and hands over to
``defer.ensureDeferred`` only when it must wait; the avatar's ``validate_to`` runs that way, and
the session answers a decision fired already without a Deferred chain. These tests prove that
the fast path gives the decisions the async path (``ensureDeferred`` of the same coroutine)
gives, for every cell of the relay matrix, and that it waits whenever something would: a
thread hop (the blocking look-up), with the same answer and the replies in order.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from pop3coexist.errors import MailError
from pop3coexist.interfaces import SMTPSession
from pop3coexist.policy.inline import run_now
from tests.support.fakes import FakeChecker, FakePasswordFileChecker
from tests.support.smtp_fakes import open_session
from tests.unit.test_relay_policy import MATRIX, TRUSTED, UNTRUSTED, avatar, policy


class HeldHops:
    """A ``run_blocking`` whose thread hops wait until the test releases them."""

    def __init__(self) -> None:
        self.held: list[tuple[defer.Deferred, Any, tuple]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.held.append((d, f, args))
        return d

    def release(self) -> None:
        """Run every held call now (in order) and fire its Deferred."""
        while self.held:
            d, f, args = self.held.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback(Failure())
            else:
                d.callback(result)


def settled(d: defer.Deferred) -> Any:
    """What a fired Deferred holds: the value, or ('refused', code, enhanced, text) for a
    MailError, or the exception's type for another failure."""
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        e = box[0].value
        return ("refused", e.code, e.enhanced, e.text) if isinstance(e, MailError) else type(e)
    return box[0]


def cached_policy(checker: type = FakePasswordFileChecker, cached: bool = True):
    """The relay matrix's server (``test_relay_policy.policy``) with the caches answering."""
    factory = policy(checker=checker)
    factory.realm.context.checker.cached = cached
    factory.realm.context.store.cached = cached
    return factory


# ------------------------------------------------------------------ run_now


def test_run_now_fires_at_once_when_nothing_waits() -> None:
    """A coroutine that awaits only fired Deferreds and coroutines gives a Deferred fired on
    return from run_now, with its value, or its exception as the failure."""
    async def inner() -> int:
        return 2

    async def ok() -> int:
        return await defer.succeed(1) + await inner()

    async def refused() -> None:
        await defer.succeed(None)
        raise MailError(550, "5.1.1", "no")

    assert settled(run_now(ok())) == 3
    assert settled(run_now(refused())) == ("refused", 550, "5.1.1", "no")


def test_run_now_waits_for_what_has_not_fired_and_hands_failures_back_in() -> None:
    """A coroutine that awaits an unfired Deferred continues when it fires, as under
    ensureDeferred: the values and the exceptions (caught by the coroutine or not) reach it."""
    first: defer.Deferred = defer.Deferred()
    second: defer.Deferred = defer.Deferred()
    seen: list = []

    async def flow() -> str:
        seen.append(await first)
        try:
            await second
        except KeyError as e:
            seen.append(("caught", e.args[0]))
        raise MailError(451, "4.4.3", "later")

    d = run_now(flow())
    assert not d.called
    first.callback("a")
    assert seen == ["a"] and not d.called
    second.errback(KeyError("b"))
    assert seen == ["a", ("caught", "b")]
    assert settled(d) == ("refused", 451, "4.4.3", "later")


# ------------------------------------------------------------------ validate_to


@pytest.mark.parametrize("checker", [FakeChecker, FakePasswordFileChecker])
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize(("authenticated", "rcpt", "trusted", "expected"), MATRIX)
def test_validate_to_now_decides_as_the_async_path(checker: type, cached: bool,
                                                   authenticated: bool, rcpt: str,
                                                   trusted: bool, expected: str) -> None:
    """For every cell of the relay matrix, with and without the caches, the fast path's
    decision (or refusal) equals the one ``ensureDeferred`` of the same avatar coroutine gives
    on an identical server, and it is there on return (the fakes never wait)."""
    session = SMTPSession(TRUSTED if trusted else UNTRUSTED, "c.test", "127.0.0.1")
    fast = avatar(cached_policy(checker, cached), authenticated).validate_to(session, rcpt, 0)
    assert fast.called
    slow_avatar = avatar(cached_policy(checker, cached), authenticated)
    slow = defer.ensureDeferred(slow_avatar._validate_to(session, rcpt, 0))
    assert settled(fast) == settled(slow)


def test_a_cached_recipient_takes_no_thread_hop_and_an_unknown_one_waits_for_it() -> None:
    """With the thread hop held: a recipient the caches know is decided on return (no hop);
    one they do not know (unknown user, a mailbox with a quota) waits for the hop and then
    gets the same answer as without the fast path."""
    hops = HeldHops()
    factory = cached_policy()
    factory.realm.context.run_blocking = hops
    factory.realm.context.expander.run_blocking = hops
    factory.realm.context.store.quotas[("pop.contoso.test", "postmaster")] = 10**9
    session = SMTPSession(UNTRUSTED, "c.test", "127.0.0.1")
    known = avatar(factory, False).validate_to(session, "ted@pop.contoso.test", 0)
    assert known.called and not hops.held
    for rcpt in ("nobody@pop.contoso.test", "postmaster@pop.contoso.test"):
        d = avatar(factory, False).validate_to(session, rcpt, 0)
        assert not d.called and hops.held
        while hops.held:
            hops.release()
        slow = defer.ensureDeferred(avatar(cached_policy(), False)._validate_to(session, rcpt, 0))
        assert settled(d) == settled(slow)


def test_session_answers_pipelined_commands_in_order_whether_decided_now_or_later() -> None:
    """A pipelined MAIL, RCPT (held thread hop), RCPT (from the cache) and DATA: the replies
    come in command order, the second RCPT's waits for the first's hop."""
    hops = HeldHops()
    factory = cached_policy()
    factory.realm.context.run_blocking = hops
    factory.realm.context.expander.run_blocking = hops
    proto, transport = open_session(factory)
    proto.dataReceived(b"EHLO c.test\r\n")
    transport.clear()
    proto.dataReceived(b"MAIL FROM:<a@foreign.example>\r\nRCPT TO:<nobody@pop.contoso.test>\r\n"
                       b"RCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n")
    assert transport.value().decode().splitlines() == ["250 2.1.0 Sender <a@foreign.example> OK"]
    while hops.held:
        hops.release()
    assert [line[:9] for line in transport.value().decode().splitlines()] == [
        "250 2.1.0", "550 5.1.1", "250 2.1.5", "354 End d"]
