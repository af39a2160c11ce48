"""Backup and restore internals (admin/backup.py) on a state folder the test builds, with the
moments the consistency rules are about made to happen on purpose: a message renamed from
new/ to cur/ or deleted between the listing and the read, a queue body removed after its
envelope was listed; the merge rules of restore; the exclusion list; the password file merge;
handing the state to the mail user (startup.hand_over)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pop3coexist.admin import backup as bk
from pop3coexist.config import parse_config
from pop3coexist.errors import AdminError
from pop3coexist.identity.passwordfile import PasswordFile
from pop3coexist.startup import hand_over, switch_ids

DOMAIN = "pop.contoso.test"


def make_config(state: Path):
    text = (f'[server]\nhostname = "{DOMAIN}"\nstate_dir = "{state}"\n'
            f'[auth]\nmethod = "passwordfile"\napop = true\n[domains]\nlocal = ["{DOMAIN}"]\n')
    return parse_config(text, state.parent / "test.toml")


def maildir(state: Path, box: str = "ted") -> Path:
    path = state / "mailroot" / DOMAIN / box
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def archive_of(state: Path, writer_class=bk._Writer) -> tuple[bytes, bk._Writer]:
    raw = io.BytesIO()
    tar = tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT)
    writer = writer_class(state, tar, None)
    writer.walk()
    data = json.dumps({"format": bk.FORMAT, "version": bk.VERSION, "started": 0,
                       "files": writer.files, "dirs": writer.dirs}).encode()
    info = tarfile.TarInfo(bk.MANIFEST)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    tar.close()
    return raw.getvalue(), writer


def members(data: bytes) -> dict[str, bk._Member]:
    _, got = bk._read_stream(io.BytesIO(data), "test", None)
    return got.members


@pytest.mark.parametrize("parts,is_dir,excluded", [
    (("run",), True, True),
    (("mailroot", ".spool"), True, True),
    (("mailroot", ".spool", "x.spool"), False, True),
    (("queue", "flush"), False, True),
    (("passwords.json.lock",), False, True),
    (("mailroot", DOMAIN, "ted", ".pop3coexist.lock"), False, True),
    (("mailroot", DOMAIN, "ted", ".pop3coexist.json.tmp.12.ab"), False, True),
    (("mailroot", ".removed.123"), True, True),
    (("mailroot", DOMAIN, "ted", "..deleted.Junk.ab12"), True, True),
    (("mailroot", DOMAIN, "ted", ".Sent", "dovecot-uidlist"), False, False),
    ((".restore-1-ab",), True, True),
    (("passwords.json",), False, False),
    (("passwords.key",), False, False),
    (("aliases", "table"), False, False),
    (("mailroot", DOMAIN, "ted", ".pop3coexist.json"), False, False),
    (("mailroot", DOMAIN, "ted", "sieve", "main.sieve"), False, False),
    (("quarantine", "abc.eml"), False, False),
])
def test_exclusions(parts, is_dir, excluded) -> None:
    """Locks, spool, run/, temporary files and markers are left out; every other file under
    state_dir (password file and key, metadata, files other features add) is state."""
    assert bk.is_excluded(parts, is_dir) is excluded


def test_message_renamed_to_cur_while_walking_is_taken_once(tmp_path) -> None:
    """A QUIT that moves a message from new/ to cur/ (with flags) after new/ was listed and
    before the message was read: the backup finds it by its unique part and holds it once."""
    state = tmp_path / "var"
    box = maildir(state)
    (box / "new" / "100.M1P1.host").write_bytes(b"Subject: a\n\nmoved\n")
    (box / "new" / "101.M1P1.host").write_bytes(b"Subject: b\n\nstays\n")

    class Racing(bk._Writer):
        def add_file(self, path, kind, immutable):
            if path.name == "100.M1P1.host" and path.parent.name == "new":
                os.rename(path, box / "cur" / "100.M1P1.host,S=19:2,S")
            return super().add_file(path, kind, immutable)

    data, writer = archive_of(state, Racing)
    names = {n for n in members(data) if "/new/" in n or "/cur/" in n}
    assert names == {f"mailroot/{DOMAIN}/ted/cur/100.M1P1.host,S=19:2,S",
                     f"mailroot/{DOMAIN}/ted/new/101.M1P1.host"}
    assert writer.summary.messages == 2 and writer.summary.vanished == 0


def test_message_deleted_while_walking_is_left_out(tmp_path) -> None:
    """A message deleted (POP3 DELE + QUIT) between the listing and the read is not in the
    backup, and the backup goes on."""
    state = tmp_path / "var"
    box = maildir(state)
    (box / "cur" / "100.M1P1.host:2,").write_bytes(b"gone\n")
    (box / "cur" / "101.M1P1.host:2,").write_bytes(b"kept\n")

    class Racing(bk._Writer):
        def add_file(self, path, kind, immutable):
            if path.name == "100.M1P1.host:2,":
                path.unlink()
            return super().add_file(path, kind, immutable)

    data, writer = archive_of(state, Racing)
    assert [n for n in members(data) if "/cur/" in n] == [f"mailroot/{DOMAIN}/ted/cur/101.M1P1.host:2,"]
    assert writer.summary.vanished == 1


def test_queue_pair_whose_body_went_is_left_out(tmp_path) -> None:
    """A queued message is its envelope and its body: when the body is removed (delivered)
    after the envelope was listed, neither is in the backup; a whole pair is."""
    state = tmp_path / "var"
    for sub in ("env", "msg", "tmp"):
        (state / "queue" / sub).mkdir(parents=True)
    for qid in ("18ecca287fb565b67073ee42", "18ecca2881a6f13310044f4c"):
        (state / "queue" / "msg" / qid).write_bytes(b"body\n")
        (state / "queue" / "env" / f"{qid}.json").write_text(json.dumps({"id": qid}))
    (state / "queue" / "tmp" / "env.x.1").write_bytes(b"half")

    class Racing(bk._Writer):
        def add_file(self, path, kind, immutable):
            if path.name == "18ecca287fb565b67073ee42":
                path.unlink()
            return super().add_file(path, kind, immutable)

    data, writer = archive_of(state, Racing)
    got = sorted(n for n in members(data) if n.startswith("queue/"))
    assert got == ["queue/env/18ecca2881a6f13310044f4c.json", "queue/msg/18ecca2881a6f13310044f4c"]
    assert "queue/tmp" in writer.dirs and writer.summary.queued == 1


def test_restore_merges_without_duplicates_and_keeps_what_differs(tmp_path, capsys) -> None:
    """Restore into a state that already holds one of the messages (read since: now in cur/
    with flags) and a state file with other contents: the message is not doubled, the file is
    kept and named, the rest is put in place; a second restore puts nothing in place."""
    src = tmp_path / "src"
    box = maildir(src)
    (box / "new" / "100.M1P1.host,S=5").write_bytes(b"one\r\n")
    (box / "new" / "101.M1P1.host,S=5").write_bytes(b"two\r\n")
    (src / "aliases").mkdir()
    (src / "aliases" / "table").write_text("a: b\n")
    archive = tmp_path / "a.tar"
    bk.backup(make_config(src), str(archive), out=io.StringIO())

    dst = tmp_path / "dst"
    dbox = maildir(dst)
    (dbox / "cur" / "100.M1P1.host,S=5:2,S").write_bytes(b"one\r\n")
    (dst / "aliases").mkdir()
    (dst / "aliases" / "table").write_text("mine\n")
    summary = bk.restore(make_config(dst), str(archive), out=io.StringIO())
    assert summary.duplicates == 1 and summary.kept == ["aliases/table"]
    assert sorted(p.name for p in (dbox / "new").iterdir()) == ["101.M1P1.host,S=5"]
    assert (dst / "aliases" / "table").read_text() == "mine\n"
    assert "kept aliases/table" in capsys.readouterr().err
    again = bk.restore(make_config(dst), str(archive), out=io.StringIO())
    assert again.restored == 0 and again.duplicates == 2
    assert not list(dst.glob(".restore-*"))


def test_truncated_archive_is_refused_and_changes_nothing(tmp_path) -> None:
    """An archive cut short (no manifest) is refused with one clear error before anything is
    put in place, and the staging folder is gone."""
    src = tmp_path / "src"
    (maildir(src) / "new" / "100.M1P1.host").write_bytes(b"x" * 5000)
    archive = tmp_path / "a.tar.zst"
    bk.backup(make_config(src), str(archive), out=io.StringIO())
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])
    dst = tmp_path / "dst"
    with pytest.raises(AdminError, match="damaged or incomplete|incomplete"):
        bk.restore(make_config(dst), str(cut), out=io.StringIO())
    assert [p.name for p in dst.iterdir()] == []


def test_backup_never_overwrites(tmp_path) -> None:
    """An existing archive name is refused (a backup never replaces one)."""
    src = tmp_path / "src"
    maildir(src)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"older")
    with pytest.raises(AdminError, match="exists"):
        bk.backup(make_config(src), str(archive), out=io.StringIO())
    assert archive.read_bytes() == b"older"


def test_password_file_merge(tmp_path) -> None:
    """merge_from adds the addresses the file lacks (with their APOP secret when both use the
    same key, without it otherwise) and never changes an address that is there."""
    key = tmp_path / "k"
    mine = PasswordFile(tmp_path / "mine.json", key, True, scrypt_n=2)
    mine.set_password("ted@a.test", "ted-pw")
    theirs = PasswordFile(tmp_path / "theirs.json", key, True, scrypt_n=2)
    theirs.set_password("ted@a.test", "other-pw")
    theirs.set_password("ann@a.test", "ann-pw")
    assert mine.merge_from(theirs) == (1, 0)
    assert mine.verify("ted@a.test", "ted-pw") and mine.verify("ann@a.test", "ann-pw")
    assert mine.secret("ann@a.test") == "ann-pw"
    stranger = PasswordFile(tmp_path / "s.json", tmp_path / "other.key", True, scrypt_n=2)
    stranger.set_password("bob@a.test", "bob-pw")
    assert mine.merge_from(stranger) == (1, 1)
    assert mine.verify("bob@a.test", "bob-pw") and mine.secret("bob@a.test") is None


def test_hand_over_gives_the_state_to_the_mail_user(tmp_path) -> None:
    """hand_over (twistd --uid) gives state_dir and everything in it, symbolic links not
    followed, to the user; switch_ids is None without --uid and names the user's group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change owners")
    state = tmp_path / "var"
    (state / "run").mkdir(parents=True)
    (state / "run" / "server.lock").write_text("1\n")
    outside = tmp_path / "outside"
    outside.write_text("x")
    (state / "link").symlink_to(outside)
    changed = hand_over(state, 65534, 65534)
    assert changed == 4
    for path in (state, state / "run", state / "run" / "server.lock"):
        assert path.stat().st_uid == 65534
    assert os.lstat(state / "link").st_uid == 65534 and outside.stat().st_uid == 0
    assert switch_ids({"uid": None, "gid": None}) is None
    assert switch_ids({"uid": 0, "gid": None}) is None
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert switch_ids({"uid": nobody.pw_uid, "gid": None, "euid": False}) == (
        nobody.pw_uid, nobody.pw_gid)


