"""Who may log in, under which name, and with which sender: the real server (twistd) with the
password file, over real sockets (issue 11 faults 6, 14 and 20).

- ``MAIL FROM:<>`` after AUTH (a read receipt) is accepted from smtplib and from swaks, and the
  message arrives; a forged sender stays ``553 5.7.1``;
- an account whose Maildir is gone (its mailbox lives elsewhere) still logs in for SMTP AUTH
  and relays, while POP3 refuses it with ``-ERR [AUTH]``; nothing is logged as critical;
- the log-in name rule: a bare name logs in while the server has one local domain; the real
  ``pop3coexist-admin domain add`` of a second domain warns on stderr (exit 0), the running
  server then refuses the bare name and its log says why, the full address still works.

Passwords reach swaks through its environment, never argv; none reaches the log.
"""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import subprocess

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration

TED_PW = "Ted's p@ss (1)*"
ANN_PW = "ann-Secret-2"
RELAY_PW = "relay-Secret-3"


@pytest.fixture
def server(tmp_path):
    """A password-file server with one local domain and mailboxes for ted and ann."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path)
    srv.write_config()
    srv.add_mailbox(f"ted@{HOSTNAME}", TED_PW)
    srv.add_mailbox(f"ann@{HOSTNAME}", ANN_PW)
    srv.start()
    yield srv
    srv.stop()
    log = srv.log_text()
    for secret in (TED_PW, ANN_PW, RELAY_PW):
        assert secret not in log, "a password reached the log"
    assert "#critical]" not in log and "Traceback" not in log, log[-4000:]


def pop_stat(srv: ServerProcess, user: str, password: str) -> tuple[int, int]:
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
    try:
        p.user(user)
        p.pass_(password)
        return p.stat()
    finally:
        p.quit()


def pop_refusal(srv: ServerProcess, user: str, password: str) -> bytes:
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
    try:
        p.user(user)
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(password)
        return e.value.args[0]
    finally:
        p.close()


def submission(srv: ServerProcess) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.port("submission"), local_hostname="client.test", timeout=30)
    s.starttls()
    s.ehlo("client.test")
    return s


def test_null_sender_after_auth_with_smtplib(server) -> None:
    """smtplib: after AUTH, MAIL FROM:<> gets 250 and the read receipt reaches ann's mailbox;
    a forged sender in the same session gets 553 5.7.1."""
    with submission(server) as s:
        s.login(f"ted@{HOSTNAME}", TED_PW)
        assert s.mail("") == (250, b"2.1.0 Sender <> OK")
        assert s.rcpt(f"ann@{HOSTNAME}")[0] == 250
        code, _ = s.data(b"Subject: Read: hello\r\n\r\nYour message was displayed.\r\n")
        assert code == 250
        code, text = s.mail(f"ann@{HOSTNAME}")
        assert (code, text[:5]) == (553, b"5.7.1")
    wait_until(lambda: pop_stat(server, f"ann@{HOSTNAME}", ANN_PW)[0] == 1, 30,
               "the receipt in ann's mailbox")


def test_null_sender_after_auth_on_the_smtps_port(server) -> None:
    """SMTPS (TLS from the first byte), smtplib: before AUTH, MAIL gets 530 5.7.0 (a
    submission port, RFC 8314 section 3.3); after AUTH, MAIL FROM:<> gets 250 in any
    spelling (``MAIL FROM: <>`` too) and another user's address gets 553 5.7.1."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    ctx.check_hostname = False
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), local_hostname="client.test",
                          timeout=30, context=ctx) as s:
        s.ehlo()
        assert s.docmd("MAIL FROM:<a@example.org>") == (530, b"5.7.0 Authentication required")
        s.login(f"ted@{HOSTNAME}", TED_PW)
        assert s.docmd("MAIL FROM: <> BODY=8BITMIME") == (250, b"2.1.0 Sender <> OK")
        assert s.rcpt(f"ann@{HOSTNAME}")[0] == 250
        assert s.data(b"Subject: Auto: away\r\n\r\nI am away.\r\n")[0] == 250
        code, text = s.docmd("MAIL FROM:<@relay.example:ann@pop.contoso.test>")
        assert (code, text[:5]) == (553, b"5.7.1")
    wait_until(lambda: pop_stat(server, f"ann@{HOSTNAME}", ANN_PW)[0] == 1, 30,
               "the auto-reply in ann's mailbox")


def test_null_sender_after_auth_with_swaks(server) -> None:
    """swaks --from '<>' with AUTH PLAIN after STARTTLS: accepted; swaks with a forged sender:
    553 5.7.1 and a failing exit code."""
    swaks = require_program("swaks")
    env = dict(os.environ, SWAKS_OPT_auth_password=TED_PW)

    def run(sender: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(server.port("submission")), "--tls",
             "--helo", "client.test", "--from", sender, "--to", f"ann@{HOSTNAME}",
             "--auth", "PLAIN", "--auth-user", f"ted@{HOSTNAME}",
             "--header", "Subject: Read: hello", "--timeout", "30"],
            capture_output=True, text=True, timeout=60, env=env,
        )

    ok = run("<>")
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "MAIL FROM:<>" in ok.stdout and "250 2.1.0 Sender <> OK" in ok.stdout
    forged = run(f"ann@{HOSTNAME}")
    assert forged.returncode != 0 and "553 5.7.1" in forged.stdout
    assert TED_PW not in ok.stdout + forged.stdout


