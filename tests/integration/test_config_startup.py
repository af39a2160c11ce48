"""The real twistd and pop3coexist-admin on config faults 8, 12 and 18.

- 8: ``smtp.max_recipients`` under 100 starts, warns in the log and in check-config, and the
  limit holds on a real socket (``452 4.5.3`` past it).
- 12: listeners from systemd socket activation (``systemd-socket-activate`` passes the
  listening sockets, as a systemd socket unit does), by index and by name; a ``systemd:``
  listener without a passed socket, and an endpoint type this server does not take, are
  refused with one line, no traceback.
- 18: a key that does not belong to the certificate refuses to start, naming the files.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import smtplib
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.certs import make_ca_and_cert
from tests.support.programs import free_port, require_program
from tests.support.server import (
    HOSTNAME,
    ServerProcess,
    admin_path,
    require_installed_plugin,
    twistd_path,
)

pytestmark = pytest.mark.integration

PASSWORD = "Ted-pass-word-9"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _twistd_refuses(cfg: Path, cwd: Path) -> str:
    """Run twistd on ``cfg``; assert it exits non-zero at once without a traceback; its output."""
    out = subprocess.run([twistd_path(), "-n", "pop3coexist", "-c", str(cfg)], capture_output=True,
                         text=True, timeout=60, env=_env(), cwd=cwd)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Traceback" not in text
    return text


def test_low_max_recipients_starts_warns_and_holds(tmp_path):
    """max_recipients = 3: the server starts (it used to refuse), the log and check-config warn
    naming the key, and smtplib's fourth RCPT gets 452 4.5.3 while three are delivered."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False, smtp_config="max_recipients = 3")
    srv.write_config()
    for name in ("a", "b", "c", "d"):
        srv.add_mailbox(f"{name}@{HOSTNAME}", PASSWORD)
    check = srv.admin("check-config")
    assert "OK" in check.stdout
    assert "warning:" in check.stderr and "[smtp.max_recipients] 3 is under the 100" in check.stderr
    with srv:
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as s:
            s.ehlo("client.example.test")
            assert s.mail("sender@example.test")[0] == 250
            for name in ("a", "b", "c"):
                assert s.rcpt(f"{name}@{HOSTNAME}")[0] == 250
            code, text = s.rcpt(f"d@{HOSTNAME}")
            assert code == 452 and text.startswith(b"4.5.3")
            assert s.data(b"Subject: three\r\n\r\nbody\r\n")[0] == 250
        log = srv.log_text()
        assert "configuration warning:" in log and "[smtp.max_recipients] 3 is under" in log
    assert "Traceback" not in srv.log_text()


