"""The outbound queue's claim protocol (store/queue.py module docstring): one runner at a time
per message, leases, take back of dead owners, and the fence that keeps a runner whose claims
were taken back from writing or removing what is no longer its own."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pop3coexist.store.queue import LEASE, FileQueue, make_owner

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def _enqueue(queue: FileQueue, tmp_path: Path, n: int = 1) -> list[str]:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    ids = []
    for i in range(n):
        src = spool / f"m{i}.{time.time_ns()}"
        src.write_bytes(MESSAGE)
        ids.append(queue.enqueue(src, {"sender": "a@example.org", "arrival": 1000.0,
                                       "recipients": [{"address": f"r{i}@example.net"}]}))
        src.unlink()
    return ids


def _runner(root: Path, node: str, worker: int) -> FileQueue:
    q = FileQueue(root, "pop.contoso.test")
    q.set_owner(make_owner(node, worker))
    return q


def test_owner_names_node_worker_and_a_new_boot_id_each_time() -> None:
    """``make_owner`` gives ``<node>.w<N>.<boot>``, the node sanitised, a new boot id per call."""
    a, b = make_owner("mx1.contoso.test", 3), make_owner("mx1.contoso.test", 3)
    assert a.startswith("mx1_contoso_test.w3.") and b.startswith("mx1_contoso_test.w3.")
    assert a != b and a.count(".") == 2


def test_a_claim_is_exclusive_and_invisible_to_no_one(tmp_path: Path) -> None:
    """The first runner's claim wins, the second gets None; the message is still listed and
    loadable (admin, tests) while claimed, and not among the unclaimed ones."""
    one = _runner(tmp_path / "q", "n1", 0)
    two = _runner(tmp_path / "q", "n1", 1)
    [qid] = _enqueue(one, tmp_path)
    env = one.claim(qid)
    assert env is not None and env.id == qid
    assert two.claim(qid) is None
    assert two.ids() == [qid] and two.ready_ids() == [] and two.load(qid) is not None
    assert (one.claimed_dir / one.owner / f"{qid}.json").exists()


def test_release_sets_the_due_time_as_mtime_and_gives_it_back(tmp_path: Path) -> None:
    """A released (deferred) message is in env/ with its due time as mtime; due_ids finds it
    only once it is due; another runner can claim it then."""
    one = _runner(tmp_path / "q", "n1", 0)
    two = _runner(tmp_path / "q", "n1", 1)
    [qid] = _enqueue(one, tmp_path)
    assert one.claim(qid) is not None
    due = time.time() + 900
    one.release(qid, due)
    assert abs(os.stat(one.envelope_path(qid)).st_mtime - due) < 1
    assert one.due_ids(time.time()) == [] and one.due_ids(due + 1) == [qid]
    assert two.claim(qid) is not None


def test_save_and_remove_work_on_the_owners_claim(tmp_path: Path) -> None:
    """A claimed message is saved in place (still claimed) and removed with its body."""
    one = _runner(tmp_path / "q", "n1", 0)
    [qid] = _enqueue(one, tmp_path)
    env = one.claim(qid)
    env.recipients[0].attempts = 3
    assert one.save(env)
    assert one.load(qid).recipients[0].attempts == 3 and one.ready_ids() == []
    one.remove(qid)
    assert one.ids() == [] and not one.body_path(qid).exists()


def test_take_back_of_a_dead_worker_and_the_fence(tmp_path: Path) -> None:
    """Worker 1 dies holding a claim: the main process takes back ``<node>.w1.*`` at once;
    the message is unclaimed again, and if the old owner still ran, its save returns False,
    its remove leaves the body, and its next lease touch starts a new incarnation."""
    main = _runner(tmp_path / "q", "n1", 0)
    w1 = _runner(tmp_path / "q", "n1", 1)
    [qid] = _enqueue(main, tmp_path)
    env = w1.claim(qid)
    old_owner = w1.owner
    assert main.take_back(prefix="n1.w1.") == 1
    assert main.ready_ids() == [qid]
    assert w1.save(env) is False
    w1.remove(qid)
    assert main.body_path(qid).exists() and main.ready_ids() == [qid]
    assert w1.touch_lease() is False and w1.owner != old_owner
    assert main.claim(qid) is not None


def test_an_expired_lease_is_taken_back_by_anyone_a_fresh_one_never(tmp_path: Path) -> None:
    """Another node's claims come back once its lease is older than LEASE, not before; a
    half-done take back (a taker that died) is finished by the next one."""
    here = _runner(tmp_path / "q", "n1", 0)
    there = _runner(tmp_path / "q", "n2", 0)
    a, b = _enqueue(here, tmp_path, 2)
    there.claim(a)
    there.claim(b)
    assert here.take_back(expired=LEASE) == 0
    lease = there.claimed_dir / there.owner / "lease"
    old = time.time() - LEASE - 10
    os.utime(lease, (old, old))
    assert here.take_back(expired=LEASE) == 2
    assert sorted(here.ready_ids()) == sorted([a, b])
    # a taker that died after its rename: the .takeback folder is finished later by anyone
    there2 = _runner(tmp_path / "q", "n2", 1)
    there2.claim(a)
    grave = there2.claimed_dir / f".takeback.{there2.owner}.dead"
    os.rename(there2.claimed_dir / there2.owner, grave)
    os.utime(grave, (old, old))
    assert here.take_back(expired=LEASE) == 1 and not grave.exists()


def test_start_up_takes_back_this_nodes_claims_only(tmp_path: Path) -> None:
    """recover(node) at the main process's start takes back every claim of its node (those
    processes are dead) and leaves another node's live claims alone."""
    old = _runner(tmp_path / "q", "n1", 1)
    other = _runner(tmp_path / "q", "n2", 0)
    a, b = _enqueue(old, tmp_path, 2)
    old.claim(a)
    other.claim(b)
    fresh = FileQueue(tmp_path / "q", "pop.contoso.test")
    counts = fresh.recover(node="n1")
    assert counts["taken_back"] == 1 and fresh.ready_ids() == [a]
    assert other.load(b) is not None and b not in fresh.ready_ids()


