"""Privilege (issue 16 item 5, issue 15 item 5): started as root, the server binds low ports,
then runs as the mail user (``twistd --uid/--gid``), and every file it writes afterwards, and
every file a root ``pop3coexist-admin`` writes, belongs to that user.

The state is first made by root (``pop3coexist-admin`` run as root before the server ever
started: the defect's set-up, where the folders made before the switch stayed root's and the
server then answered ``451 4.4.3`` / ``-ERR [SYS/TEMP]``).
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.privilege import foreign_owned, shared_dir, system_user, user_python
from tests.support.server import HOSTNAME
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Priv-pw-1"
TED, ANN = f"ted@{HOSTNAME}", f"ann@{HOSTNAME}"


def free_low_ports(count: int) -> list[int]:
    """Ports below 1024 that nothing listens on at 127.0.0.1 (only root can bind them)."""
    found = []
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    pytest.fail("no free ports below 1024 on 127.0.0.1")


def process_ids(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and file-system uid of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(x) for x in line.split()[1:])
    raise AssertionError("no Uid line")


def test_root_binds_low_ports_then_everything_belongs_to_the_mail_user() -> None:
    """twistd started as root with --uid/--gid binds POP3 and SMTP on ports below 1024; the
    main process and its worker process then run as the mail user (all four uids); mail
    delivered, queued, read and deleted, and mailboxes and passwords added by a root
    pop3coexist-admin while it serves, all work (no 451 4.4.3, no -ERR [SYS/TEMP]), and every
    file and folder under state_dir belongs to the mail user."""
    user = system_user()
    with shared_dir("privilege-") as root:
        srv = make_server(root, tls=False, server_config="workers = 2",
                          extra_config='[[domains.remote]]\nname = "remote.test"\nrelay = true\n'
                                       'route = "[127.0.0.1]:9"\n[smarthost]\ntls = "none"\n')
        srv.write_config()
        pop3_port, smtp_port = free_low_ports(2)
        text = srv.config_path.read_text()
        for section, port in (("[pop3]", pop3_port), ("[smtp]", smtp_port)):  # their `listen`
            start = text.index(section)  # the section's own `listen` (not tls_/submission_)
            m = re.compile(r'(?m)^\s*listen = \["tcp:0:interface=127.0.0.1"\]').search(text, start)
            text = (text[:m.start()] + f'\nlisten = ["tcp:{port}:interface=127.0.0.1"]'
                    + text[m.end():])
        srv.config_path.write_text(text)
        srv.add_mailbox(TED, PASSWORD)  # as root, before the server ever ran
        assert srv.state_dir.stat().st_uid == 0

        python, env = user_python(user)
        log = root / "twistd.log"
        proc = subprocess.Popen(
            [python, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--uid", str(user.uid), "--gid", str(user.gid), "--logfile", str(log),
             "--pidfile", "", "pop3coexist", "-c", str(srv.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root)
        try:
            listeners = srv.state_dir / "run" / "listeners.json"
            deadline = time.monotonic() + 90
            while not listeners.exists():
                assert proc.poll() is None, (proc.stdout.read().decode(errors="replace")
                                             + log.read_text(errors="replace")[-3000:])
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            record = json.loads(listeners.read_text())
            assert record["listeners"]["pop3"] == [pop3_port]
            assert record["listeners"]["smtp"] == [smtp_port]
            for pid in record["workers"]:
                assert process_ids(pid) == (user.uid,) * 4, pid

            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
                s.sendmail("a@example.test", [TED], b"Subject: one\r\n\r\nbody\r\n")
                s.sendmail("a@example.test", ["x@remote.test"], b"Subject: out\r\n\r\nq\r\n")
            p = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
            p.user(TED)
            p.pass_(PASSWORD)
            assert p.stat()[0] == 1
            p.retr(1)
            p.dele(1)
            p.quit()

            add = subprocess.run([*srv.admin_command(), "-c", str(srv.config_path), "mailbox",
                                  "add", ANN, "--password-stdin"], input=PASSWORD + "\n",
                                 capture_output=True, text=True, env=srv.env(), timeout=120)
            assert add.returncode == 0, add.stderr  # root, acting as the state's owner
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
                s.sendmail("a@example.test", [ANN], b"Subject: two\r\n\r\nbody\r\n")
            p = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
            p.user(ANN)
            p.pass_(PASSWORD)
            assert p.stat()[0] == 1
            p.quit()

            assert foreign_owned(srv.state_dir, user.uid) == []
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]
        assert PASSWORD not in text
        assert foreign_owned(srv.state_dir, user.uid) == []
        assert os.stat(srv.state_dir).st_uid == user.uid
