"""The admin API against the real server (twistd), driven by the real ``pop3coexist-admin
--server`` and by plain HTTP: the same verbs with the same output and exit codes as a local
run, a locked mailbox's POP3 log-in refused, a queue flush the delivery runner acts on, the
audit log naming the administrator, and every request without a valid credential refused
(token or client certificate)."""

from __future__ import annotations

import io
import os
import poplib
import ssl
import subprocess
import sys
import time

import pytest

from pop3coexist.admin import cli
from tests.support.adminweb import admin_web_server, http, make_client_ca, make_token
from tests.support.server import HOSTNAME, admin_path, require_installed_plugin

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("admin_web")]

BOB = f"bob@{HOSTNAME}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server with [admin_web] (HTTP on loopback, HTTPS asking for client certificates
    from a test CA), an API token for ``ops``, and a client certificate for ``carol``."""
    require_installed_plugin()
    root = tmp_path_factory.mktemp("adminapi")
    ca = make_client_ca(root / "clientca")
    server = admin_web_server(root / "srv", client_ca=ca.ca_pem)
    server.write_config()
    token_file = make_token(server, "ops")
    server.start()
    try:
        yield server, token_file, ca
    finally:
        server.stop_cleanly(token_file.read_text().strip())


class Ran:
    """What one command run printed and its exit code."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def remote(served, capsys, monkeypatch):
    """``remote(*args, token=FILE, url=, extra=, stdin=, env=)``: ``pop3coexist-admin --server
    URL ...`` run in this process (``admin.cli.run``, the console script's code: a process
    start costs seconds here) with POP3COEXIST_CONFIG pointing nowhere (nothing local is
    read)."""
    server, token_file, _ = served

    def call(*args: str, token=token_file, url: str | None = None, extra: tuple = (),
             stdin: str | None = None, env: dict | None = None) -> Ran:
        monkeypatch.setenv("POP3COEXIST_CONFIG", "/nonexistent/config.toml")
        monkeypatch.delenv("POP3COEXIST_ADMIN_TOKEN", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        cmd = ["--server", url or f"http://127.0.0.1:{server.port('admin_web')}", *extra]
        if token is not None:
            cmd += ["--token-file", str(token)]
        capsys.readouterr()
        out = io.StringIO()
        code = cli.run([*cmd, *args], out)
        return Ran(code, out.getvalue(), capsys.readouterr().err)

    return call


@pytest.fixture
def local(served, capsys):
    """``local(*args)``: the same command on the server's own config, in this process."""
    server = served[0]

    def call(*args: str) -> Ran:
        capsys.readouterr()
        out = io.StringIO()
        code = cli.run(["-c", str(server.config_path), *args], out)
        return Ran(code, out.getvalue(), capsys.readouterr().err)

    return call


def remote_process(server, token_file, *args: str, stdin: str | None = None,
                   url: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The installed ``pop3coexist-admin --server URL --token-file FILE ARGS`` as a process."""
    url = url or f"http://127.0.0.1:{server.port('admin_web')}"
    cmd = [*admin_path(), "--server", url, *extra]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    run_env = {k: v for k, v in server.env().items() if k != "POP3COEXIST_CONFIG"}
    run_env["POP3COEXIST_CONFIG"] = "/nonexistent/config.toml"  # proves nothing local is read
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=run_env)


def test_mailbox_add_lock_refuses_pop3_login_through_the_api(served, remote):
    """The installed ``pop3coexist-admin --server`` adds a mailbox (password on stdin) and
    locks it; POP3 then refuses its log-in with the locked reply (-ERR [AUTH]); the output is
    the local command's; the audit log names the administrator, never the password."""
    server, token, _ = served
    added = remote_process(server, token, "mailbox", "add", BOB, "--password-stdin",
                           stdin="s3cret-Bob\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"mailbox {BOB} added\n"
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user(BOB)
    assert pop.pass_("s3cret-Bob").startswith(b"+OK")
    pop.quit()
    locked = remote("mailbox", "lock", BOB)
    assert (locked.returncode, locked.stdout) == (0, f"mailbox {BOB} locked\n")
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user(BOB)
    with pytest.raises(poplib.error_proto) as refused:
        pop.pass_("s3cret-Bob")
    assert refused.value.args[0].startswith(b"-ERR [AUTH]"), refused.value
    pop.close()
    listed = remote("mailbox", "list")
    assert f"{BOB} (locked)\n" in listed.stdout
    audit = (server.state_dir / "admin-audit.log").read_text()
    assert f"admin=ops via=api action=mailbox.lock target={BOB} ok" in audit
    assert "s3cret-Bob" not in audit


def test_remote_output_and_errors_are_the_local_ones(remote, local):
    """``stat``, ``domain list``, the queue, quarantine, nodes, alias and list verbs and
    failing verbs print the same lines with ``--server`` as locally, and a failure exits 1
    with one line."""
    for args in (("domain", "list"), ("stat",), ("queue", "list"), ("quarantine", "list"),
                 ("nodes",), ("mailbox", "quota", f"postmaster@{HOSTNAME}", "5MB")):
        here = local(*args)
        there = remote(*args)
        assert (there.returncode, there.stdout) == (0, here.stdout), args
    made = remote("list", "add", f"team@{HOSTNAME}", "--senders", "members")
    assert made.returncode == 0, made.stderr
    assert remote("list", "member", "add", f"team@{HOSTNAME}",
                  f"postmaster@{HOSTNAME}").returncode == 0
    assert remote("alias", "add", f"info@{HOSTNAME}", f"team@{HOSTNAME}").returncode == 0
    for args in (("list", "show", f"team@{HOSTNAME}"), ("alias", "list")):
        assert remote(*args).stdout == local(*args).stdout
    for args in (("mailbox", "lock", f"nobody@{HOSTNAME}"), ("queue", "delete", "nosuchid"),
                 ("domain", "remove", HOSTNAME, "--yes"), ("alias", "add", "bad", "x")):
        here = local(*args)
        there = remote(*args)
        assert there.returncode == here.returncode == 1, args
        assert there.stderr == here.stderr and there.stderr.count("\n") == 1, args


def test_queue_flush_through_the_api_reaches_the_delivery_runner(served, remote):
    """``queue flush`` through the API is picked up by the running server's delivery runner
    (its log says so) within its poll interval."""
    server = served[0]
    done = remote("queue", "flush")
    assert (done.returncode, done.stdout) == (0, "queue flush requested\n")
    deadline = time.monotonic() + 20
    while "queue flush requested: retrying every message now" not in server.log_text():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)


def test_the_api_refuses_requests_without_a_valid_credential(served, remote):
    """No token, a wrong token, a token of the right shape but unknown: 401 with no detail;
    the command without a credential exits 1 before asking; with one from the environment it
    works."""
    server, token, _ = served
    base = f"http://127.0.0.1:{server.port('admin_web')}"
    for value in (None, "wrong", "p3ca_00000000_" + "A" * 43,
                  token.read_text().strip()[:-1] + "x"):
        for path, data in (("/api/v1/stat", None), ("/api/v1/mailbox/lock", {"address": BOB}),
                           ("/api/v1/", None)):
            status, body, headers = http(base + path, token=value, data=data)
            assert (status, body) == (401, {"error": "unauthorized"}), (value, path)
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    status, body, _ = http(base + "/api/v1/stat", token=token.read_text().strip())
    assert status == 200 and body["total"]["messages"] >= 0
    bare = remote("stat", token=None)
    assert bare.returncode == 1 and "no credential" in bare.stderr
    by_env = remote("stat", token=None, env={"POP3COEXIST_ADMIN_TOKEN": token.read_text().strip()})
    assert by_env.returncode == 0, by_env.stderr
    wrong = remote("stat", token=None, env={"POP3COEXIST_ADMIN_TOKEN": "wrong"})
    assert wrong.returncode == 1 and "refused the credentials (HTTP 401)" in wrong.stderr


def test_a_client_certificate_of_the_configured_ca_logs_in(served, remote, tmp_path):
    """Over HTTPS a client certificate the ``client_ca`` signed acts as the administrator its
    CN names (audit log); one from another CA fails the handshake; none at all is 401."""
    server, _, ca = served
    url = f"https://localhost:{server.port('admin_webs')}"
    cert, key = ca.issue("carol")
    tls = ("--ca", str(server.certs.ca_cert), "--cert", str(cert), "--key", str(key))
    ok = remote("domain", "lock", HOSTNAME, token=None, url=url, extra=tls)
    assert (ok.returncode, ok.stdout) == (0, f"domain {HOSTNAME} locked\n"), ok.stderr
    assert remote("domain", "unlock", HOSTNAME, token=None, url=url, extra=tls).returncode == 0
    assert f"admin=carol via=api action=domain.lock target={HOSTNAME} ok" in \
        (server.state_dir / "admin-audit.log").read_text()
    other_cert, other_key = make_client_ca(tmp_path / "other").issue("carol")
    bad = remote("stat", token=None, url=url, extra=(
        "--ca", str(server.certs.ca_cert), "--cert", str(other_cert), "--key", str(other_key)))
    assert bad.returncode == 1 and "cannot reach" in bad.stderr
    context = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    status, body, _ = http(url + "/api/v1/stat", context=context)
    assert (status, body) == (401, {"error": "unauthorized"})


def test_a_token_never_travels_in_argv_and_is_stored_hashed(served, capsys):
    """The command has no option that takes the token itself, and the token file under
    state_dir keeps only its SHA-256."""
    server, token, _ = served
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    helptext = capsys.readouterr().out
    assert "--token " not in helptext and "--token-file" in helptext
    stored = (server.state_dir / "admin" / "tokens.json").read_text()
    secret = token.read_text().strip()
    assert secret not in stored and secret.split("_")[2] not in stored
    assert oct(os.stat(server.state_dir / "admin" / "tokens.json").st_mode & 0o777) == "0o600"
