"""The IMAP folder store (store/folders.py) and the IMAP protocol over StringTransport: UIDs
stable across new/ -> cur/ and flag renames and a fresh view (the dovecot-uidlist file),
Dovecot's flag letters, Maildir++ folder names, the quota over all folders, Sieve folder
names, and a byte-exact log-in / SELECT / FETCH / STORE / EXPUNGE dialogue."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from pop3coexist.config import Config, DomainsConfig, ServerConfig
from pop3coexist.imap.factory import IMAPServerFactory
from pop3coexist.interfaces import IAccountFolders, IFolderStore, IFolderView
from pop3coexist.store.folders import (
    FolderError,
    MaildirFolders,
    flags_from_info,
    info_from_flags,
    to_folder_name,
)
from pop3coexist.store.maildir import MaildirStore, uidl_for_name
from tests.support.dialogue import connect, take
from tests.support.fakes import FakeChecker, sync_run_blocking

HOST = "pop.contoso.test"


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot")
    s.add_domain(HOST)
    s.add_mailbox(HOST, "ted")
    return s


def test_interfaces_and_flag_letters(store: MaildirStore) -> None:
    """The real classes provide their interfaces; flags map to Dovecot's sorted letters."""
    folders = MaildirFolders(store)
    account = folders.open_account(HOST, "ted")
    verifyObject(IFolderStore, folders)
    verifyObject(IAccountFolders, account)
    verifyObject(IFolderView, account.open_folder("INBOX"))
    assert info_from_flags(["\\Seen", "\\Answered", "\\Flagged", "$Work"], ["$Work"]) == "FRSa"
    assert flags_from_info("DFRSTa", ["$Work"]) == {"\\Draft", "\\Flagged", "\\Answered",
                                                   "\\Seen", "\\Deleted", "$Work"}


def test_uids_stable_across_renames_and_views(store: MaildirStore) -> None:
    """A delivered message gets UID 1; claiming it (new/ -> cur/) and flagging it keep its UID
    and its POP3 UIDL; a second view reads the same UIDVALIDITY and UIDs from dovecot-uidlist."""
    path = store.deliver_bytes(HOST, "ted", b"Subject: a\n\nx\n")
    store.deliver_bytes(HOST, "ted", b"Subject: b\n\ny\n")
    view = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
    msgs = view.sync()
    assert [m.uid for m in msgs] == [1, 2] and all(m.recent for m in msgs)
    view.claim_recent(msgs)
    view.set_flags(msgs[0], {"\\Seen", "\\Answered"})
    again = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
    msgs2 = again.sync()
    assert [m.uid for m in msgs2] == [1, 2]
    assert again.uidvalidity == view.uidvalidity
    assert msgs2[0].name.endswith(":2,RS")
    assert uidl_for_name(msgs2[0].name) == uidl_for_name(Path(str(path)).name)
    view.expunge([msgs2[1]])
    assert [m.uid for m in again.sync()] == [1]
    assert (store.mailbox_folder(HOST, "ted") / "dovecot-uidlist").read_text().startswith("3 V")


def test_folders_names_quota_and_special_use(store: MaildirStore) -> None:
    """Special folders are made once; a.b is the Maildir++ folder .a.b; bad names are refused;
    the quota counts every folder; a Sieve name with / becomes the . hierarchy (mUTF-7)."""
    account = MaildirFolders(store).open_account(HOST, "ted")
    account.ensure_special_folders()
    assert account.list_folders() == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    account.create("a.b")
    assert (store.mailbox_folder(HOST, "ted") / ".a.b" / "maildirfolder").exists()
    with pytest.raises(FolderError):
        account.create("a.b")
    with pytest.raises(FolderError):
        account.create("../x")
    account.append("a.b", b"Subject: q\r\n\r\n" + b"z" * 100 + b"\r\n", ["\\Seen"], None)
    assert account.quota()[0] > 100
    assert to_folder_name("Lists/Café") == "Lists.Caf&AOk-"


class Env:
    def __init__(self, tmp: Path, store: MaildirStore) -> None:
        self.clock = task.Clock()
        self.store = store
        checker = FakeChecker({f"ted@{HOST}": "pw"}, local_domains=(HOST,))
        config = Config(server=ServerConfig(HOST, tmp), domains=DomainsConfig(local=(HOST,)))
        self.factory = IMAPServerFactory(config, store, checker, reactor=self.clock,
                                         run_blocking=sync_run_blocking)

    def session(self):  # noqa: ANN201
        proto = self.factory.buildProtocol(None)
        return proto, connect(proto, host_port=143)


def test_dialogue_login_select_fetch_store_expunge(tmp_path: Path, store: MaildirStore) -> None:
    """Byte for byte: the greeting; LOGIN; SELECT (EXISTS, RECENT, UIDVALIDITY); FETCH with
    RFC822.SIZE equal to the BODY[] literal (CRLF form of an LF file); STORE; EXPUNGE; a bad
    command gets BAD and the session lives; LOGOUT."""
    store.deliver_bytes(HOST, "ted", b"Subject: hi\n\nHello\n")
    env = Env(tmp_path, store)
    proto, t = env.session()
    assert take(t).startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ")
    proto.dataReceived(b"a1 LOGIN ted@pop.contoso.test pw\r\n")
    assert take(t).startswith(b"a1 OK [CAPABILITY IMAP4rev1")
    proto.dataReceived(b"a2 SELECT INBOX\r\n")
    out = take(t)
    assert b"* 1 EXISTS\r\n* 1 RECENT\r\n" in out and b"[UIDVALIDITY " in out
    assert out.endswith(b"a2 OK [READ-WRITE] SELECT completed\r\n")
    proto.dataReceived(b"a3 FETCH 1 (RFC822.SIZE BODY.PEEK[])\r\n")
    assert take(t) == (b"* 1 FETCH (RFC822.SIZE 22 BODY[] {22}\r\nSubject: hi\r\n\r\nHello\r\n)"
                       b"\r\na3 OK FETCH completed\r\n")
    proto.dataReceived(b"a4 STORE 1 +FLAGS (\\Deleted)\r\n")
    assert take(t) == (b"* 1 FETCH (FLAGS (\\Deleted \\Recent))\r\na4 OK STORE completed\r\n")
    proto.dataReceived(b"a5 FROB\r\n")
    assert take(t) == b"a5 BAD unknown command\r\n"
    proto.dataReceived(b"a6 EXPUNGE\r\n")
    assert take(t) == b"* 1 EXPUNGE\r\na6 OK EXPUNGE completed\r\n"
    proto.dataReceived(b"a7 LOGOUT\r\n")
    assert take(t) == b"* BYE logging out\r\na7 OK LOGOUT completed\r\n"


