"""The per-recipient rules stage with Sieve (policy/rules.py) over a real Maildir store and
script store, with a fake outbound queue; the out-of-office rules (policy/vacation.py), SRS
(policy/srs.py) and the script store (store/sievestore.py) on their own."""

from __future__ import annotations

import asyncio
import email
import itertools
from pathlib import Path

import pytest
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3coexist.errors import MailError
from pop3coexist.interfaces import IIdleRules, IMailboxRules, IOutboundQueue, ISieveScripts
from pop3coexist.policy import vacation
from pop3coexist.policy.rules import RulesSettings, SieveRules
from pop3coexist.policy.sieve_run import MailContext
from pop3coexist.policy.srs import SRS, SRSError
from pop3coexist.policy.stages import (
    CommitStage,
    ExpandRecipients,
    Message,
    Outcome,
    Recipient,
    RecipientRules,
    run_stages,
    start_stages,
)
from pop3coexist.smtp.incoming import SpoolWriter
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import (
    BadScriptName,
    NoSuchScript,
    ScriptActive,
    ScriptExists,
    SieveScripts,
)

D = "pop.contoso.test"
_IDS = itertools.count(1)


@implementer(IOutboundQueue)
class FakeQueue:
    """See IOutboundQueue: keeps what was queued (bytes and envelope)."""

    def __init__(self) -> None:
        self.queued: list[tuple[bytes, dict]] = []

    def enqueue(self, source: object, envelope: dict) -> str:
        self.queued.append((Path(str(source)).read_bytes(), envelope))
        return f"Q{len(self.queued)}"

    def wake(self) -> None:
        pass


class FakeCommitter:
    """Records what the commit stage was asked to store."""

    def __init__(self) -> None:
        self.local: list = []

    def commit(self, spool, local, envelope, notes=None):  # noqa: ANN001, ANN201
        self.local = list(local)
        return defer.succeed([])


def blocking(f, *args):  # noqa: ANN001, ANN201
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def env(tmp_path: Path):  # noqa: ANN201
    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain(D)
    for box in ("ted", "ann"):
        store.add_mailbox(D, box)
    scripts = SieveScripts(store)
    queue = FakeQueue()
    srs = SRS(b"k" * 32, clock=lambda: 1_800_000_000.0)
    rules = SieveRules(RulesSettings(hostname="mx.contoso.test"), scripts, queue, store,
                       blocking, srs=srs, clock=lambda: 1_800_000_000.0)
    return store, scripts, queue, rules


def message(store: MaildirStore, data: bytes, rcpts: list[tuple[str, tuple | None]],
            sender: str = "ann@example.org") -> Message:
    qid = f"QID{next(_IDS)}"
    spool = SpoolWriter(Path(store.spool_dir()), qid)
    spool.write_local_prefix(b"Return-Path: <x>\r\n")
    spool.write(data)
    return Message(qid, spool, sender,
                   [Recipient({"address": a, "orcpt": None, "notify": None}, box)
                    for a, box in rcpts], size=len(data))


def apply(rules: SieveRules, msg: Message):  # noqa: ANN201
    d = defer.ensureDeferred(rules.apply(msg))
    out: list = []
    d.addBoth(out.append)
    assert out, "the stage did not finish synchronously"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


MAIL = (b"From: Ann <ann@example.org>\r\nTo: ted@pop.contoso.test\r\nSubject: hi\r\n"
        b"Message-ID: <1@example.org>\r\n\r\nhello\r\n")


def test_the_real_classes_provide_their_interfaces(env) -> None:  # noqa: ANN001
    """verifyObject on SieveRules (IMailboxRules) and SieveScripts (ISieveScripts)."""
    store, scripts, queue, rules = env
    assert verifyObject(IMailboxRules, rules)
    assert verifyObject(ISieveScripts, scripts)
    assert verifyObject(IOutboundQueue, queue)


