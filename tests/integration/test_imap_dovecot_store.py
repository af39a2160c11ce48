"""The IMAP store's files are Dovecot's own: Dovecot's imap binary (PREAUTH, a private config,
mail as ``nobody``) pointed at a mailbox our store wrote sees the same folders (a modified
UTF-7 name included), the same UIDVALIDITY and UIDs, and the same flags and keywords; and what
Dovecot then changes (a flag, an expunge, an APPEND) our store reads back with the same UIDs."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pop3coexist.store.folders import MaildirFolders
from pop3coexist.store.maildir import MaildirStore
from tests.support.dovecot import make_root
from tests.support.programs import require_program

pytestmark = pytest.mark.integration

HOST = "pop.contoso.test"
IMAP_BINARY = "/usr/lib/dovecot/imap"  # Debian's dovecot-imapd


def _dovecot_imap(root: Path, maildir: Path, commands: list[str]) -> str:
    """Run Dovecot's imap in PREAUTH mode over a pipe; the transcript."""
    binary = require_program(IMAP_BINARY)  # missing: skipped locally, a failure in CI
    conf = root / "dovecot.conf"
    conf.write_text(
        "protocols =\nssl = no\nlog_path = /dev/stderr\n"
        f"mail_location = maildir:{maildir}\n"
        "mail_uid = nobody\nmail_gid = nogroup\nfirst_valid_uid = 1\nfirst_valid_gid = 1\n"
        "userdb {\n  driver = static\n  args = home=" + str(root / "home") + "\n}\n"
        "passdb {\n  driver = static\n  args = nopassword=y\n}\n")
    (root / "home").mkdir(exist_ok=True)
    nobody = pwd.getpwnam("nobody")
    parents = [p for p in maildir.parents if root in p.parents]  # the folders down to it
    for path in [root / "home", *parents, maildir, *maildir.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    script = "".join(f"a{i} {c}\r\n" for i, c in enumerate(commands)) + "z LOGOUT\r\n"
    env = {"USER": "ted", "HOME": str(root / "home"), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([binary, "-c", str(conf)], input=script.encode(),
                         capture_output=True, env=env, timeout=30)
    text = out.stdout.decode("utf-8", "replace")
    assert "z OK" in text, text + out.stderr.decode("utf-8", "replace")
    return text


@pytest.fixture
def place():  # noqa: ANN201
    if os.geteuid() != 0:
        pytest.skip("Dovecot's imap drops to nobody: needs root")
    root = make_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_dovecot_reads_what_we_wrote_and_we_read_what_it_changed(place: Path) -> None:
    """Same folders, UIDVALIDITY, UIDs, flags and keywords in both directions."""
    store = MaildirStore(place / "mailroot")
    store.add_domain(HOST)
    store.add_mailbox(HOST, "ted")
    for n in range(3):
        store.deliver_bytes(HOST, "ted", f"Subject: m{n}\n\nbody {n}\n".encode())
    account = MaildirFolders(store).open_account(HOST, "ted")
    account.ensure_special_folders()
    account.create("Lists.Caf&AOk-")
    inbox = account.open_folder("INBOX")
    msgs = inbox.sync()
    inbox.claim_recent(msgs)
    inbox.set_flags(msgs[0], {"\\Seen", "$Work"})
    inbox.set_flags(msgs[1], {"\\Flagged", "\\Answered"})
    account.append("Sent", b"Subject: sent\r\n\r\nx\r\n", ["\\Seen"], None)
    validity = inbox.uidvalidity
    maildir = store.mailbox_folder(HOST, "ted")

    text = _dovecot_imap(place, maildir, [
        'LIST "" "*"', "SELECT INBOX", "FETCH 1:* (UID FLAGS)",
        "STATUS Sent (MESSAGES UIDVALIDITY)",
        "UID STORE 3 +FLAGS (\\Deleted \\Draft)", "UID STORE 2 -FLAGS (\\Flagged)",
        "UID EXPUNGE 3", "APPEND INBOX (\\Seen) {20+}\r\nSubject: dove\r\n\r\nx\r\n",
    ])
    for name in ("INBOX", "Sent", "Drafts", "Trash", "Junk", "Lists.Caf&AOk-"):
        assert re.search(r'\* LIST \([^)]*\) "\." "?' + re.escape(name) + '"?\r\n', text), text
    assert f"[UIDVALIDITY {validity}]" in text
    assert "* 1 FETCH (UID 1 FLAGS (\\Seen $Work))" in text
    assert "* 2 FETCH (UID 2 FLAGS (\\Answered \\Flagged))" in text
    assert "* 3 FETCH (UID 3 FLAGS ())" in text
    sent = account.open_folder("Sent")
    assert f"* STATUS Sent (MESSAGES 1 UIDVALIDITY {sent.uidvalidity})" in text
    appended = re.search(r"\[APPENDUID (\d+) (\d+)\]", text)
    assert appended and int(appended.group(1)) == validity

    again = MaildirFolders(store).open_account(HOST, "ted").open_folder("INBOX")
    now = {m.uid: m.flags for m in again.sync()}
    assert again.uidvalidity == validity
    assert now == {1: {"\\Seen", "$Work"}, 2: {"\\Answered"},
                   int(appended.group(2)): {"\\Seen"}}
