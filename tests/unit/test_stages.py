"""The declared stages after DATA (policy/stages.py): order, outcomes, failure semantics."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from pop3coexist.errors import MailError, QuotaExceeded
from pop3coexist.policy.stages import (
    ACCEPT,
    CONTINUE,
    CheckContent,
    CommitStage,
    ExpandRecipients,
    Message,
    Outcome,
    Recipient,
    RecipientRules,
    Verdict,
    default_stages,
    run_stages,
)


class Spool:
    queue_id = "q1"
    aborted = False

    def abort(self) -> None:
        self.aborted = True


class Committer:
    """Records the commit; ``refused`` are the mailboxes its quota check turns away."""

    def __init__(self, refused=(), fail: BaseException | None = None) -> None:
        self.calls: list = []
        self.refused = list(refused)
        self.fail = fail

    def commit(self, spool, local, envelope, notes=None) -> defer.Deferred:
        self.calls.append((local, envelope, notes))
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(self.refused)


def message() -> Message:
    return Message("q1", Spool(), "a@b.test", [
        Recipient({"address": "ted@pop.contoso.test", "orcpt": None, "notify": None},
                  ("pop.contoso.test", "ted")),
        Recipient({"address": "bob@example.org", "orcpt": None, "notify": ["NEVER"]}),
    ], size=10, hops=2, arrival=1.0, received_from="c.test ([192.0.2.1])")


def run(msg: Message, stages) -> object:
    box: list = []
    defer.ensureDeferred(run_stages(msg, stages)).addBoth(box.append)
    return box[0]


def test_the_declared_order() -> None:
    """Recipient expansion, content check, per-recipient rules, then the commit."""
    stages = default_stages(Committer())
    assert [type(s) for s in stages] == [ExpandRecipients, CheckContent, RecipientRules,
                                         CommitStage]
    assert [o.value for o in Outcome] == ["accept", "refuse", "defer", "continue"]


def test_commit_builds_the_envelope_and_notes_and_accepts_every_recipient() -> None:
    """The commit stage hands the local mailboxes, the queue envelope and the report notes to
    the committer; every recipient is accepted."""
    committer = Committer()
    results = run(message(), default_stages(committer))
    assert results == {"ted@pop.contoso.test": ACCEPT, "bob@example.org": ACCEPT}
    [(local, envelope, notes)] = committer.calls
    assert local == [("pop.contoso.test", "ted")]
    assert envelope == {"sender": "a@b.test", "recipients": [
        {"address": "bob@example.org", "orcpt": None, "notify": ["NEVER"]}],
        "ret": None, "envid": None, "body": None, "received_from": "c.test ([192.0.2.1])",
        "arrival": 1.0, "hops": 2, "inside": True, "id": "q1"}
    assert list(notes.recipients) == [("pop.contoso.test", "ted")]


def test_a_full_mailbox_is_a_per_recipient_refusal_all_full_refuses_the_message() -> None:
    """A mailbox whose quota refused the message while others got it: 552 5.2.2 for that
    recipient only; every mailbox full (QuotaExceeded): the whole message 552 5.2.2."""
    results = run(message(), default_stages(Committer(refused=[("pop.contoso.test", "ted")])))
    assert results["ted@pop.contoso.test"].outcome is Outcome.REFUSE
    assert results["ted@pop.contoso.test"].error.reply() == "552 5.2.2 Mailbox full"
    assert results["bob@example.org"] is ACCEPT
    failure = run(message(), default_stages(Committer(fail=QuotaExceeded("full"))))
    assert failure.value.reply() == "552 5.2.2 Mailbox full"
    failure = run(message(), default_stages(Committer(fail=OSError("disk"))))
    assert failure.value.code == 451 and failure.value.enhanced == "4.3.0"


class Refuse:
    name = "test"

    def __init__(self, verdict: Verdict | None = None, per_recipient: Verdict | None = None,
                 raises: BaseException | None = None) -> None:
        self.verdict, self.per_recipient, self.raises = verdict, per_recipient, raises

    async def __call__(self, msg: Message) -> Verdict:
        if self.raises is not None:
            raise self.raises
        if self.per_recipient is not None:
            msg.decide(msg.recipients[0], self.per_recipient)
        return self.verdict or CONTINUE


@pytest.mark.parametrize(("stage", "reply"), [
    (Refuse(Verdict.refusal(MailError(554, "5.7.1", "spam"))), "554 5.7.1 spam"),
    (Refuse(Verdict.refusal(MailError(451, "4.7.1", "later"))), "451 4.7.1 later"),
    (Refuse(raises=MailError(550, "5.7.1", "no")), "550 5.7.1 no"),
    (Refuse(raises=RuntimeError("bug")),
     "451 4.3.0 Local error in processing; message not accepted, try again later"),
])
def test_a_whole_message_refusal_stores_nothing(stage, reply: str) -> None:
    """REFUSE / DEFER (or a raised error) before the commit: the commit never runs, the spool
    file is removed, the reply is the stage's (any other exception: 451 4.3.0)."""
    committer = Committer()
    msg = message()
    failure = run(msg, [stage, CommitStage(committer)])
    assert failure.value.reply() == reply
    assert committer.calls == [] and msg.spool.aborted


def test_a_refused_recipient_leaves_the_message() -> None:
    """A per-recipient refusal drops that recipient before the commit; the others go on; with
    none left, the whole message gets the first refusal."""
    committer = Committer()
    no = Verdict.refusal(MailError(550, "5.7.1", "not for ted"))
    results = run(message(), [Refuse(per_recipient=no), CommitStage(committer)])
    assert results["ted@pop.contoso.test"] is no and results["bob@example.org"] is ACCEPT
    [(local, envelope, _)] = committer.calls
    assert local == [] and [r["address"] for r in envelope["recipients"]] == ["bob@example.org"]
    msg = message()
    msg.recipients = msg.recipients[:1]
    failure = run(msg, [Refuse(per_recipient=no), CommitStage(Committer())])
    assert failure.value is no.error