def test_wrong_password_waits_the_throttle(tmp_path: Path, store: MaildirStore) -> None:
    """A wrong password gets NO [AUTHENTICATIONFAILED] only after the failure delay."""
    env = Env(tmp_path, store)
    proto, t = env.session()
    take(t)
    proto.dataReceived(b"a1 LOGIN ted@pop.contoso.test nope\r\n")
    assert take(t) == b""
    env.clock.advance(60)
    assert take(t) == b"a1 NO [AUTHENTICATIONFAILED] authentication failed\r\n"


def test_store_usage_counts_every_folder(store: MaildirStore) -> None:
    """The mailbox usage the quota checks (``MaildirStore.usage``: SMTP delivery, admin stat)
    counts the IMAP folders too, not a deleted folder's leftovers (``..deleted.*``)."""
    store.deliver_bytes(HOST, "ted", b"Subject: a\n\nx\n")
    account = MaildirFolders(store).open_account(HOST, "ted")
    account.create("Archive")
    account.append("Archive", b"Subject: b\r\n\r\n" + b"y" * 500 + b"\r\n", [], None)
    count, size = store.usage(HOST, "ted")
    assert count == 2 and size > 500
    gone = store.mailbox_folder(HOST, "ted") / "..deleted.x" / "cur"
    gone.mkdir(parents=True)
    (gone / "1.M1P1.h,S=9999").write_bytes(b"z")
    assert store.usage(HOST, "ted") == (count, size)


def test_sync_if_changed_reads_only_a_changed_folder(store: MaildirStore) -> None:
    """An unchanged folder (new/, cur/, the uid list older than the racy window) costs no
    scan: ``sync_if_changed`` answers None; a delivery makes it read the folder again."""
    import os

    store.deliver_bytes(HOST, "ted", b"Subject: a\n\nx\n")
    view = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
    view.sync()
    root = store.mailbox_folder(HOST, "ted")
    old = 1_000_000_000
    for name in ("new", "cur", "dovecot-uidlist"):
        os.utime(root / name, (old, old))
    assert [m.uid for m in view.sync()] == [1]
    assert view.sync_if_changed() is None
    store.deliver_bytes(HOST, "ted", b"Subject: b\n\ny\n")
    assert [m.uid for m in view.sync_if_changed()] == [1, 2]


def test_concurrent_views_agree_on_uids(store: MaildirStore) -> None:
    """Four views syncing in threads while messages arrive and a POP3 session moves them to
    cur/ assign each message exactly one UID (no two messages share one, no message gets two):
    the dovecot-uidlist lock serialises the writers."""
    import threading

    account = MaildirFolders(store).open_account(HOST, "ted")
    seen: list[dict[str, int]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        view = account.open_folder("INBOX")
        mine: dict[str, int] = {}
        try:
            while not stop.is_set():
                for m in view.sync():
                    assert mine.setdefault(m.unique, m.uid) == m.uid
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        seen.append(mine)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(40):
        store.deliver_bytes(HOST, "ted", f"Subject: {n}\n\nx\n".encode())
        if n % 10 == 9:
            store.open_maildrop(HOST, "ted").commit(set())  # POP3 QUIT: new/ -> cur/
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    final = {m.unique: m.uid for m in account.open_folder("INBOX").sync()}
    assert len(final) == 40 and len(set(final.values())) == 40
    for mine in seen:
        assert all(final[u] == uid for u, uid in mine.items())


def test_a_canonical_size_is_read_once_per_process(store: MaildirStore, monkeypatch) -> None:
    """A message whose name lacks ``W=`` is read whole for its RFC822.SIZE once per process,
    not once per folder read: new accounts, views and reads (each web mail listing, each IMAP
    session) take the size remembered by folder and unique name (web mail read a 50 MB message
    whole at every listing); a new message is read for its own size."""
    from pop3coexist.store import folders as folders_module

    box = store.mailbox_folder(HOST, "ted")
    (box / "cur" / "1700000001.M1P1.big:2,S").write_bytes(b"Subject: x\n\n" + b"y\n" * 1000)
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if "M1P1.big" in str(path) or "M2P1.more" in str(path):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(folders_module, "open", counting_open, raising=False)
    sizes = []
    for _ in range(3):
        view = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
        sizes += [view.size(m) for m in view.sync()]
    assert sizes == [3014] * 3 and len(opened) == 1
    (box / "cur" / "1700000002.M2P1.more:2,S").write_bytes(b"Subject: y\n\nz\n")
    view = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
    assert sorted(view.size(m) for m in view.sync()) == [17, 3014] and len(opened) == 2