def test_incremental_takes_what_changed_since(tmp_path) -> None:
    """--since: an incremental backup holds the files created or renamed after the time given
    (a new message, one moved to cur/ by a POP3 session), not the unchanged ones, and still
    lists every folder; verify accepts it; --since with a word that is no time is refused."""
    import time

    state = tmp_path / "var"
    box = maildir(state)
    (box / "new" / "100.M1P1.host").write_bytes(b"old\n")
    (box / "new" / "101.M1P1.host").write_bytes(b"read later\n")
    since = time.time()
    while time.time() < since + 0.05:  # past the file system's coarse clock
        pass
    (box / "new" / "102.M1P1.host").write_bytes(b"new\n")
    os.rename(box / "new" / "101.M1P1.host", box / "cur" / "101.M1P1.host:2,S")
    archive = tmp_path / "inc.tar"
    bk.backup(make_config(state), str(archive), since=str(since + 0.02), out=io.StringIO())
    manifest = bk.verify(str(archive), out=io.StringIO())
    assert sorted(bk.iter_manifest_paths(manifest)) == [
        f"mailroot/{DOMAIN}/ted/cur/101.M1P1.host:2,S", f"mailroot/{DOMAIN}/ted/new/102.M1P1.host"]
    assert f"mailroot/{DOMAIN}/ted/tmp" in manifest["dirs"]
    with pytest.raises(AdminError, match="--since"):
        bk.backup(make_config(state), str(tmp_path / "x.tar"), since="yesterday")