def test_release_all_keeps_what_is_still_in_flight(tmp_path: Path) -> None:
    """At a clean stop every claim goes back but the ones still being delivered."""
    one = _runner(tmp_path / "q", "n1", 0)
    a, b = _enqueue(one, tmp_path, 2)
    one.claim(a)
    one.claim(b)
    assert one.release_all(keep={b}) == 1
    assert one.ready_ids() == [a]


def _claimer(root: str, worker: int, ids: list[str], out: multiprocessing.Queue) -> None:
    q = FileQueue(Path(root), "pop.contoso.test")
    q.set_owner(make_owner("race", worker))
    out.put([qid for qid in ids if q.claim(qid) is not None])


@pytest.mark.parametrize("runners", [4])
def test_racing_processes_claim_each_message_exactly_once(tmp_path: Path, runners: int) -> None:
    """Several processes try to claim the same 200 messages at once: every message is claimed
    by exactly one of them."""
    q = FileQueue(tmp_path / "q", "pop.contoso.test")
    ids = _enqueue(q, tmp_path, 200)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path / "q"), w, ids, out))
             for w in range(runners)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [qid for part in got for qid in part]
    assert sorted(claimed) == sorted(ids)


def test_remove_many_removes_claimed_messages_and_leaves_taken_ones(tmp_path: Path) -> None:
    """``remove_many`` (the runner's group removal) drops each claimed envelope and its body;
    a message no longer in this owner's claim (taken back) keeps its envelope and body."""
    one = _runner(tmp_path / "q", "n1", 0)
    ids = _enqueue(one, tmp_path, 3)
    for qid in ids:
        assert one.claim(qid) is not None
    one.release(ids[2], time.time())  # no longer ours
    one.remove_many(ids)
    assert one.ids() == [ids[2]]
    assert not one.body_path(ids[0]).exists() and not one.body_path(ids[1]).exists()
    assert one.body_path(ids[2]).exists()


