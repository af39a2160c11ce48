"""Real SMTP clients against the real server (twistd) on OS-picked loopback ports.

The client x mechanism x transport matrix: swaks (AUTH PLAIN, LOGIN, CRAM-MD5 over clear
text, STARTTLS and TLS on connect; --pipeline), msmtp (STARTTLS + AUTH), curl smtp:// and
smtps://, Python smtplib; a message sent by SMTP comes back from POP3 byte for byte (plus the
Return-Path and Received fields); a 50 MB message does not grow the server's memory by anything like 50 MB;
a burst from smtp-source is all delivered. Passwords go through files or the environment,
never argv.
"""

from __future__ import annotations

import itertools
import os
import poplib
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Sm7p pass-word"
TED = f"ted@{HOSTNAME}"
ANN = f"ann@{HOSTNAME}"
_n = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server with mailboxes ted and ann (same password)."""
    srv = make_server(tmp_path_factory.mktemp("smtp-clients"),
                      smtp_config='max_message_size = "60MB"\nmax_connections_per_client = 100')
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.add_mailbox(ANN, PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def new_dir(server, address: str) -> Path:
    return server.state_dir / "mailroot" / HOSTNAME / address.split("@")[0] / "new"


def find(server, address: str, marker: str, timeout: float = 10.0) -> list[Path]:
    """The messages in ``address``'s new/ that contain ``marker``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in new_dir(server, address).iterdir() if marker.encode() in p.read_bytes()]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def message(marker: str, to: str = ANN) -> bytes:
    return (f"From: {TED}\r\nTo: {to}\r\nSubject: {marker}\r\n\r\nbody of {marker}\r\n"
            f".leading dot\r\n").encode()


def test_smtplib_to_pop3_byte_for_byte(server) -> None:
    """smtplib sends; POP3 RETR gives back exactly the client's bytes after our Return-Path and
    Received fields."""
    marker = f"exact-{next(_n)}"
    body = message(marker, TED) + b"8bit: \xc3\xa9t\xc3\xa9\r\n\r\n\r\n"
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test") as s:
        s.ehlo()
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("dsn")
        s.sendmail("someone@example.test", [TED], body, mail_options=["BODY=8BITMIME"])
    pop = poplib.POP3("127.0.0.1", server.port("pop3"))
    pop.user(TED)
    pop.pass_(PASSWORD)
    count, _ = pop.stat()
    got = None
    for i in range(1, count + 1):
        _, lines, _ = pop.retr(i)
        raw = b"\r\n".join(lines) + b"\r\n"
        if marker.encode() in raw:
            got = raw
    pop.quit()
    assert got is not None
    header, sep, rest = got.partition(b"From: ")
    assert header.startswith(b"Return-Path: <someone@example.test>\r\n"
                             b"Received: from client.test ([127.0.0.1])\r\n\tby pop.contoso.test "
                             b"(pop3coexist) with ESMTP id ")
    assert b"From: " + rest == body


def test_smtplib_starttls_auth_submission(server) -> None:
    """smtplib on the submission port: STARTTLS, AUTH LOGIN, send as own address."""
    marker = f"sub-{next(_n)}"
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    with smtplib.SMTP("127.0.0.1", server.port("submission"), local_hostname="client.test") as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail(TED, [ANN], message(marker))
        assert e.value.smtp_code == 530
        s.starttls(context=ctx)
        s.ehlo()
        assert "STARTTLS" not in s.esmtp_features and "starttls" not in s.esmtp_features
        s.login(TED, PASSWORD)
        s.sendmail(TED, [ANN], message(marker))
    [path] = find(server, ANN, marker)
    assert b" with ESMTPSA (TLSv1." in path.read_bytes()


SWAKS_TRANSPORTS = {"clear": ("smtp", []), "starttls": ("submission", ["--tls"]),
                    "tls-on-connect": ("smtps", ["--tls-on-connect"])}


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("transport", sorted(SWAKS_TRANSPORTS))
def test_swaks_auth_matrix(server, mech: str, transport: str) -> None:
    """swaks logs in with each mechanism over each transport and the message arrives."""
    swaks = require_program("swaks")
    role, flags = SWAKS_TRANSPORTS[transport]
    marker = f"swaks-{mech}-{transport}-{next(_n)}"
    env = dict(os.environ, SWAKS_OPT_auth_password=PASSWORD)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port(role)), "--helo", "client.test",
         "--from", TED, "--to", ANN, "--auth", mech, "--auth-user", TED,
         "--header", f"Subject: {marker}", "--body", f"body {marker}", *flags],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert PASSWORD not in result.stdout
    [path] = find(server, ANN, marker)
    keyword = {"clear": b"ESMTPA", "starttls": b"ESMTPSA", "tls-on-connect": b"ESMTPSA"}[transport]
    assert b" with " + keyword + b" " in path.read_bytes()


