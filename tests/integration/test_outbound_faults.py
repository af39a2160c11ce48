"""Injected faults from a real peer (Postfix smtp-sink), and kill -9 during a delivery run.

Each fault row says what the next hop does and what must become of the recipient.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.store.queue import FileQueue
from tests.support.programs import require_program
from tests.support.smarthost import Runner, SmartHost, SmtpSink, enqueue, wait_until, write_config

pytestmark = pytest.mark.integration

BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: fault\r\n\r\nhello\r\n"

# (smtp-sink options, state the recipient ends in, text in the logged reply)
FAULTS = [
    pytest.param(["-r", "RCPT"], "deferred", "450 4.3.0", id="4xx-at-rcpt"),
    pytest.param(["-f", "RCPT"], "failed", "500 5.3.0", id="5xx-at-rcpt"),
    pytest.param(["-f", "MAIL"], "failed", "500 5.3.0", id="5xx-at-mail"),
    pytest.param(["-r", "."], "deferred", "450 4.3.0", id="4xx-after-data"),
    pytest.param(["-Q", "DATA"], "deferred", "421 ", id="421-and-disconnect-at-data"),
    pytest.param(["-Q", "CONNECT"], "deferred", "refused to talk to us", id="421-greeting"),
    pytest.param(["-q", "."], "deferred", "connection lost after DATA", id="disconnect-after-dot"),
    pytest.param(["-q", "RCPT"], "deferred", "connection lost after RCPT", id="disconnect-at-rcpt"),
    # smtp-sink offers PIPELINING: MAIL, RCPT and DATA go together and wait for their replies
    pytest.param(["-W", "DATA:3"], "deferred", "timeout waiting for the reply to MAIL/RCPT/DATA",
                 id="slow-reply"),
]


@pytest.mark.parametrize(("options", "state", "reply"), FAULTS)
def test_fault(tmp_path: Path, options: list[str], state: str, reply: str) -> None:
    """The recipient ends deferred (4xx, disconnect, timeout) or failed (5xx), and the log line
    for the attempt carries the next hop's reply."""
    sink = SmtpSink(require_program("smtp-sink", "/usr/sbin/smtp-sink"), *options).start()
    runner = None
    try:
        cfg = write_config(tmp_path / "run", sink.hop, retry_intervals=("1h",), command_timeout="1s")
        queue = FileQueue(cfg.parent / "state" / "queue", "pop.contoso.test")
        qid = enqueue(queue, ["b@example.net"], BODY, notify=["NEVER"])
        runner = Runner(cfg).start()
        wait_until(lambda: f"{qid} to=<b@example.net>" in runner.log(), what="the attempt log line")
        line = next(ln for ln in runner.log().splitlines() if f"{qid} to=<b@example.net>" in ln)
        assert f"state={state}" in line and reply in line, line
        if state == "failed":
            wait_until(lambda: queue.ids() == [], what="the failed message to leave the queue")
        else:
            # the attempt is logged before its new state is saved: wait for the save
            def deferred() -> bool:
                entries = queue.entries()
                return bool(entries) and entries[0]["recipients"][0]["state"] == "deferred"

            wait_until(deferred, what="the recipient to be saved as deferred")
    finally:
        if runner is not None:
            runner.stop()
        sink.stop()


def test_kill_9_during_a_delivery_run_loses_nothing(tmp_path: Path) -> None:
    """kill -9 while messages are being delivered, then restart: every queued message reaches
    the smart host at least once."""
    host = SmartHost().start()
    runners: list[Runner] = []
    try:
        cfg = write_config(tmp_path / "run", host.hop, retry_intervals=("1s",))
        queue = FileQueue(cfg.parent / "state" / "queue", "pop.contoso.test")
        total = 400
        for i in range(total):
            enqueue(queue, [f"r{i}@example.net"], BODY.replace(b"hello", b"seq %d" % i))
        first = Runner(cfg).start()
        runners.append(first)
        wait_until(lambda: len(host.received) >= 40, what="some deliveries")
        first.kill9()
        at_kill = len(host.received)
        assert at_kill < total, "everything was delivered before the kill; make the run longer"
        second = Runner(cfg).start()
        runners.append(second)
        wait_until(lambda: queue.ids() == [], timeout=60, what="the queue to empty after restart")
        got = {r for m in host.received for r in m.rcpt_tos}
        assert got == {f"r{i}@example.net" for i in range(total)}
    finally:
        for r in runners:
            r.stop()
        host.stop()
