"""The IMAP store's shared per-mailbox files under concurrent writers, its quota usage, and its
cached message open (store/folders.py, store/maildir.py, fsutil.py; issue 18).

- Every read-modify-write of a shared file (``subscriptions``, ``dovecot-keywords``, the uid
  list, the first log-in's special folders, folder creation) holds a cross-process lock and
  replaces the file atomically: proved with real processes (multiprocessing, spawn) writing
  at once (forked), none of whose changes may be lost.
- Quota usage is kept per folder and keyed by its mtime: a change by any writer (SMTP
  delivery, POP3, another process) shows in the next check; an unchanged mailbox is not
  listed again; a folder changed within the racy window is never trusted.
- IMAP's cached open of a message file gives the unbuffered ``io.FileIO`` POP3's RETR reads.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3coexist.store import maildir as maildirmod
from pop3coexist.store.folders import (
    KEYWORDS,
    SPECIAL_USE,
    STALE_LOCK,
    SUBSCRIPTIONS,
    FolderError,
    MaildirFolders,
)
from pop3coexist.store.maildir import MaildirStore

HOST = "example.org"
PROCS = 4
_ctx = multiprocessing.get_context("fork")  # as test_queue_claims: the store is imported


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot")
    s.add_domain(HOST)
    s.add_mailbox(HOST, "ann")
    return s


def _account(root: str):  # noqa: ANN202 - AccountFolders
    return MaildirFolders(MaildirStore(root)).open_account(HOST, "ann")


# -- workers ---------------------------------------------------

def _subscribe_many(root: str, start, me: int, n: int) -> None:
    account = _account(root)
    start.wait()
    for i in range(n):
        account.subscribe(f"p{me}.f{i}", True)


def _first_login(root: str, start, me: int) -> None:
    account = _account(root)
    start.wait()
    account.ensure_special_folders()
    account.subscribe(f"mine{me}", True)


def _add_keywords(root: str, start, me: int, n: int) -> None:
    account = _account(root)
    view = account.open_folder("INBOX")
    start.wait()
    for i in range(n):
        view.add(b"Subject: k\r\n\r\nx\r\n", [f"$p{me}k{i}"], None)


def _create(root: str, start, me: int, out) -> None:
    account = _account(root)
    start.wait()
    results = []
    try:
        account.create("Same")
        results.append("made")
    except FolderError as exc:
        results.append(exc.code)
    account.create(f"Parent.Child{me}")  # the parent is shared: made by whoever comes first
    out.put((me, results))


def _append_many(root: str, start, me: int, n: int, out) -> None:
    account = _account(root)
    start.wait()
    out.put([account.append("INBOX", b"Subject: %d\r\n\r\nx\r\n" % i, [], None)[1]
             for i in range(n)])


def _drop_in(box: str) -> None:
    with open(f"{box}/tmp/x", "wb") as f:
        f.write(b"d" * 77)
    os.rename(f"{box}/tmp/x", f"{box}/.Archive/cur/999.M1P2Q3.other:2,S")


def _run(target, args_of, queue=None) -> list:  # noqa: ANN001
    """Start PROCS processes on ``target`` at once (a barrier), wait for them; their
    queue results, if any."""
    start = _ctx.Barrier(PROCS)
    procs = [_ctx.Process(target=target, args=(*args_of(me, start),)) for me in range(PROCS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs] if queue is not None else []
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


# -- 1. shared files under concurrent processes ---------------------------------------------------

def test_concurrent_subscribes_in_processes_lose_none(store: MaildirStore) -> None:
    """PROCS processes SUBSCRIBE 15 names each at once: every name is in ``subscriptions``
    once (a read-modify-write without the cross-process lock drops some), and no temporary
    or lock file is left beside it."""
    root = str(store.root)
    _run(_subscribe_many, lambda me, start: (root, start, me, 15))
    subs = _account(root).subscriptions()
    assert sorted(subs) == sorted(f"p{me}.f{i}" for me in range(PROCS) for i in range(15))
    box = store.mailbox_folder(HOST, "ann")
    assert not [n for n in os.listdir(box) if n.startswith((f"{SUBSCRIPTIONS}.", f".{SUBSCRIPTIONS}"))]


def test_concurrent_first_logins_make_special_folders_once(store: MaildirStore) -> None:
    """PROCS first log-ins of one account at once (each then subscribing a name of its own):
    Sent, Drafts, Trash and Junk exist and are subscribed once each, and every log-in's own
    subscription survives."""
    root = str(store.root)
    _run(_first_login, lambda me, start: (root, start, me))
    account = _account(root)
    subs = account.subscriptions()
    assert sorted(subs) == sorted([*SPECIAL_USE, *(f"mine{me}" for me in range(PROCS))])
    assert all(account.exists(name) for name in SPECIAL_USE)


def test_concurrent_keywords_keep_every_keyword_and_letter(store: MaildirStore) -> None:
    """PROCS processes APPEND messages with new keywords at once: ``dovecot-keywords`` holds
    every keyword under its own letter, and each message reads back with its keyword (two
    writers without the lock give one letter to two keywords, or lose one)."""
    root = str(store.root)
    _run(_add_keywords, lambda me, start: (root, start, me, 4))
    account = _account(root)
    path = account.path("INBOX") / KEYWORDS
    lines = path.read_text().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in lines) == \
        sorted(f"$p{me}k{i}" for me in range(PROCS) for i in range(4))
    assert [line.split(" ", 1)[0] for line in lines] == [str(i) for i in range(len(lines))]
    view = account.open_folder("INBOX")
    msgs = view.sync()
    assert len(msgs) == PROCS * 4
    assert sorted(f for m in msgs for f in m.flags) == \
        sorted(f"$p{me}k{i}" for me in range(PROCS) for i in range(4))


def test_concurrent_create_one_wins_and_shared_parents_are_whole(store: MaildirStore) -> None:
    """PROCS processes CREATE one folder at once: one succeeds, the others get ALREADYEXISTS;
    their CREATEs of children under one new parent all succeed; every folder is whole (tmp,
    new, cur, maildirfolder) and no staging folder is left in tmp/ or listed."""
    root = str(store.root)
    queue = _ctx.Queue()
    results = _run(_create, lambda me, start: (root, start, me, queue), queue)
    outcomes = sorted(r for _, rs in results for r in rs)
    assert outcomes == ["ALREADYEXISTS"] * (PROCS - 1) + ["made"]
    account = _account(root)
    assert account.list_folders() == ["INBOX", "Parent", *(f"Parent.Child{me}" for me in range(PROCS)),
                                      "Same"]
    for name in account.list_folders()[1:]:
        p = account.path(name)
        assert all((p / d).is_dir() for d in ("tmp", "new", "cur")) and (p / "maildirfolder").is_file()
    assert os.listdir(account.path("INBOX") / "tmp") == []
    (account.root / "..deleted.Same.x" / "cur").mkdir(parents=True)  # DELETE's rename-first
    assert "Same.x" not in account.list_folders() and ".deleted.Same.x" not in account.list_folders()


def test_concurrent_appends_in_processes_get_distinct_uids(store: MaildirStore) -> None:
    """PROCS processes APPEND 10 messages each into one folder at once (the uid list's
    read-modify-write): every UID is distinct, and a fresh view sees every message under the
    UID its APPEND returned."""
    root = str(store.root)
    queue = _ctx.Queue()
    results = _run(_append_many, lambda me, start: (root, start, me, 10, queue), queue)
    uids = sorted(u for r in results for u in r)
    assert len(set(uids)) == PROCS * 10
    assert [m.uid for m in _account(root).open_folder("INBOX").sync()] == uids


def test_stale_subscription_lock_is_taken_over(store: MaildirStore) -> None:
    """A ``subscriptions.lock`` left by a crash (older than STALE_LOCK) does not block
    SUBSCRIBE; a RENAME moves the folder's subscription in one step."""
    account = MaildirFolders(store).open_account(HOST, "ann")
    lock = account.root / f"{SUBSCRIPTIONS}.lock"
    lock.write_text("")
    old = time.time() - STALE_LOCK - 10
    os.utime(lock, (old, old))
    account.create("A")
    account.subscribe("A", True)
    account.subscribe("B", True)
    account.rename("A", "C")
    assert account.subscriptions() == ["C", "B"]
    assert not lock.exists()


