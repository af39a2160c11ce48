"""Queue file recycling (store/recycle.py, FileQueue's pool, SpoolWriter.finish with a
recycler): spent bodies and envelopes reused for new files, never a file another name shares,
bounded, emptied at start and when idle, and never mistaken for a message."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from zope.interface.verify import verifyObject

from pop3coexist.interfaces import IFileRecycler
from pop3coexist.smtp.incoming import SpoolWriter, clean_spool
from pop3coexist.store.queue import FileQueue, make_owner
from pop3coexist.store.recycle import FilePool

BIG = b"X" * 10_000


def _env(*rcpts: str) -> dict:
    return {
        "sender": "a@example.org",
        "recipients": [{"address": r, "orcpt": None, "notify": None} for r in rcpts],
        "ret": None, "envid": None, "received_from": "client.example [192.0.2.1]",
        "arrival": 1000.0, "hops": 1,
    }


def _spool(tmp_path: Path, data: bytes) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    p = spool / f"m{time.time_ns()}"
    p.write_bytes(data)
    return p


def _files(tmp_path: Path, n: int, data: bytes = b"old") -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        out.append(str(p))
    return out


def _queue(tmp_path: Path, **kw: object) -> FileQueue:
    kw.setdefault("recycle", 16)
    q = FileQueue(tmp_path / "queue", "mx.example", **kw)  # type: ignore[arg-type]
    q.ensure_dirs()
    return q


def test_pool_is_bounded(tmp_path: Path) -> None:
    """A pool takes at most ``limit`` files; further spent files are refused (the caller
    unlinks them), and a limit of 0 turns the pool off."""
    pool = FilePool(str(tmp_path / "free"), "b.", 3)
    files = _files(tmp_path, 5)
    assert [pool.put(f) for f in files] == [True, True, True, False, False]
    assert len(os.listdir(tmp_path / "free")) == 3
    assert os.path.exists(files[3]) and os.path.exists(files[4])
    off = FilePool(str(tmp_path / "off"), "b.", 0)
    assert not off.put(files[3])
    assert off.take(str(tmp_path / "x")) is None


def test_file_with_other_links_is_never_recycled(tmp_path: Path) -> None:
    """A file another name still points at (a Maildir link of the same message) is refused
    by ``put``, and one that got a second link while pooled is never handed out by ``take``:
    the other name keeps its bytes."""
    pool = FilePool(str(tmp_path / "free"), "b.", 8)
    shared, alone = _files(tmp_path, 2, b"private message")
    os.link(shared, tmp_path / "maildir-copy")
    assert not pool.put(shared)
    assert pool.put(alone)
    pooled = tmp_path / "free" / os.listdir(tmp_path / "free")[0]
    os.link(pooled, tmp_path / "late-link")  # a link made while pooled
    assert pool.take(str(tmp_path / "dest")) is None
    assert (tmp_path / "late-link").read_bytes() == b"private message"
    assert (tmp_path / "maildir-copy").read_bytes() == b"private message"
    assert not (tmp_path / "dest").exists()


def test_queue_keeps_body_shared_with_a_mailbox(tmp_path: Path) -> None:
    """remove_many of a message whose body is also linked elsewhere (local delivery of the
    same spool file) unlinks the queue's name only; nothing enters the pool."""
    q = _queue(tmp_path)
    src = _spool(tmp_path, BIG)
    qid = q.enqueue(src, _env("b@example.net"))  # src stays: a second link to the body
    q.remove_many([qid])
    assert src.read_bytes() == BIG
    assert len(q.bodies) == 0
    assert not (q.msg_dir / qid).exists()


def test_two_takers_one_winner(tmp_path: Path) -> None:
    """Two takers that know the same pooled names (two processes): each file goes to one of
    them (rename is atomic), the loser goes on with the next name or gets None."""
    folder = str(tmp_path / "free")
    a = FilePool(folder, "b.", 64)
    b = FilePool(folder, "b.", 64)
    for f in _files(tmp_path, 40):
        assert a.put(f)
    b._names.extend(a._names)  # b learns the same names (as another process would)
    got: dict[str, list[int]] = {"a": [], "b": []}
    out = tmp_path / "out"
    out.mkdir()

    def run(name: str, pool: FilePool) -> None:
        i = 0
        while True:
            fd = pool.take(str(out / f"{name}{i}"))
            if fd is None:
                return
            got[name].append(os.fstat(fd).st_ino)
            os.close(fd)
            i += 1

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inodes = got["a"] + got["b"]
    assert len(inodes) == 40 and len(set(inodes)) == 40
    assert len(os.listdir(out)) == 40 and not os.listdir(folder)


