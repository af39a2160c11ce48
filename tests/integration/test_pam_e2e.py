"""The installed server (twistd) with ``auth.method = "local"``: real accounts through PAM.

poplib and curl log in over POP3 and swaks over SMTP AUTH PLAIN with a Unix account's
password; a locked account and an empty password are refused; mail to the account's address
lands in its mailbox. Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import poplib
import smtplib
import subprocess

import pytest

from tests.support.pam import LocalAccounts
from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A PAM service, a good and a locked account (no white space in the passwords: curl's
    netrc), and a server using them."""
    require_installed_plugin()
    accounts = LocalAccounts()
    try:
        accounts.install_service()
        accounts.add("good", password="Pam-e2e-Secret-1")
        accounts.add("locked", password="Pam-e2e-Secret-2")
        accounts.lock("locked")
        accounts.add("nobox", password="Pam-e2e-Secret-3")  # an account with no Maildir
        method = f'[auth]\nmethod = "local"\napop = false\n[auth.local]\npam_service = "{accounts.service}"\n'
        srv = ServerProcess(tmp_path_factory.mktemp("pam-e2e"), method_config=method)
        srv.write_config()
        for kind in ("good", "locked"):
            srv.admin("mailbox", "add", f"{accounts.accounts[kind].name}@{HOSTNAME}")
        srv.start()
        try:
            yield srv, accounts
        finally:
            srv.stop()
            log = srv.log_text()
            assert "Pam-e2e-Secret" not in log, "a password reached the log"
            assert "Traceback" not in log, log[-4000:]
    finally:
        accounts.remove()


def test_poplib_and_delivery(setup) -> None:
    """Mail to the account's address arrives; poplib logs in with the Unix password."""
    srv, accounts = setup
    good = accounts.accounts["good"]
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), local_hostname="client.test") as s:
        s.sendmail("alice@example.test", [f"{good.name.upper()}@{HOSTNAME}"], b"Subject: pam-1\r\n\r\nhello\r\n")
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
    p.user(good.name)
    p.pass_(good.password)
    assert p.stat()[0] >= 1
    assert any(b"pam-1" in line for line in p.retr(1)[1])
    p.quit()


def test_refusals(setup) -> None:
    """A locked account with its right password and an empty password get -ERR [AUTH]."""
    srv, accounts = setup
    for name, password in ((accounts.accounts["locked"].name, accounts.accounts["locked"].password),
                           (accounts.accounts["good"].name, "")):
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
        p.user(name)
        with pytest.raises(poplib.error_proto):
            p.pass_(password) if password else p._shortcmd("PASS")
        p.close()


def test_account_without_maildir_submits_but_cannot_read(setup) -> None:
    """Issue 11 fault 14: a Unix account with no Maildir logs in for SMTP AUTH (235) and sends
    as itself (also with <>); POP3 refuses it with -ERR [AUTH]; nothing critical is logged."""
    srv, accounts = setup
    nobox, good = accounts.accounts["nobox"], accounts.accounts["good"]
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), local_hostname="client.test",
                      timeout=30) as s:
        s.starttls()
        s.ehlo("client.test")
        assert s.login(nobox.name, nobox.password)[0] == 235
        assert s.mail(f"{nobox.name}@{HOSTNAME}")[0] == 250
        assert s.rcpt(f"{good.name}@{HOSTNAME}")[0] == 250
        assert s.data(b"Subject: pam-nobox\r\n\r\nhello\r\n")[0] == 250
        assert s.mail("")[0] == 250
        s.rset()
        assert s.mail(f"{good.name}@{HOSTNAME}")[0] == 553
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
    try:
        p.user(nobox.name)
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(nobox.password)
        assert b"[AUTH]" in e.value.args[0]
    finally:
        p.close()
    assert "#critical]" not in srv.log_text()


def test_curl_and_swaks(setup, tmp_path) -> None:
    """curl pop3:// (netrc) and swaks AUTH PLAIN log in with the Unix password."""
    srv, accounts = setup
    good = accounts.accounts["good"]
    rc = tmp_path / "netrc"
    rc.write_text(f"machine 127.0.0.1 login {good.name}@{HOSTNAME} password {good.password}\n")
    rc.chmod(0o600)
    got = subprocess.run([require_program("curl"), "-sS", "--max-time", "30", "--netrc-file", str(rc),
                          f"pop3://127.0.0.1:{srv.port('pop3')}/"], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    env = dict(os.environ, SWAKS_OPT_auth_password=good.password)
    result = subprocess.run(
        [require_program("swaks"), "--server", "127.0.0.1", "--port", str(srv.port("submission")), "--tls",
         "--from", f"{good.name}@{HOSTNAME}", "--to", f"{good.name}@{HOSTNAME}",
         "--auth", "PLAIN", "--auth-user", good.name],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
