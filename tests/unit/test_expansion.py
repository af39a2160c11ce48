"""Aliases, lists and groups (policy/expansion.py), the recipient-expansion stage and the commit
of list copies (policy/stages.py), and the alias files (store/aliases.py), over fakes that
implement the declared interfaces (IMailStore + IAliasTable, IAccountChecker + IGroupLookup,
ICommitter + ICopyCommitter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3coexist.address import parse_address
from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable, MailError, StoreError
from pop3coexist.interfaces import (
    Distribution,
    IAliasTable,
    ICommitter,
    ICopyCommitter,
    IGroupLookup,
    LocalNotes,
)
from pop3coexist.policy.expansion import Expander, list_id, owner_address
from pop3coexist.policy.stages import (
    ACCEPT,
    CheckContent,
    CommitStage,
    ExpandRecipients,
    Message,
    Recipient,
    RecipientRules,
    run_stages,
)
from pop3coexist.smtp.incoming import SpoolWriter, copy_spool
from pop3coexist.store.aliases import AliasFiles
from tests.support.fakes import FakeDirectoryChecker, FakeMailStore, sync_run_blocking

D = "pop.contoso.test"


def fired(d):
    """The result of a coroutine or Deferred that has already finished (the fakes answer at
    once), or the exception it failed with."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    box: list = []
    d.addBoth(box.append)
    [result] = box
    if isinstance(result, Failure):
        result.raiseException()
    return result


@pytest.fixture
def world():
    """Mailboxes ann, bo, cy and postmaster; a directory-like checker that also has groups."""
    config = parse_config(f'[server]\nhostname = "{D}"\nstate_dir = "/tmp/x"\n'
                          f'[domains]\nlocal = ["{D}"]\n')
    store = FakeMailStore()
    for name in ("ann", "bo", "cy", "postmaster"):
        store.add(f"{name}@{D}")
    checker = FakeDirectoryChecker({f"{n}@{D}": "pw" for n in ("ann", "bo", "cy")},
                                   aliases={f"annie@{D}": f"ann@{D}"})
    verifyObject(IAliasTable, store)
    verifyObject(IGroupLookup, checker)
    return Expander(config, store, checker, sync_run_blocking), store, checker


def alias(store, name, *targets):
    store.distributions[f"{name}@{D}"] = Distribution("alias", f"{name}@{D}", targets)


def mlist(store, name, *members, senders="anyone", owner=None):
    store.distributions[f"{name}@{D}"] = Distribution("list", f"{name}@{D}", members,
                                                      senders, owner)


def flat(parts):
    return {(None if p.copy is None else p.copy.address): (sorted(p.local), sorted(p.remote))
            for p in parts}


def test_accounts_win_and_every_kind_resolves(world) -> None:
    """A proxy address resolves to its account's mailbox (not an alias); an admin alias, a
    list, a group, owner-LIST and an outside address each resolve to what they are."""
    ex, store, checker = world
    alias(store, "annie", f"bo@{D}")  # the account's address wins over a stray alias
    alias(store, "sales", f"ann@{D}")
    mlist(store, "team", f"bo@{D}")
    checker.groups[f"grp@{D}"] = Distribution("group", f"grp@{D}", (f"cy@{D}",))
    assert fired(ex.resolve(f"Annie@{D}")).mailbox == (D, "ann")
    assert fired(ex.resolve(f"sales@{D}")).distribution.kind == "alias"
    assert fired(ex.resolve(f"team@{D}")).distribution.kind == "list"
    assert fired(ex.resolve(f"grp@{D}")).distribution.kind == "group"
    owner = fired(ex.resolve(f"owner-team@{D}")).distribution
    assert owner.kind == "owner" and owner.targets == (f"postmaster@{D}",)
    assert fired(ex.resolve("x@outside.test")).remote == "x@outside.test"
    assert fired(ex.resolve(f"nobody@{D}")) is None
    assert fired(ex.resolve(f"owner-nobody@{D}")) is None


