"""Real POP3 clients against the real installed server (twistd), on OS-picked loopback ports.

Client x method x transport: Python poplib (USER/PASS, APOP, STLS, POP3S), curl (pop3:// with
USER/PASS and ;AUTH=+APOP, pop3s://), mpop (user, apop, cram-md5, plain; STARTTLS and TLS on
connect), fetchmail (proto apop). Passwords reach the clients through files (netrc, a
passwordeval command, an rcfile), never through argv.
"""

from __future__ import annotations

import itertools
import os
import poplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration

PASSWORD = "Corr3ct horse battery"
_counter = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server for the module; each test makes its own mailbox."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("pop3-clients"))
    srv.write_config()
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def make_message(n: int, body_lines: int = 3, crlf: bool = False) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    lines = [
        b"From: alice@example.test",
        f"To: user{n}@{HOSTNAME}".encode(),
        f"Subject: message {n}".encode(),
        f"Message-ID: <{n}.{time.time()}@example.test>".encode(),
        b"",
    ] + [f"line {i} of message {n}".encode() for i in range(body_lines)] + [b".a line starting with a dot", b""]
    return nl.join(lines)


def mailbox(server: ServerProcess, messages: int = 2, crlf: bool = False,
            password: str = PASSWORD) -> tuple[str, list[bytes]]:
    """Create a fresh mailbox with ``messages`` messages dropped straight into new/."""
    name = f"user{next(_counter)}"
    address = f"{name}@{HOSTNAME}"
    server.add_mailbox(address, password)
    new = server.state_dir / "mailroot" / HOSTNAME / name / "new"
    bodies = []
    for i in range(messages):
        data = make_message(i, crlf=crlf)
        (new / f"{1700000000 + i}.M{i}P1.foreign").write_bytes(data)
        bodies.append(data)
    return address, bodies


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def remaining(server: ServerProcess, address: str) -> int:
    name = address.split("@")[0]
    box = server.state_dir / "mailroot" / HOSTNAME / name
    return sum(1 for d in ("new", "cur") for f in (box / d).iterdir() if not f.name.startswith("."))


def login(server: ServerProcess, address: str, password: str = PASSWORD) -> poplib.POP3:
    """A clear-text poplib session logged in with USER/PASS."""
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    p.user(address)
    p.pass_(password)
    return p


def client_ctx(server: ServerProcess) -> ssl.SSLContext:
    assert server.certs is not None
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    return ctx


# --------------------------------------------------------------------------- poplib


def test_poplib_user_pass_retr_dele(server):
    """poplib USER/PASS: STAT, LIST, UIDL, RETR give the messages; DELE + QUIT removes them."""
    address, bodies = mailbox(server, 2)
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    assert p.getwelcome().startswith(b"+OK")
    p.user(address)
    p.pass_(PASSWORD)
    assert p.stat() == (2, sum(len(crlf(b)) for b in bodies))
    resp, lines, _ = p.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == crlf(bodies[0])
    uid_before = p.uidl(2)
    p.dele(1)
    p.quit()
    assert remaining(server, address) == 1
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    p.user(address.upper())
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    assert p.uidl(1).split()[-1] == uid_before.split()[-1]
    p.quit()


def test_poplib_apop(server):
    """poplib APOP with the greeting's timestamp succeeds (Twisted's APOP never did)."""
    address, _ = mailbox(server, 1)
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    p.apop(address, PASSWORD)
    assert p.stat()[0] == 1
    p.quit()


def test_poplib_wrong_password_is_auth_error(server):
    """A wrong password gets -ERR [AUTH] and the session stays usable."""
    address, _ = mailbox(server, 1)
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    p.user(address)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong")
    p.user(address)
    p.pass_(PASSWORD)
    p.quit()


def test_poplib_stls(server):
    """poplib STLS upgrades the session; USER/PASS then work over TLS."""
    address, _ = mailbox(server, 1)
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    caps = p.capa()
    assert "STLS" in caps
    p.stls(context=client_ctx(server))
    assert "STLS" not in p.capa()
    p.user(address)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    p.quit()


