"""Monitoring against the real installed twistd with two serving processes: ``/metrics`` after
a short smtplib + poplib load (counters summed over both processes), the open-sessions gauge
and a replaced worker, and ``/healthz`` when every part answers and when the queue does not.

Which process takes a connection is up to the kernel; to know that both processes counted,
the other one is paused with SIGSTOP while a connection is made (as tests/integration/
test_workers.py does).
"""

from __future__ import annotations

import json
import os
import poplib
import signal
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration

PASSWORD = "m0nitor pass"
USER = f"ann@{HOSTNAME}"


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block, so the other process takes new connections."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _pids(srv: ServerProcess) -> list[int]:
    return json.loads((srv.state_dir / "run" / "listeners.json").read_text())["workers"]


def scrape(srv: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one GET /metrics."""
    url = f"http://127.0.0.1:{srv.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=20) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def health(srv: ServerProcess) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{srv.port('metrics')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2",
                        extra_config='[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                                     'store_refresh = "1s"\n')
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    with srv:
        yield srv
        srv.stop_cleanly(PASSWORD)


def _send(srv: ServerProcess, n: int, tag: str) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
            s.sendmail("x@example.org", [USER], f"Subject: {tag} {i}\r\n\r\nhello\r\n".encode())


def _read(srv: ServerProcess) -> int:
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
    p.user(USER)
    p.pass_(PASSWORD)
    count = len(p.list()[1])
    octets = sum(len(line) + 2 for line in p.retr(1)[1]) if count else 0
    p.quit()
    return octets


def test_counters_follow_a_load_over_both_processes(server: ServerProcess) -> None:
    """Three SMTP sessions through each process (one message each, to a local mailbox), one
    refused recipient, two POP3 sessions and a wrong password: the scrape (main process) shows
    the sessions, acceptances, local deliveries, the refusal by its reply code and the log-ins,
    summed over the two processes, each of which wrote its own counter file."""
    main, worker = _pids(server)
    with paused(main):
        _send(server, 3, "via worker")
    with paused(worker):
        _send(server, 3, "via main")
        with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
            s.ehlo()
            s.mail("x@example.org")
            code, _ = s.rcpt(f"nobody@{HOSTNAME}")
            assert code == 550
    octets = _read(server)
    with paused(main):
        _read(server)
        with pytest.raises(poplib.error_proto):
            p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
            try:
                p.user(USER)
                p.pass_("wrong")
            finally:
                p.close()
    files = {p.name for p in (server.state_dir / "run" / "metrics").iterdir()}
    assert {f"counter_{main}.db", f"counter_{worker}.db"} <= files

    def settled() -> dict:
        m = scrape(server)
        return m if value(m, "pop3coexist_sessions_open", protocol="pop3",
                          listener="pop3") == 0 else {}

    m = wait_until(settled, what="every session closed in the metrics")
    assert value(m, "pop3coexist_sessions_total", protocol="smtp", listener="smtp") == 7
    assert value(m, "pop3coexist_sessions_total", protocol="pop3", listener="pop3") == 3
    assert value(m, "pop3coexist_messages_accepted_total", listener="smtp") == 6
    assert value(m, "pop3coexist_deliveries_total", route="local", outcome="delivered") == 6
    assert value(m, "pop3coexist_delivery_latency_seconds_count", route="local") == 6
    assert value(m, "pop3coexist_messages_refused_total", listener="smtp", command="RCPT",
                 code="550", enhanced="5.1.1") == 1
    assert value(m, "pop3coexist_logins_total", protocol="pop3", method="USER",
                 outcome="ok") == 2
    assert value(m, "pop3coexist_logins_total", protocol="pop3", method="USER",
                 outcome="failed") == 1
    assert value(m, "pop3coexist_auth_throttled_total", protocol="pop3") == 1
    assert value(m, "pop3coexist_message_bytes_total", protocol="pop3",
                 direction="out") >= 2 * octets > 0
    assert value(m, "pop3coexist_message_bytes_total", protocol="smtp", direction="in") > 0
    assert value(m, "pop3coexist_sessions_open", protocol="smtp", listener="smtp") == 0
    assert value(m, "pop3coexist_up") == 1
    assert value(m, "pop3coexist_queue_messages") == 0
    # the mailbox figures come from a cached count, refreshed at most every second here
    m = wait_until(lambda: (lambda s: s if value(s, "pop3coexist_store_messages",
                                                 domain=HOSTNAME) == 6 else None)(scrape(server)),
                   what="the mailbox count")
    assert value(m, "pop3coexist_mailboxes", domain=HOSTNAME) >= 1
    assert value(m, "pop3coexist_store_bytes", domain=HOSTNAME) > 0


def test_open_sessions_and_a_replaced_worker(server: ServerProcess) -> None:
    """A POP3 session held open in the worker shows as one open session; when that worker is
    killed, its open sessions leave the gauge, the restart is counted, and its counters stay in
    the totals (a counter never goes back)."""
    main, worker = _pids(server)
    with paused(main):
        held = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
    try:
        m = wait_until(lambda: (lambda s: s if value(s, "pop3coexist_sessions_open",
                                                     protocol="pop3", listener="pop3") == 1
                                else None)(scrape(server)), what="one open session")
        before = value(m, "pop3coexist_sessions_total", protocol="pop3", listener="pop3")
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: "started again" in server.log_text(), timeout=30, what="a new worker")
        m = scrape(server)
        assert value(m, "pop3coexist_sessions_open", protocol="pop3", listener="pop3") == 0
        assert value(m, "pop3coexist_worker_restarts_total") == 1
        assert value(m, "pop3coexist_sessions_total", protocol="pop3",
                     listener="pop3") == before
    finally:
        held.sock.close()


def test_healthz_says_which_part_does_not_answer(server: ServerProcess) -> None:
    """/healthz is 200 with every check passing; with the queue's tmp/ folder replaced by a
    file the queue check fails, the answer is 503 and names it; put back, 200 again."""
    status, body = health(server)
    assert status == 200 and body["status"] == "ok", body
    assert set(body["checks"]) == {"listeners", "store", "queue", "directory"}
    assert "2 serving process(es)" in body["checks"]["listeners"]["detail"]
    tmp = server.state_dir / "queue" / "tmp"
    tmp.rmdir()
    tmp.write_text("not a folder")
    try:
        status, body = health(server)
        assert status == 503 and body["status"] == "failing"
        assert body["checks"]["queue"]["ok"] is False
        assert body["checks"]["store"]["ok"] is True
    finally:
        tmp.unlink()
        tmp.mkdir(mode=0o700)
    assert health(server)[0] == 200
