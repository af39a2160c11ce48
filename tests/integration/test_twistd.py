"""The real installed plugin: ``twistd pop3coexist`` starts, serves, stops cleanly, and refuses a
bad config with one line that names the key (nothing half-started)."""

from __future__ import annotations

import os
import poplib
import signal
import subprocess

import pytest

from tests.support.server import ServerProcess, require_installed_plugin, twistd_path

pytestmark = pytest.mark.integration


def test_plugin_starts_serves_and_stops(tmp_path):
    """twistd -n pop3coexist -c FILE: log in with poplib, then SIGTERM gives exit 0."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path)
    srv.write_config()
    srv.add_mailbox("ann@pop.contoso.test", "ann-password-1")
    with srv:
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
        p.user("ann@pop.contoso.test")
        p.pass_("ann-password-1")
        assert p.stat() == (0, 0)
        p.quit()
        assert set(srv.ports) >= {"pop3", "pop3s", "smtp", "submission", "smtps"}
        proc = srv.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the stopping signal after a clean shutdown (exit status -SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    log = srv.log_text()
    assert "Main loop terminated." in log
    assert "Traceback" not in log
    assert "ann-password-1" not in log


def test_help_lists_the_config_option():
    """twistd pop3coexist --help works after a regular install."""
    require_installed_plugin()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([twistd_path(), "pop3coexist", "--help"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0
    assert "--config" in out.stdout


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("[smtp]\nmax_mesage_size = 5\n", "[smtp.max_mesage_size] unknown key"),
        ("[relay]\nnetworks = [\"0.0.0.0/0\"]\n", "[relay.networks]"),
        ("[tls]\ncertificate = \"missing.pem\"\nprivate_key = \"missing.key\"\n", "[tls.certificate]"),
    ],
)
def test_bad_config_refuses_to_start(tmp_path, extra, needle):
    """A config error is reported by twistd naming the key; the process exits non-zero at once."""
    require_installed_plugin()
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        "[server]\nhostname = \"pop.contoso.test\"\nstate_dir = \"var\"\n"
        "[pop3]\nlisten = [\"tcp:0:interface=127.0.0.1\"]\n" + extra
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([twistd_path(), "-n", "pop3coexist", "-c", str(cfg)], capture_output=True,
                         text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode != 0
    assert needle in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_unwritable_mailroot_refuses_to_start(tmp_path):
    """A state_dir that cannot be created is reported at start-up, not at the first log-in."""
    require_installed_plugin()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[server]\nhostname = \"pop.contoso.test\"\nstate_dir = \"{blocker}/var\"\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([twistd_path(), "-n", "pop3coexist", "-c", str(cfg)], capture_output=True,
                         text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode != 0
    assert "[server.state_dir]" in out.stdout + out.stderr


def test_sighup_keeps_serving_and_sees_admin_changes(tmp_path):
    """SIGHUP does not stop the server; a mailbox added and a password changed by the admin
    command while it runs work at once, without a restart."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False)
    srv.write_config()
    with srv:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        srv.add_mailbox("bea@pop.contoso.test", "bea-password-1")
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
        p.user("bea@pop.contoso.test")
        p.pass_("bea-password-1")
        p.quit()
        srv.admin("mailbox", "passwd", "bea@pop.contoso.test", password="bea-password-2")
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
        p.user("bea@pop.contoso.test")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_("bea-password-1")
        p.user("bea@pop.contoso.test")
        p.pass_("bea-password-2")
        p.quit()
        assert srv.proc.poll() is None
    assert "SIGHUP" in srv.log_text()