def test_poplib_pop3s(server):
    """poplib POP3_SSL on the implicit-TLS listener."""
    address, _ = mailbox(server, 1)
    p = poplib.POP3_SSL("127.0.0.1", server.port("pop3s"), context=client_ctx(server), timeout=30)
    p.user(address)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    p.quit()


def test_second_session_gets_in_use(server):
    """Two simultaneous sessions on one mailbox: the second gets -ERR [IN-USE]."""
    address, _ = mailbox(server, 1)
    first = login(server, address)
    second = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    second.user(address)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    second.quit()
    first.quit()
    third = login(server, address)
    third.quit()


def test_dropped_connection_after_dele_deletes_nothing(server):
    """DELE then a dropped connection (no QUIT): nothing is deleted, and the lock is released."""
    address, _ = mailbox(server, 2)
    p = login(server, address)
    p.dele(1)
    p.dele(2)
    p.sock.shutdown(socket.SHUT_RDWR)
    p.sock.close()
    deadline = time.monotonic() + 20
    while True:
        q = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
        q.user(address)
        try:
            q.pass_(PASSWORD)
            break
        except poplib.error_proto as e:
            q.quit()
            if b"IN-USE" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert q.stat()[0] == 2
    q.quit()
    assert remaining(server, address) == 2


# --------------------------------------------------------------------------- curl


# netrc splits at white space: curl's mailboxes get a password without spaces
CURL_PASSWORD = "curl-Passw0rd!"


def netrc(tmp_path: Path, login: str) -> Path:
    path = tmp_path / "netrc"
    path.write_text(f"machine 127.0.0.1 login {login} password {CURL_PASSWORD}\n")
    path.chmod(0o600)
    return path


def curl(*args: str) -> subprocess.CompletedProcess:
    exe = require_program("curl")
    return subprocess.run([exe, "-sS", "--max-time", "30", *args], capture_output=True, timeout=60)


@pytest.mark.parametrize("mech", [None, "PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_pop3_sasl(server, tmp_path, mech):
    """curl pop3:// lists and retrieves a message; with no option curl picks the best SASL
    mechanism from CAPA (CRAM-MD5), else the one named by --login-options."""
    address, bodies = mailbox(server, 2, password=CURL_PASSWORD)
    rc = netrc(tmp_path, address)
    opts = ["--login-options", f"AUTH={mech}"] if mech else []
    listing = curl("--netrc-file", str(rc), *opts, f"pop3://127.0.0.1:{server.port('pop3')}/")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0].startswith(b"1 ")
    got = curl("--netrc-file", str(rc), "-v", *opts, f"pop3://127.0.0.1:{server.port('pop3')}/2")
    assert got.returncode == 0, got.stderr
    assert f"AUTH {mech or 'CRAM-MD5'}".encode() in got.stderr
    assert got.stdout == crlf(bodies[1])


def test_curl_pop3_apop(server, tmp_path):
    """curl pop3:// with ;AUTH=+APOP logs in by APOP."""
    address, bodies = mailbox(server, 1, password=CURL_PASSWORD)
    rc = netrc(tmp_path, address)
    user = address.replace("@", "%40")
    got = curl("--netrc-file", str(rc), "-v",
               f"pop3://{user};AUTH=+APOP@127.0.0.1:{server.port('pop3')}/1")
    assert got.returncode == 0, got.stderr
    assert b"APOP " in got.stderr
    assert got.stdout == crlf(bodies[0])


def test_curl_pop3s(server, tmp_path):
    """curl pop3s:// verifies the test CA and retrieves a message."""
    address, bodies = mailbox(server, 1, password=CURL_PASSWORD)
    rc = netrc(tmp_path, address)
    assert server.certs is not None
    got = curl("--netrc-file", str(rc), "--cacert", str(server.certs.ca_cert),
               f"pop3s://127.0.0.1:{server.port('pop3s')}/1")
    assert got.returncode == 0, got.stderr
    assert got.stdout == crlf(bodies[0])


# --------------------------------------------------------------------------- mpop


@pytest.mark.parametrize(
    "auth,transport",
    [
        (a, t)
        for a in ("user", "apop", "cram-md5", "plain")
        for t in ("clear", "starttls", "tls")
    ],
)
def test_mpop(server, tmp_path, auth, transport):
    """mpop retrieves and deletes mail with each auth method over clear text, STARTTLS and TLS."""
    exe = require_program("mpop")
    address, bodies = mailbox(server, 2)
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    maildir = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True)
    assert server.certs is not None
    port = server.port("pop3s") if transport == "tls" else server.port("pop3")
    tls_args = ["--tls=off"]
    if transport != "clear":
        tls_args = [
            "--tls=on", f"--tls-starttls={'on' if transport == 'starttls' else 'off'}",
            f"--tls-trust-file={server.certs.ca_cert}", "--tls-host-override=localhost",
        ]
    cmd = [
        exe, "--host=127.0.0.1", f"--port={port}", f"--user={address}", f"--auth={auth}",
        f"--passwordeval=cat {secret}", *tls_args, f"--delivery=maildir,{maildir}",
        "--keep=off", "--only-new=off", "--received-header=off", "--timeout=30", "-q",
    ]
    result = subprocess.run(cmd, capture_output=True, timeout=90)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    got = sorted(p.read_bytes() for p in (maildir / "new").iterdir())
    assert got == sorted(b.replace(b"\r\n", b"\n") for b in bodies)
    assert remaining(server, address) == 0


