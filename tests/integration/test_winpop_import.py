"""``pop3coexist-admin import winpop`` on a generated Windows Server 2003 POP3 store.

The test builds ``MAILROOT/<domain>/P3_<mailbox>.mbx/*.eml`` as a copy of the Windows store
looks on Linux: 3 domains, folder and file names in mixed and upper case, CRLF files, the
service's lock files, 1,000 messages whose file times do not follow their names (and some
that share a time), one file the importing user cannot read. The import runs as the mail
user that owns state_dir (so that file really is unreadable); the real server then serves the
mailboxes over POP3.
"""

from __future__ import annotations

import os
import poplib
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.privilege import shared_dir, system_user, user_python
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Winpop-pw-1"
LAYOUT = {  # domain folder -> mailbox folders (names as the copy has them)
    "Contoso.TEST": ["P3_Alice.mbx", "P3_BOB.MBX", "p3_carol.mbx"],
    "FABRIKAM.test": ["P3_Dave.Mbx", "P3_ERIN.mbx"],
    "northwind.test": ["P3_Frank.mbx", "P3_GRACE.MBX"],
}
TOTAL = 1000


@dataclass
class Source:
    address: str
    path: Path
    mtime: int
    data: bytes
    readable: bool = True


def build_store(root: Path) -> dict[str, list[Source]]:
    """The Windows tree; returns each mailbox's messages in the order POP3 must list them."""
    rng = random.Random(15)
    boxes = [(d, m) for d, ms in LAYOUT.items() for m in ms]
    out: dict[str, list[Source]] = {}
    for n in range(TOTAL):
        domain, mbx = boxes[n % len(boxes)]
        folder = root / domain / mbx
        folder.mkdir(parents=True, exist_ok=True)
        address = f"{mbx[3:-4].lower()}@{domain.lower()}"
        name = f"P3{rng.randrange(10**6):06d}{n}.{'EML' if n % 3 else 'eml'}"
        lines = [f"From: sender{n}@example.test", f"Subject: winpop {n}", "",
                 *(f"line {k} of message {n} " + "z" * (n % 50) for k in range(n % 17 + 1))]
        data = ("\r\n".join(lines) + "\r\n").encode()
        path = folder / name
        path.write_bytes(data)
        mtime = 1_100_000_000 + rng.randrange(0, 400) * 60  # shared times happen
        os.utime(path, (mtime, mtime))
        out.setdefault(address, []).append(Source(address, path, mtime, data))
    for domain, mbxs in LAYOUT.items():
        (root / domain / mbxs[0] / "mailbox.lck").write_bytes(b"")  # the service's lock file
    victim = out["bob@contoso.test"][3]
    victim.path.chmod(0o000)  # owned by root: the mail user cannot read it
    victim.readable = False
    for sources in out.values():
        sources.sort(key=lambda s: (s.mtime, s.path.name.lower()))
    return out


def run_import(srv, user, *args: str) -> subprocess.CompletedProcess:
    """The real pop3coexist-admin, run as the mail user that owns state_dir."""
    python, env = user_python(user)
    return subprocess.run([python, "-m", "pop3coexist.admin.cli", "-c", str(srv.config_path),
                           "import", "winpop", *args], capture_output=True, text=True,
                          timeout=600, env=env, user=user.uid, group=user.gid, extra_groups=[],
                          cwd="/")


def pop3_mailbox(port: int, address: str) -> tuple[int, int, list[bytes]]:
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    p.user(address)
    p.pass_(PASSWORD)
    count, octets = p.stat()
    bodies = [b"\r\n".join(p.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    p.quit()
    return count, octets, bodies


def test_import_winpop_store(tmp_path) -> None:
    """The import creates the 3 domains and 7 mailboxes (lower-case names); each mailbox then
    has, over POP3, exactly the readable messages of its Windows folder: the same count, the
    same octets (STAT) and the same bytes, in the order of their file times (name order for a
    shared time); lock files are skipped; the unreadable file is reported (exit 1) and
    skipped. A dry run writes nothing; a second run copies nothing; a third run after POP3
    deleted messages does not bring them back (the ledger)."""
    user = system_user()
    with shared_dir("winpop-") as root:
        winroot = root / "MAILROOT"
        expected = build_store(winroot)
        passwords = root / "passwords.txt"
        passwords.write_text("".join(f"{a}\t{PASSWORD}\n" for a in expected))
        srv = make_server(root / "srv", tls=False)
        srv.write_config()
        srv.state_dir.mkdir()
        os.chown(srv.state_dir, user.uid, user.gid)

        dry = run_import(srv, user, str(winroot), "--dry-run", "--passwords", str(passwords))
        assert dry.returncode == 1, dry.stderr  # the unreadable file is named
        assert "cannot read" in dry.stderr and "would copy 999 messages" in dry.stdout, dry.stdout
        assert list(srv.state_dir.iterdir()) == []

        started = time.monotonic()
        first = run_import(srv, user, str(winroot), "--passwords", str(passwords))
        took = time.monotonic() - started
        assert first.returncode == 1, first.stderr
        assert first.stderr.count("cannot read") == 1 and "skipped" in first.stderr
        assert "copied 999 messages" in first.stdout, first.stdout
        assert first.stderr.strip().splitlines()[-1].startswith("pop3coexist-admin: error: 1 file")
        second = run_import(srv, user, str(winroot), "--passwords", str(passwords))
        assert "copied 0 messages" in second.stdout and "999 already imported" in second.stdout
        for path in srv.state_dir.rglob("*"):
            assert path.stat().st_uid == user.uid, path
        srv.start()
        try:
            port = srv.port("pop3")
            for address, sources in expected.items():
                readable = [s for s in sources if s.readable]
                count, octets, bodies = pop3_mailbox(port, address)
                assert count == len(readable), address
                assert octets == sum(len(s.data) for s in readable), address
                assert bodies == [s.data for s in readable], f"{address}: bytes or order differ"
            print(f"imported {sum(len(v) for v in expected.values()) - 1} messages "
                  f"({sum(len(s.data) for v in expected.values() for s in v if s.readable)} "
                  f"bytes) into {len(expected)} mailboxes of {len(LAYOUT)} domains in "
                  f"{took:.1f} s")
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            p.user("alice@contoso.test")
            p.pass_(PASSWORD)
            kept = p.stat()[0]
            p.dele(1)
            p.dele(2)
            p.quit()
            third = run_import(srv, user, str(winroot), "--passwords", str(passwords))
            assert "copied 0 messages" in third.stdout, third.stdout
            count, _, _ = pop3_mailbox(port, "alice@contoso.test")
            assert count == kept - 2
        finally:
            srv.stop_cleanly(PASSWORD)