def test_no_script_keeps_and_reads_nothing(env) -> None:  # noqa: ANN001
    """Without an active script the stage continues and the spool is never read."""
    store, scripts, queue, rules = env
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert apply(rules, msg).outcome is Outcome.CONTINUE
    assert [r.address for r in msg.recipients] == ["ted@pop.contoso.test"]
    assert queue.queued == []


def test_redirect_queues_an_srs_copy_with_the_loop_marker(env) -> None:  # noqa: ANN001
    """redirect: the copy (loop marker in front, no Return-Path) goes to the queue with an SRS0
    sender of the mailbox's domain; the recipient leaves the message (not stored)."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "r", 'redirect "far@example.net";')
    scripts.set_active(D, "ted", "r")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted")),
                                ("ann@pop.contoso.test", (D, "ann"))])
    assert apply(rules, msg).outcome is Outcome.CONTINUE
    assert [r.address for r in msg.recipients] == ["ann@pop.contoso.test"]
    [(data, env_)] = queue.queued
    assert data.startswith(b"X-Sieve-Redirected-From: <ted@pop.contoso.test>\nFrom: Ann")  # LF
    assert b"Return-Path" not in data
    assert env_["sender"].startswith("SRS0=") and env_["sender"].endswith(f"@{D}")
    assert env_["recipients"][0]["address"] == "far@example.net"


def test_discarding_everyone_accepts_without_storing(env) -> None:  # noqa: ANN001
    """All recipients discarded: ACCEPT (250), the spool removed, the commit never runs."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "d", "discard;")
    scripts.set_active(D, "ted", "d")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    committer = FakeCommitter()
    result = asyncio.run(_run_stages(msg, [ExpandRecipients(), RecipientRules(rules),
                                           CommitStage(committer)]))
    assert result["ted@pop.contoso.test"].outcome is Outcome.ACCEPT
    assert committer.local == [] and not msg.spool.path.exists()


async def _run_stages(msg, stages):  # noqa: ANN001, ANN202
    return await defer.Deferred.asFuture(defer.ensureDeferred(run_stages(msg, stages)),
                                         asyncio.get_running_loop())