def test_delivered_message_files_are_reused_and_cut(tmp_path: Path) -> None:
    """After a delivered message is removed, its body becomes the next spool file (same
    inode) and its envelope the next envelope's temp file: the new content is exact (the
    old, longer bytes are cut off), and the pool empties as files are taken."""
    q = _queue(tmp_path)
    q.set_owner(make_owner("n", 0))
    q.claim_new = True
    src = _spool(tmp_path, BIG)
    env = _env("b@example.net", "c@example.net", "d@example.net")
    qid = q.enqueue(src, env)
    src.unlink()  # the spool name goes: the body has one link, as after a relay commit
    body_ino = os.stat(q.body_path(qid)).st_ino
    q.remove_many([qid])
    assert len(q.bodies) == 1 and len(q.envelopes) == 1

    verifyObject(IFileRecycler, q)
    spool = SpoolWriter(tmp_path / "spool", "0123456789abcdef01234567", lazy=True)
    spool.write(b"short message\n")
    spool.finish(q)
    spool.close()
    assert os.stat(spool.file).st_ino == body_ino
    assert Path(spool.file).read_bytes() == b"short message\n"
    assert len(q.bodies) == 0

    qid2 = q.enqueue(spool.file, _env("e@example.net"))
    env2 = q.take_born(qid2) or q.load(qid2)
    assert env2 is not None and [r.address for r in env2.recipients] == ["e@example.net"]
    assert len(q.envelopes) == 0
    path = q.envelope_file(qid2)
    assert path is not None
    assert json.loads(path.read_bytes())["id"] == qid2  # parses whole: no old tail


def test_spool_writer_without_pool_creates_as_before(tmp_path: Path) -> None:
    """An empty pool (or none): finish creates a new spool file as it always did."""
    q = _queue(tmp_path)
    spool = SpoolWriter(tmp_path / "spool", "0123456789abcdef01234567", lazy=True)
    spool.write(b"hello\n")
    spool.finish(q)
    spool.close()
    assert Path(spool.file).read_bytes() == b"hello\n"


def test_crash_leftovers_are_not_messages_and_are_emptied(tmp_path: Path) -> None:
    """Files left in free/ by a process that ended are removed by recover() at start and
    never listed as messages; a pooled file taken as a spool file or an envelope temp file
    and left by a crash is removed by the existing start-up clean-ups."""
    q = _queue(tmp_path)
    src = _spool(tmp_path, BIG)
    qid = q.enqueue(src, _env("b@example.net"))
    src.unlink()
    q.remove_many([qid])
    (q.free_dir / "b.dead.7").write_bytes(b"another process's spent body")
    (q.free_dir / "e.dead.7").write_bytes(b"{}")
    assert q.ids() == []
    # a taken file left under a spool name and under a queue temp name by a crash
    q.bodies.take(str(tmp_path / "spool" / f"{'a' * 24}.1{'.smtp-spool'}"))
    (q.tmp_dir / "env.deadbeefdeadbeef.0000").write_bytes(b"half")
    fresh = FileQueue(tmp_path / "queue", "mx.example", recycle=16)
    counts = fresh.recover()
    assert os.listdir(q.free_dir) == []
    assert os.listdir(q.tmp_dir) == []
    assert counts["tmp"] == 1 and fresh.ids() == []
    assert clean_spool(tmp_path / "spool") == 1


def test_idle_pool_is_trimmed(tmp_path: Path) -> None:
    """Spent files pooled longer than max_age (a minute) are unlinked by trim (the runner's
    periodic work): a delivered message's bytes do not stay on disk while the server idles."""
    now = [100.0]
    pool = FilePool(str(tmp_path / "free"), "b.", 8, max_age=60.0, clock=lambda: now[0])
    a, b = _files(tmp_path, 2)
    assert pool.put(a)
    now[0] = 130.0
    assert pool.put(b)
    now[0] = 161.0
    assert pool.trim() == 1 and len(pool) == 1
    now[0] = 191.0
    assert pool.trim() == 1 and os.listdir(tmp_path / "free") == []


