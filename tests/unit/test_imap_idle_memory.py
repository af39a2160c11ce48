"""What keeps 1,000 IDLE sessions small (issue 18, issue 17's memory target) and the store
races a burst of first log-ins and SELECTs found: a folder read again while its stat
signature cannot be trusted reuses the unchanged message records of its last read; sessions
on one snapshot share its uids and flags lists until they change them; the uid-list lock is
never unlinked once it became another writer's; two first log-ins of one account in one
process both succeed."""

from __future__ import annotations

import os
import threading
from array import array
from pathlib import Path

import pytest

from pop3coexist.imap.selected import Selected
from pop3coexist.store import folders as foldersmod
from pop3coexist.store.folders import MaildirFolders
from pop3coexist.store.maildir import MaildirStore

HOST = "pop.contoso.test"


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot")
    s.add_domain(HOST)
    s.add_mailbox(HOST, "ted")
    for n in range(20):
        s.deliver_bytes(HOST, "ted", b"Subject: m%d\n\nx\n" % n)
    return s


def _inbox(store: MaildirStore):  # noqa: ANN202
    return MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")


def test_racy_reads_share_unchanged_records(store: MaildirStore) -> None:
    """Views read a folder that just changed (no trusted signature): a second view with the
    same signature takes the first one's (provisional) read instead of scanning the folder
    again; after a change made through a view (a flag) the next read holds the last read's
    record objects for every unchanged message and a fresh record for the renamed one."""
    a, b = _inbox(store), _inbox(store)
    first = a.sync()
    a.claim_recent(first)  # new/ -> cur/: the folder changed now (racy)
    again = a.sync()
    assert a._state() is None  # within RACY_WINDOW: not shared by signature
    second = b.sync()
    assert second is again  # the provisional read, not a scan of its own
    b.set_flags(second[3], {"\\Seen"})
    third = b.sync()
    assert third is not second and third[3] is not second[3] and "\\Seen" in third[3].flags
    assert all(third[i] is second[i] for i in range(len(third)) if i != 3)


def test_provisional_read_is_checked_once_the_window_passed(
        store: MaildirStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change a provisional read could not see (one that left new/, cur/ and the uid list
    with the same stat signature, as a change in the same clock tick does) shows at the first
    check after RACY_WINDOW: the view that took the provisional read reads the folder again
    then; until then it is told "unchanged" without a scan. A change made through a view of
    the process shows at once to every view (the provisional read is dropped)."""
    a, b = _inbox(store), _inbox(store)
    a.claim_recent(a.sync())
    snap = a.sync()
    assert b.sync() is snap and b.sync_if_changed() is None
    root = Path(a.path)
    times = {n: os.stat(root / n) for n in ("new", "cur")}
    (root / "cur" / "1700000000.hidden.host:2,").write_bytes(b"Subject: hidden\n\nx\n")
    for n, st in times.items():  # the same signature as before the file came
        os.utime(root / n, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.sync_if_changed() is None  # within the window: the provisional read stands
    monkeypatch.setattr(foldersmod, "RACY_WINDOW", 0.0)  # the window has passed
    later = b.sync_if_changed()
    assert later is not None and len(later) == len(snap) + 1
    monkeypatch.undo()
    c, d = _inbox(store), _inbox(store)
    os.utime(root / "cur")  # racy again
    shared = c.sync()
    assert d.sync() is shared
    c.set_flags(shared[0], {"\\Flagged"})
    now = d.sync_if_changed()
    assert now is not None and "\\Flagged" in now[0].flags


def test_sessions_share_lists_until_they_change() -> None:
    """Sessions that load one snapshot hold the same uids array and flags list; a change
    (flags told, an EXISTS, an EXPUNGE) gives that session copies and leaves the others'."""

    class Snap(list):
        __slots__ = ("__weakref__",)

    class Msg:
        def __init__(self, uid: int) -> None:
            self.uid, self.flags = uid, frozenset()

    snap = Snap(Msg(u) for u in (1, 2, 5))
    one, two = Selected("INBOX", None, False), Selected("INBOX", None, False)
    one.load(snap)
    two.load(snap)
    assert one.uids is two.uids and one.flags is two.flags
    one.set_flags_of(2, frozenset({"\\Seen"}))
    assert one.flags is not two.flags and two.flags_of(2) == frozenset()
    two.append(Msg(7))
    assert list(two.uids) == [1, 2, 5, 7] and list(one.uids) == [1, 2, 5]
    one.remove(1)
    assert list(one.uids) == [2, 5] and list(two.uids) == [1, 2, 5, 7]
    plain = Selected("INBOX", None, False)
    plain.load([Msg(3)])  # a plain list: lists of its own
    assert plain.uids == array("I", [3])


def test_uidlist_lock_of_another_writer_is_kept(tmp_path: Path) -> None:
    """After the holder renamed its lock into dovecot-uidlist, the lock name may already be
    another writer's (another process took it): leaving the first lock must not unlink it."""
    folder = tmp_path / "box"
    folder.mkdir()
    with foldersmod._dotlock(folder) as fd:
        os.write(fd, b"3 V1 N1 Gx\n")
        os.rename(folder / foldersmod.UIDLIST_LOCK, folder / foldersmod.UIDLIST)
        other = os.open(folder / foldersmod.UIDLIST_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.close(other)
    assert (folder / foldersmod.UIDLIST_LOCK).exists()
    os.unlink(folder / foldersmod.UIDLIST_LOCK)
    with foldersmod._dotlock(folder):  # a lock left unrenamed (an error) is still removed
        pass
    assert not (folder / foldersmod.UIDLIST_LOCK).exists()


def test_first_logins_in_threads_all_succeed(store: MaildirStore, monkeypatch) -> None:
    """Eight threads make the special folders of one account at once (its first log-ins in
    one process; the marker file's write is slowed so that they overlap): none fails, and
    Sent, Drafts, Trash and Junk exist."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)
    real_write = Path.write_text

    def slow_write(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        done = real_write(self, *args, **kwargs)
        if ".pop3coexist.imap.json" in self.name:
            threading.Event().wait(0.05)  # the others write theirs meanwhile
        return done

    monkeypatch.setattr(Path, "write_text", slow_write)

    def first_login() -> None:
        account = MaildirFolders(store).open_account(HOST, "ted")
        barrier.wait()
        try:
            account.ensure_special_folders()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=first_login) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    names = MaildirFolders(store).open_account(HOST, "ted").list_folders()
    assert {"Sent", "Drafts", "Trash", "Junk"} <= set(names)