def test_reject_alone_is_550_and_beside_others_a_notice(env) -> None:  # noqa: ANN001
    """reject for the only recipient: the run ends with 550 5.7.1 <reason>. Beside a recipient
    that keeps it: that one is refused, the other stored, and a notice goes to the sender
    with <>."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "r", 'require "reject";\nreject "Not\r\nwanted";')
    scripts.set_active(D, "ted", "r")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    with pytest.raises(MailError) as e:
        asyncio.run(_run_stages(msg, [RecipientRules(rules), CommitStage(FakeCommitter())]))
    assert (e.value.code, e.value.enhanced) == (550, "5.7.1") and "Not wanted" in str(e.value)
    assert queue.queued == []

    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted")),
                                ("ann@pop.contoso.test", (D, "ann"))])
    committer = FakeCommitter()
    result = asyncio.run(_run_stages(msg, [RecipientRules(rules), CommitStage(committer)]))
    assert result["ted@pop.contoso.test"].outcome is Outcome.REFUSE
    assert committer.local == [(D, "ann")]
    [(notice, env_)] = queue.queued
    assert env_["sender"] == "" and env_["recipients"][0]["address"] == "ann@example.org"
    assert b"Not\nwanted" in notice and b"Auto-Submitted: auto-replied" in notice


def test_a_script_that_does_not_parse_keeps(env, tmp_path) -> None:  # noqa: ANN001
    """A stored script with a syntax error (written by hand): the message is kept."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "broken", "if true {")
    scripts.set_active(D, "ted", "broken")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert apply(rules, msg).outcome is Outcome.CONTINUE
    assert [r.address for r in msg.recipients] == ["ted@pop.contoso.test"]


def test_vacation_replies_once_then_is_quiet(env) -> None:  # noqa: ANN001
    """vacation: the first message gets a reply with <>, the second from the same sender in
    the period none; both are kept."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "v", 'require "vacation";\nvacation :days 2 "Away";')
    scripts.set_active(D, "ted", "v")
    for _ in range(2):
        msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
        assert apply(rules, msg).outcome is Outcome.CONTINUE
        assert len(msg.recipients) == 1
    [(reply, env_)] = queue.queued
    parsed = email.message_from_bytes(reply)
    assert env_["sender"] == "" and parsed["Subject"] == "Auto: hi"
    assert parsed["In-Reply-To"] == "<1@example.org>"


# --------------------------------------------------------------------------- vacation rules


@pytest.mark.parametrize("head,sender,why", [
    (b"To: ted@pop.contoso.test\r\n", "", "the envelope sender is <>"),
    (b"To: ted@pop.contoso.test\r\nAuto-Submitted: auto-replied\r\n", "a@x.example",
     "Auto-Submitted: auto-replied"),
    (b"To: ted@pop.contoso.test\r\nPrecedence: junk\r\n", "a@x.example", "Precedence: junk"),
    (b"To: ted@pop.contoso.test\r\nList-Unsubscribe: <mailto:u@x>\r\n", "a@x.example",
     "List-Unsubscribe"),
    (b"To: ted@pop.contoso.test\r\n", "ted@pop.contoso.test", "the mailbox itself"),
    (b"To: ted@pop.contoso.test\r\n", "owner-team@x.example", "system sender"),
    (b"To: ted@pop.contoso.test\r\n", "MAILER-DAEMON@x.example", "system sender"),
    (b"To: team@x.example\r\n", "a@x.example", "not in To or Cc"),
])
def test_vacation_refusals(head: bytes, sender: str, why: str) -> None:
    """Every RFC 3834 / RFC 5230 reason not to reply is found and named."""
    mail = MailContext.from_bytes(sender, "ted@pop.contoso.test", head + b"\r\nx\r\n")
    assert why in (vacation.refusal(mail, ["ted@pop.contoso.test"]) or "")


def test_vacation_allows_auto_submitted_no_and_cc_and_addresses() -> None:
    """Auto-Submitted: no is a person's mail; the address may be in Cc, or be one of
    :addresses."""
    mail = MailContext.from_bytes("a@x.example", "ted@pop.contoso.test",
                                  b"Cc: T <Ted.Smith@contoso.test>\r\nAuto-Submitted: no\r\n\r\n")
    assert vacation.refusal(mail, ["ted@pop.contoso.test", "ted.smith@contoso.test"]) is None
    assert vacation.period(None, 7, 1, 30) == 7 * 86400
    assert vacation.period(0, 7, 1, 30) == 86400 and vacation.period(99, 7, 1, 30) == 30 * 86400


# --------------------------------------------------------------------------- SRS


def test_srs_round_trip_forgery_and_age() -> None:
    """forward then reverse gives the sender back; a changed hash or an old stamp is refused;
    SRS0 of another forwarder becomes SRS1 and reverses to that forwarder."""
    now = [1_800_000_000.0]
    srs = SRS(b"secret", max_age_days=21, clock=lambda: now[0])
    fwd = srs.forward("Ann.Smith@Example.ORG", "pop.contoso.test")
    local, _, domain = fwd.rpartition("@")
    assert domain == "pop.contoso.test" and local.startswith("SRS0=")
    assert srs.reverse(local) == "Ann.Smith@Example.ORG"
    assert srs.reverse(local.lower()) == "Ann.Smith@Example.ORG".lower()  # case-folded relay
    with pytest.raises(SRSError):
        srs.reverse("SRS0=AAAAAA=" + local.split("=", 2)[2])
    now[0] += 30 * 86400
    with pytest.raises(SRSError, match="days old"):
        srs.reverse(local)
    assert srs.forward("", "pop.contoso.test") == ""
    assert srs.forward("ted@pop.contoso.test", "pop.contoso.test") == "ted@pop.contoso.test"
    other = "SRS0=HHHH=TT=example.org=ann@forwarder.example"
    srs1 = srs.forward(other, "pop.contoso.test")
    assert srs1.startswith("SRS1=")
    assert srs.reverse(srs1.rpartition("@")[0]) == other


# --------------------------------------------------------------------------- the script store


def test_script_store_names_activation_rename_delete(env) -> None:  # noqa: ANN001
    """Put, list, activate (a symlink), rename the active one (it stays active), refuse to
    delete it, refuse bad names, and keep the vacation record durable and exact."""
    store, scripts, queue, rules = env
    scripts.put_script(D, "ted", "one", "keep;")
    scripts.put_script(D, "ted", "two", "discard;")
    scripts.set_active(D, "ted", "one")
    assert scripts.list_scripts(D, "ted") == [("one", True, 5), ("two", False, 8)]
    scripts.rename_script(D, "ted", "one", "uno")
    assert scripts.active_script(D, "ted")[:2] == ("uno", "keep;")
    with pytest.raises(ScriptActive):
        scripts.delete_script(D, "ted", "uno")
    with pytest.raises(ScriptExists):
        scripts.rename_script(D, "ted", "two", "uno")
    with pytest.raises(NoSuchScript):
        scripts.set_active(D, "ted", "three")
    for bad in ("", ".hidden", "a/b", "tab\there", "x" * 129):
        with pytest.raises(BadScriptName):
            scripts.put_script(D, "ted", bad, "keep;")
    scripts.set_active(D, "ted", "")
    assert scripts.active_script(D, "ted") is None
    scripts.delete_script(D, "ted", "uno")
    assert [n for n, _, _ in scripts.list_scripts(D, "ted")] == ["two"]
    assert scripts.vacation_due(D, "ted", "h\0a@x", 86400, now=1000.0)
    assert not scripts.vacation_due(D, "ted", "h\0a@x", 86400, now=1000.0 + 86399)
    assert scripts.vacation_due(D, "ted", "h\0a@x", 86400, now=1000.0 + 86400)
    assert scripts.vacation_due(D, "ted", "h\0b@x", 86400, now=1000.0 + 86400)


def _counting_rules(store, scripts, queue):  # noqa: ANN001, ANN202
    """SieveRules whose thread hops are counted (``calls``) on a clock the test moves
    (``now[0]``, monotonic seconds)."""
    calls: list = []
    now = [100.0]

    def counting(f, *args):  # noqa: ANN001, ANN202
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    rules = SieveRules(RulesSettings(hostname="mx"), scripts, queue, store, counting,
                       monotonic=lambda: now[0])
    return rules, calls, now


def test_mailboxes_without_rules_cost_no_thread_hop_for_a_second(env) -> None:  # noqa: ANN001
    """A mailbox found without an active script is not looked at again for NO_SCRIPT_TTL
    seconds (no run_blocking call); a script activated meanwhile runs after that."""
    store, scripts, queue, _ = env
    rules, calls, now = _counting_rules(store, scripts, queue)
    for _ in range(3):
        apply(rules, message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))]))
    assert len(calls) == 1
    scripts.put_script(D, "ted", "d", "discard;")
    scripts.set_active(D, "ted", "d")
    now[0] += 1.5
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert apply(rules, msg).outcome is Outcome.ACCEPT and len(calls) == 2


def test_rules_known_empty_make_the_stage_idle(env) -> None:  # noqa: ANN001
    """``idle`` is True only while every local recipient's mailbox is known to have no active
    script (a look found none less than NO_SCRIPT_TTL seconds ago): then start_stages takes
    its plain-callback path (the rules are not asked) with the same result; a mailbox not yet
    looked at, or looked at too long ago, makes the stage run (and a script found then acts)."""
    store, scripts, queue, _ = env
    now = [100.0]
    rules = SieveRules(RulesSettings(hostname="mx"), scripts, queue, store, blocking,
                       monotonic=lambda: now[0])
    stage = RecipientRules(rules)
    first = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted")), ("far@example.net", None)])
    assert not stage.idle(first)  # never looked at
    apply(rules, first)
    second = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted")), ("far@example.net", None)])
    assert stage.idle(second)  # known without rules; the outside recipient is not the rules'
    assert not stage.idle(message(store, MAIL, [("ann@pop.contoso.test", (D, "ann"))]))

    committer = FakeCommitter()
    asked: list = []
    rules.apply = lambda msg: asked.append(msg)  # type: ignore[method-assign]
    d = start_stages(second, [ExpandRecipients(), RecipientRules(rules), CommitStage(committer)])
    assert d.called and committer.local == [(D, "ted")] and asked == []
    del rules.apply

    scripts.put_script(D, "ted", "d", "discard;")
    scripts.set_active(D, "ted", "d")
    now[0] += 1.5
    third = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert not stage.idle(third)
    assert apply(rules, third).outcome is Outcome.ACCEPT  # the script ran: discarded


def test_idle_says_when_apply_would_continue_touching_nothing(env) -> None:  # noqa: ANN001
    """SieveRules provides IIdleRules: idle for a message with no local recipient (relayed
    mail) or only mailboxes known to have no script, not for a mailbox never looked at or
    whose no-script knowledge has expired; it reads nothing itself."""
    store, scripts, queue, _ = env
    rules, calls, now = _counting_rules(store, scripts, queue)
    assert IIdleRules.providedBy(rules) and verifyObject(IIdleRules, rules)
    assert rules.idle(message(store, MAIL, [("x@relay.example", None)]))
    ted = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert not rules.idle(ted)
    apply(rules, ted)  # looks once: no script
    assert rules.idle(message(store, MAIL, [("ted@pop.contoso.test", (D, "ted")),
                                            ("x@relay.example", None)]))
    assert len(calls) == 1
    now[0] += 1.5  # NO_SCRIPT_TTL has passed: looked at again
    assert not rules.idle(message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))]))


def test_a_script_activated_applies_to_the_next_message_at_once(env) -> None:  # noqa: ANN001
    """The no-script cache ends when any process sets or unsets an active script through the
    store (its change marker moves on), not only after NO_SCRIPT_TTL: the next message to the
    mailbox runs the new script even within the same second (seen in CI: a test activated a
    fileinto script right after mail to the same mailbox and found the message in INBOX)."""
    store, scripts, queue, _ = env
    now = [100.0]  # the clock stands still: only the marker can end the cache
    rules = SieveRules(RulesSettings(hostname="mx"), scripts, queue, store, blocking,
                       monotonic=lambda: now[0])
    apply(rules, message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))]))
    assert rules.idle(message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))]))
    other = SieveScripts(MaildirStore(store.root))  # another process's view of the same store
    other.put_script(D, "ted", "d", "discard;")
    assert rules.idle(message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))]))  # not active
    other.set_active(D, "ted", "d")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert not rules.idle(msg)
    assert apply(rules, msg).outcome is Outcome.ACCEPT  # discarded by the new script
    other.set_active(D, "ted", "")
    msg = message(store, MAIL, [("ted@pop.contoso.test", (D, "ted"))])
    assert apply(rules, msg).outcome is Outcome.CONTINUE  # no script again: kept


def test_the_change_marker_moves_on_every_activation(env) -> None:  # noqa: ANN001
    """``changes`` is 0 before any activation and grows at every set_active (a script, none),
    even twice within one clock tick; a script's text alone does not move it."""
    store, scripts, _, _ = env
    assert scripts.changes() == 0
    scripts.put_script(D, "ted", "a", "keep;")
    assert scripts.changes() == 0
    seen = [scripts.changes()]
    for name in ("a", "", "a", "a"):
        scripts.set_active(D, "ted", name)
        seen.append(scripts.changes())
    assert seen == sorted(set(seen)), seen
