"""``server.workers = 2`` against the real installed twistd: a worker process serves POP3 and
SMTP on the same ports, hands remote mail to the main process's queue runner, is replaced when
it dies, ends with the main process, and the connection limits hold across both processes.

Which process takes a connection is up to the kernel; to make a test deterministic, the other
process is paused with SIGSTOP while the connection is made (a paused process cannot accept,
the running one takes the connection from the shared socket).
"""

from __future__ import annotations

import json
import os
import poplib
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost, wait_until

pytestmark = pytest.mark.integration

PASSWORD = "w0rker pass"
USER = f"ann@{HOSTNAME}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _workers(srv: ServerProcess) -> list[int]:
    return json.loads((srv.state_dir / "run" / "listeners.json").read_text())["workers"]


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block, so the other process takes new connections."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _greeting_pid(port: int) -> int:
    """The pid in the APOP timestamp of the POP3 greeting (``<pid.clock@host>``)."""
    p = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        return int(p.getwelcome().split(b"<", 1)[1].split(b".", 1)[0])
    finally:
        p.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2",
                        pop3_config="max_connections_per_client = 3",
                        extra_config='[log]\nmail_log = "../mail.log"\n')
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    with srv:
        yield srv


def test_both_processes_serve_the_same_ports(server: ServerProcess) -> None:
    """listeners.json names two processes; with either one paused, the other answers POP3 and
    SMTP on the same ports, and mail taken in by one is read through the other. The worker's
    mail events reach both logs, written by the main process as before: the mail log has the
    message's ``accepted`` and ``delivered`` lines with the worker's pid and fields, the
    server log its text lines under ``[worker 1: ...]`` (issue 17: a worker sends lean lines,
    not Twisted's JSON events)."""
    main, worker = _workers(server)
    assert main == server.proc.pid and worker != main
    with paused(main):
        assert _greeting_pid(server.port("pop3")) == worker
        with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
            s.sendmail("x@example.org", [USER], b"Subject: via worker\r\n\r\nhello\r\n")
    with paused(worker):
        assert _greeting_pid(server.port("pop3")) == main
        p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
        p.user(USER)
        p.pass_(PASSWORD)
        assert b"Subject: via worker" in b"\r\n".join(p.retr(1)[1])
        p.quit()
    log = server.log_text()
    assert "[worker 1: " in log and "worker 1 (pid" in log
    assert PASSWORD not in log
    mail_log = server.root / "mail.log"
    wait_until(lambda: mail_log.exists() and "status=sent" in mail_log.read_text(), 20)
    log = server.log_text()
    lines = mail_log.read_text().splitlines()
    accepted = [line for line in lines if " accepted from=<x@example.org>" in line]
    assert len(accepted) == 1 and f"pop3coexist[{worker}]:" in accepted[0], lines
    assert f"to=<{USER}>" in accepted[0] and "size=" in accepted[0]
    qid = accepted[0].split(f"pop3coexist[{worker}]: ", 1)[1].split(":", 1)[0]
    assert any(f"{qid}: to=<{USER}>, relay=local" in line and "status=sent" in line
               for line in lines), lines
    assert f"[worker 1: pop3coexist.smtp.server#info] SMTP {qid} accepted from 127.0.0.1" in log
    assert "[worker 1: pop3coexist.smtp.server#info] SMTP connect from 127.0.0.1 (smtp)" in log


def test_mail_queued_by_a_worker_is_delivered_by_the_worker(tmp_path: Path) -> None:
    """Remote mail accepted by the worker goes out through the smart host at once from the
    worker itself (it claims what it queued): it arrives while the main process is stopped."""
    require_installed_plugin()
    host = SmartHost().start()
    try:
        srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2",
                            extra_config=f'[smarthost]\nhost = "{host.hop}"\n')
        with srv:
            main, worker = _workers(srv)
            with paused(main):
                with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
                    s.sendmail("x@example.org", ["far@example.net"], b"Subject: out\r\n\r\nbye\r\n")
                [msg] = host.wait_for(1)
            assert msg.rcpt_tos == ["far@example.net"]
            wait_until(lambda: "to=<far@example.net>" in srv.log_text(), what="the delivery log line")
            line = next(ln for ln in srv.log_text().splitlines() if "to=<far@example.net>" in ln)
            assert "[worker 1: pop3coexist.outbound" in line, line
    finally:
        host.stop()


def test_a_killed_workers_claims_are_taken_back_at_once(tmp_path: Path) -> None:
    """kill -9 of a worker in the middle of a delivery (the next hop never answers): the main
    process takes the message the worker had claimed back at once and claims it itself (no
    wait for the lease to expire), and nothing is lost."""
    require_installed_plugin()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts, never greets: the delivery hangs while claimed
    try:
        srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2",
                            extra_config=f'[smarthost]\nhost = "[127.0.0.1]:{silent.getsockname()[1]}"\n')
        with srv:
            main, worker = _workers(srv)
            claimed = srv.state_dir / "queue" / "claimed"

            def holder() -> str:
                for d in claimed.iterdir():
                    try:
                        if any(p.suffix == ".json" for p in d.iterdir()):
                            return d.name
                    except FileNotFoundError:  # taken back (renamed) between the two listings
                        continue
                return ""

            with paused(main):
                with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
                    s.sendmail("x@example.org", ["far@example.net"], b"Subject: out\r\n\r\nbye\r\n")
                wait_until(lambda: ".w1." in holder(), what="the worker to claim the message")
            os.kill(worker, signal.SIGKILL)
            wait_until(lambda: ".w0." in holder(), timeout=30,
                       what="the main process to take the message back and claim it")
            assert "messages claimed by worker 1 taken back" in srv.log_text()
    finally:
        silent.close()


