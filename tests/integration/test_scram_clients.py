"""SCRAM-SHA-256 with real clients against the real server, and against Dovecot for comparison
(issue 16 item 6).

The matrix: mpop (GNU SASL, ``--auth=scram-sha-256``) against our POP3 and against Dovecot's;
msmtp (GNU SASL, ``auth scram-sha-256``) against our submission port; a client built on scramp
(the library the server uses) against our POP3, our SMTP AUTH and Dovecot's POP3. Dovecot's
passwd-file holds the same kind of salted keys as ours (made here with scramp), so both
servers verify the same client messages from keys alone. Passwords reach the programs through
files (passwordeval), never argv.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from scramp import ScramClient

from pop3coexist.identity.scram import derive_keys
from tests.support.dovecot import DovecotPop3, dovecot_scram_entry, make_root
from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration

TED = f"ted@{HOSTNAME}"
PASSWORD = "Scram-clients pw 9"
MESSAGE = b"From: a@example.test\nSubject: scram test\n\nbody\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Our server (password file; SCRAM keys made by `mailbox add`), no TLS."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("scram"), tls=False)
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


@pytest.fixture(scope="module")
def dovecot():
    """Dovecot POP3 with a passwd-file entry of SCRAM-SHA-256 keys for TED."""
    keys = derive_keys(PASSWORD)
    entry = dovecot_scram_entry(keys.salt, keys.iterations, keys.stored_key, keys.server_key)
    root = make_root()
    try:
        with DovecotPop3(root, {TED: entry}) as dc:
            yield dc
    finally:
        shutil.rmtree(root, ignore_errors=True)


def drop_message(maildir_new: Path, name: str) -> None:
    maildir_new.mkdir(parents=True, exist_ok=True)
    (maildir_new / name).write_bytes(MESSAGE)


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------- scramp client


class LineSocket:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data + b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def scramp_pop3(port: int, password: str) -> bytes:
    """Log in with AUTH SCRAM-SHA-256 driven by scramp; return the final reply line. The
    server's signature is checked (scramp raises when it is wrong)."""
    conn = LineSocket(port)
    try:
        assert conn.line().startswith(b"+OK")
        client = ScramClient(["SCRAM-SHA-256"], TED, password)
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
        reply = conn.line()
        assert reply.startswith(b"+ "), reply
        client.set_server_first(base64.b64decode(reply[2:].strip()).decode())
        conn.send(b64(client.get_client_final()))
        reply = conn.line()
        if reply.startswith(b"+ "):
            client.set_server_final(base64.b64decode(reply[2:].strip()).decode())
            conn.send(b"")
            reply = conn.line()
        conn.send(b"QUIT")
        return reply
    finally:
        conn.close()


def scramp_smtp(port: int, password: str) -> bytes:
    """SMTP AUTH SCRAM-SHA-256 driven by scramp; the final reply line."""
    conn = LineSocket(port)
    try:
        assert conn.line().startswith(b"220")
        conn.send(b"EHLO client.example.test")
        lines = []
        while True:
            line = conn.line()
            lines.append(line)
            if line[3:4] == b" ":
                break
        assert any(b"SCRAM-SHA-256" in line for line in lines), lines
        client = ScramClient(["SCRAM-SHA-256"], TED, password)
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
        reply = conn.line()
        assert reply.startswith(b"334 "), reply
        client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
        conn.send(b64(client.get_client_final()))
        reply = conn.line()
        if reply.startswith(b"334 "):
            client.set_server_final(base64.b64decode(reply[4:].strip()).decode())
            conn.send(b"")
            reply = conn.line()
        conn.send(b"QUIT")
        return reply
    finally:
        conn.close()


def test_password_file_entry_holds_keys_not_the_password(server):
    """`mailbox add` wrote SCRAM-SHA-256 keys (4096 iterations) for the account."""
    doc = json.loads((server.state_dir / "passwords.json").read_text())
    scram = doc["users"][TED]["scram"]
    assert scram["alg"] == "SCRAM-SHA-256" and scram["i"] == 4096
    assert PASSWORD not in json.dumps(doc)


def test_scramp_client_against_our_pop3_and_smtp(server):
    """A scramp client logs in to our POP3 (+OK) and SMTP (235 2.7.0), verifying the server's
    signature; a wrong password gets -ERR [AUTH] and 535 5.7.8."""
    assert scramp_pop3(server.port("pop3"), PASSWORD).startswith(b"+OK ted@pop.contoso.test")
    assert scramp_smtp(server.port("submission"), PASSWORD).startswith(b"235 2.7.0")
    assert scramp_pop3(server.port("pop3"), "wrong").startswith(b"-ERR [AUTH]")
    assert scramp_smtp(server.port("submission"), "wrong").startswith(b"535 5.7.8")


def test_scramp_client_against_dovecot(dovecot):
    """The same scramp client logs in to Dovecot with keys made by the same library: the
    comparison our server's exchange is measured against (same framing, same success)."""
    assert scramp_pop3(dovecot.port, PASSWORD).startswith(b"+OK")
    assert scramp_pop3(dovecot.port, "wrong").startswith(b"-ERR")


def run_mpop(port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    exe = require_program("mpop")
    maildir = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--host=127.0.0.1", f"--port={port}", f"--user={TED}", "--auth=scram-sha-256",
           f"--passwordeval=cat {secret_file(tmp_path)}", "--tls=off",
           f"--delivery=maildir,{maildir}", "--keep=off", "--only-new=off",
           "--received-header=off", "--timeout=30", "-q"]
    return subprocess.run(cmd, capture_output=True, timeout=90)


def test_mpop_scram_against_our_server(server, tmp_path):
    """mpop (GNU SASL) with --auth=scram-sha-256 retrieves and deletes our message; the log
    names the SCRAM-SHA-256 log-in."""
    drop_message(server.state_dir / "mailroot" / HOSTNAME / "ted" / "new", "1.mpop.test")
    result = run_mpop(server.port("pop3"), tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    got = list((tmp_path / "Maildir" / "new").iterdir())
    assert len(got) == 1 and b"Subject: scram test" in got[0].read_bytes()
    assert "by AUTH SCRAM-SHA-256: success" in server.log_text()


def test_mpop_scram_against_dovecot(dovecot, tmp_path):
    """mpop with --auth=scram-sha-256 retrieves a message from Dovecot the same way."""
    drop_message(dovecot.root / "mail" / HOSTNAME / "ted" / "new", "1.dovecot.test")
    subprocess.run(["chown", "-R", "nobody:", str(dovecot.root / "mail")], check=True)
    result = run_mpop(dovecot.port, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1


def test_msmtp_scram_against_our_submission(server, tmp_path):
    """msmtp (GNU SASL) with auth scram-sha-256 sends through our submission port; the
    message lands and the log names the SCRAM-SHA-256 log-in."""
    exe = require_program("msmtp")
    rc = tmp_path / "msmtprc"
    rc.write_text(f"account default\nhost 127.0.0.1\nport {server.port('submission')}\n"
                  f"tls off\nauth scram-sha-256\nuser {TED}\n"
                  f"passwordeval cat {secret_file(tmp_path)}\nfrom {TED}\n")
    rc.chmod(0o600)
    msg = b"From: ted@pop.contoso.test\nSubject: msmtp scram\n\nhello\n"
    result = subprocess.run([exe, "-C", str(rc), TED], input=msg, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SMTP AUTH ok for ted@pop.contoso.test" in server.log_text()