def test_alias_targets_keep_the_message_and_lists_get_a_copy(world) -> None:
    """An alias's targets get the message as it is (copy None); a list reached through it gets
    its own copy with List-Id and the owner- sender."""
    ex, store, _ = world
    mlist(store, "team", f"bo@{D}", "x@outside.test", owner=f"cy@{D}")
    alias(store, "sales", f"ann@{D}", "y@outside.test", f"team@{D}")
    parts = fired(ex.expand(store.distributions[f"sales@{D}"]))
    assert flat(parts) == {
        None: ([(D, "ann", f"ann@{D}")], ["y@outside.test"]),
        f"team@{D}": ([(D, "bo", f"bo@{D}")], ["x@outside.test"]),
    }
    copy = parts[1].copy
    assert copy.sender == f"owner-team@{D}" == owner_address(f"team@{D}")
    assert copy.header == f"List-Id: {list_id(f'team@{D}')}\n".encode()
    assert list_id(f"team@{D}") == f"<team.{D}>"
    owner = fired(ex.resolve(f"owner-team@{D}")).distribution
    assert owner.targets == (f"cy@{D}",)


def test_nested_lists_join_the_outer_copy_and_loops_expand_once(world) -> None:
    """A nested list's members join the outer list's copy; a list that includes itself and two
    lists that include each other expand once each."""
    ex, store, _ = world
    mlist(store, "one", f"one@{D}", f"two@{D}", f"ann@{D}")
    mlist(store, "two", f"one@{D}", f"bo@{D}", f"two@{D}")
    assert flat(fired(ex.expand(store.distributions[f"one@{D}"]))) == {
        f"one@{D}": ([(D, "ann", f"ann@{D}"), (D, "bo", f"bo@{D}")], [])}
    assert flat(fired(ex.expand(store.distributions[f"two@{D}"]))) == {
        f"two@{D}": ([(D, "ann", f"ann@{D}"), (D, "bo", f"bo@{D}")], [])}


def test_groups_expand_like_lists(world) -> None:
    """A directory group (IGroupLookup) is a list: its members get the group's copy."""
    ex, _, checker = world
    checker.groups[f"grp@{D}"] = Distribution("group", f"grp@{D}", (f"cy@{D}", "z@out.test"))
    parts = fired(ex.expand(checker.groups[f"grp@{D}"]))
    assert flat(parts) == {f"grp@{D}": ([(D, "cy", f"cy@{D}")], ["z@out.test"])}


def test_depth_is_bounded(world) -> None:
    """A chain of aliases deeper than MAX_DEPTH stops there (no endless walk)."""
    ex, store, _ = world
    for i in range(30):
        alias(store, f"a{i}", f"a{i + 1}@{D}")
    alias(store, "a30", f"ann@{D}")
    assert flat(fired(ex.expand(store.distributions[f"a0@{D}"]))) == {}


def test_senders_rule(world) -> None:
    """members: a member's address (direct or nested) or login may send, a stranger and <>
    get 550 5.7.1; authenticated: only a logged-in client; an alias to a list follows it."""
    ex, store, _ = world
    mlist(store, "inner", f"cy@{D}")
    mlist(store, "team", f"annie@{D}", f"inner@{D}", senders="members")
    alias(store, "to-team", f"team@{D}")
    team = store.distributions[f"team@{D}"]
    who = parse_address
    assert fired(ex.sender_refusal(team, who(f"annie@{D}"), None)) is None
    assert fired(ex.sender_refusal(team, who(f"ann@{D}"), None)) is None  # its mailbox
    assert fired(ex.sender_refusal(team, who(f"cy@{D}"), None)) is None  # nested
    assert fired(ex.sender_refusal(team, who("x@outside.test"), f"ann@{D}")) is None
    for sender in (who("x@outside.test"), None):
        err = fired(ex.sender_refusal(team, sender, None))
        assert (err.code, err.enhanced) == (550, "5.7.1")
    err = fired(ex.sender_refusal(store.distributions[f"to-team@{D}"], who("x@o.test"), None))
    assert err is not None and "only members" in err.text
    mlist(store, "auth", f"bo@{D}", senders="authenticated")
    auth = store.distributions[f"auth@{D}"]
    assert fired(ex.sender_refusal(auth, who(f"bo@{D}"), None)).code == 550
    assert fired(ex.sender_refusal(auth, None, f"bo@{D}")) is None


def test_flatten_for_the_queue_local_hop(world) -> None:
    """The local hop's view: every mailbox and outside address an address reaches, once."""
    ex, store, _ = world
    mlist(store, "team", f"bo@{D}", f"sales@{D}", owner=f"cy@{D}")
    alias(store, "sales", f"bo@{D}", "q@out.test")
    assert fired(ex.flatten(f"sales@{D}")) == ([(D, "bo")], ["q@out.test"])
    assert fired(ex.flatten(f"team@{D}")) == ([(D, "bo")], ["q@out.test"])
    assert fired(ex.flatten(f"owner-team@{D}")) == ([(D, "cy")], [])
    assert fired(ex.flatten(f"nobody@{D}")) is None