# --------------------------------------------------------------------------- fetchmail


def test_fetchmail_apop(server, tmp_path):
    """fetchmail with proto apop retrieves every message through an MDA into a file."""
    exe = require_program("fetchmail")
    address, bodies = mailbox(server, 2)
    out = tmp_path / "delivered"
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f'poll 127.0.0.1 port {server.port("pop3")} proto apop\n'
        f'  user "{address}" password "{PASSWORD}" is root here\n'
        f'  sslproto "" no sslcertck\n'
        f'  mda "/bin/sh -c \'cat >> {out}\'"\n'
    )
    rcfile.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(
        [exe, "-f", str(rcfile), "--nodetach", "--nosyslog", "-v", "--pidfile", str(tmp_path / "fm.pid")],
        capture_output=True, timeout=90, env=env,
    )
    text = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, text
    assert PASSWORD not in text
    data = out.read_bytes()
    for body in bodies:
        assert body.split(b"\n")[2] in data  # each Subject arrived
    assert b"APOP" in result.stdout + result.stderr or "apop" in text.lower()
    assert remaining(server, address) == 0


def test_curl_pop3_user_pass_when_no_sasl_is_offered(tmp_path):
    """With pop3.sasl_mechanisms = [] CAPA lists no SASL and, with auth.apop = false, the
    greeting has no APOP timestamp: curl logs in with USER/PASS."""
    srv = ServerProcess(tmp_path / "srv", tls=False, pop3_config="sasl_mechanisms = []",
                        method_config='[auth]\nmethod = "passwordfile"\napop = false\n')
    srv.write_config()
    address, bodies = mailbox(srv, 1, password=CURL_PASSWORD)
    rc = netrc(tmp_path, address)
    with srv:
        got = curl("--netrc-file", str(rc), "-v", f"pop3://127.0.0.1:{srv.port('pop3')}/1")
    shown = b"\n".join(ln for ln in got.stderr.splitlines() if not ln.startswith(b"> PASS"))
    assert got.returncode == 0, shown
    assert b"> USER " + address.encode() in got.stderr
    assert b"> AUTH " not in got.stderr and b"> APOP " not in got.stderr
    assert got.stdout == crlf(bodies[0])