def test_swaks_pipeline_and_bad_auth(server) -> None:
    """swaks --pipeline sends a pipelined transaction; a wrong password gets 535 5.7.8."""
    swaks = require_program("swaks")
    marker = f"pipe-{next(_n)}"
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("smtp")), "--pipeline",
         "--from", "x@example.test", "--to", f"{TED},{ANN}", "--header", f"Subject: {marker}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert len(find(server, TED, marker)) == 1 and len(find(server, ANN, marker)) == 1
    t = os.stat(find(server, TED, marker)[0])
    assert t.st_nlink >= 2  # single-instance: one file, two links
    env = dict(os.environ, SWAKS_OPT_auth_password="wrong")
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("submission")), "--tls",
         "--from", TED, "--to", ANN, "--auth", "PLAIN", "--auth-user", TED],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout


def test_msmtp_starttls_auth(server, tmp_path) -> None:
    """msmtp with STARTTLS (certificate verified) and AUTH delivers to a local mailbox."""
    msmtp = require_program("msmtp")
    marker = f"msmtp-{next(_n)}"
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"account default\nhost localhost\nport {server.port('submission')}\n"
        f"tls on\ntls_starttls on\ntls_trust_file {server.certs.ca_cert}\n"
        f"auth on\nuser {TED}\npasswordeval cat {secret}\nfrom {TED}\n"
    )
    rc.chmod(0o600)
    result = subprocess.run([msmtp, "-C", str(rc), ANN], input=message(marker), capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(find(server, ANN, marker)) == 1


def test_curl_smtp_and_smtps(server, tmp_path) -> None:
    """curl smtp:// (anonymous, to a local mailbox) and smtps:// with a netrc log-in."""
    curl = require_program("curl")
    marker = f"curl-{next(_n)}"
    mail = tmp_path / "mail.eml"
    mail.write_bytes(message(marker))
    result = subprocess.run(
        [curl, "-sS", "--url", f"smtp://127.0.0.1:{server.port('smtp')}", "--mail-from",
         "x@example.test", "--mail-rcpt", ANN, "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(find(server, ANN, marker)) == 1
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine localhost login {TED} password \"{PASSWORD}\"\n")
    netrc.chmod(0o600)
    marker2 = f"curls-{next(_n)}"
    mail.write_bytes(message(marker2))
    result = subprocess.run(
        [curl, "-sS", "--url", f"smtps://localhost:{server.port('smtps')}", "--cacert",
         str(server.certs.ca_cert), "--netrc-file", str(netrc), "--mail-from", TED,
         "--mail-rcpt", ANN, "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(find(server, ANN, marker2)) == 1


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_50mb_message_streams(server) -> None:
    """A 50 MB message is accepted while the server's peak memory grows by far less."""
    if not Path(f"/proc/{server.proc.pid}/status").exists():
        pytest.skip("needs /proc")
    before = _peak_rss_kb(server.proc.pid)
    marker = f"big-{next(_n)}"
    line = b"0123456789" * 7 + b"abcdef\r\n"
    body = message(marker) + line * (50 * 1000 * 1000 // len(line))
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        s.sendmail("x@example.test", [TED], body)
    after = _peak_rss_kb(server.proc.pid)
    [path] = find(server, TED, marker, timeout=1) or [None]
    assert path is not None and path.stat().st_size > 50 * 1000 * 1000 * 78 // 80
    print(f"peak RSS before {before} kB, after {after} kB")
    assert after - before < 20 * 1024, f"peak RSS grew by {after - before} kB"


def test_smtp_source_burst(server) -> None:
    """smtp-source: 20 parallel sessions, 400 messages of 4 KB, every one delivered."""
    source = require_program("smtp-source", "/usr/sbin/smtp-source")
    box = new_dir(server, "ann@x")
    before = len(list(box.iterdir()))
    start = time.monotonic()
    result = subprocess.run(
        [source, "-s", "20", "-m", "400", "-l", "4096", "-f", "x@example.test", "-t", ANN,
         f"127.0.0.1:{server.port('smtp')}"], capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert len(list(box.iterdir())) - before == 400
    print(f"smtp-source: 400 messages in {elapsed:.2f}s ({400 / elapsed:.0f}/s)")
