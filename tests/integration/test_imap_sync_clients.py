"""Mail programs that keep state across runs, against the real server and against Dovecot's imapd
(the ``target`` fixture of test_imap_clients.py): ``mbsync`` (isync) syncing a mailbox both
ways twice, ``neomutt`` in batch mode (under a pseudo-terminal: it is a screen program) reading
and moving mail; then, on our server, the same mailbox read over POP3 and by Dovecot pointed at
our Maildir gives the same messages and flags; and the POP3/IMAP coexistence rules seen by a
real IDLEing imaplib session. Passwords reach the programs through files of mode 0600.
"""

from __future__ import annotations

import email
import imaplib
import os
import poplib
import pty
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_imap_clients import TARGETS, crlf, login, message, ok, wait_untagged
from tests.support.dovecot import Dovecot, give_to_nobody, make_root
from tests.support.imap_targets import ImapTarget, dovecot_for_module, ours_for_module
from tests.support.programs import require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

@pytest.fixture(scope="module")
def _dovecot():
    yield from dovecot_for_module()


@pytest.fixture(scope="module")
def _ours():
    yield from ours_for_module(pool_size=4)


@pytest.fixture(params=TARGETS)
def target(request) -> ImapTarget:
    """The server under test: ours or Dovecot's (one module-wide instance of each)."""
    return request.getfixturevalue("_ours" if request.param == "pop3coexist" else "_dovecot")


SYSTEM_FLAGS = {"\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft"}