def test_account_without_mailbox_sends_but_cannot_read(server) -> None:
    """An account whose Maildir is gone logs in for SMTP AUTH (235), may relay and send as
    itself; POP3 refuses it with -ERR [AUTH]; the log has no critical line (the fixture)."""
    server.add_mailbox(f"pop3relay@{HOSTNAME}", RELAY_PW)
    shutil.rmtree(server.state_dir / "mailroot" / HOSTNAME / "pop3relay")
    with submission(server) as s:
        assert s.login(f"POP3Relay@{HOSTNAME}", RELAY_PW)[0] == 235
        assert s.mail(f"pop3relay@{HOSTNAME}")[0] == 250
        assert s.rcpt(f"ted@{HOSTNAME}")[0] == 250
        assert s.data(b"Subject: from the relay account\r\n\r\nhi\r\n")[0] == 250
    wait_until(lambda: pop_stat(server, f"ted@{HOSTNAME}", TED_PW)[0] == 1, 30,
               "the message in ted's mailbox")
    assert b"[AUTH]" in pop_refusal(server, f"pop3relay@{HOSTNAME}", RELAY_PW)
    assert "no mailbox on this server" in server.log_text()


def test_locked_domain_refuses_account_without_mailbox(server) -> None:
    """A locked domain refuses the SMTP log-in of its accounts, with or without a Maildir
    (535 5.7.8); unlocked again, both log in."""
    server.add_mailbox(f"pop3relay@{HOSTNAME}", RELAY_PW)
    shutil.rmtree(server.state_dir / "mailroot" / HOSTNAME / "pop3relay")
    server.admin("domain", "lock", HOSTNAME)
    for user, password in ((f"pop3relay@{HOSTNAME}", RELAY_PW), (f"ted@{HOSTNAME}", TED_PW)):
        with submission(server) as s, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login(user, password)
        assert e.value.smtp_code == 535
    server.admin("domain", "unlock", HOSTNAME)
    for user, password in ((f"pop3relay@{HOSTNAME}", RELAY_PW), (f"ted@{HOSTNAME}", TED_PW)):
        with submission(server) as s:
            assert s.login(user, password)[0] == 235


def test_second_domain_ends_bare_name_logins_with_a_warning(server) -> None:
    """One local domain: 'ted' logs in (POP3 and SMTP AUTH). `domain add` of a second domain
    exits 0 with a warning on stderr; the running server then refuses 'ted' (-ERR [AUTH],
    535), logs why at info level, and the full address still logs in."""
    assert pop_stat(server, "ted", TED_PW)[0] == 0
    with submission(server) as s:
        assert s.login("ted", TED_PW)[0] == 235
    added = server.admin("domain", "add", "fabrikam.test")
    assert added.returncode == 0 and added.stdout.splitlines()[0] == "domain fabrikam.test added"
    assert added.stderr.startswith("pop3coexist-admin: warning: ")
    assert "bare-name log-ins end" in added.stderr and f"ted@{HOSTNAME}, not ted" in added.stderr

    def bare_refused() -> bool:
        try:
            pop_stat(server, "ted", TED_PW)
            return False
        except poplib.error_proto as e:
            assert b"[AUTH]" in e.args[0]
            return True

    wait_until(bare_refused, 30, "the bare name refused once the second domain counts")
    with submission(server) as s, pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.login("ted", TED_PW)
    assert e.value.smtp_code == 535
    log = server.log_text()
    why = [line for line in log.splitlines() if "log-in name 'ted' refused" in line]
    assert why and all("#info]" in line for line in why), log[-3000:]
    assert "exactly one local domain" in why[0] and "fabrikam.test" in why[0]
    assert pop_stat(server, f"TED@{HOSTNAME}", TED_PW)[0] == 0
    with submission(server) as s:
        assert s.login(f"ted@{HOSTNAME}", TED_PW)[0] == 235
    # APOP and AUTH LOGIN follow the same rule; removing the second domain brings bare names back
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    with pytest.raises(poplib.error_proto) as e:
        p.apop("ted", TED_PW)
    assert b"[AUTH]" in e.value.args[0]
    p.close()
    with submission(server) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("TED", TED_PW, initial_response_ok=False)  # AUTH PLAIN without initial response
    server.admin("domain", "remove", "fabrikam.test", "--yes")
    wait_until(lambda: not bare_refused(), 30, "the bare name back with one local domain")
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    assert p.apop("Ted", TED_PW).startswith(b"+OK")
    p.quit()
    with submission(server) as s:
        s.user, s.password = "ted", TED_PW
        assert s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0] == 235