# -- 2. quota usage ------------------------------------------------------------------------------

def _age(box: Path) -> None:
    """Set every new/ and cur/ of the mailbox to an mtime past the racy window (as after a
    quiet while), keeping each distinct."""
    old = time.time() - 60
    for sub in [box, *(p for p in box.iterdir() if p.name.startswith(".") and p.is_dir())]:
        for d in ("new", "cur"):
            if (sub / d).is_dir():
                os.utime(sub / d, (old, old))


def _full_count(box: Path) -> tuple[int, int]:
    """The usage counted the slow way (every folder's every file), for comparison."""
    count = total = 0
    for sub in [box, *(p for p in box.iterdir()
                       if p.name.startswith(".") and not p.name.startswith("..") and (p / "cur").is_dir())]:
        for d in ("new", "cur"):
            for e in os.scandir(sub / d):
                if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                    continue
                fields = maildirmod._size_fields(e.name)
                count += 1
                total += fields["S"] if "S" in fields else e.stat().st_size
    return count, total


def test_quota_sees_smtp_pop3_and_other_process_changes(store: MaildirStore, monkeypatch) -> None:
    """After a check, a delivery (SMTP's ``deliver_within_quota``), a POP3 deletion and a file
    another process renames in all show in the next ``quota()``; a check with nothing changed
    lists no folder again."""
    account = MaildirFolders(store).open_account(HOST, "ann")
    account.create("Archive")
    account.append("Archive", b"a" * 300, [], None)
    store.deliver_bytes(HOST, "ann", b"b" * 200)
    box = store.mailbox_folder(HOST, "ann")
    _age(box)
    assert account.quota()[0] == _full_count(box)[1]
    listed = []
    real = os.listdir
    monkeypatch.setattr(maildirmod.os, "listdir", lambda p: listed.append(str(p)) or real(p))
    assert account.quota()[0] == _full_count(box)[1]
    assert [p for p in listed if p.endswith(("/new", "/cur"))] == []
    spool = store.spool_dir() / "m"
    spool.write_bytes(b"c" * 1000)
    store.deliver_within_quota(spool, [(HOST, "ann")])
    assert account.quota()[0] == _full_count(box)[1]
    drop = store.open_maildrop(HOST, "ann")
    drop.commit({0})
    assert account.quota()[0] == _full_count(box)[1]
    other = _ctx.Process(target=_drop_in, args=(str(box),))  # not through the store
    other.start()
    other.join(60)
    assert other.exitcode == 0
    assert account.quota()[0] == _full_count(box)[1]


