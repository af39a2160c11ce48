"""Group commit of incoming messages (``incoming.GroupCommitter``): batching, ordering, failure
isolation, and no success before the data and the directory entries are durable."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer

from pop3coexist.smtp.incoming import SYNCFS, GroupCommitter, SpoolWriter
from pop3coexist.store.maildir import MaildirStore
from tests.support.fakes import sync_run_blocking

HOST = "pop.contoso.test"


class ManualRunner:
    """run_blocking that holds each call until ``step()`` runs it (one batch at a time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def step(self) -> None:
        d, f, args = self.calls.pop(0)
        try:
            d.callback(f(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the Deferred like a thread pool does
            d.errback(e)


class SyncLog:
    """Fake sync functions that record what was synced; ``fail_next`` makes the next one fail."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail_next: OSError | None = None

    def _check(self) -> None:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e

    def fsync(self, fd: int) -> None:
        self._check()
        self.events.append("fsync")
        os.fsync(fd)

    def syncfs(self, fd: int) -> None:
        self._check()
        self.events.append("syncfs")
        os.fsync(fd)


def make(tmp_path: Path, run_blocking=sync_run_blocking):
    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain(HOST)
    for box in ("ted", "ann"):
        store.add_mailbox(HOST, box)
    sync = SyncLog()
    queue = FakeQueue()
    committer = GroupCommitter(store, queue, run_blocking, sync_fs=sync.syncfs, fsync=sync.fsync)
    return store, queue, committer, sync


class FakeQueue:
    """Records enqueued messages; ``fail`` makes enqueue raise."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, dict]] = []
        self.fail: BaseException | None = None

    def enqueue(self, source, envelope: dict) -> str:
        if self.fail is not None:
            raise self.fail
        self.items.append((Path(source).read_bytes(), envelope))
        return "q1"


def spool(store: MaildirStore, text: bytes, lazy: bool = True) -> SpoolWriter:
    w = SpoolWriter(store.spool_dir(), os.urandom(4).hex(), lazy=lazy)
    w.write(text)
    return w


def new_files(store: MaildirStore, box: str) -> list[bytes]:
    new = store.root / HOST / box / "new"
    return sorted(p.read_bytes() for p in new.iterdir())


def results(ds: list[defer.Deferred]) -> list[object]:
    out: list[object] = []
    for d in ds:
        d.addCallbacks(lambda _: out.append("ok"), lambda f: out.append(f.type.__name__))
    return out


def test_one_batch_for_messages_that_wait_and_replies_in_order(tmp_path: Path) -> None:
    """Messages ending while a batch runs share the next batch (two syncs for all of them);
    every Deferred fires in submission order, and only after its batch finished."""
    runner = ManualRunner()
    store, _, committer, sync = make(tmp_path, runner)
    order: list[int] = []
    d0 = committer.commit(spool(store, b"m0\n"), [(HOST, "ted")], None)
    d0.addCallback(lambda _: order.append(0))
    ds = []
    for i in range(1, 6):
        d = committer.commit(spool(store, b"m%d\n" % i), [(HOST, "ted")], None)
        d.addCallback(lambda _, i=i: order.append(i))
        ds.append(d)
    assert len(runner.calls) == 1 and order == []  # batch 1 (m0) is running, 5 wait
    runner.step()
    assert order == [0] and len(runner.calls) == 1
    sync.events.clear()
    runner.step()
    assert order == [0, 1, 2, 3, 4, 5]
    # five messages, one mailbox: one sync for the data, one fsync of new/
    assert sync.events == ["syncfs", "fsync"]
    assert new_files(store, "ted") == [b"m%d\n" % i for i in range(6)]
    assert list(store.spool_dir().iterdir()) == []
    assert committer.batches == 2 and committer.messages == 6


def test_no_success_before_data_and_entries_are_durable(tmp_path: Path) -> None:
    """The Deferred fires after both syncs: the data sync comes before any link exists, the
    folder sync after the links; nothing fires while the batch is held."""
    runner = ManualRunner()
    store, _, committer, sync = make(tmp_path, runner)
    seen: list[str] = []
    real_deliver = store.deliver_within_quota

    def deliver(source, recipients, **kw):
        seen.append("link after " + ",".join(sync.events))
        return real_deliver(source, recipients, **kw)

    store.deliver_within_quota = deliver  # type: ignore[method-assign]
    committer._deferred_sync = True
    d = committer.commit(spool(store, b"a\n"), [(HOST, "ted"), (HOST, "ann")], None)
    fired = results([d])
    assert fired == []
    runner.step()
    assert seen == ["link after fsync"]
    # one message to two mailboxes: its data, then the two folders (fsync each: fewer than 3)
    assert sync.events == ["fsync", "fsync", "fsync"]
    assert fired == ["ok"]


def test_failing_data_sync_fails_only_its_batch(tmp_path: Path) -> None:
    """A failing sync fails every message of that batch (nothing delivered, spool removed);
    the next batch goes on normally."""
    runner = ManualRunner()
    store, _, committer, sync = make(tmp_path, runner)
    first = results([committer.commit(spool(store, b"x\n"), [(HOST, "ted")], None)])
    second = results([committer.commit(spool(store, b"y%d\n" % i), [(HOST, "ted")], None)
                      for i in range(3)])
    sync.fail_next = OSError(5, "I/O error")
    runner.step()
    assert first == ["OSError"] and second == []
    runner.step()
    assert second == ["ok", "ok", "ok"]
    assert new_files(store, "ted") == [b"y0\n", b"y1\n", b"y2\n"]
    assert list(store.spool_dir().iterdir()) == []


def test_failing_folder_sync_removes_the_links(tmp_path: Path) -> None:
    """If the directory entries cannot be made durable, the messages get no success and their
    links are removed again (the client will retry; no half-acknowledged copies)."""
    store, _, committer, sync = make(tmp_path)
    real = sync.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second sync of the batch: the new/ folder
            raise OSError(5, "I/O error")
        real(fd)

    committer.fsync = fsync
    fired = results([committer.commit(spool(store, b"z\n"), [(HOST, "ted")], None)])
    assert fired == ["OSError"]
    assert new_files(store, "ted") == []
    assert list(store.spool_dir().iterdir()) == []


def test_one_message_failure_does_not_fail_the_batch(tmp_path: Path) -> None:
    """A message whose delivery fails (here: a mailbox that vanished) fails alone; the other
    messages of the batch are delivered."""
    runner = ManualRunner()
    store, _, committer, _ = make(tmp_path, runner)
    committer.commit(spool(store, b"first\n"), [(HOST, "ted")], None)
    fired = results([
        committer.commit(spool(store, b"to ted\n"), [(HOST, "ted")], None),
        committer.commit(spool(store, b"to nobody\n"), [(HOST, "gone")], None),
        committer.commit(spool(store, b"to ted again\n"), [(HOST, "ted")], None),
    ])
    runner.step()
    runner.step()
    assert fired[0] == "ok" and fired[2] == "ok"
    assert fired[1] != "ok"
    assert len(new_files(store, "ted")) == 3


def test_quota_at_data_refuses_only_the_full_mailbox(tmp_path: Path) -> None:
    """At the end of DATA the quota is checked on the real size: a full mailbox among several
    does not get the message, the others do (no report here: no LocalNotes, no sender)."""
    store, _, committer, _ = make(tmp_path)
    store.set_quota(HOST, "ann", 1)
    fired = results([committer.commit(spool(store, b"to ann and ted\n"), [(HOST, "ann"), (HOST, "ted")], None)])
    assert fired == ["ok"]
    assert len(new_files(store, "ann")) == 0 and len(new_files(store, "ted")) == 1


def test_quota_at_data_one_full_mailbox_alone_fails_with_nothing_stored(tmp_path: Path) -> None:
    """Every recipient's mailbox full: QuotaExceeded (the session answers 552 5.2.2) and no
    file is left anywhere."""
    store, _, committer, _ = make(tmp_path)
    store.set_quota(HOST, "ann", 10)
    fired = results([committer.commit(spool(store, b"x" * 40 + b"\n"), [(HOST, "ann")], None)])
    assert fired == ["QuotaExceeded"]
    assert new_files(store, "ann") == [] and list(store.spool_dir().iterdir()) == []


def test_remote_recipients_are_enqueued_and_queue_failure_is_per_message(tmp_path: Path) -> None:
    """The other recipients go to the queue from the same spool file; a queue failure fails
    that message only."""
    store, queue, committer, _ = make(tmp_path)
    env = {"sender": "a@b.test", "recipients": [{"address": "x@foreign.example"}]}
    ok = results([committer.commit(spool(store, b"q\n"), [(HOST, "ted")], env)])
    assert ok == ["ok"] and queue.items == [(b"q\n", env)]
    queue.fail = OSError(28, "No space left on device")
    bad = results([committer.commit(spool(store, b"r\n"), [], env)])
    assert bad == ["OSError"]
    assert list(store.spool_dir().iterdir()) == []


def test_lazy_spool_writer_creates_the_file_only_when_needed(tmp_path: Path) -> None:
    """A lazy spool file exists only past the in-memory chunk or at finish(); abort before
    that leaves nothing; an eager one exists at once."""
    w = SpoolWriter(tmp_path, "lazy1", lazy=True)
    w.write(b"small")
    assert not w.path.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w = SpoolWriter(tmp_path, "lazy2", lazy=True)
    w.write(b"x" * (300 * 1024))
    assert w.path.exists()
    w.write(b"tail")
    w.finish()
    assert w.path.stat().st_size == 300 * 1024 + 4
    w.abort()
    w = SpoolWriter(tmp_path, "lazy3", lazy=True)
    w.write(b"y")
    w.finish()
    assert w.path.read_bytes() == b"y"
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_syncfs_is_found_on_linux() -> None:
    """On Linux the group commit uses syncfs(2) (one call per batch)."""
    if os.uname().sysname == "Linux":
        assert SYNCFS is not None


def test_one_syncfs_per_file_system(tmp_path: Path, monkeypatch) -> None:
    """Folders on two file systems (a mailbox mounted elsewhere) get one syncfs each."""
    _, _, committer, sync = make(tmp_path)
    a, b, c = (os.open(tmp_path, os.O_RDONLY) for _ in range(3))
    devices = {a: 1, b: 2, c: 1}

    class St:
        def __init__(self, dev: int) -> None:
            self.st_dev = dev

    real_fstat = os.fstat
    monkeypatch.setattr("pop3coexist.smtp.incoming.os.fstat",
                        lambda fd: St(devices[fd]) if fd in devices else real_fstat(fd))
    try:
        committer._sync([a, b, c])
    finally:
        for fd in (a, b, c):
            os.close(fd)
    assert sync.events == ["syncfs", "syncfs"]


def test_lazy_spool_write_error_is_kept_for_the_commit(tmp_path: Path) -> None:
    """An I/O error while a lazy spool file is written (here: the folder the spool folder
    lives in is gone) does not break the session: the data is dropped, and the commit fails
    with that error (a 451)."""
    store, _, committer, _ = make(tmp_path)
    w = SpoolWriter(tmp_path / "missing-state" / "spool", "id", lazy=True)
    w.write(b"x" * (300 * 1024))  # past the in-memory chunk: the file is created now, and fails
    assert isinstance(w.error, OSError)
    w.write(b"more")  # ignored, no exception
    fired = results([committer.commit(w, [(HOST, "ted")], None)])
    assert fired == ["FileNotFoundError"]
    assert new_files(store, "ted") == []


def test_a_spool_folder_removed_at_run_time_is_made_again(tmp_path: Path) -> None:
    """The store checks its spool folder at most once a second; when the folder was removed
    meanwhile, the next spool file makes it again (mode 0700) and the message is stored."""
    store, _, committer, _ = make(tmp_path)
    folder = store.spool_dir()
    folder.rmdir()
    assert store.spool_dir() == folder and not folder.exists()  # the cached answer
    w = SpoolWriter(folder, "id", lazy=True)
    w.write(b"Subject: s\n\nbody\n")
    fired = results([committer.commit(w, [(HOST, "ted")], None)])
    assert fired == ["ok"]
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    assert len(new_files(store, "ted")) == 1


def test_queue_bound_messages_commit_in_parallel(tmp_path: Path) -> None:
    """With a queue that cannot batch its syncs (no IBatchEnqueue), messages that also go to
    the outbound queue do not wait for a batch: each is committed on its own at once (their
    queue fsyncs then overlap), and still reports its own result."""
    runner = ManualRunner()
    store, queue, committer, _ = make(tmp_path, runner)
    env = {"sender": "a@b.test", "recipients": [{"address": "x@foreign.example"}]}
    committer.commit(spool(store, b"local only\n"), [(HOST, "ted")], None)  # a batch is running
    fired = results([committer.commit(spool(store, b"r%d\n" % i), [(HOST, "ann")], env)
                     for i in range(2)])
    assert len(runner.calls) == 3  # the batch and both queue-bound messages, side by side
    runner.calls.reverse()
    for _ in range(3):
        runner.step()
    assert fired == ["ok", "ok"]
    assert sorted(m for m, _ in queue.items) == [b"r0\n", b"r1\n"]
    assert new_files(store, "ann") == [b"r0\n", b"r1\n"]


def _batch_queue(tmp_path: Path, runner) -> tuple:
    from pop3coexist.store.queue import FileQueue

    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain(HOST)
    store.add_mailbox(HOST, "ted")
    sync = SyncLog()
    queue = FileQueue(tmp_path / "queue", HOST)
    woken: list[list[str]] = []
    queue.set_waker(lambda: woken.append(queue.drain_new()))
    committer = GroupCommitter(store, queue, runner, sync_fs=sync.syncfs, fsync=sync.fsync)
    return store, queue, committer, sync, woken


ENVELOPE = {"sender": "a@example.org", "recipients": [{"address": "far@example.net"}]}


def test_relayed_messages_join_the_batch_with_one_syncfs(tmp_path: Path, monkeypatch) -> None:
    """With a FileQueue (IBatchEnqueue) relayed messages are committed in the batch: no fsync
    by the queue, one syncfs after the links and envelopes exist, the runner told only then,
    and the 250 (the Deferred) only after that."""
    import pop3coexist.store.queue as queue_module

    runner = ManualRunner()
    store, queue, committer, sync, woken = _batch_queue(tmp_path, runner)
    dir_syncs: list[str] = []
    monkeypatch.setattr(queue_module, "_fsync_dir", lambda p: dir_syncs.append(str(p)))
    fired: list[str] = []
    d0 = committer.commit(spool(store, b"m0\n"), [], dict(ENVELOPE))
    d0.addCallback(lambda _: fired.append("m0"))
    ds = [committer.commit(spool(store, b"m%d\n" % i), [(HOST, "ted")] if i == 1 else [],
                           dict(ENVELOPE)) for i in range(1, 4)]
    runner.step()  # batch 1: m0 alone
    sync.events.clear()
    assert woken and fired == ["m0"]
    runner.step()  # batch 2: m1..m3
    assert results(ds) == ["ok", "ok", "ok"]
    # one data sync for the spool files, one syncfs for links + envelopes (same file system)
    assert sync.events == ["syncfs", "syncfs"] and dir_syncs == []
    assert len(queue.ready_ids()) == 4 and sum(len(w) for w in woken) == 4
    assert [queue.body_path(q).read_bytes() for q in queue.ready_ids()] == [
        b"m0\n", b"m1\n", b"m2\n", b"m3\n"]
    assert new_files(store, "ted") == [b"m1\n"]


def test_a_failing_queue_sync_leaves_no_queued_message(tmp_path: Path) -> None:
    """The syncfs after the enqueues fails: every message of the batch fails (451), their
    envelopes and bodies are gone, and the runner was never told of them."""
    runner = ManualRunner()
    store, queue, committer, sync, woken = _batch_queue(tmp_path, runner)
    d = committer.commit(spool(store, b"m0\n"), [], dict(ENVELOPE))
    out = results([d])
    committer.sync_fs = lambda fd: (_ for _ in ()).throw(OSError(5, "EIO"))
    runner.step()
    assert out == ["OSError"]
    assert queue.ids() == [] and list(queue.msg_dir.iterdir()) == [] and woken == []