def snapshot(target_port: int, address: str, password: str) -> dict[str, dict[str, frozenset]]:
    """Every folder of the mailbox over IMAP: {folder: {Message-ID: system flags}} (a folder
    with two messages of one Message-ID fails: a duplicate)."""
    m = imaplib.IMAP4("127.0.0.1", target_port, timeout=30)
    m.login(address, password)
    out: dict[str, dict[str, frozenset]] = {}
    for line in ok(m.list('""', "*")):
        name = re.search(rb'"[./]" "?([^"]*)"?$', line).group(1).decode()
        if b"\\Noselect" in line:
            continue
        count = int(ok(m.select(f'"{name}"', readonly=True))[0])
        box: dict[str, frozenset] = {}
        if count:
            for item in ok(m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")):
                if not isinstance(item, tuple):
                    continue
                msgid = email.message_from_bytes(item[1])["Message-ID"]
                flags = frozenset(f for f in re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()
                                  if f in SYSTEM_FLAGS)
                assert msgid not in box, f"duplicate {msgid} in {name}"
                box[msgid] = flags
        out[name] = box
    m.logout()
    return {k: v for k, v in out.items() if v or k == "INBOX"}


def local_maildir(path: Path) -> dict[str, frozenset]:
    """{Message-ID: flags} of a Maildir folder on disk (maildir(5) info letters)."""
    letters = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered", "T": "\\Deleted", "D": "\\Draft"}
    out = {}
    for sub in ("new", "cur"):
        for f in (path / sub).iterdir():
            msgid = email.message_from_bytes(f.read_bytes())["Message-ID"]
            assert msgid not in out, f"duplicate {msgid} in {path}"
            info = f.name.partition(":2,")[2]
            out[msgid] = frozenset(letters[c] for c in info if c in letters)
    return out


# --------------------------------------------------------------------------- mbsync


def mbsync(target: ImapTarget, work: Path, address: str) -> str:
    exe = require_program("mbsync")
    rc = work / "mbsyncrc"
    if not rc.exists():
        (work / "pass").touch(mode=0o600)
        (work / "pass").write_text(target.password)
        (work / "local").mkdir()
        rc.write_text(f"""IMAPAccount acc
Host localhost
Port {target.tls_port}
User {address}
PassCmd "cat {work}/pass"
SSLType IMAPS
CertificateFile {target.cafile}
AuthMechs LOGIN

IMAPStore remote
Account acc

MaildirStore local
Path {work}/local/
Inbox {work}/local/INBOX
SubFolders Verbatim

Channel ch
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""")
    r = subprocess.run([exe, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert target.password not in r.stdout + r.stderr
    return r.stdout


def local_drop(folder: Path, n: int, flags: str = "") -> str:
    """A message written into the local Maildir as a mail program would (cur/ with flags)."""
    data = message(n, subject=f"local {n}")
    msgid = email.message_from_bytes(data)["Message-ID"]
    name = f"{int(time.time())}.L{n}.local:2,{flags}"
    (folder / "cur" / name).write_bytes(data)
    return msgid


def test_mbsync_two_way_twice(target, tmp_path):
    """mbsync (isync) syncs both ways twice: the server's messages arrive locally; messages
    and a folder made locally, flags set locally and on the server, a deletion on each side
    all reach the other side; a third run changes nothing; no duplicate, no loss, the same
    messages and flags on both sides."""
    address = target.new_mailbox([message(i) for i in range(1, 5)])
    work = tmp_path / "mbsync"
    work.mkdir()
    mbsync(target, work, address)
    local = work / "local"
    remote = snapshot(target.port, address, target.password)
    assert local_maildir(local / "INBOX") == remote["INBOX"] and len(remote["INBOX"]) == 4
    # round two: changes on both sides
    first = sorted((local / "INBOX" / "new").iterdir())[0]  # read locally: into cur/, S
    os.rename(first, local / "INBOX" / "cur" / (first.name.rsplit(":2,", 1)[0] + ":2,S"))
    mine = local_drop(local / "INBOX", 10, "F")
    (local / "Projects").mkdir()
    for sub in ("cur", "new", "tmp"):
        (local / "Projects" / sub).mkdir()
    project = local_drop(local / "Projects", 11, "S")
    target.drop(address, message(20, subject="arrived meanwhile"))
    m = login(target, address)
    ok(m.select("INBOX"))
    ok(m.store("2", "+FLAGS", "(\\Flagged)"))
    ok(m.store("3", "+FLAGS", "(\\Deleted)"))
    ok(m.expunge())
    m.logout()
    mbsync(target, work, address)
    remote = snapshot(target.port, address, target.password)
    assert local_maildir(local / "INBOX") == remote["INBOX"]
    assert len(remote["INBOX"]) == 5 and remote["INBOX"][mine] == {"\\Flagged"}
    assert sorted(map(sorted, remote["INBOX"].values())).count(["\\Seen"]) == 1
    assert remote["Projects"] == {project: frozenset({"\\Seen"})}
    assert local_maildir(local / "Projects") == remote["Projects"]
    # round three: nothing changed, nothing moves
    mbsync(target, work, address)
    assert snapshot(target.port, address, target.password) == remote
    assert local_maildir(local / "INBOX") == remote["INBOX"]


# --------------------------------------------------------------------------- neomutt


def neomutt(target: ImapTarget, work: Path, address: str, keys: str, deadline: float = 60) -> bytes:
    """Run neomutt on the mailbox (IMAPS, the CA checked) under a pseudo-terminal with
    ``keys`` pushed; return its screen output once it has quit."""
    exe = require_program("neomutt")
    rc = work / "muttrc"
    rc.touch(mode=0o600)
    rc.write_text(f'''set imap_user = "{address}"
set imap_pass = "{target.password}"
set folder = "imaps://localhost:{target.tls_port}/"
set spoolfile = "+INBOX"
set ssl_ca_certificates_file = "{target.cafile}"
set header_cache = ""
set message_cachedir = ""
set confirmappend = no
set confirmcreate = no
set wait_key = no
set quit = yes
set delete = yes
set move = no
set mark_old = no
set pipe_decode = no
set sort = date-received
push "{keys}"
''')
    pid, fd = pty.fork()
    if pid == 0:  # the child: neomutt on the terminal
        os.execve(exe, [exe, "-n", "-F", str(rc)], dict(os.environ, TERM="xterm", HOME=str(work)))
    out = b""
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                assert os.waitstatus_to_exitcode(status) == 0, out[-2000:]
                break
        else:
            raise AssertionError(f"neomutt still running after {deadline}s: {out[-2000:]!r}")
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert target.password.encode() not in out
    return out


def test_neomutt_reads_and_moves(target, tmp_path):
    """neomutt over IMAPS reads a message (piped out byte for byte) and moves the tagged
    messages whose subject matches into a folder it creates (save, then sync deletes and
    expunges them in INBOX)."""
    first = message(1, subject="apples 1")
    address = target.new_mailbox([first, message(2, subject="pears"), message(3, subject="apples 2")])
    work = tmp_path / "neomutt"
    work.mkdir()
    out = work / "read.eml"
    neomutt(target, work, address, f"<pipe-message>cat > {out}<enter><tag-pattern>~s apples<enter>"
            "<tag-prefix><save-message>=Archive<enter><sync-mailbox><quit>")
    assert email.message_from_bytes(out.read_bytes())["Subject"] == "apples 1"
    assert email.message_from_bytes(out.read_bytes()).get_payload() == email.message_from_bytes(first).get_payload()
    snap = snapshot(target.port, address, target.password)
    subjects = {}
    m = login(target, address)
    for folder in ("INBOX", "Archive"):
        ok(m.select(folder, readonly=True))
        subjects[folder] = sorted(email.message_from_bytes(p[1])["Subject"] for p in
                                  ok(m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")) if isinstance(p, tuple))
    m.logout()
    assert subjects == {"INBOX": ["pears"], "Archive": ["apples 1", "apples 2"]}, subjects
    assert len(snap["INBOX"]) == 1 and len(snap["Archive"]) == 2


# --------------------------------------------------------------------------- one Maildir, three readers


def pop3_view(port: int, address: str, password: str) -> dict[str, str]:
    """{Message-ID: UIDL} of INBOX over POP3 (poplib, USER/PASS); nothing deleted."""
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    p.user(address)
    p.pass_(password)
    out = {}
    for entry in p.uidl()[1]:
        n, uidl = entry.decode().split()
        top = b"\r\n".join(p.top(int(n), 0)[1])
        out[email.message_from_bytes(top)["Message-ID"]] = uidl
    p.quit()
    return out


@pytest.mark.parametrize("target", ["pop3coexist"], indirect=True)
def test_same_maildir_over_pop3_and_dovecot(target, tmp_path):
    """After IMAP work on our server (flags, a folder, a move, an append), the same mailbox read
    over our POP3 has INBOX's messages (UIDLs unchanged by the IMAP reads), and Dovecot's imapd
    pointed at our Maildir sees the same folders, messages and flags as our IMAP."""
    address = target.new_mailbox([message(i) for i in range(1, 5)])
    srv_pop3 = target.pop3_port
    before = pop3_view(srv_pop3, address, target.password)
    m = login(target, address)
    ok(m.create("Archive"))
    ok(m.select("INBOX"))
    ok(m.fetch("1", "(BODY[])"))  # \Seen
    ok(m.store("2", "+FLAGS", "(\\Flagged \\Answered)"))
    ok(m._simple_command("MOVE", "4", "Archive"))
    ok(m.append("Archive", "(\\Draft)", None, crlf(message(9))))
    m.logout()
    ours = snapshot(target.port, address, target.password)
    after = pop3_view(srv_pop3, address, target.password)
    assert set(after) == set(ours["INBOX"])
    assert all(after[k] == before[k] for k in after), "a UIDL changed"
    root = make_root()
    try:
        mailroot = target.maildir(address).parent.parent
        give_to_nobody(target.maildir(address))
        os.chmod(mailroot, 0o755)
        os.chmod(mailroot / address.partition("@")[2], 0o755)
        with Dovecot(root, {}, protocols=("imap",), static_password=target.password,
                     mail_root=mailroot, autocreate=False) as dv:
            theirs = snapshot(dv.ports["imap"], address, target.password)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert theirs == ours
    assert pop3_view(srv_pop3, address, target.password) == after  # Dovecot's reads changed no UIDL


# --------------------------------------------------------------------------- POP3 and IMAP together


@pytest.mark.parametrize("target", ["pop3coexist"], indirect=True)
def test_pop3_delete_reaches_idle_session(target):
    """A message deleted over POP3 (DELE, QUIT) is announced to an IDLEing imaplib session as
    ``* n EXPUNGE``; a message read and flagged over IMAP keeps its POP3 UIDL."""
    address = target.new_mailbox([message(1), message(2), message(3)])
    before = pop3_view(target.pop3_port, address, target.password)
    m = login(target, address)
    ok(m.select("INBOX"))
    ok(m.fetch("1:*", "(BODY[])"))
    ok(m.store("3", "+FLAGS", "(\\Flagged)"))
    m.send(b"I1 IDLE\r\n")
    assert m.readline().startswith(b"+")
    p = poplib.POP3("127.0.0.1", target.pop3_port, timeout=30)
    p.user(address)
    p.pass_(target.password)
    uidls = {n.split()[1]: int(n.split()[0]) for n in (x.decode() for x in p.uidl()[1])}
    assert set(uidls) == set(before.values())  # IMAP's reads kept every UIDL
    p.dele(2)
    p.quit()
    assert wait_untagged(m, rb"\* 2 EXPUNGE")
    m.send(b"DONE\r\n")
    assert wait_untagged(m, rb"I1 OK")
    assert ok(m.search(None, "ALL")) == [b"1 2"]
    m.logout()