# --------------------------------------------------------------------------- the stages


class Spool:
    def __init__(self, name: str = "q1") -> None:
        self.queue_id = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


@implementer(ICommitter, ICopyCommitter)
class CopyCommitter:
    """Records copies and commits; ``full``: mailboxes whose quota refuses."""

    def __init__(self, full=()) -> None:
        self.copies: list[tuple[str, bytes, Spool]] = []
        self.commits: list[tuple[Spool, list, dict | None, LocalNotes, bool]] = []
        self.full = list(full)

    def commit(self, spool, local_recipients, envelope, notes=None):
        self.commits.append((spool, local_recipients, envelope, notes, False))
        return defer.succeed([b for b in local_recipients if b in self.full])

    def commit_copy(self, spool, local_recipients, envelope, notes=None):
        self.commits.append((spool, local_recipients, envelope, notes, True))
        return defer.succeed([b for b in local_recipients if b in self.full])

    def copy(self, spool, sender, header):
        made = Spool(f"copy{len(self.copies)}")
        self.copies.append((sender, header, made))
        return defer.succeed(made)


def message(*rcpts: Recipient) -> Message:
    return Message("q1", Spool(), "alice@example.test", list(rcpts), size=10)


def entry(address: str, notify=None) -> dict:
    return {"address": address, "orcpt": None, "notify": notify}


def stages(ex, committer):
    return [ExpandRecipients(ex), CheckContent(), RecipientRules(), CommitStage(committer)]


def test_stage_dedupes_and_commits_each_copy(world) -> None:
    """A person named directly and in two lists gets one copy (the direct one); a person in
    two lists gets the first list's copy only; the outside member is queued once from the
    list's owner- sender; the message and each copy are committed once."""
    ex, store, _ = world
    mlist(store, "one", f"ann@{D}", f"bo@{D}", "x@outside.test")
    mlist(store, "two", f"bo@{D}", f"cy@{D}", "x@outside.test")
    committer = CopyCommitter()
    verifyObject(ICopyCommitter, committer)
    msg = message(Recipient(entry(f"ann@{D}"), (D, "ann")),
                  Recipient(entry(f"one@{D}"), expand=store.distributions[f"one@{D}"]),
                  Recipient(entry(f"two@{D}"), expand=store.distributions[f"two@{D}"]))
    results = fired(run_stages(msg, stages(ex, committer)))
    assert set(results) == {f"ann@{D}", f"one@{D}", f"two@{D}"}
    assert all(v == ACCEPT for v in results.values())
    assert [(s, h) for s, h, _ in committer.copies] == [
        (f"owner-one@{D}", f"List-Id: <one.{D}>\n".encode()),
        (f"owner-two@{D}", f"List-Id: <two.{D}>\n".encode())]
    by_sender = {c[3].sender: c for c in committer.commits}
    assert by_sender["alice@example.test"][1] == [(D, "ann")]
    one = by_sender[f"owner-one@{D}"]
    assert one[1] == [(D, "bo")] and one[4] is True
    assert one[2]["sender"] == f"owner-one@{D}"
    assert [r["address"] for r in one[2]["recipients"]] == ["x@outside.test"]
    two = by_sender[f"owner-two@{D}"]
    assert two[1] == [(D, "cy")] and two[2] is None


def test_alias_targets_carry_the_rcpt_dsn_entry(world) -> None:
    """An alias's targets join the message as it is, with the RCPT's NOTIFY and the alias as
    ORCPT; no copy is made, the plain commit runs."""
    ex, store, _ = world
    alias(store, "sales", f"bo@{D}", "y@outside.test")
    committer = CopyCommitter()
    msg = message(Recipient(entry(f"sales@{D}", ["SUCCESS"]),
                            expand=store.distributions[f"sales@{D}"]))
    fired(run_stages(msg, stages(ex, committer)))
    [(spool, local, envelope, notes, partial)] = committer.commits
    assert not partial and committer.copies == [] and local == [(D, "bo")]
    assert notes.recipients[(D, "bo")] == {"address": f"bo@{D}", "orcpt": f"rfc822;sales@{D}",
                                           "notify": ["SUCCESS"]}
    assert envelope["recipients"] == [{"address": "y@outside.test",
                                       "orcpt": f"rfc822;sales@{D}", "notify": ["SUCCESS"]}]