def test_mismatched_tls_pair_refuses_to_start(tmp_path):
    """A private key that belongs to another certificate: twistd exits non-zero before it
    listens, with one line naming both files (it used to start and fail every handshake)."""
    require_installed_plugin()
    good = make_ca_and_cert(tmp_path / "a")
    other = make_ca_and_cert(tmp_path / "b")
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "{HOSTNAME}"
        state_dir = "var"
        [pop3]
        listen = ["tcp:0:interface=127.0.0.1"]
        [smtp]
        listen = ["tcp:0:interface=127.0.0.1"]
        [tls]
        certificate = "{good.cert}"
        private_key = "{other.key}"
        """))
    text = _twistd_refuses(cfg, tmp_path)
    assert f"the private key {other.key} does not belong to the certificate {good.cert}" in text
    assert not (tmp_path / "var" / "run" / "listeners.json").exists()
    check = subprocess.run([*admin_path(), "-c", str(cfg), "check-config"], capture_output=True,
                           text=True, timeout=60, env=_env())
    assert check.returncode == 1 and "does not belong" in check.stderr


@pytest.mark.parametrize("listen,needle", [
    ('["systemd:domain=INET:index=0"]', "no socket was passed by systemd"),
    ('["ssl:2465:privateKey=k.pem"]', "listeners take tcp:PORT, tcp6:PORT, unix:PATH or systemd:"),
    ('["tcp:0:interfaec=127.0.0.1"]', "takes no option 'interfaec'"),
    ('["systemd:domain=INET"]', "needs index=N or name=NAME"),
])
def test_listener_mistakes_refuse_to_start(tmp_path, listen, needle):
    """A systemd: listener with nothing passed, an endpoint type or option this server does not
    take: one line naming the key, exit non-zero, no traceback."""
    require_installed_plugin()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nhostname = "{HOSTNAME}"\nstate_dir = "var"\n'
                   f'[pop3]\nlisten = []\n[smtp]\nlisten = {listen}\n')
    text = _twistd_refuses(cfg, tmp_path)
    assert "[smtp.listen]" in text and needle in text


class _Activated:
    """systemd-socket-activate holding two listening sockets (OS-free ports picked by the
    test), which execs twistd on the first connection, as a systemd socket unit would."""

    def __init__(self, root: Path, config: Path, names: bool) -> None:
        self.root, self.config, self.names = root, config, names
        self.proc: subprocess.Popen | None = None
        self.ports: tuple[int, int] = (0, 0)

    def start(self) -> None:
        program = require_program("systemd-socket-activate")
        for _attempt in range(5):  # a picked port may be taken again before we bind it
            self.ports = (free_port(), free_port())
            if self.ports[0] == self.ports[1]:
                continue
            err = self.root / "activate.err"
            self.proc = subprocess.Popen(
                [program, "-l", f"127.0.0.1:{self.ports[0]}", "-l", f"127.0.0.1:{self.ports[1]}",
                 *(["--fdname=smtp:pop3"] if self.names else []),
                 twistd_path(), "-n", "--logfile", str(self.root / "twistd.log"),
                 "--pidfile", str(self.root / "twistd.pid"), "pop3coexist", "-c", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err.open("wb"), env=_env(), cwd=self.root)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = err.read_text(errors="replace")
                if text.count("Listening on") == 2:
                    return
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            self.stop()
        pytest.fail(f"systemd-socket-activate did not listen: {err.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.mark.parametrize("workers,names", [(1, True), (2, True), (1, False)])
def test_systemd_socket_activation(tmp_path, workers, names):
    """smtp.listen = systemd:domain=INET:index=0 and pop3.listen = systemd:domain=INET:name=pop3
    (index=1 when systemd-socket-activate runs without --fdname, so LISTEN_FDNAMES is unset)
    under a real systemd-socket-activate: the first SMTP connection starts the server, which
    adopts both sockets; smtplib delivers a message and poplib reads it back, on the ports
    systemd held; listeners.json names those ports. With two worker processes both serve."""
    require_installed_plugin()
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "pop3coexist.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "{HOSTNAME}"
        state_dir = "../var"
        workers = {workers}
        [pop3]
        listen = ["systemd:domain=INET:{'name=pop3' if names else 'index=1'}"]
        [smtp]
        listen = ["systemd:domain=INET:index=0"]
        [domains]
        local = ["{HOSTNAME}"]
        """))
    subprocess.run([*admin_path(), "-c", str(cfg), "mailbox", "add", f"ted@{HOSTNAME}",
                    "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True, timeout=60, env=_env())
    act = _Activated(tmp_path, cfg, names)
    act.start()
    try:
        smtp_port, pop3_port = act.ports
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as s:  # starts the server
            assert s.ehlo("client.example.test")[0] == 250
            s.sendmail("alice@example.test", [f"ted@{HOSTNAME}"],
                       b"Subject: activated\r\n\r\nHello from a socket systemd held.\r\n")
        p = poplib.POP3("127.0.0.1", pop3_port, timeout=60)
        p.user(f"ted@{HOSTNAME}")
        p.pass_(PASSWORD)
        assert p.stat()[0] == 1
        assert b"Hello from a socket systemd held." in b"\r\n".join(p.retr(1)[1])
        p.quit()
        listeners = tmp_path / "var" / "run" / "listeners.json"
        deadline = time.monotonic() + 30
        while not listeners.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        record = json.loads(listeners.read_text())
        assert record["listeners"] == {"smtp": [smtp_port], "pop3": [pop3_port]}
        if workers > 1:
            assert len(record["workers"]) == workers
    finally:
        act.stop()
    log = (tmp_path / "twistd.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert re.search(rf"smtp listening on systemd:domain=INET:index=0 \(port {smtp_port}\)", log)