def test_sweep_removes_old_files_of_others(tmp_path: Path) -> None:
    """trim also unlinks, at most once per max_age, files of this kind pooled long ago by
    a process that ended (restarted worker), found by their ctime."""
    folder = tmp_path / "free"
    folder.mkdir()
    (folder / "b.other.1").write_bytes(b"x")
    (folder / "e.other.1").write_bytes(b"x")
    now = [0.0]
    pool = FilePool(str(folder), "b.", 8, max_age=0.0, clock=lambda: now[0])
    now[0] = 1.0
    assert pool.trim() == 1
    assert os.listdir(folder) == ["e.other.1"]


def test_recycling_off_by_default_and_with_zero(tmp_path: Path) -> None:
    """A FileQueue made without ``recycle`` (the admin's) or with 0 unlinks spent files as
    before: nothing is pooled."""
    for q in (FileQueue(tmp_path / "queue", "mx.example"), _queue(tmp_path, recycle=0)):
        q.ensure_dirs()
        src = _spool(tmp_path, BIG)
        qid = q.enqueue(src, _env("b@example.net"))
        src.unlink()
        q.remove_many([qid])
        assert len(q.bodies) == 0 and not q.free_dir.exists()
        assert not q.body_path(qid).exists()


def test_shared_queue_does_not_recycle(tmp_path: Path) -> None:
    """On a queue shared by several nodes the pool is off: bodies are unlinked as before."""
    q = _queue(tmp_path, shared=True)
    src = _spool(tmp_path, BIG)
    qid = q.enqueue(src, _env("b@example.net"))
    src.unlink()
    q.remove_many([qid])
    assert len(q.bodies) == 0 and not q.free_dir.exists()


def test_file_open_elsewhere_is_never_reused(tmp_path: Path) -> None:
    """A spent file that a reader opened before it was spent (a backup streaming the body)
    is not handed out (no write lease while another opener has it): the reader's bytes stay
    those of the old message."""
    pool = FilePool(str(tmp_path / "free"), "b.", 8)
    (path,) = _files(tmp_path, 1, b"old message")
    with open(path, "rb") as reader:
        assert pool.put(path)
        assert pool.take(str(tmp_path / "dest")) is None
        assert reader.read() == b"old message"
    assert not (tmp_path / "dest").exists() and os.listdir(tmp_path / "free") == []


def _pool_one_envelope(q: FileQueue, tmp_path: Path) -> None:
    src = _spool(tmp_path, BIG)
    qid = q.enqueue(src, _env("b@example.net"))
    src.unlink()
    q.remove_many([qid])
    assert len(q.envelopes) == 1


def test_batched_envelope_reuses_a_file_only_when_prepared(tmp_path: Path) -> None:
    """A batched enqueue (no fsync before the envelope's rename) never overwrites a spent
    envelope in place by itself (its name could reach the disk before its data); with
    prepare_envelope the spent file is written first under a temp name (for the caller's
    data sync) and the enqueue only renames it into the owner's claim."""
    q = _queue(tmp_path)
    q.set_owner(make_owner("n", 0))
    q.claim_new = True
    _pool_one_envelope(q, tmp_path)
    src = _spool(tmp_path, b"small\n")
    q.enqueue_unsynced(src, {**_env("c@example.net"), "id": "0123456789abcdef0000000a"})
    assert len(q.envelopes) == 1  # a new file: the spent one waits

    env = {**_env("d@example.net"), "id": "0123456789abcdef0000000b"}
    fd = q.prepare_envelope(str(src), env)
    assert fd is not None and len(q.envelopes) == 0
    ino = os.fstat(fd).st_ino
    os.close(fd)
    (tmp_name,) = [n for n in os.listdir(q.tmp_dir) if "0000000b" in n]
    assert q.envelope_file(env["id"]) is None  # no name means "queued" yet
    assert q.enqueue_unsynced(src, env) == env["id"]
    path = q.envelope_file(env["id"])
    assert path is not None and os.stat(path).st_ino == ino
    data = json.loads(path.read_bytes())
    assert data["id"] == env["id"] and data["size"] == 6
    assert data["recipients"][0]["address"] == "d@example.net"
    born = q.take_born(env["id"])
    assert born is not None and born.id == env["id"]
    assert tmp_name not in os.listdir(q.tmp_dir)


