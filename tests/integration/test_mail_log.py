"""The mail log against the real installed twistd: one line per event, joined by the queue id
the client was told in the 250, in text and in JSON ([log] mail_log, format).

The events made: a session (connect, disconnect), a message to a local mailbox and three
remote recipients through an aiosmtpd smart host that takes one, defers one (450) and refuses
one (550): accepted, delivered (local and remote), deferred, bounced, and, with a queue that
gives up after two seconds, expired; then each refusal the issue names: an unknown recipient,
relay from an untrusted address, a mailbox over its quota, a message over the size limit, a
sender that is not the log-in's, and MAIL without AUTH on the submission port.
"""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

import pytest

from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost, wait_until

pytestmark = pytest.mark.integration

PASSWORD = "mai1log pass"
USER = f"ann@{HOSTNAME}"
FULL = f"full@{HOSTNAME}"


def _make_events(srv: ServerProcess) -> str:
    """Run every case; return the queue id of the accepted message."""
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
        s.ehlo()
        s.mail("x@example.org")
        for rcpt in (USER, "ok@example.net", "soon@example.net", "gone@example.net"):
            assert s.rcpt(rcpt)[0] == 250
        code, reply = s.data(b"Subject: logged\r\n\r\nhello\r\n")
        assert code == 250
        qid = re.search(rb"queued as ([0-9a-f]+)", reply).group(1).decode()
        s.rset()
        s.mail("x@example.org")
        assert s.rcpt(f"nobody@{HOSTNAME}")[0] == 550  # unknown recipient
        s.rset()
        assert s.mail("x@example.org", ["SIZE=5000"])[0] == 552  # over the size limit
        s.rset()
        s.mail("x@example.org", ["SIZE=500"])
        assert s.rcpt(FULL)[0] == 552  # over quota
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20,
                      source_address=("127.0.0.2", 0)) as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("far@example.net")[0] == 554  # relay from an untrusted address
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=20) as s:
        s.ehlo()
        assert s.mail(USER)[0] == 530  # no AUTH
        s.login(USER, PASSWORD)
        assert s.mail("someone@example.org")[0] == 553  # not the log-in's address
    return qid


@pytest.fixture(params=["text", "json"])
def logged(request: pytest.FixtureRequest, tmp_path: Path):
    require_installed_plugin()
    host = SmartHost(rcpt_replies={"soon@example.net": "450 4.2.0 try later",
                                   "gone@example.net": "550 5.1.1 no such user here"}).start()
    srv = ServerProcess(
        tmp_path / "srv", tls=False, smtp_config='max_message_size = "2KB"',
        extra_config=f'[smarthost]\nhost = "{host.hop}"\n'
                     '[queue]\nretry_intervals = ["1s"]\nexpiration = "2s"\n'
                     f'[log]\nmail_log = "../mail.log"\nformat = "{request.param}"\n')
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    srv.add_mailbox(FULL, "full pass")
    srv.admin("mailbox", "quota", FULL, "100")
    try:
        with srv:
            qid = _make_events(srv)
            log = srv.root / "mail.log"
            wait_until(lambda: "expired" in log.read_text(), timeout=30, what="the expiry")
            srv.stop_cleanly(PASSWORD)
        yield request.param, qid, log.read_text().splitlines()
    finally:
        host.stop()


def _records(fmt: str, lines: list[str]) -> list[dict]:
    """Each line as {"event", "queue_id", "text" or the JSON fields}."""
    out = []
    for line in lines:
        if fmt == "json":
            out.append(json.loads(line))
            continue
        m = re.match(r"^\S+ \S+ pop3coexist\[\d+\]: (\S+): (\S+)", line)
        assert m, line
        qid, word = m.groups()
        event = {"connect": "connect", "disconnect": "disconnect", "accepted": "accepted",
                 "reject:": "refused", "login": "login"}.get(word)
        if event is None:
            status = re.search(r"status=(\w+)", line).group(1)
            event = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced",
                     "expired": "expired"}[status]
        out.append({"event": event, "queue_id": None if qid == "NOQUEUE" else qid,
                    "text": line})
    return out


def test_one_line_per_event_joined_by_the_queue_id(logged) -> None:
    """Every event kind has its line; the accepted message's lines (accepted, local and remote
    delivered, deferred, bounced, expired) all carry the id of the 250 reply, which is the
    outbound queue's id; each refusal names its reason."""
    fmt, qid, lines = logged
    records = _records(fmt, lines)
    kinds = {r["event"] for r in records}
    assert {"connect", "disconnect", "login", "accepted", "refused", "delivered", "deferred",
            "bounced", "expired"} <= kinds, kinds
    mine = [r for r in records if r["queue_id"] == qid]
    assert [r["event"] for r in mine if r["event"] == "accepted"] == ["accepted"]
    by_kind = {(r["event"], r.get("recipient") or re.search(r"to=<([^>]*)>",
                                                           r.get("text", "")).group(1))
               for r in mine if r["event"] != "accepted"}
    assert {("delivered", USER), ("delivered", "ok@example.net"),
            ("deferred", "soon@example.net"), ("bounced", "gone@example.net"),
            ("expired", "soon@example.net")} <= by_kind, by_kind
    accepted = next(r for r in mine if r["event"] == "accepted")
    refusals = [r for r in records if r["event"] == "refused"]
    if fmt == "json":
        assert accepted["sender"] == "x@example.org" and accepted["size"] > 0
        assert accepted["recipients"] == [USER, "ok@example.net", "soon@example.net",
                                          "gone@example.net"]
        bounced = next(r for r in mine if r["event"] == "bounced")
        assert bounced["reply"].startswith("550 5.1.1") and bounced["route"] == "smarthost"
        reasons = {(r["code"], r["enhanced"], r["reason"]) for r in refusals}
    else:
        text = accepted["text"]
        assert "from=<x@example.org>" in text and "nrcpt=4" in text
        assert f"to=<{USER}>,<ok@example.net>,<soon@example.net>,<gone@example.net>" in text
        assert "550 5.1.1" in next(r for r in mine if r["event"] == "bounced")["text"]
        reasons = set()
        for r in refusals:
            m = re.search(r": (\d{3}) (\S+) .*reason=\"([^\"]+)\"", r["text"])
            reasons.add((int(m.group(1)), m.group(2), m.group(3)))
    assert {(550, "5.1.1", "unknown recipient"), (554, "5.7.1", "relay denied"),
            (552, "5.2.2", "over quota"), (552, "5.3.4", "message too big"),
            (553, "5.7.1", "wrong sender"), (530, "5.7.0", "AUTH required")} <= reasons, reasons
    assert not any(PASSWORD in line for line in lines)