def test_imap_folders_flags_and_uids_survive_backup_and_restore(tmp_path) -> None:
    """A mailbox with IMAP folders (Maildir++ ``.Sent``, nested ``.a.b``, ``maildirfolder``),
    flags in ``:2,`` names, keywords (``dovecot-keywords``), subscriptions and each folder's
    ``dovecot-uidlist``: restored into an empty state, every file comes back as it was, and
    the folder store reads the same UIDVALIDITY, UIDs and flags; a second restore adds no
    duplicate, and a message whose flags changed since (renamed in a folder) is not doubled."""
    from pop3coexist.store.folders import MaildirFolders
    from pop3coexist.store.maildir import MaildirStore

    src = tmp_path / "src"
    store = MaildirStore(src / "mailroot")
    store.add_domain(DOMAIN)
    store.add_mailbox(DOMAIN, "ted")
    account = MaildirFolders(store).open_account(DOMAIN, "ted")
    account.ensure_special_folders()
    account.create("a.b")
    account.subscribe("a.b", True)
    account.append("INBOX", b"Subject: i\r\n\r\ninbox\r\n", ["\\Seen"], 1.7e9)
    account.append("Sent", b"Subject: s\r\n\r\nsent\r\n", ["\\Seen", "\\Answered"], 1.7e9)
    account.append("a.b", b"Subject: n\r\n\r\nnested\r\n", ["$Forwarded", "\\Flagged"], 1.7e9)
    before = {name: [(m.uid, m.flags) for m in account.open_folder(name).sync()]
              for name in account.list_folders()}
    validity = {name: account.open_folder(name).uidvalidity for name in account.list_folders()}
    box = src / "mailroot" / DOMAIN / "ted"
    files = {str(p.relative_to(box)): p.read_bytes() for p in box.rglob("*")
             if p.is_file() and not p.name.endswith(".lock")}
    assert ".a.b/dovecot-keywords" in files and ".a.b/maildirfolder" in files
    assert ".Sent/dovecot-uidlist" in files and "subscriptions" in files
    archive = tmp_path / "a.tar"
    bk.backup(make_config(src), str(archive), out=io.StringIO())

    dst = tmp_path / "dst"
    summary = bk.restore(make_config(dst), str(archive), out=io.StringIO())
    dbox = dst / "mailroot" / DOMAIN / "ted"
    got = {str(p.relative_to(dbox)): p.read_bytes() for p in dbox.rglob("*") if p.is_file()}
    assert got == files and summary.kept == []
    dstore = MaildirStore(dst / "mailroot")
    again = MaildirFolders(dstore).open_account(DOMAIN, "ted")
    assert again.list_folders() == list(before)
    assert {n: [(m.uid, m.flags) for m in again.open_folder(n).sync()] for n in before} == before
    assert {n: again.open_folder(n).uidvalidity for n in before} == validity
    assert "a.b" in again.subscriptions()

    view = again.open_folder("a.b")  # a flag change since the backup renames the file
    view.set_flags(view.sync()[0], {"\\Seen"})
    second = bk.restore(make_config(dst), str(archive), out=io.StringIO())
    assert second.duplicates == 3 and second.restored == 0
    assert len(list((dbox / ".a.b" / "cur").iterdir())) == 1
