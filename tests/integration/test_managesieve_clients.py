"""ManageSieve (RFC 5804) with real clients against the real server (twistd): Debian's
``sieve-connect`` and Python's ``sievelib`` upload, check, list, activate, rename and delete
scripts over STARTTLS, with the passwords of the POP3 accounts; and what they upload is
what the delivery runs."""

from __future__ import annotations

import os
import smtplib
import subprocess
from pathlib import Path

import pytest

from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import SieveScripts
from tests.support.programs import require_program
from tests.support.server import ServerProcess, require_installed_plugin
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration

USER = "ted@pop.contoso.test"
PASSWORD = "ted's sieve pass"
SCRIPT = 'require ["fileinto"];\nif header :contains "subject" "junk" {\n  discard;\n}\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("managesieve"),
                        extra_config='[managesieve]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    srv.add_mailbox("ann@pop.contoso.test", "ann pass")
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def _scripts(srv: ServerProcess) -> SieveScripts:
    return SieveScripts(MaildirStore(srv.state_dir / "mailroot"))


def _sieve_connect(srv: ServerProcess, *args: str, user: str = USER,
                   password: str = PASSWORD) -> subprocess.CompletedProcess:
    """sieve-connect with the password on a pipe (never in argv), verifying the server's
    certificate against the test CA, STARTTLS required (--noclearchan)."""
    program = require_program("sieve-connect")
    read, write = os.pipe()
    os.write(write, password.encode() + b"\n")
    os.close(write)
    try:
        return subprocess.run(
            [program, "--server", "127.0.0.1", "--port", str(srv.port("managesieve")),
             "--user", user, "--passwordfd", str(read), "--tlscafile", str(srv.certs.ca_cert),
             "--tlshostname", "localhost", "--noclearchan", "--authmech", "PLAIN", *args],
            pass_fds=(read,), capture_output=True, text=True, timeout=60,
        )
    finally:
        os.close(read)


def test_sieve_connect_uploads_and_activates_over_starttls(server: ServerProcess,
                                                          tmp_path: Path) -> None:
    """sieve-connect uploads a script and activates it inside TLS; the store has it active,
    the server logged the log-in and both commands, and the delivery runs it (a message
    whose subject says junk is discarded, another is kept)."""
    local = tmp_path / "rules.sieve"
    local.write_text(SCRIPT)
    up = _sieve_connect(server, "--upload", "--localsieve", str(local), "--remotesieve", "rules")
    assert up.returncode == 0, up.stderr
    act = _sieve_connect(server, "--activate", "--remotesieve", "rules")
    assert act.returncode == 0, act.stderr
    listed = _sieve_connect(server, "--list")
    assert listed.returncode == 0 and "rules" in listed.stdout
    assert _scripts(server).list_scripts("pop.contoso.test", "ted") == [
        ("rules", True, len(SCRIPT))]
    log = server.log_text()
    assert f"ManageSieve log-in {USER} from 127.0.0.1 by PLAIN: success" in log
    assert f'ManageSieve {USER}: SETACTIVE "rules"' in log

    new = server.state_dir / "mailroot" / "pop.contoso.test" / "ted" / "new"
    before = len(list(new.iterdir()))
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
        s.sendmail("x@example.org", [USER], b"Subject: pure junk\r\n\r\nbuy\r\n")
        s.sendmail("x@example.org", [USER], b"Subject: hello\r\n\r\nhi\r\n")
    wait_until(lambda: 'script "rules": discard' in server.log_text(), what="the discard")
    assert len(list(new.iterdir())) == before + 1


def test_sieve_connect_gets_the_parser_error_with_its_line(server: ServerProcess,
                                                          tmp_path: Path) -> None:
    """A script with an error is refused at upload with its line number, and nothing is
    stored."""
    bad = tmp_path / "bad.sieve"
    bad.write_text('require "fileinto";\n\nif true {\n  fileinto "x"\n}\n')
    up = _sieve_connect(server, "--upload", "--localsieve", str(bad), "--remotesieve", "bad")
    assert up.returncode != 0
    assert "line 5" in up.stdout + up.stderr
    assert "bad" not in [n for n, _, _ in _scripts(server).list_scripts("pop.contoso.test",
                                                                          "ted")]


def test_sieve_connect_wrong_password_is_refused(server: ServerProcess) -> None:
    """A wrong password gets NO; the password is not in the log (stop_cleanly checks)."""
    result = _sieve_connect(server, "--list", password="not the password")
    assert result.returncode != 0
    wait_until(lambda: f"ManageSieve log-in {USER} from 127.0.0.1 by PLAIN: refused"
               in server.log_text(), what="the refusal log line")


def test_sievelib_client_does_the_same(server: ServerProcess, monkeypatch) -> None:  # noqa: ANN001
    """Python's sievelib (STARTTLS, AUTH PLAIN and LOGIN) puts, checks, activates, renames,
    gets, lists and deletes; its errors carry the ManageSieve response codes."""
    from sievelib.managesieve import Client

    monkeypatch.setenv("SSL_CERT_FILE", str(server.certs.ca_cert))
    for mech in ("PLAIN", "LOGIN"):
        c = Client("127.0.0.1", server.port("managesieve"), srvhostname="localhost")
        assert c.connect("ann@pop.contoso.test", "ann pass", starttls=True, authmech=mech)
        assert "vacation" in c.get_sieve_capabilities()
        assert c.havespace("away", 200)
        assert c.checkscript('require "vacation";\nvacation "away";\n')
        assert not c.checkscript('require "vacation";\nvacation :days "x" "away";\n')
        assert b"line 2" in c.errmsg
        assert c.putscript(f"away-{mech}", 'require "vacation";\nvacation "away";\n')
        assert c.setactive(f"away-{mech}")
        assert not c.deletescript(f"away-{mech}")  # NO (ACTIVE)
        assert c.renamescript(f"away-{mech}", f"holiday-{mech}")
        active, others = c.listscripts()
        assert active == f"holiday-{mech}"
        # sievelib drops the last line end of what it gets
        assert c.getscript(f"holiday-{mech}") == 'require "vacation";\nvacation "away";'
        assert c.setactive("")
        assert c.deletescript(f"holiday-{mech}")
        c.logout()
    assert _scripts(server).list_scripts("pop.contoso.test", "ann") == []