def test_a_folder_changed_within_the_racy_window_is_listed_again(store: MaildirStore) -> None:
    """A folder whose mtime is within USAGE_RACY_WINDOW of the check is not trusted: a second
    change that leaves the same mtime (the same clock tick) still shows in the next check."""
    account = MaildirFolders(store).open_account(HOST, "ann")
    store.deliver_bytes(HOST, "ann", b"x" * 100)
    new = store.mailbox_folder(HOST, "ann") / "new"
    # the folder's mtime inside the window however long the machine took to get here (an
    # mtime ahead of the clock is inside it too: an NFS server's clock may run ahead)
    ahead = time.time_ns() + 3_600_000_000_000
    os.utime(new, ns=(ahead, ahead))
    st_before = os.stat(new)
    assert account.quota()[0] == 100
    (new / "5.M5P5Q5.h,S=40").write_bytes(b"y" * 40)
    os.utime(new, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))  # the same tick
    assert account.quota()[0] == 140


def test_append_refused_over_quota_until_pop3_frees_room(store: MaildirStore) -> None:
    """APPEND's over-quota refusal (OVERQUOTA) follows deliveries and deletions by other
    paths at once: a delivery that fills the quota refuses the next APPEND; POP3 deleting it
    lets the APPEND in."""
    account = MaildirFolders(store).open_account(HOST, "ann")
    store.set_quota(HOST, "ann", 1000)
    account.append("INBOX", b"a" * 400, [], None)
    _age(store.mailbox_folder(HOST, "ann"))
    account.quota()
    store.deliver_bytes(HOST, "ann", b"b" * 600)
    with pytest.raises(FolderError) as err:
        account.append("INBOX", b"c" * 10, [], None)
    assert err.value.code == "OVERQUOTA"
    drop = store.open_maildrop(HOST, "ann")
    doomed = [i for i in range(len(drop)) if drop.size(i) > 500]  # 602: CRLF size
    drop.commit(set(doomed))
    account.append("INBOX", b"c" * 10, [], None)
    assert account.quota() == (410, 1000)


def test_copy_follows_the_quota_rule_of_append(store: MaildirStore) -> None:
    """COPY / MOVE (``copy_within_quota``) refuse with OVERQUOTA exactly when APPEND of the
    same octets would (``quota_refuses``: the grace counts, a mailbox at its quota takes
    nothing), count the stored octets, and copy when they fit; an empty set is no copy."""
    store.set_quota(HOST, "ann", 1000)
    account = MaildirFolders(store).open_account(HOST, "ann")
    account.create("Keep")
    account.append("INBOX", b"a" * 300, [], None)
    account.append("INBOX", b"b" * 300, [], None)
    view, dest = account.open_folder("INBOX"), account.open_folder("Keep")
    msgs = view.sync()
    assert len(view.copy_to([], dest)) == 0
    pairs = account.copy_within_quota(view, msgs[:1], dest)  # 600 + 300 <= 1000
    assert [a for a, _ in pairs] == [msgs[0].uid]
    with pytest.raises(FolderError) as err:  # 900 + 600 > 1000 + the default grace (none)
        account.copy_within_quota(view, msgs, dest)
    assert err.value.code == "OVERQUOTA"
    assert account.quota() == (900, 1000)
    assert account.copy_within_quota(view, [], dest) == []