def test_prepared_envelope_of_a_failed_message_is_dropped(tmp_path: Path) -> None:
    """A prepared envelope whose message never gets enqueued (it failed in the batch) is
    unlinked by drop_prepared: nothing is left in tmp/ and nothing is queued."""
    q = _queue(tmp_path)
    q.set_owner(make_owner("n", 0))
    q.claim_new = True
    _pool_one_envelope(q, tmp_path)
    src = _spool(tmp_path, b"x\n")
    env = {**_env("d@example.net"), "id": "0123456789abcdef0000000c"}
    fd = q.prepare_envelope(str(src), env)
    assert fd is not None
    os.close(fd)
    q.drop_prepared([env["id"]])
    assert os.listdir(q.tmp_dir) == [] and q.ids() == []


def _store_and_queue_with_spent_files(tmp_path: Path):  # noqa: ANN202
    """A Maildir store and a recycling queue (claims on, born claimed) whose pool holds one
    spent body and one spent envelope (a message queued and removed)."""
    from pop3coexist.store.maildir import MaildirStore

    store = MaildirStore(tmp_path / "mailroot")
    q = FileQueue(store.root.parent / "queue", "mx.example", recycle=16)
    q.ensure_dirs()
    q.set_owner(make_owner("n", 0))
    q.claim_new = True
    src = _spool(tmp_path, BIG)
    first = q.enqueue(src, _env("b@example.net"))
    src.unlink()
    q.remove_many([first])
    return store, q


def test_group_commit_syncs_prepared_envelopes_with_the_spool_data(tmp_path: Path) -> None:
    """In the SMTP group commit with a recycling queue, a relayed message's spool file is a
    spent body and its envelope a spent envelope written before the batch's first sync (the
    sync of the spool files' data), so both have their data on disk before any name points
    at them; the message is queued whole and the pool is used."""
    from pop3coexist.smtp.incoming import GroupCommitter
    from tests.support.fakes import sync_run_blocking

    store, q = _store_and_queue_with_spent_files(tmp_path)
    assert len(q.bodies) == 1 and len(q.envelopes) == 1
    order: list[str] = []

    def syncfs(fd: int) -> None:
        order.append("sync:" + ",".join(sorted(os.listdir(q.tmp_dir))))
        os.fsync(fd)

    committer = GroupCommitter(store, q, sync_run_blocking, sync_fs=syncfs, syncfs_min=2)
    qid = "0123456789abcdef0000000d"
    w = SpoolWriter(store.spool_dir(), qid, lazy=True)
    w.write(b"relayed\n")
    d = committer.commit(w, [], {**_env("far@example.net"), "id": qid})
    done: list[object] = []
    d.addBoth(done.append)
    assert done == [[]]
    assert order[0].startswith("sync:env.") and qid in order[0]  # the prepared envelope
    assert len(q.bodies) == 0 and len(q.envelopes) == 0
    assert q.body_path(qid).read_bytes() == b"relayed\n"
    env = q.take_born(qid)
    assert env is not None and env.size == len(b"relayed\n")
    assert os.listdir(q.tmp_dir) == []


def test_failed_data_sync_leaves_no_prepared_envelope(tmp_path: Path) -> None:
    """The group commit's first sync fails: the message fails (no 250), its prepared
    envelope's temp file is unlinked and nothing is queued."""
    from pop3coexist.smtp.incoming import GroupCommitter
    from tests.support.fakes import sync_run_blocking

    store, q = _store_and_queue_with_spent_files(tmp_path)

    def failing(fd: int) -> None:
        raise OSError(5, "EIO")

    committer = GroupCommitter(store, q, sync_run_blocking, sync_fs=failing, fsync=failing)
    qid = "0123456789abcdef0000000e"
    w = SpoolWriter(store.spool_dir(), qid, lazy=True)
    w.write(b"relayed\n")
    done: list[object] = []
    committer.commit(w, [], {**_env("far@example.net"), "id": qid}).addBoth(done.append)
    assert len(done) == 1 and not isinstance(done[0], list)
    done.clear()  # the failure is handled
    assert os.listdir(q.tmp_dir) == [] and q.ids() == [] and q.take_born(qid) is None
    assert not q.body_path(qid).exists() and os.listdir(store.spool_dir()) == []
