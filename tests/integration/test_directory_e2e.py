"""The installed server (twistd) with ``auth.method = "directory"`` against a real slapd.

Real clients: poplib and curl log in over POP3, swaks over SMTP AUTH PLAIN; a disabled
directory user and an empty password are refused; mail to a user's secondary proxy address
lands in that user's mailbox; stopping slapd gives ``-ERR [SYS/TEMP]`` and ``454 4.7.0``,
and after slapd is back the same server process logs in again.
"""

from __future__ import annotations

import itertools
import os
import poplib
import smtplib
import subprocess
import time

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.slapd import BASE_DN, DIRECTORY_USERS, SERVICE_DN, slapd  # noqa: F401
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration
TED = DIRECTORY_USERS["ted"]
KIM = DIRECTORY_USERS["kim"]  # no white space in the password: it goes into a netrc
DORA = DIRECTORY_USERS["dora"]
FAR = DIRECTORY_USERS["far"]  # addresses only in other domains: no mailbox on this server
_n = itertools.count(1)


@pytest.fixture(scope="module")
def server(slapd, tmp_path_factory):  # noqa: F811
    """One server using the slapd fixture; mailboxes for ted, kim and dora."""
    require_installed_plugin()
    method = (
        '[auth]\nmethod = "directory"\napop = false\n'
        f'[auth.directory]\nurl = "{slapd.url}"\nstarttls = true\nca_file = "{slapd.ca_file}"\n'
        f'base_dn = "{BASE_DN}"\nbind_dn = "{SERVICE_DN}"\n'
        f'bind_password_file = "{slapd.secret_file}"\ntimeout = "5s"\n'
    )
    srv = ServerProcess(tmp_path_factory.mktemp("directory-e2e"), method_config=method)
    srv.write_config()
    for name in ("ted", "kim", "dora"):
        srv.admin("mailbox", "add", f"{name}@{HOSTNAME}")
    srv.start()
    yield srv
    slapd.ensure_running()
    srv.stop()
    log = srv.log_text()
    for user in (TED, KIM, DORA, FAR):
        assert user.password not in log, "a password reached the log"
    assert "Traceback" not in log, log[-4000:]


def send(server: ServerProcess, to: str, marker: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test") as s:
        s.sendmail("alice@example.test", [to], f"Subject: {marker}\r\n\r\nbody {marker}\r\n".encode())


def pop_messages(server: ServerProcess, user: str, password: str) -> list[bytes]:
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    try:
        p.user(user)
        p.pass_(password)
        count, _ = p.stat()
        return [b"\n".join(p.retr(i + 1)[1]) for i in range(count)]
    finally:
        p.quit()


def test_poplib_login_and_secondary_address(server) -> None:
    """Mail to ted's secondary proxy address (smtp:theodore@...) lands in ted's mailbox,
    and poplib logs in with the directory password to read it."""
    marker = f"secondary-{next(_n)}"
    send(server, "Theodore@pop.contoso.test", marker)
    bodies = pop_messages(server, "TED@pop.contoso.test", TED.password)
    assert any(marker.encode() in b for b in bodies)


def test_short_name_login(server) -> None:
    """With one local domain the sAMAccountName logs in too."""
    pop_messages(server, "ted", TED.password)


def test_refusals(server) -> None:
    """A disabled directory user, a wrong and an empty password get -ERR [AUTH]."""
    for user, password in (("dora@pop.contoso.test", DORA.password),
                           ("ted@pop.contoso.test", "wrong"), ("ted@pop.contoso.test", "")):
        p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
        try:
            p.user(user)
            with pytest.raises(poplib.error_proto) as e:
                if password:
                    p.pass_(password)
                else:
                    p._shortcmd("PASS")
            assert b"[AUTH]" in e.value.args[0] or b"-ERR" in e.value.args[0]
        finally:
            p.close()


def test_curl_pop3(server, tmp_path) -> None:
    """curl pop3:// lists kim's mailbox with the directory password (from a netrc)."""
    marker = f"curl-{next(_n)}"
    send(server, "kim.akers@pop.contoso.test", marker)
    rc = tmp_path / "netrc"
    rc.write_text(f"machine 127.0.0.1 login kim@pop.contoso.test password {KIM.password}\n")
    rc.chmod(0o600)
    curl = require_program("curl")
    got = subprocess.run([curl, "-sS", "--max-time", "30", "--netrc-file", str(rc),
                          f"pop3://127.0.0.1:{server.port('pop3')}/1"], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert marker.encode() in got.stdout


def test_swaks_auth_plain(server) -> None:
    """swaks AUTH PLAIN (after STARTTLS) with the directory password sends a message."""
    swaks = require_program("swaks")
    marker = f"swaks-{next(_n)}"
    env = dict(os.environ, SWAKS_OPT_auth_password=TED.password)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("submission")), "--tls",
         "--helo", "client.test", "--from", "ted@pop.contoso.test", "--to", "kim@pop.contoso.test",
         "--auth", "PLAIN", "--auth-user", "ted@pop.contoso.test", "--header", f"Subject: {marker}"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert TED.password not in result.stdout
    env = dict(os.environ, SWAKS_OPT_auth_password=DORA.password)
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("submission")), "--tls",
         "--from", "dora@pop.contoso.test", "--to", "kim@pop.contoso.test",
         "--auth", "PLAIN", "--auth-user", "dora@pop.contoso.test"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0 and "535 5.7.8" in result.stdout


