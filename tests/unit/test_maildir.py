"""Unit tests for the Maildir store (store/maildir.py): IMailStore and IMaildrop on a temp folder."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from pop3coexist import errors
from pop3coexist.interfaces import IMaildrop, IMailStore
from pop3coexist.store import maildir as maildir_module
from pop3coexist.store.maildir import MaildirStore, crlf_size, uidl_for_name, unique_part

DOMAIN = "pop.contoso.test"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot", hostname="mx.test")
    s.check_writable()
    s.add_domain(DOMAIN)
    s.add_mailbox(DOMAIN, "ted")
    s.add_mailbox(DOMAIN, "ann")
    return s


def box(store: MaildirStore, mailbox: str = "ted") -> Path:
    return store.root / DOMAIN / mailbox


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def spool(store: MaildirStore, data: bytes) -> Path:
    path = store.spool_dir() / "incoming"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


# -- interfaces --------------------------------------------------------------------------------


def test_store_and_maildrop_provide_their_interfaces(store: MaildirStore) -> None:
    """MaildirStore provides IMailStore and its maildrop provides IMaildrop (zope verifyObject)."""
    assert verifyObject(IMailStore, store)
    drop = store.open_maildrop(DOMAIN, "ted")
    try:
        assert verifyObject(IMaildrop, drop)
    finally:
        drop.close()


# -- domains and mailboxes ---------------------------------------------------------------------


def test_domains_and_mailboxes_are_created_lower_case_and_listed(store: MaildirStore) -> None:
    """Names are lower-cased on disk; add_* returns False when the thing exists; listings skip
    dot-files (metadata, spool) and folders that are not Maildirs."""
    assert store.add_domain("Example.TEST") is True
    assert store.add_domain("example.test") is False
    assert (store.root / "example.test").is_dir()
    assert store.add_mailbox("EXAMPLE.test", "Bob") is True
    assert store.add_mailbox("example.test", "bob") is False
    for sub in ("tmp", "new", "cur"):
        assert (store.root / "example.test" / "bob" / sub).is_dir()
    (store.root / "example.test" / "notamaildir").mkdir()
    store.set_domain_locked("example.test", True)
    assert store.list_domains() == ["example.test", DOMAIN]
    assert store.list_mailboxes("example.test") == ["bob"]
    assert store.list_mailboxes(DOMAIN) == ["ann", "ted"]
    assert store.domain_exists("EXAMPLE.TEST") and not store.domain_exists("other.test")
    assert store.mailbox_exists("example.test", "BOB")
    assert not store.mailbox_exists("example.test", "notamaildir")
    assert not store.mailbox_exists("other.test", "bob")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".new")]


def test_add_mailbox_completes_a_half_made_folder(store: MaildirStore) -> None:
    """A mailbox folder lacking tmp/new/cur (by hand or an old crash) is completed by add_mailbox."""
    (store.root / DOMAIN / "half").mkdir()
    assert not store.mailbox_exists(DOMAIN, "half")
    assert store.add_mailbox(DOMAIN, "half") is True
    assert store.mailbox_exists(DOMAIN, "half")


def test_unknown_domain_or_mailbox_raises_no_such_mailbox(store: MaildirStore) -> None:
    """Methods on an unknown domain or mailbox raise NoSuchMailbox and create nothing."""
    with pytest.raises(errors.NoSuchMailbox):
        store.add_mailbox("other.test", "bob")
    with pytest.raises(errors.NoSuchMailbox):
        store.list_mailboxes("other.test")
    with pytest.raises(errors.NoSuchMailbox):
        store.is_domain_locked("other.test")
    with pytest.raises(errors.NoSuchMailbox):
        store.usage(DOMAIN, "nobody")
    with pytest.raises(errors.NoSuchMailbox):
        store.open_maildrop(DOMAIN, "nobody")
    with pytest.raises(errors.NoSuchMailbox):
        store.remove_mailbox(DOMAIN, "nobody")
    with pytest.raises(errors.NoSuchMailbox):
        store.remove_domain("other.test")
    assert not (store.root / "other.test").exists()
    assert not (store.root / DOMAIN / "nobody").exists()


@pytest.mark.parametrize(
    "domain,mailbox",
    [
        ("../etc", "ted"),
        ("..", "ted"),
        ("a/b.test", "ted"),
        (".hidden.test", "ted"),
        ("localhost", "ted"),
        ("", "ted"),
        (DOMAIN, "../ann"),
        (DOMAIN, ".."),
        (DOMAIN, "."),
        (DOMAIN, "a/b"),
        (DOMAIN, ".hidden"),
        (DOMAIN, ".pop3coexist.json"),
        (DOMAIN, "x..y"),
        (DOMAIN, "trailing."),
        (DOMAIN, ""),
        (DOMAIN, "a" * 65),
        (DOMAIN, "sp ace"),
        (DOMAIN, "nul\x00"),
    ],
)
def test_bad_names_are_refused_and_never_escape_the_root(
    store: MaildirStore, domain: str, mailbox: str
) -> None:
    """Path-traversal and otherwise invalid names raise ValueError for every kind of call, and
    nothing is created outside (or inside) the mailroot."""
    before = sorted(str(p) for p in store.root.parent.rglob("*"))
    calls = [
        lambda: store.add_mailbox(domain, mailbox),
        lambda: store.mailbox_exists(domain, mailbox),
        lambda: store.deliver_bytes(domain, mailbox, b"x\n"),
        lambda: store.open_maildrop(domain, mailbox),
        lambda: store.set_quota(domain, mailbox, 1),
        lambda: store.remove_mailbox(domain, mailbox),
    ]
    if mailbox == "ted":
        calls += [lambda: store.add_domain(domain), lambda: store.remove_domain(domain)]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert sorted(str(p) for p in store.root.parent.rglob("*")) == before


def test_non_text_names_are_refused(store: MaildirStore) -> None:
    """A name that is not a str (bytes, None) is a ValueError, not a crash deeper down."""
    with pytest.raises(ValueError):
        store.add_domain(b"x.test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.mailbox_exists(DOMAIN, None)  # type: ignore[arg-type]


def test_remove_mailbox_and_domain_delete_recursively(store: MaildirStore) -> None:
    """remove_mailbox deletes one Maildir with its mail; remove_domain deletes everything under
    the domain; no leftovers (graveyard folders) remain in the mailroot."""
    store.deliver_bytes(DOMAIN, "ted", b"Subject: x\n\nhi\n")
    store.set_quota(DOMAIN, "ted", 1000)
    store.remove_mailbox(DOMAIN, "ted")
    assert not box(store, "ted").exists()
    assert store.list_mailboxes(DOMAIN) == ["ann"]
    store.remove_domain(DOMAIN)
    assert not (store.root / DOMAIN).exists()
    assert store.list_domains() == []
    assert [p.name for p in store.root.iterdir()] == [".spool"]


# -- delivery ----------------------------------------------------------------------------------


def test_deliver_bytes_leaves_nothing_in_tmp_and_names_carry_sizes(store: MaildirStore) -> None:
    """deliver_bytes writes through tmp/ into new/: tmp/ is empty afterwards, the file in new/
    has the exact bytes and a maildir(5) unique name with S= (bytes) and W= (CRLF size)."""
    data = b"Subject: hello\n\nline one\r\nline two\n"
    path = store.deliver_bytes(DOMAIN, "ted", data)
    assert path.parent == box(store) / "new"
    assert files(box(store) / "tmp") == []
    assert files(box(store) / "new") == [path.name]
    assert path.read_bytes() == data
    assert path.name.endswith(f",S={len(data)},W={len(data) + 3}")
    assert path.name.split(".")[1].startswith("M")
    assert ".mx.test," in path.name
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_unique_names_differ_for_back_to_back_deliveries(store: MaildirStore) -> None:
    """Many deliveries in the same second get distinct names (Q counter and R random)."""
    names = {store.deliver_bytes(DOMAIN, "ted", b"x\n").name for _ in range(50)}
    assert len(names) == 50


def test_deliver_file_is_single_instance(store: MaildirStore) -> None:
    """deliver_file hard-links one spool file into each recipient's new/: same inode, distinct
    names, the source left in place for the caller, one path returned per recipient."""
    data = b"Subject: both\n\nhello\n"
    source = spool(store, data)
    paths = store.deliver_file(source, [(DOMAIN, "TED"), ("POP.contoso.test", "ann")])
    assert [p.parent for p in paths] == [box(store, "ted") / "new", box(store, "ann") / "new"]
    assert paths[0].name != paths[1].name
    assert paths[0].stat().st_ino == paths[1].stat().st_ino == source.stat().st_ino
    assert source.exists()
    assert all(p.read_bytes() == data for p in paths)
    assert all(p.name.endswith(f",S={len(data)},W={len(data) + 3}") for p in paths)


def test_deliver_file_quota_refused_before_anything_is_written(store: MaildirStore) -> None:
    """If any recipient would go over quota, QuotaExceeded names it and no mailbox gets the
    message; with enforce_quota=False the delivery goes through."""
    store.set_quota(DOMAIN, "ann", 10)
    source = spool(store, b"x" * 20)
    with pytest.raises(errors.QuotaExceeded) as caught:
        store.deliver_file(source, [(DOMAIN, "ted"), (DOMAIN, "ann")])
    assert caught.value.recipient == (DOMAIN, "ann")
    assert "ann@pop.contoso.test" in str(caught.value)
    assert files(box(store, "ted") / "new") == [] and files(box(store, "ann") / "new") == []
    paths = store.deliver_file(source, [(DOMAIN, "ted"), (DOMAIN, "ann")], enforce_quota=False)
    assert len(paths) == 2


def test_deliver_file_unknown_recipient_writes_nothing(store: MaildirStore) -> None:
    """An unknown mailbox among the recipients raises NoSuchMailbox before any link is made."""
    source = spool(store, b"x\n")
    with pytest.raises(errors.NoSuchMailbox):
        store.deliver_file(source, [(DOMAIN, "ted"), (DOMAIN, "nobody")])
    assert files(box(store, "ted") / "new") == []


def test_deliver_file_rolls_back_when_a_link_fails(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error on the second recipient removes the first link again and raises StoreError:
    a delivery lands everywhere or nowhere."""
    source = spool(store, b"x\n")
    real_link = os.link
    calls = []

    def failing_link(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(maildir_module.os, "link", failing_link)
    with pytest.raises(errors.StoreError, match="Input/output error"):
        store.deliver_file(source, [(DOMAIN, "ted"), (DOMAIN, "ann")])
    assert files(box(store, "ted") / "new") == [] and files(box(store, "ann") / "new") == []


def test_spool_dir_is_inside_the_mailroot(store: MaildirStore) -> None:
    """spool_dir() is root/.spool (same file system, so hard links work) and is created."""
    spool_path = store.spool_dir()
    assert spool_path == store.root / ".spool" and spool_path.is_dir()
    assert spool_path.stat().st_dev == store.root.stat().st_dev


def test_clean_spool_removes_only_old_files(store: MaildirStore) -> None:
    """clean_spool removes spool files older than max_age (crash leftovers) and keeps new ones."""
    source = spool(store, b"x\n")
    assert store.clean_spool(max_age=3600) == 0
    assert store.clean_spool(max_age=3600, now=source.stat().st_mtime + 7200) == 1
    assert not source.exists()


# -- quota, usage, locks, metadata -------------------------------------------------------------


def test_quota_and_usage(store: MaildirStore) -> None:
    """usage counts messages and bytes in new/ and cur/ (S= from names, stat for foreign files);
    would_exceed_quota compares usage + size with the quota; None means no quota."""
    assert store.usage(DOMAIN, "ted") == (0, 0)
    assert store.get_quota(DOMAIN, "ted") is None
    assert store.would_exceed_quota(DOMAIN, "ted", 10**12) is False
    store.deliver_bytes(DOMAIN, "ted", b"a" * 100)
    (box(store) / "cur" / "123.foreign.host:2,S").write_bytes(b"b" * 50)
    (box(store) / "cur" / ".hidden").write_bytes(b"c" * 1000)
    assert store.usage(DOMAIN, "ted") == (2, 150)
    store.set_quota(DOMAIN, "ted", 200)
    assert store.get_quota(DOMAIN, "TED") == 200
    assert store.would_exceed_quota(DOMAIN, "ted", 50) is False
    assert store.would_exceed_quota(DOMAIN, "ted", 51) is True
    store.set_quota(DOMAIN, "ted", None)
    assert store.get_quota(DOMAIN, "ted") is None
    assert store.would_exceed_quota(DOMAIN, "ted", 51) is False


def test_deliver_bytes_quota_is_optional(store: MaildirStore) -> None:
    """deliver_bytes ignores the quota by default (local notices) and enforces it on request."""
    store.set_quota(DOMAIN, "ted", 5)
    store.deliver_bytes(DOMAIN, "ted", b"0123456789")
    with pytest.raises(errors.QuotaExceeded):
        store.deliver_bytes(DOMAIN, "ted", b"x", enforce_quota=True)
    assert store.usage(DOMAIN, "ted") == (1, 10)


@pytest.mark.parametrize("bad", [-1, 1.5, "10MB", True])
def test_bad_quota_values_are_refused(store: MaildirStore, bad: object) -> None:
    """A quota must be a whole number of bytes >= 0 or None; anything else is a ValueError."""
    with pytest.raises(ValueError):
        store.set_quota(DOMAIN, "ted", bad)  # type: ignore[arg-type]


def test_locks_and_the_domain_lock_rule(store: MaildirStore) -> None:
    """A mailbox is locked when it or its domain is locked; unlocking a mailbox while its domain
    is locked is an AdminError; unlocking the domain restores each mailbox's own state."""
    assert not store.is_mailbox_locked(DOMAIN, "ted")
    store.set_mailbox_locked(DOMAIN, "ted", True)
    assert store.is_mailbox_locked(DOMAIN, "ted") and not store.is_mailbox_locked(DOMAIN, "ann")
    store.set_domain_locked(DOMAIN, True)
    assert store.is_domain_locked(DOMAIN)
    assert store.is_mailbox_locked(DOMAIN, "ann")
    with pytest.raises(errors.AdminError, match="domain pop.contoso.test is locked"):
        store.set_mailbox_locked(DOMAIN, "ann", False)
    store.set_mailbox_locked(DOMAIN, "ann", True)  # locking more is fine
    store.set_domain_locked(DOMAIN, False)
    assert store.is_mailbox_locked(DOMAIN, "ted") and store.is_mailbox_locked(DOMAIN, "ann")
    store.set_mailbox_locked(DOMAIN, "ann", False)
    assert not store.is_mailbox_locked(DOMAIN, "ann")


def test_metadata_written_by_one_store_is_seen_by_another(store: MaildirStore) -> None:
    """A second store instance (another process, e.g. the admin command) changes locks and quota;
    the first sees the change on its next call. Metadata lives in dot-files as JSON."""
    admin = MaildirStore(store.root)
    assert not store.is_mailbox_locked(DOMAIN, "ted")
    admin.set_mailbox_locked(DOMAIN, "ted", True)
    admin.set_quota(DOMAIN, "ted", 4096)
    admin.set_domain_locked(DOMAIN, True)
    assert store.is_mailbox_locked(DOMAIN, "ted")
    assert store.get_quota(DOMAIN, "ted") == 4096
    assert store.is_domain_locked(DOMAIN)
    meta = json.loads((box(store) / ".pop3coexist.json").read_text())
    assert meta == {"locked": True, "quota": 4096}
    assert json.loads((store.root / DOMAIN / ".pop3coexist.json").read_text()) == {"locked": True}
    assert not [p for p in box(store).iterdir() if ".tmp." in p.name]


def test_concurrent_metadata_updates_keep_every_change(store: MaildirStore) -> None:
    """Read-modify-write is serialised by the flock: a lock writer and a quota writer running at
    once (separate store objects, separate threads) never lose each other's change."""
    a, b = MaildirStore(store.root), MaildirStore(store.root)

    def locker() -> None:
        for i in range(40):
            a.set_mailbox_locked(DOMAIN, "ted", i % 2 == 0)
        a.set_mailbox_locked(DOMAIN, "ted", True)

    def quota() -> None:
        for i in range(40):
            b.set_quota(DOMAIN, "ted", i)
        b.set_quota(DOMAIN, "ted", 777)

    threads = [threading.Thread(target=locker), threading.Thread(target=quota)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.is_mailbox_locked(DOMAIN, "ted") and store.get_quota(DOMAIN, "ted") == 777


def test_damaged_metadata_is_a_clear_store_error(store: MaildirStore) -> None:
    """A hand-broken metadata file gives StoreError naming the file, not a silent unlock."""
    (box(store) / ".pop3coexist.json").write_text("{not json")
    with pytest.raises(errors.StoreError, match="damaged metadata file .*ted"):
        store.is_mailbox_locked(DOMAIN, "ted")


def test_check_writable_reports_path_and_reason(tmp_path: Path) -> None:
    """check_writable raises StoreError naming the mailroot and the reason when it cannot be
    created (here its parent is a regular file)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = MaildirStore(blocker / "mailroot")
    with pytest.raises(errors.StoreError, match=r"mail root .*file/mailroot is not writable: "):
        bad.check_writable()
    good = MaildirStore(tmp_path / "deep" / "mailroot")
    good.check_writable()
    assert [p.name for p in good.root.iterdir()] == [".spool"]


# -- POP3 maildrops ----------------------------------------------------------------------------


def test_foreign_lf_and_crlf_messages_in_new_are_listed(store: MaildirStore) -> None:
    """Files any Maildir writer drops into new/ (no S=/W=, LF or CRLF line ends) are listed with
    the POP3 (CRLF) size, their name as UIDL, and their stored bytes."""
    lf = b"Subject: lf\n\nbody\n"
    crlf = b"Subject: crlf\r\n\r\nbody\r\n"
    (box(store) / "new" / "1000000001.12345.other.host").write_bytes(lf)
    (box(store) / "new" / "1000000002.M5P9.other.host").write_bytes(crlf)
    drop = store.open_maildrop(DOMAIN, "ted")
    try:
        assert len(drop) == 2
        assert [drop.uidl(0), drop.uidl(1)] == ["1000000001.12345.other.host", "1000000002.M5P9.other.host"]
        assert drop.size(0) == len(lf) + 3
        assert drop.size(1) == len(crlf)
        with drop.open_message(0) as f:
            assert f.read() == lf
        with drop.open_message(1) as f:
            assert f.read() == crlf
    finally:
        drop.close()


def test_snapshot_order_skips_and_indexes(store: MaildirStore) -> None:
    """The snapshot is sorted by delivery time (numerically, new/ and cur/ together), skips
    dot-files, symlinks and folders, and refuses out-of-range or negative indexes."""
    (box(store) / "cur" / "999.M1P1.h:2,S").write_bytes(b"first\n")
    (box(store) / "new" / "1000.M2P1.h").write_bytes(b"third\n")
    (box(store) / "new" / "1000.M10P1.h").write_bytes(b"fourth\n")
    (box(store) / "new" / "999.M2P1.h").write_bytes(b"second\n")
    (box(store) / "new" / ".partial").write_bytes(b"no\n")
    (box(store) / "new" / "subdir").mkdir()
    secret = store.root.parent / "secret"
    secret.write_bytes(b"not mail\n")
    (box(store) / "new" / "1.M1P1.link").symlink_to(secret)
    drop = store.open_maildrop(DOMAIN, "ted")
    try:
        bodies = []
        for i in range(len(drop)):
            with drop.open_message(i) as f:
                bodies.append(f.read())
        assert bodies == [b"first\n", b"second\n", b"third\n", b"fourth\n"]
        for bad in (4, -1):
            with pytest.raises(IndexError):
                drop.size(bad)
    finally:
        drop.close()


def test_uidl_is_stable_across_sessions_and_after_commit(store: MaildirStore) -> None:
    """UIDLs are the same in two sessions, and after commit has moved the messages from new/ to
    cur/ (with ':2,'), in a third session after a 'restart' (a fresh store object)."""
    store.deliver_bytes(DOMAIN, "ted", b"one\n")
    (box(store) / "new" / "2000000000.foreign.host").write_bytes(b"two\n")
    first = store.open_maildrop(DOMAIN, "ted")
    uidls = [first.uidl(i) for i in range(len(first))]
    first.close()
    second = store.open_maildrop(DOMAIN, "ted")
    assert [second.uidl(i) for i in range(len(second))] == uidls
    second.commit(set())
    assert files(box(store) / "new") == []
    cur = files(box(store) / "cur")
    assert len(cur) == 2 and all(name.endswith(":2,") for name in cur)
    assert any(name.startswith("2000000000.foreign.host,S=4,W=5:2,") for name in cur)
    third = MaildirStore(store.root).open_maildrop(DOMAIN, "ted")
    try:
        assert [third.uidl(i) for i in range(len(third))] == uidls
        assert [third.size(i) for i in range(len(third))] == [5, 5]
    finally:
        third.close()


def test_uidl_of_unusual_names() -> None:
    """The UIDL is the unique part (before ':' info and ',S='/',W='); a name too long or with
    characters outside 0x21-0x7E gets a stable hex digest instead."""
    assert unique_part("123.M4P5.host,S=10,W=12:2,S") == "123.M4P5.host"
    assert uidl_for_name("123.M4P5.host,S=10,W=12:2,S") == "123.M4P5.host"
    assert uidl_for_name("123.M4P5.host") == "123.M4P5.host"
    long_name = "1." + "x" * 80
    digest = uidl_for_name(long_name)
    assert digest == uidl_for_name(long_name + ":2,S") and len(digest) == 64
    spaced = uidl_for_name("1.with space.host")
    assert all(0x21 <= ord(c) <= 0x7E for c in spaced) and spaced != "1.with space.host"
    assert uidl_for_name("1.nonascii-\udcff.host") == uidl_for_name("1.nonascii-\udcff.host:2,")


def test_commit_removes_only_the_given_indexes(store: MaildirStore) -> None:
    """commit(deleted) unlinks exactly those messages (one already gone is fine), keeps the rest,
    and releases the lock; a second commit does nothing."""
    for n in range(4):
        store.deliver_bytes(DOMAIN, "ted", f"message {n}\n".encode())
    drop = store.open_maildrop(DOMAIN, "ted")
    keep = [drop.uidl(1), drop.uidl(3)]
    # someone else removed #2 (found by content: names sort by text, not by delivery order)
    [third] = [n for n in files(box(store) / "new")
               if (box(store) / "new" / n).read_bytes() == b"message 2\n"]
    os.unlink(box(store) / "new" / third)
    drop.commit({0, 2})
    drop.commit({1})
    again = store.open_maildrop(DOMAIN, "ted")
    try:
        assert [again.uidl(i) for i in range(len(again))] == keep
        with again.open_message(0) as f:
            assert f.read() == b"message 1\n"
    finally:
        again.close()


def test_commit_with_a_bad_index_changes_nothing(store: MaildirStore) -> None:
    """A bad index in commit is an IndexError before anything is deleted; the session keeps its
    lock so the caller can still close it."""
    store.deliver_bytes(DOMAIN, "ted", b"keep\n")
    drop = store.open_maildrop(DOMAIN, "ted")
    with pytest.raises(IndexError):
        drop.commit({0, 5})
    with pytest.raises(errors.MailboxInUse):
        store.open_maildrop(DOMAIN, "ted")
    drop.close()
    assert store.usage(DOMAIN, "ted") == (1, 5)


def test_close_deletes_nothing_and_is_idempotent(store: MaildirStore) -> None:
    """close() (a dropped connection) releases the lock and leaves every message in new/."""
    store.deliver_bytes(DOMAIN, "ted", b"x\n")
    drop = store.open_maildrop(DOMAIN, "ted")
    drop.close()
    drop.close()
    drop.commit({0})  # after close: nothing happens
    assert len(files(box(store) / "new")) == 1


def test_messages_delivered_after_the_snapshot_are_not_seen_or_touched(store: MaildirStore) -> None:
    """A message arriving during a session is not in its snapshot and survives its commit."""
    store.deliver_bytes(DOMAIN, "ted", b"old\n")
    drop = store.open_maildrop(DOMAIN, "ted")
    late = store.deliver_bytes(DOMAIN, "ted", b"late\n")
    assert len(drop) == 1
    drop.commit({0})
    assert late.exists()
    assert store.usage(DOMAIN, "ted") == (1, 5)


def test_open_message_finds_a_message_moved_to_cur_by_another_client(store: MaildirStore) -> None:
    """If another Maildir client moves a message from new/ to cur/ mid-session, RETR and DELE
    still find it by its unique name; a message gone entirely is a StoreError."""
    path = store.deliver_bytes(DOMAIN, "ted", b"moved\n")
    gone = store.deliver_bytes(DOMAIN, "ted", b"gone\n")
    drop = store.open_maildrop(DOMAIN, "ted")
    os.rename(path, box(store) / "cur" / (path.name + ":2,S"))
    os.unlink(gone)
    with drop.open_message(0) as f:
        assert f.read() == b"moved\n"
    with pytest.raises(errors.StoreError, match="message 2 is no longer"):
        drop.open_message(1)
    drop.commit({0})
    assert store.usage(DOMAIN, "ted") == (0, 0)


def test_second_session_is_refused_until_the_first_ends(store: MaildirStore) -> None:
    """A second open_maildrop on the same mailbox raises MailboxInUse (same process, its own fd);
    after close or commit the mailbox opens again; other mailboxes are not affected."""
    first = store.open_maildrop(DOMAIN, "ted")
    with pytest.raises(errors.MailboxInUse):
        store.open_maildrop(DOMAIN, "TED")
    other = store.open_maildrop(DOMAIN, "ann")
    other.close()
    first.close()
    second = store.open_maildrop(DOMAIN, "ted")
    second.commit(set())
    store.open_maildrop(DOMAIN, "ted").close()


def test_a_lock_held_by_another_process_blocks(store: MaildirStore) -> None:
    """A session held by a child process (another server or tool) makes open_maildrop raise
    MailboxInUse; when the child exits, the mailbox opens again."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        from pop3coexist.store.maildir import MaildirStore
        drop = MaildirStore({str(store.root)!r}).open_maildrop({DOMAIN!r}, "ted")
        print("locked", flush=True)
        sys.stdin.readline()
        drop.close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(errors.MailboxInUse, match="ted@pop.contoso.test is in use"):
            store.open_maildrop(DOMAIN, "ted")
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0
        child.stdout.close()
    store.open_maildrop(DOMAIN, "ted").close()


# -- helpers -----------------------------------------------------------------------------------


def test_crlf_size_of_paths_files_and_chunk_boundaries(tmp_path: Path) -> None:
    """crlf_size counts each bare LF as two octets, including a CR LF split across a read chunk;
    a file object is read from its start and its position is restored."""
    data = b"a" * (65536 - 1) + b"\r\n" + b"b\nc\r\n\n"
    path = tmp_path / "m"
    path.write_bytes(data)
    assert crlf_size(path) == len(data) + 2
    assert crlf_size(str(path)) == len(data) + 2
    f = io.BytesIO(b"x\ny\n")
    f.seek(3)
    assert crlf_size(f) == 6 and f.tell() == 3
    assert crlf_size(io.BytesIO(b"")) == 0
    assert crlf_size(io.BytesIO(b"\r\n\r\n")) == 4


def test_io_failures_become_store_errors_naming_the_operation(tmp_path: Path) -> None:
    """An OSError below the store (here: the mailroot's parent is a file) reaches the caller as a
    StoreError that says what failed and why, never as a bare OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = MaildirStore(blocker / "mailroot")
    with pytest.raises(errors.StoreError, match="cannot add domain x.test: Not a directory"):
        bad.add_domain("x.test")
    with pytest.raises(errors.StoreError, match="cannot create the spool folder"):
        bad.spool_dir()
    with pytest.raises(errors.StoreError, match="cannot list the domains"):
        bad.list_domains()
    assert MaildirStore(tmp_path / "not-yet").list_domains() == []  # a missing root is empty


def test_session_lock_file_is_private_and_leftovers_are_swept(store: MaildirStore) -> None:
    """The session lock file is mode 0600 and a dot-file; check_writable sweeps graveyard folders
    a crash left during a removal."""
    store.open_maildrop(DOMAIN, "ted").close()
    lock = box(store) / ".pop3coexist.lock"
    assert oct(lock.stat().st_mode & 0o777) == oct(0o600)
    (store.root / ".removed.123" / "x").mkdir(parents=True)
    store.check_writable()
    assert not (store.root / ".removed.123").exists()


def test_hostname_is_made_safe_for_file_names(tmp_path: Path) -> None:
    """'/', ':' and ',' in the host name are escaped as maildir(5) and Dovecot do, so the unique
    part, the info and the size fields still parse."""
    s = MaildirStore(tmp_path / "root", hostname="a/b:c,d")
    s.add_domain(DOMAIN)
    s.add_mailbox(DOMAIN, "ted")
    path = s.deliver_bytes(DOMAIN, "ted", b"x\n")
    assert ".a\\057b\\072c\\054d,S=2,W=3" in path.name
    assert unique_part(path.name + ":2,S").endswith(".a\\057b\\072c\\054d")


def test_deliver_file_copies_when_hard_links_are_impossible(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the spool file cannot be hard-linked (another file system: EXDEV), each recipient gets
    a copy written through tmp/ instead; the delivery still succeeds with the same names."""
    data = b"Subject: copy\n\nbody\n"
    source = spool(store, data)

    def no_link(src, dst, *args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(maildir_module.os, "link", no_link)
    paths = store.deliver_file(source, [(DOMAIN, "ted"), (DOMAIN, "ann")])
    assert [p.read_bytes() for p in paths] == [data, data]
    assert paths[0].stat().st_ino != paths[1].stat().st_ino
    assert all(p.name.endswith(f",S={len(data)},W={len(data) + 3}") for p in paths)
    assert files(box(store, "ted") / "tmp") == [] and files(box(store, "ann") / "tmp") == []


def test_open_message_cached_opens_without_a_thread_or_says_none(store: MaildirStore) -> None:
    """``open_message_cached`` opens a message the kernel has cached (just written: it is) and
    returns None, never an error, for one moved or removed meanwhile; ``open_message`` (the
    blocking path) still finds the moved one."""
    first = store.deliver_bytes(DOMAIN, "ted", b"one\n")
    store.deliver_bytes(DOMAIN, "ted", b"two\n")
    drop = store.open_maildrop(DOMAIN, "ted")
    with drop.open_message_cached(1) as f:
        assert f.read() == b"two\n"
    os.rename(first, box(store) / "cur" / (first.name + ":2,S"))
    assert drop.open_message_cached(0) is None
    with drop.open_message(0) as f:
        assert f.read() == b"one\n"
    drop.close()


def test_read_message_cached_gives_the_stored_bytes_or_none(store: MaildirStore) -> None:
    """``read_message_cached`` (RETR's short cut) gives a cached message's stored bytes as they
    are; None, never an error, for one over the limit, one moved meanwhile (the other paths
    find it) and one whose size changed since the snapshot (grown or shrunk: never a
    truncated or longer message than the snapshot's)."""
    first = store.deliver_bytes(DOMAIN, "ted", b"one\n")
    second = store.deliver_bytes(DOMAIN, "ted", b"two\r\n.dot\n")
    third = store.deliver_bytes(DOMAIN, "ted", b"three\n")
    fourth = store.deliver_bytes(DOMAIN, "ted", b"four\n")
    store.deliver_bytes(DOMAIN, "ted", b"")
    drop = store.open_maildrop(DOMAIN, "ted")
    if drop.read_message_cached(1, 1000) is None:
        pytest.skip("this kernel cannot open or read without waiting for the disk")
    assert drop.read_message_cached(1, 1000) == b"two\r\n.dot\n"
    assert drop.read_message_cached(1, 9) is None  # over the limit
    assert drop.read_message_cached(4, 1000) == b""
    os.rename(first, box(store) / "cur" / (first.name + ":2,S"))
    assert drop.read_message_cached(0, 1000) is None
    third.write_bytes(b"three more\n")
    fourth.write_bytes(b"4\n")
    assert drop.read_message_cached(2, 1000) is None
    assert drop.read_message_cached(3, 1000) is None
    with pytest.raises(IndexError):
        drop.read_message_cached(5, 1000)
    assert second.exists()
    drop.close()


def test_commit_syncs_the_folders_it_changed_only(store: MaildirStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """QUIT's commit fsyncs each folder it changed (an unlink, a move from new/ to cur/, a
    rename in cur/) and no other: removing from new/ only syncs new/, moving the rest syncs
    both, a session that changes nothing syncs nothing."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(maildir_module.os, "fsync", fsync)
    monkeypatch.setattr(maildir_module, "_fsync_dir",
                        lambda path: synced.append(Path(path).name))
    for i in range(4):
        store.deliver_bytes(DOMAIN, "ted", b"message %d\n" % i)
    synced.clear()
    drop = store.open_maildrop(DOMAIN, "ted")
    drop.commit({0, 1, 2, 3})  # everything in new/, all removed
    assert synced == ["new"]
    for i in range(3):
        store.deliver_bytes(DOMAIN, "ted", b"again %d\n" % i)
    synced.clear()
    drop = store.open_maildrop(DOMAIN, "ted")
    drop.commit({0})  # one removed from new/, two moved to cur/
    assert sorted(synced) == ["cur", "new"]
    synced.clear()
    drop = store.open_maildrop(DOMAIN, "ted")
    drop.commit({0})  # one removed from cur/
    assert synced == ["cur"]
    synced.clear()
    drop = store.open_maildrop(DOMAIN, "ted")
    drop.commit(set())  # nothing changed
    assert synced == []
    assert len(files(box(store) / "cur")) == 1 and files(box(store) / "new") == []


def test_open_cached_is_a_plain_read_only_open(tmp_path: Path) -> None:
    """fsutil.open_cached gives a read-only descriptor of a cached file and None for a missing
    one (on a kernel without openat2 RESOLVE_CACHED it is always None)."""
    from pop3coexist import fsutil

    f = tmp_path / "m"
    f.write_bytes(b"data")
    fd = fsutil.open_cached(f)
    if fd is None:
        assert not fsutil._cached_open_works
        return
    try:
        assert os.read(fd, 10) == b"data"
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    assert fsutil.open_cached(tmp_path / "missing") is None


def test_list_domains_is_kept_until_the_mail_root_changes(store: MaildirStore, monkeypatch) -> None:
    """A settled root is listed once (every RCPT asks); a domain added or removed (by this
    store or by hand) shows at once; a listing made right after a change is not kept."""
    import pop3coexist.store.maildir as maildir

    monkeypatch.setattr(maildir, "ROOT_RACY_WINDOW", 0.0)  # every change counts as settled
    scans: list = []
    real = os.scandir
    monkeypatch.setattr(maildir.os, "scandir", lambda p: (scans.append(p), real(p))[1])
    assert store.list_domains() == [DOMAIN]
    assert store.list_domains() == [DOMAIN]
    assert [p for p in scans if p == store.root] == [store.root]  # one listing for two answers
    (store.root / "b.test").mkdir()  # by hand: the root's mtime and link count change
    assert store.list_domains() == sorted([DOMAIN, "b.test"])
    store.remove_domain("b.test")
    assert store.list_domains() == [DOMAIN]
    monkeypatch.setattr(maildir, "ROOT_RACY_WINDOW", 3600.0)  # every change is recent
    store.add_domain("c.test")
    n = len(scans)
    assert store.list_domains() == sorted([DOMAIN, "c.test"])
    assert store.list_domains() == sorted([DOMAIN, "c.test"])
    assert len(scans) == n + 2  # just changed: not kept, listed each time


@pytest.mark.parametrize("err", ["EIO", "ENOTCONN", "EACCES", "ESTALE"])
def test_a_volume_fault_is_never_no_such_mailbox(store: MaildirStore, monkeypatch, err: str) -> None:
    """A stat() of a mailbox's folders that fails with an I/O error (a shared volume's passing
    fault) is a StoreError (POP3 [SYS/TEMP], SMTP 4xx), never NoSuchMailbox (which POP3 answers
    "[AUTH] authentication failed" and SMTP with a permanent refusal); ESTALE is asked again
    and then answered from the volume. ENOENT stays "no such mailbox"."""
    import errno as errno_mod

    real_stat = os.stat
    failures = {"left": 1 if err == "ESTALE" else 10**6}

    def flaky_stat(path, *a, **kw):
        if str(path).endswith("/ted/new") and failures["left"] > 0:
            failures["left"] -= 1
            code = getattr(errno_mod, err)
            raise OSError(code, os.strerror(code), str(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "stat", flaky_stat)
    if err == "ESTALE":
        assert store.mailbox_exists(DOMAIN, "ted")
        failures["left"] = 1
        store.open_maildrop(DOMAIN, "ted").close()
    else:
        with pytest.raises(errors.StoreError) as caught:
            store.mailbox_exists(DOMAIN, "ted")
        assert not isinstance(caught.value, errors.NoSuchMailbox)
        with pytest.raises(errors.StoreError) as caught:
            store.open_maildrop(DOMAIN, "ted")
        assert not isinstance(caught.value, errors.NoSuchMailbox)
    monkeypatch.setattr(os, "stat", real_stat)
    assert not store.mailbox_exists(DOMAIN, "nobody")
    with pytest.raises(errors.NoSuchMailbox):
        store.open_maildrop(DOMAIN, "nobody")


def test_write_atomic_replaces_whole_files_with_unique_temporary_names(tmp_path, monkeypatch):
    """``fsutil.write_atomic`` (the password file, admin accounts, Sieve scripts, quarantine,
    the node probe and listeners.json all write through it): the new contents replace the old
    whole, with the mode asked; two threads writing the same file at once each use their own
    temporary file (the old per-process names collided); a failed write leaves the old file
    and no temporary file behind."""
    import os
    import threading

    from pop3coexist import fsutil

    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    fsutil.write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents" and (target.stat().st_mode & 0o777) == 0o600
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for _ in range(50):
                fsutil.write_atomic(target, str(n).encode() * 1000, durable=False)
        except BaseException as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(target.read_bytes())) == 1
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        fsutil.write_atomic(target, b"lost")
    assert target.read_bytes() != b"lost" and os.listdir(tmp_path) == ["f.json"]


def test_current_pid_follows_fork() -> None:
    """``fsutil.current_pid`` (the pid in Maildir unique names and spool file names, read
    without a getpid system call) is this process's id, and a forked child's own id there."""
    from pop3coexist.fsutil import current_pid

    assert current_pid() == os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its view, then leave without running pytest's exit
        try:
            os.write(w, f"{current_pid()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 100).decode().split()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got[0] == got[1] == str(pid)


def test_unique_names_carry_the_pid(store: MaildirStore) -> None:
    """A delivered file's unique name names this process (``P<pid>``, maildir(5))."""
    path = store.deliver_bytes(DOMAIN, "ted", b"x\n")
    assert f"P{os.getpid()}Q" in path.name


@pytest.mark.parametrize("data", [
    b"", b"a", b"a\n", b"a\r\nb\rc\r\r\nd", b"x" * 70000 + b"\r", b"\r" + b"\n" * 65535 + b"\n",
    (b"line\n" * 20000) + b"tail",
])
def test_sizes_of_matches_stat_and_crlf_size(tmp_path: Path, data: bytes) -> None:
    """``_sizes_of`` (the delivery's os-level read of the spool file) gives the same size and
    POP3 size as ``os.stat`` and ``crlf_size``, line ends split across its read chunks too."""
    f = tmp_path / "m"
    f.write_bytes(data)
    assert maildir_module._sizes_of(str(f)) == (len(data), crlf_size(f))


def test_deliver_within_quota_reads_without_buffered_open(
        store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``deliver_within_quota`` (SMTP's commit) reads the spool file and the metadata with
    os-level calls only (no buffered ``open()``, whose isatty ioctl and lseek cost per
    message), takes a str source, and returns the links as Paths with the right S= and W=
    (quota mailboxes included), or as str with ``sync=False`` (the group commit)."""
    store.set_quota(DOMAIN, "ann", 10_000)
    src = tmp_path / "spool"
    src.write_bytes(b"Subject: s\n\nbody\n")

    def no_open(*_a, **_k):
        raise AssertionError("buffered open() on the delivery path")

    monkeypatch.setattr(maildir_module, "open", no_open, raising=False)
    written, refused = store.deliver_within_quota(str(src), [(DOMAIN, "ted"), (DOMAIN, "ann")])
    batch, _ = store.deliver_within_quota(str(src), [(DOMAIN, "ted")], sync=False)
    monkeypatch.undo()
    assert refused == [] and len(written) == 2
    assert [type(p) for p in batch] == [str]  # the group commit's form: it syncs the folders
    for p in [*written, Path(batch[0])]:
        assert isinstance(p, Path) and p.parent.name == "new"
        assert p.name.endswith(",S=17,W=20") and p.read_bytes() == src.read_bytes()
    with pytest.raises(errors.NoSuchMailbox, match="no such mailbox: nobody@"):
        store.deliver_within_quota(str(src), [(DOMAIN, "nobody")])
    with pytest.raises(errors.NoSuchMailbox, match="no such domain: nowhere.test"):
        store.deliver_within_quota(str(src), [("nowhere.test", "ted")])


def test_mailbox_fits_cached_and_spool_dir_answers(store: MaildirStore) -> None:
    """RCPT's cached check (str paths now) says yes for a mailbox without metadata, no for one
    whose metadata file holds a quota, an unknown mailbox or an invalid name; ``spool_dir``
    is the same folder each call and is made again once its check interval has passed."""
    for sub in ("new", "cur"):
        os.stat(box(store) / sub)
    with pytest.raises(FileNotFoundError):
        os.stat(box(store) / maildir_module.META_NAME)
    if maildir_module.stat_cached("/") is not None:
        assert store.mailbox_fits_cached(DOMAIN, "TED") is True
    store.set_quota(DOMAIN, "ann", 1000)
    assert store.mailbox_fits_cached(DOMAIN, "ann") is False
    assert store.mailbox_fits_cached(DOMAIN, "nobody") is False
    assert store.mailbox_fits_cached(DOMAIN, "bad..name") is False
    first = store.spool_dir()
    assert store.spool_dir() is first and first == store.root / maildir_module.SPOOL_NAME
    first.rmdir()
    store._spool_checked = -maildir_module.SPOOL_CHECK_INTERVAL
    assert store.spool_dir().is_dir()