def test_a_message_queued_by_a_running_runner_is_born_claimed(tmp_path: Path) -> None:
    """With ``claim_new`` (the runner runs), what this process queues is written into its own
    claim and its envelope handed over in memory once (``take_born``); nobody else can claim
    it, and a plain ``claim`` by its owner still reads it from the claim."""
    one = _runner(tmp_path / "q", "n1", 0)
    two = _runner(tmp_path / "q", "n1", 1)
    one.claim_new = True
    [qid] = _enqueue(one, tmp_path)
    assert one.ready_ids() == [] and one.ids() == [qid]
    assert (one.claimed_dir / one.owner / f"{qid}.json").exists()
    born = one.take_born(qid)
    assert born is not None and born.id == qid and born.recipients[0].address == "r0@example.net"
    assert one.take_born(qid) is None  # handed over once
    assert two.claim(qid) is None
    assert one.claim(qid) == born


def test_a_born_claim_of_a_dead_worker_is_taken_back(tmp_path: Path) -> None:
    """A worker that queued a message born claimed and died (kill -9: nothing released) loses
    it to the main process's take back, which another runner then delivers."""
    main = _runner(tmp_path / "q", "n1", 0)
    w1 = _runner(tmp_path / "q", "n1", 1)
    w1.claim_new = True
    [qid] = _enqueue(w1, tmp_path)
    assert main.ready_ids() == []
    assert main.take_back(prefix="n1.w1.") == 1
    assert main.ready_ids() == [qid] and main.claim(qid) is not None


def test_born_claimed_falls_back_to_env_when_the_claim_was_taken(tmp_path: Path) -> None:
    """When this owner's claim folder was taken back, a new message goes to env/ (claimable
    by anyone, nothing handed over in memory); ``discard`` removes a born claim whole;
    ``forget_born`` (the runner stops) sends new messages to env/ again."""
    main = _runner(tmp_path / "q", "n1", 0)
    w1 = _runner(tmp_path / "q", "n1", 1)
    w1.claim_new = True
    main.take_back(prefix="n1.w1.")
    [qid] = _enqueue(w1, tmp_path)
    assert w1.ready_ids() == [qid] and w1.take_born(qid) is None
    w1.touch_lease()  # a new incarnation
    [born] = _enqueue(w1, tmp_path)
    assert w1.ready_ids() == [qid]
    w1.discard(born)
    assert w1.ids() == [qid] and not w1.body_path(born).exists() and w1.take_born(born) is None
    w1.forget_born()
    [later] = _enqueue(w1, tmp_path)
    assert sorted(w1.ready_ids()) == sorted([qid, later]) and w1.take_born(later) is None


def test_group_call_batches_the_requests_made_while_a_batch_runs() -> None:
    """outbound.GroupCall: the first request runs at once; those made while it runs go
    together into one next call; each request's Deferred fires with its batch's result."""
    from twisted.internet import defer

    from pop3coexist.smtp.outbound import GroupCall

    calls: list[list[str]] = []
    pending: list[defer.Deferred] = []

    def blocking(f, items):  # type: ignore[no-untyped-def]
        calls.append(list(items))
        d: defer.Deferred = defer.Deferred()
        d.addCallback(lambda _: f(items))
        pending.append(d)
        return d

    group = GroupCall(blocking, lambda items: {i: i.upper() for i in items})
    got: list = []
    for item in ("a", "b", "c"):
        group(item).addCallback(lambda r, i=item: got.append(r[i]))
    assert calls == [["a"]]
    pending.pop(0).callback(None)
    assert got == ["A"] and calls == [["a"], ["b", "c"]]
    pending.pop(0).callback(None)
    assert got == ["A", "B", "C"]