def test_a_killed_worker_is_replaced(server: ServerProcess) -> None:
    """kill -9 of the worker: the main process logs it, starts a new worker, and the new one
    serves the same ports; run/listeners.json lists the new worker's pid in place of the dead
    one's."""
    main, worker = _workers(server)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: "started again" in server.log_text(), timeout=30, what="a new worker")
    assert f"worker 1 (pid {worker}) ended (signal 9)" in server.log_text()
    with paused(main):
        new = _greeting_pid(server.port("pop3"))
    assert new not in (main, worker)
    assert _alive(new)
    assert _workers(server) == [main, new]  # listeners.json: the live pids, not the dead one


def test_workers_end_with_the_main_process(server: ServerProcess) -> None:
    """SIGTERM stops the worker too (both shut down cleanly); and a kill -9 of the main process
    leaves no worker serving (it sees its pipe from the main process end)."""
    main, worker = _workers(server)
    server.stop()  # twistd ends by the SIGTERM it re-raises after a clean shut-down
    assert "Server Shut Down." in server.log_text()
    assert "[worker 1: twisted.internet.base#info] Main loop terminated." in server.log_text()
    wait_until(lambda: not _alive(worker), timeout=20, what="the worker to end")
    server.start()
    main, worker = _workers(server)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: not _alive(worker), timeout=20, what="the orphaned worker to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=5).recv(1)


def test_per_client_limit_counts_both_processes(server: ServerProcess) -> None:
    """max_connections_per_client = 3 over two processes: two sessions held by the worker and
    one by the main process use up the limit; the fourth, whichever process takes it, is
    refused with -ERR [SYS/TEMP]; when one closes, a new one is served."""
    main, worker = _workers(server)
    held = []
    with paused(main):
        for _ in range(2):
            held.append(poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20))
    with paused(worker):
        held.append(poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20))
    assert {int(p.getwelcome().split(b"<")[1].split(b".")[0]) for p in held} == {main, worker}
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
    held.pop(0).quit()
    wait_until(lambda: _try_pop3(server.port("pop3")), what="a session after one closed")
    for p in held:
        p.quit()


def _try_pop3(port: int) -> bool:
    try:
        poplib.POP3("127.0.0.1", port, timeout=20).quit()
        return True
    except poplib.error_proto:
        return False


def test_long_sessions_are_spread_over_the_processes(server: ServerProcess) -> None:
    """Three POP3 sessions opened one after another and kept open end up on both processes
    (a process holding more sessions leaves the next one to the other), not all on the one
    that happened to wake first."""
    main, worker = _workers(server)
    held = [poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20) for _ in range(3)]
    # max_connections_per_client = 3 in this fixture: the three sessions are the limit
    pids = [int(p.getwelcome().split(b"<")[1].split(b".")[0]) for p in held]
    for p in held:
        p.quit()
    assert set(pids) == {main, worker}


def test_failed_log_ins_are_counted_across_processes(server: ServerProcess) -> None:
    """A wrong password through the worker and one through the main process count as two
    failures of one address in the shared throttle table (so the delay doubles whichever
    process the attacker reaches), and the right password clears them."""
    from pop3coexist.policy.sharedthrottle import SharedAuthThrottle

    class Now:
        seconds = staticmethod(time.time)

    table = SharedAuthThrottle(Now(), server.state_dir / "run" / "auth-failures-pop3.table")
    main, worker = _workers(server)
    for pid in (main, worker):
        with paused(pid):
            p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
            p.user(USER)
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                p.pass_("not the password")
            p.quit()
    assert table.failures("127.0.0.1") == 2
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
    p.user(USER)
    p.pass_(PASSWORD)
    p.quit()
    assert table.failures("127.0.0.1") == 0
    assert PASSWORD not in server.log_text() and "not the password" not in server.log_text()



def test_without_a_mail_log_worker_lines_reach_the_server_log_in_order_before_a_kill(
        tmp_path: Path) -> None:
    """With no mail log (``[log] mail_log = ""``, the default: a worker sends lean text lines,
    issue 17), a message the worker takes while the main process is paused leaves its
    connect, stored and accepted lines in the server log under ``[worker 1:
    pop3coexist.smtp.server#LEVEL]``, in that order, with the queue id of the 250; the worker
    is killed with -9 right after the 250 (before QUIT) and before the main process runs
    again, so the accepted line was not held in any buffer of the worker."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2")
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    with srv:
        main, worker = _workers(srv)
        with paused(main):
            with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
                s.ehlo()
                s.mail("x@example.org")
                s.rcpt(USER)
                code, reply = s.data(b"Subject: lean\r\n\r\nhello\r\n")
                assert code == 250
                os.kill(worker, signal.SIGKILL)  # right after the 250, before QUIT
            qid = reply.split(b"queued as ", 1)[1].decode().strip()
        wait_until(lambda: "started again" in srv.log_text(), timeout=30, what="a new worker")
        prefix = "[worker 1: pop3coexist.smtp.server#"
        lines = [line.split(prefix, 1)[1] for line in srv.log_text().splitlines()
                 if prefix in line]
        assert lines == ["info] SMTP connect from 127.0.0.1 (smtp)",
                         f"debug] SMTP {qid} stored in ['{USER}']",
                         f"info] SMTP {qid} accepted from 127.0.0.1: 24 octets, 1 recipients"
                         ], lines  # killed before QUIT: no disconnect line