def test_usage_cache_is_bounded(store: MaildirStore, monkeypatch) -> None:
    """The usage cache holds at most USAGE_CACHE_NAMES file names over all folders (the
    oldest folders leave first) and still counts right past the bound."""
    monkeypatch.setattr(maildirmod, "USAGE_CACHE_NAMES", 5)
    monkeypatch.setattr(maildirmod, "_usage_cache", {})
    monkeypatch.setattr(maildirmod, "_usage_names", [0])
    account = MaildirFolders(store).open_account(HOST, "ann")
    for name in ("A", "B", "C"):
        account.create(name)
        for i in range(3):
            account.append(name, b"z" * (10 + i), [], None)
    box = store.mailbox_folder(HOST, "ann")
    _age(box)
    assert account.quota()[0] == _full_count(box)[1] == 99
    assert maildirmod._usage_names[0] <= 5
    assert sum(len(e.sizes) for e in maildirmod._usage_cache.values()) == maildirmod._usage_names[0]


_OPS = st.lists(st.tuples(st.sampled_from(["add", "add_unsized", "remove", "to_cur", "age",
                                             "check", "subdir"]),
                          st.integers(0, 2), st.integers(1, 500)), max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_usage_matches_a_full_count_whatever_happens(tmp_path: Path, ops: list) -> None:
    """Whatever sequence of deliveries (with and without ``,S=``), removals, new/ -> cur/
    renames, quiet periods (aged mtimes) and checks, the cached usage equals a full count of
    every folder's files (folders and dot-files inside new/ or cur/ do not count)."""
    store = MaildirStore(tmp_path / f"r{time.monotonic_ns()}")
    store.add_domain(HOST)
    store.add_mailbox(HOST, "ann")
    account = MaildirFolders(store).open_account(HOST, "ann")
    account.create("F")
    account.create("G")
    box = store.mailbox_folder(HOST, "ann")
    folders = [box, box / ".F", box / ".G"]
    n = 0
    for op, which, size in ops:
        folder = folders[which]
        n += 1
        if op == "add":
            (folder / "new" / f"{n}.M{n}P1Q{n}.h,S={size}").write_bytes(b"x")
        elif op == "add_unsized":
            (folder / "cur" / f"{n}.M{n}P1Q{n}.h:2,").write_bytes(b"x" * size)
        elif op == "subdir":
            (folder / "cur" / f"d{n}").mkdir()
            (folder / "new" / f".hidden{n}").write_bytes(b"x" * size)
        elif op in ("remove", "to_cur"):
            files = sorted(e.path for d in ("new", "cur") for e in os.scandir(folder / d)
                           if e.is_file() and not e.name.startswith("."))
            if files:
                victim = files[size % len(files)]
                if op == "remove":
                    os.unlink(victim)
                elif "/new/" in victim:
                    os.rename(victim, folder / "cur" / (os.path.basename(victim) + ":2,S"))
        elif op == "age":
            _age(box)
        else:
            assert store.usage(HOST, "ann") == _full_count(box)
    assert store.usage(HOST, "ann") == _full_count(box)


# -- 3. the cached open ---------------------------------------------------------------------------

def test_imap_cached_open_is_pop3s_unbuffered_file(store: MaildirStore) -> None:
    """IMAP's ``FolderView.open_cached`` and POP3's ``open_message_cached`` give the same
    cheap object (``fsutil.open_cached_file``: an unbuffered ``io.FileIO``, no ``fdopen``
    buffer) reading the whole message; a file gone meanwhile gives None."""
    from pop3coexist import fsutil

    store.deliver_bytes(HOST, "ann", b"Subject: s\n\nbody\n")
    account = MaildirFolders(store).open_account(HOST, "ann")
    view = account.open_folder("INBOX")
    msg = view.sync()[0]
    if not fsutil._cached_open_works:
        assert view.open_cached(msg) is None
        return
    f = view.open_cached(msg)
    assert type(f) is io.FileIO
    with f:
        assert f.read() == b"Subject: s\n\nbody\n"
    drop = store.open_maildrop(HOST, "ann")
    g = drop.open_message_cached(0)
    assert type(g) is io.FileIO
    g.close()
    drop.close()
    os.unlink(account.path("INBOX") / msg.sub / msg.name)
    assert view.open_cached(msg) is None