def test_group_call_with_a_linger_gathers_the_requests_of_that_time() -> None:
    """outbound.GroupCall with ``linger`` (the runner's removals): the first request starts a
    batch ``linger`` seconds later, and every request made until then goes into it."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from pop3coexist.smtp.outbound import GroupCall

    clock = Clock()
    calls: list[list[str]] = []
    group = GroupCall(lambda f, items: (calls.append(list(items)), defer.succeed(f(items)))[1],
                      lambda items: None, linger=0.02, clock=clock)
    fired: list[str] = []
    for item in ("a", "b"):
        group(item).addCallback(lambda _, i=item: fired.append(i))
    assert calls == [] and fired == []
    clock.advance(0.01)
    group("c").addCallback(lambda _: fired.append("c"))
    clock.advance(0.01)
    assert calls == [["a", "b", "c"]] and fired == ["a", "b", "c"]
    group("d")
    assert calls == [["a", "b", "c"]]
    clock.advance(0.02)
    assert calls == [["a", "b", "c"], ["d"]]


class _MoveWhileLooking(FileQueue):
    """The admin's view of the queue (no owner) where a runner's rename of the envelope
    (``move(envelope path) -> new path``) happens at the worst moment: right after env/ was
    read, before the claim folders are (``_claim_dirs``), the first ``times`` times."""

    def __init__(self, root: Path, move, times: int = 1) -> None:  # noqa: ANN001
        super().__init__(root, "pop.contoso.test")
        self.move, self.times = move, times

    def _claim_dirs(self) -> list[Path]:
        if self.times > 0:
            self.times -= 1
            self.move()
        return super()._claim_dirs()


def _claimed(tmp_path: Path) -> tuple[FileQueue, str, Path, Path]:
    """A runner holding one claimed message: (runner, id, its env/ path, its claim path)."""
    runner = _runner(tmp_path / "q", "n1", 0)
    [qid] = _enqueue(runner, tmp_path)
    assert runner.claim(qid) is not None
    claim = runner.claimed_dir / runner.owner / f"{qid}.json"
    return runner, qid, runner.envelope_path(qid), claim


def test_a_release_between_the_reads_hides_nothing(tmp_path: Path) -> None:
    """A runner releasing a message (claim -> env/) after a listing read env/ and before it
    read the claims: ``ids``, ``entries`` (the admin's queue list, the console's queue page)
    and ``load`` still find it; the same for a claim (env/ -> claim) in that gap (stop 27's
    CI: an admin listing of one deferred message came back empty)."""
    runner, qid, env, claim = _claimed(tmp_path)

    def release() -> None:
        os.rename(claim, env)

    def take() -> None:
        os.rename(env, claim)

    looks = {
        "ids": lambda q: q.ids() == [qid],
        "entries": lambda q: [e["id"] for e in q.entries()] == [qid],
        "load": lambda q: q.load(qid) is not None,
    }
    for move_back, move in ((take, release), (release, take)):
        if move is take:
            release()  # from env/ this time
        for name, look in looks.items():
            view = _MoveWhileLooking(tmp_path / "q", move)
            assert look(view), (name, move.__name__)
            if view.times == 0:  # it moved: put it back for the next look
                move_back()


def test_an_admin_delete_of_a_moving_message_leaves_nothing_behind(tmp_path: Path) -> None:
    """``delete`` by the admin while the runner releases the message between the admin's look
    and its unlink: envelope and body are both gone, never an envelope without its body
    (which the next start would move aside as damaged)."""
    runner, qid, env, claim = _claimed(tmp_path)
    admin = FileQueue(tmp_path / "q", "pop.contoso.test")
    found = admin._find
    looks = []

    def find_then_release(q: str) -> Path | None:
        path = found(q)
        looks.append(path)
        if len(looks) == 2 and path == claim:  # delete's load looked first; now its removal
            os.rename(claim, env)  # the runner defers it: this look is stale now
        return path

    admin._find = find_then_release  # type: ignore[method-assign]
    admin.delete(qid)
    assert looks[:2] == [claim, claim]
    assert admin.ids() == [] and not admin.body_path(qid).exists()
    assert not env.exists() and not claim.exists()