def test_account_without_local_address_submits_and_owns_its_proxy_addresses(server) -> None:
    """Issue 11 faults 14 and 15 against real slapd: far (addresses only in other domains, no
    mailbox here) logs in for SMTP AUTH with any of its addresses and sends as its own
    proxyAddresses / mail, or with <>; another user's address stays 553 5.7.1; POP3 refuses
    far (no mailbox). ted sends as its proxy address in a non-local domain."""
    with smtplib.SMTP("127.0.0.1", server.port("submission"), local_hostname="client.test",
                      timeout=30) as s:
        s.starttls()
        s.ehlo("client.test")
        assert s.login("Far@Elsewhere.test", FAR.password)[0] == 235
        assert s.mail("far@elsewhere.test")[0] == 250
        s.rset()
        assert s.mail("")[0] == 250
        s.rset()
        code, text = s.mail("ted@pop.contoso.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        marker = f"far-{next(_n)}"
        assert s.mail("far@elsewhere.test")[0] == 250
        assert s.rcpt("kim@pop.contoso.test")[0] == 250
        assert s.data(f"Subject: {marker}\r\n\r\nfrom far away\r\n".encode())[0] == 250
    wait_until(lambda: any(marker.encode() in b
                           for b in pop_messages(server, "kim@pop.contoso.test", KIM.password)),
               30, "far's message in kim's mailbox")
    with smtplib.SMTP("127.0.0.1", server.port("submission"), local_hostname="client.test",
                      timeout=30) as s:
        s.starttls()
        s.ehlo("client.test")
        assert s.login("far@northwindtraders.test", FAR.password)[0] == 235  # the UPN
    with smtplib.SMTP("127.0.0.1", server.port("submission"), local_hostname="client.test",
                      timeout=30) as s:
        s.starttls()
        s.ehlo("client.test")
        assert s.login("ted@pop.contoso.test", TED.password)[0] == 235
        assert s.mail("ted@northwindtraders.test")[0] == 250  # smtp: proxy, not a local domain
        s.rset()
        code, _ = s.mail("far@elsewhere.test")
        assert code == 553
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    try:
        p.user("far@elsewhere.test")
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(FAR.password)
        assert b"[AUTH]" in e.value.args[0]
    finally:
        p.close()
    assert "#critical]" not in server.log_text()


def test_directory_down_then_back(server, slapd) -> None:  # noqa: F811
    """slapd stopped: POP3 answers -ERR [SYS/TEMP], SMTP AUTH 454 4.7.0; slapd back: the same
    server process logs in again."""
    slapd.stop()
    try:
        p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
        p.user("ted@pop.contoso.test")
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(TED.password)
        assert b"[SYS/TEMP]" in e.value.args[0]
        p.close()
        with smtplib.SMTP("127.0.0.1", server.port("submission"), local_hostname="client.test") as s:
            s.starttls()
            s.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError) as a:
                s.login("ted@pop.contoso.test", TED.password)
            assert a.value.smtp_code == 454
    finally:
        slapd.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            pop_messages(server, "ted@pop.contoso.test", TED.password)
            break
        except poplib.error_proto:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