def test_an_empty_list_is_accepted_and_dropped(world) -> None:
    """A list with no members: the message is accepted, nothing is committed, the spool is
    removed."""
    ex, store, _ = world
    mlist(store, "empty")
    committer = CopyCommitter()
    msg = message(Recipient(entry(f"empty@{D}"), expand=store.distributions[f"empty@{D}"]))
    assert fired(run_stages(msg, stages(ex, committer))) == {f"empty@{D}": ACCEPT}
    assert committer.commits == [] and msg.spool.aborted


def test_a_full_member_is_refused_alone(world) -> None:
    """A member whose quota refuses the list copy is that recipient's refusal (its report goes
    to the owner through commit_copy); the others are accepted."""
    ex, store, _ = world
    mlist(store, "team", f"ann@{D}", f"bo@{D}")
    committer = CopyCommitter(full=[(D, "bo")])
    msg = message(Recipient(entry(f"team@{D}"), expand=store.distributions[f"team@{D}"]))
    fired(run_stages(msg, stages(ex, committer)))
    assert [r.address for r in msg.recipients if r.verdict.refused] == [f"bo@{D}"]
    assert msg.spool.aborted  # only the copy was committed


def test_directory_down_during_expansion_defers(world) -> None:
    """The directory cannot answer while a list expands: 451 4.4.3, nothing committed."""
    ex, store, checker = world
    mlist(store, "team", f"ann@{D}")
    checker.fail = AuthUnavailable("down")
    committer = CopyCommitter()
    msg = message(Recipient(entry(f"team@{D}"), expand=store.distributions[f"team@{D}"]))
    with pytest.raises(MailError) as e:
        fired(run_stages(msg, stages(ex, committer)))
    assert (e.value.code, e.value.enhanced) == (451, "4.4.3")
    assert committer.commits == [] and msg.spool.aborted


# --------------------------------------------------------------------------- files


def test_copy_spool_puts_return_path_and_list_id_in_front(tmp_path: Path) -> None:
    """The list copy's spool file: its own Return-Path (local-only prefix), the List-Id, then
    the message without the original's Return-Path."""
    spool = SpoolWriter(tmp_path, "q1")
    spool.write_local_prefix(b"Return-Path: <alice@example.test>\n")
    spool.write(b"Received: x\nSubject: hi\n\nbody\n")
    copy = copy_spool(spool, f"owner-team@{D}", b"List-Id: <team.pop.contoso.test>\n")
    copy.close()
    data = copy.path.read_bytes()
    assert data == (f"Return-Path: <owner-team@{D}>\n".encode()
                    + b"List-Id: <team.pop.contoso.test>\nReceived: x\nSubject: hi\n\nbody\n")
    assert copy.local_prefix == len(f"Return-Path: <owner-team@{D}>\n")
    spool.abort()
    copy.abort()


def test_alias_files_round_trip_and_damage(tmp_path: Path) -> None:
    """Aliases and lists written by ``changing`` are read back as Distributions (any case);
    another writer's change is seen at once; a damaged file is a StoreError."""
    (tmp_path / D).mkdir()
    files = AliasFiles(tmp_path)
    with files.changing(D) as data:
        data["aliases"]["sales"] = [f"ann@{D}"]
        data["lists"]["team"] = {"members": [f"bo@{D}"], "senders": "members", "owner": None}
    assert files.distribution(f"Sales@{D}") == Distribution("alias", f"sales@{D}", (f"ann@{D}",))
    assert files.distribution(f"team@{D}") == Distribution("list", f"team@{D}", (f"bo@{D}",),
                                                           "members", None)
    with AliasFiles(tmp_path).changing(D) as data:
        data["aliases"]["sales"].append("x@outside.test")
    assert files.distribution(f"sales@{D}").targets == (f"ann@{D}", "x@outside.test")
    assert files.distribution(f"nobody@{D}") is None
    assert files.distribution("sales@unknown.test") is None
    path = tmp_path / D / ".pop3coexist.aliases.json"
    path.write_text(json.dumps({"lists": {"team": {"senders": "everyone"}}}))
    with pytest.raises(StoreError):
        files.distribution(f"team@{D}")
