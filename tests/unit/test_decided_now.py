"""Decisions made at once (issue 17: the Deferred machinery on the per-message SMTP path).

``policy.inline.run_now`` steps a policy coroutine on the caller's stack and hands over to
``defer.ensureDeferred`` only when it must wait; the avatar's ``validate_to`` runs that way, and
the session answers a decision fired already without a Deferred chain. These tests prove that
the fast path gives the decisions the async path (``ensureDeferred`` of the same coroutine)
gives, for every cell of the relay matrix, and that it waits whenever something would: a
thread hop (the blocking look-up), with the same answer and the replies in order. The same for
the stages after DATA: ``policy.stages.start_stages`` commits with plain callbacks when every
stage before the commit is idle, with ``run_stages``' results and refusals, and runs the
stages as coroutines whenever one has work to do.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3coexist.errors import MailError, QuotaExceeded
from pop3coexist.interfaces import IIdleRules, SMTPSession
from pop3coexist.policy.inline import run_now
from pop3coexist.policy.stages import (
    ACCEPT,
    CONTINUE,
    ExpandRecipients,
    Message,
    RecipientRules,
    Verdict,
    default_stages,
    run_stages,
    start_stages,
)
from tests.support.fakes import FakeChecker, FakePasswordFileChecker
from tests.support.smtp_fakes import open_session
from tests.unit.test_relay_policy import MATRIX, TRUSTED, UNTRUSTED, avatar, policy
from tests.unit.test_stages import Committer, message


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


# ------------------------------------------------------------------ the stages after DATA


class RaisingCommitter(Committer):
    """A committer whose ``commit`` raises before giving a Deferred."""

    def commit(self, spool, local, envelope, notes=None) -> defer.Deferred:
        raise RuntimeError("no thread pool")


class HeldCommitter(Committer):
    """A committer whose Deferreds fire when the test says (the group commit's batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[defer.Deferred] = []

    def commit(self, spool, local, envelope, notes=None) -> defer.Deferred:
        self.calls.append((local, envelope, notes))
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        return d


def logged(run: Any) -> tuple[Any, list]:
    """(``run()``'s value, the log events it emitted as (format, has a failure))."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        value = run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return value, [(e.get("log_format"), "log_failure" in e) for e in events]


def both_ways(make_committer, stages_of=default_stages) -> tuple[Any, Any, Message, Message]:
    """(fast result, run_stages result, fast message, run_stages message) on twin messages;
    the two runs log the same events."""
    fast_msg, slow_msg = message(), message()
    fast, fast_log = logged(lambda: settled(start_stages(fast_msg, stages_of(make_committer()))))
    slow, slow_log = logged(lambda: settled(
        defer.ensureDeferred(run_stages(slow_msg, stages_of(make_committer())))))
    assert fast_log == slow_log
    return fast, slow, fast_msg, slow_msg


def plain(verdict: Verdict) -> tuple:
    """A verdict as comparable data (MailError instances compare by identity)."""
    e = verdict.error
    return verdict.outcome, None if e is None else (type(e), e.code, e.enhanced, e.text)


def results(value: Any) -> Any:
    """A run's result with its verdicts as data."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def shape(msg: Message) -> tuple:
    """What a run leaves on a message: recipients, dropped ones with verdicts, the spool."""
    return ([(r.address, plain(r.verdict)) for r in msg.recipients],
            [(r.address, plain(r.verdict)) for r in msg.dropped], msg.spool.aborted)


@pytest.mark.parametrize("make_committer", [
    Committer,  # stored everywhere
    lambda: Committer(refused=[("pop.contoso.test", "ted")]),  # one mailbox full
    lambda: Committer(fail=QuotaExceeded()),  # every mailbox full: 552
    lambda: Committer(fail=OSError(errno.ENOSPC, "full")),  # the state disk full: 452
    lambda: Committer(fail=RuntimeError("bug")),  # logged, 451
    RaisingCommitter,  # raised before giving a Deferred: logged, 451
], ids=["stored", "one-full", "all-full", "disk-full", "error", "raised"])
def test_idle_stages_commit_as_run_stages_does(make_committer) -> None:
    """With the stages configured but idle, ``start_stages`` gives the results (or the
    refusal) ``run_stages`` gives, leaves the message the same, and logs alike."""
    fast, slow, fast_msg, slow_msg = both_ways(make_committer)
    assert results(fast) == results(slow)
    assert shape(fast_msg) == shape(slow_msg)


def test_a_stage_with_work_to_do_takes_run_stages() -> None:
    """A rules stage, a milter, a recipient to expand or a list copy: not idle, so the stages
    run as coroutines (the rules and the content check are asked; same results)."""
    asked: list[str] = []

    class Rules:
        async def apply(self, msg: Message) -> Verdict:
            asked.append("rules")
            return CONTINUE

    class Filter:
        async def check(self, msg: Message) -> Any:
            asked.append("milter")
            return None

    class Outcomes:
        async def apply(self, msg: Message, result: Any) -> Verdict:
            return CONTINUE

    for stages in (lambda c: default_stages(c, rules=Rules()),
                   lambda c: default_stages(c, content_filter=Filter(), outcomes=Outcomes())):
        fast, slow, _, _ = both_ways(Committer, stages)
        assert fast == slow == {"ted@pop.contoso.test": ACCEPT, "bob@example.org": ACCEPT}
    assert asked == ["rules", "rules", "milter", "milter"]
    stage = ExpandRecipients(expander=object())
    msg = message()
    assert stage.idle(msg)
    msg.recipients[0].expand = object()  # an alias RCPT accepted: expansion has work
    assert not stage.idle(msg)


def test_rules_that_say_they_are_idle_take_the_fast_commit() -> None:
    """A rules stage whose rules provide IIdleRules and are idle for the message (no local
    recipient, or none with a script: SieveRules) is passed over as ``run_stages`` would
    pass it (CONTINUE, nothing touched): same results; rules that are not idle are asked."""
    asked: list[str] = []

    @implementer(IIdleRules)
    class Rules:
        def __init__(self, idle: bool) -> None:
            self._idle = idle

        def idle(self, msg: Message) -> bool:
            return self._idle

        async def apply(self, msg: Message) -> Verdict:
            asked.append("rules")
            return CONTINUE

    fast, slow, fast_msg, slow_msg = both_ways(
        Committer, lambda c: default_stages(c, rules=Rules(True)))
    assert results(fast) == results(slow) and shape(fast_msg) == shape(slow_msg)
    assert asked == ["rules"]  # only run_stages asked the idle rules (CONTINUE at once)
    assert RecipientRules(Rules(True)).idle(message())
    assert not RecipientRules(Rules(False)).idle(message())
    both_ways(Committer, lambda c: default_stages(c, rules=Rules(False)))
    assert asked == ["rules", "rules", "rules"]


def test_the_fast_commit_waits_for_the_group_commit() -> None:
    """The answer comes only when the committer's batch fires (a 250 only once durable)."""
    committer = HeldCommitter()
    d = start_stages(message(), default_stages(committer))
    assert not d.called and len(committer.waiting) == 1
    committer.waiting[0].callback([])
    assert settled(d) == {"ted@pop.contoso.test": ACCEPT, "bob@example.org": ACCEPT}
