"""Issue 11's kept-back cases of faults 8, 12, 16 and 18, against the real installed twistd.

- Fault 8: an idle timeout under the RFC minimum starts the server, with a warning in the log
  and from ``check-config`` (it used to refuse to start).
- Fault 12: a ``unix:`` listener with ``mode=660`` served by two processes keeps its mode, and
  keeps serving after a worker process ends (a worker used to chmod it to 0666, and on its way
  out to remove the socket file and shut the shared socket down).
- Fault 16: a file where the queue folder should be refuses to start, naming it (the server
  used to start with its queue dead); ``check-config`` says the same.
- Fault 18: a TLS key path that is a folder is named as one, with the config file and line.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, require_installed_plugin, twistd_path
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration


def _twistd(srv: ServerProcess, *, daemon: bool = False) -> subprocess.CompletedProcess:
    args = [twistd_path(), "--logfile", str(srv.root / "second.log"),
            "--pidfile", str(srv.root / "second.pid"), "pop3coexist", "-c", str(srv.config_path)]
    if not daemon:
        args.insert(1, "-n")
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=srv.env(),
                          cwd=srv.root)


def _nothing_left(srv: ServerProcess) -> bool:
    out = subprocess.run(["pgrep", "-f", str(srv.config_path)], capture_output=True, text=True)
    return out.stdout.strip() == ""


class _UnixSMTP(smtplib.SMTP):
    """smtplib over a UNIX socket: ``connect(path)``."""

    def _get_socket(self, host, port, timeout):  # noqa: ANN001 (smtplib's signature)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(host)
        return s


@pytest.mark.parametrize("daemon", [False, True])
def test_a_file_where_the_queue_folder_should_be_refuses_to_start(tmp_path: Path,
                                                                  daemon: bool) -> None:
    """Fault 16: ``<state_dir>/queue`` is a file: twistd (with -n, and daemonised) exits 1 with
    one line naming the config line, the key and the path; nothing is left running;
    ``check-config`` exits 1 with the same line."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False)
    srv.write_config()
    srv.state_dir.mkdir(parents=True)
    (srv.state_dir / "queue").write_text("")
    line = (f"[server.state_dir] {srv.state_dir.resolve() / 'queue'} is a file where the server "
            "needs a folder; move it away")
    out = _twistd(srv, daemon=daemon)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{srv.config_path}:3: {line}" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert _nothing_left(srv)
    check = srv.admin("check-config", check=False)
    assert check.returncode == 1 and f"{srv.config_path}:3: {line}" in check.stderr


def test_a_tls_key_that_is_a_folder_is_named(tmp_path: Path) -> None:
    """Fault 18: ``[tls] private_key`` names a folder: twistd -n exits 1 saying so, with the
    config file and line; nothing is left running."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path)
    srv.write_config()
    assert srv.certs is not None
    srv.certs.key.unlink()
    srv.certs.key.mkdir()
    out = _twistd(srv)
    line = next(n for n, text in enumerate(srv.config_path.read_text().splitlines(), 1)
                if text.startswith("private_key"))
    assert out.returncode == 1
    assert (f"{srv.config_path}:{line}: [tls.private_key] {srv.certs.key} is a folder, not a "
            "file") in out.stderr
    assert _nothing_left(srv)


def test_an_idle_timeout_under_the_rfc_minimum_starts_with_a_warning(tmp_path: Path) -> None:
    """Fault 8: ``smtp.idle_timeout = "1m"`` and ``pop3.idle_timeout = "5m"`` start the
    server (Postfix and the Windows POP3 service take such values); the log and
    ``check-config`` warn about each, naming the key; SMTP still answers."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False, smtp_config='idle_timeout = "1m"',
                        pop3_config='idle_timeout = "5m"')
    with srv:
        log = srv.log_text()
        assert "configuration warning" in log and "[smtp.idle_timeout] 60 seconds" in log
        assert "[pop3.idle_timeout] 300 seconds" in log
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10) as smtp:
            assert smtp.noop()[0] == 250
        check = srv.admin("check-config")
        assert "warning" in check.stderr and "[smtp.idle_timeout]" in check.stderr
        assert check.stdout.strip().endswith("OK")


def test_a_unix_listener_keeps_its_mode_and_serves_after_a_worker_ends(tmp_path: Path) -> None:
    """Fault 12: ``submission_listen = ["unix:sub.sock:mode=660"]`` (relative: beside the
    config file) with two processes: the socket file is 0660, not 0666; when the worker
    process ends, the file stays and every connection is still answered (by the main process
    and then by the new worker), and the new worker leaves the mode alone too."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False, server_config="workers = 2")
    srv.write_config()
    text = srv.config_path.read_text().replace(
        'submission_listen = ["tcp:0:interface=127.0.0.1"]',
        'submission_listen = ["unix:sub.sock:mode=660"]')
    srv.config_path.write_text(text)
    sock = srv.config_path.parent / "sub.sock"
    with srv:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        record = json.loads((srv.state_dir / "run" / "listeners.json").read_text())
        worker = record["workers"][1]
        os.kill(worker, signal.SIGTERM)
        wait_until(lambda: srv.log_text().count(") serving") >= 2 and f"(pid {worker}) ended"
                   in srv.log_text(), timeout=60, what="a new worker process")
        assert sock.exists() and oct(sock.stat().st_mode & 0o777) == oct(0o660)
        for _ in range(6):
            with _UnixSMTP(timeout=10) as smtp:
                smtp.connect(str(sock))
                assert smtp.ehlo("client.example")[0] == 250
