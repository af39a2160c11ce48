"""Final delivery against the real server (twistd) on OS-picked loopback ports (issue 11,
faults 4, 7, 9, 19): clients smtplib and swaks in, poplib out, two aiosmtpd next hops (one
advertising DSN, one not) behind ``[[domains.remote]]`` routes.

- content that does not start with a header field becomes body: TOP n 0 shows only our fields;
- ``Return-Path`` at final delivery (also for reports the queue delivers), never relayed on;
- a message larger than the room left in a mailbox: 552 5.2.2 alone, a 5.2.2 report beside
  others;
- NOTIFY=SUCCESS: "delivered" for a local mailbox, passed on to a DSN hop (no report),
  "relayed" from a hop without DSN.
"""

from __future__ import annotations

import itertools
import poplib
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME
from tests.support.smarthost import SmartHost, wait_until
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Deliv3ry pass"
TED = f"ted@{HOSTNAME}"
ANN = f"ann@{HOSTNAME}"
FULL = f"full@{HOSTNAME}"
FULL2 = f"full2@{HOSTNAME}"
_n = itertools.count(1)


@pytest.fixture(scope="module")
def hops():
    """Two next hops: ``dsn.test`` goes to one that offers DSN, ``nodsn.test`` to one that does
    not."""
    with_dsn = SmartHost(dsn=True, hostname="dsn-hop.test").start()
    without = SmartHost(hostname="plain-hop.test").start()
    yield {"dsn": with_dsn, "plain": without}
    with_dsn.stop()
    without.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, hops):
    """A running server with mailboxes ted, ann, full and full2 (quota 20,000 bytes each,
    default 10% grace) and routes to the two hops."""
    extra = (
        f'[[domains.remote]]\nname = "dsn.test"\nrelay = true\nroute = "{hops["dsn"].hop}"\n'
        f'[[domains.remote]]\nname = "nodsn.test"\nrelay = true\nroute = "{hops["plain"].hop}"\n'
        '[smarthost]\ntls = "none"\n[queue]\nretry_intervals = ["1s"]\n'
    )
    srv = make_server(tmp_path_factory.mktemp("delivery"), extra_config=extra, tls=False)
    srv.write_config()
    for box in (TED, ANN, FULL, FULL2):
        srv.add_mailbox(box, PASSWORD)
    srv.admin("mailbox", "quota", FULL, "20000")
    srv.admin("mailbox", "quota", FULL2, "20000")
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def new_dir(server, address: str) -> Path:
    return server.state_dir / "mailroot" / HOSTNAME / address.split("@")[0] / "new"


def find(server, address: str, *markers: bytes, timeout: float = 20.0) -> list[bytes]:
    """The messages in ``address``'s new/ holding every marker (polled up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p.read_bytes() for p in sorted(new_dir(server, address).iterdir())]
        found = [m for m in found if all(k in m for k in markers)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def queue_empty(server) -> bool:
    """No envelope in the queue, unclaimed (env/) or claimed by a runner (claimed/<owner>/:
    mail a runner's own process queued is there from the start)."""
    queue = server.state_dir / "queue"
    return not any(queue.glob("env/*.json")) and not any(queue.glob("claimed/*/*.json"))


def pop(address: str, server) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.port("pop3"))
    p.user(address)
    p.pass_(PASSWORD)
    return p


def smtp(server) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test")
    s.ehlo()
    return s


# --------------------------------------------------------------------------- fault 4 / 19


def test_content_without_a_header_is_body_and_top_0_shows_only_our_fields(server) -> None:
    """smtplib sends content whose first line is indented: POP3 TOP n 0 gives Return-Path and
    Received and the empty line only; RETR gives the client's lines as the body."""
    marker = f"indented-{next(_n)}"
    with smtp(server) as s:
        s.sendmail("someone@example.test", [ANN],
                   f"  indented first line {marker}\r\nsecond line\r\n".encode())
    p = pop(ANN, server)
    try:
        count, _ = p.stat()
        for i in range(1, count + 1):
            _, lines, _ = p.retr(i)
            if any(marker.encode() in line for line in lines):
                break
        else:
            raise AssertionError("message not found")
        _, head, _ = p.top(i, 0)
    finally:
        p.quit()
    assert head[0] == b"Return-Path: <someone@example.test>"
    assert head[1].startswith(b"Received: from client.test ([127.0.0.1])")
    assert all(line.startswith(b"\t") for line in head[2:-1]) and head[-1] == b""
    blank = lines.index(b"")
    assert lines[blank + 1:] == [f"  indented first line {marker}".encode(), b"second line"]


def test_swaks_null_sender_return_path_and_forged_one_dropped(server) -> None:
    """swaks sends from <> with a Return-Path field of its own in the header: the mailbox copy
    starts with ``Return-Path: <>`` and the forged field is gone (RFC 5321 4.4)."""
    swaks = require_program("swaks")
    marker = f"nullrp-{next(_n)}"
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("smtp")), "--helo", "client.test",
         "--from", "<>", "--to", ANN, "--add-header", "Return-Path: <forged@evil.test>",
         "--header", f"Subject: {marker}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "MAIL FROM:<>" in result.stdout
    [msg] = find(server, ANN, marker.encode())
    assert msg.startswith(b"Return-Path: <>\nReceived: from client.test ")
    assert b"forged@evil.test" not in msg


def test_relayed_copy_has_no_return_path(server, hops) -> None:
    """One transaction to a local mailbox and a relayed recipient: the next hop gets the
    message without Return-Path, the mailbox with it."""
    marker = f"mixed-{next(_n)}"
    with smtp(server) as s:
        s.sendmail("someone@example.test", [ANN, "x@nodsn.test"],
                   f"Subject: {marker}\r\n\r\nbody\r\n".encode())
    [local] = find(server, ANN, marker.encode())
    assert local.startswith(b"Return-Path: <someone@example.test>\n")
    got = wait_until(lambda: [m for m in hops["plain"].received if marker.encode() in m.content],
                     what="the relayed copy")
    assert got[0].content.startswith(b"Received: from client.test")
    assert b"Return-Path" not in got[0].content


# --------------------------------------------------------------------------- fault 7


def test_message_larger_than_the_room_left_is_refused_with_552(server) -> None:
    """Quota 20,000 bytes, empty mailbox, 40 KB without SIZE=: RCPT 250, end of DATA
    ``552 5.2.2``, nothing stored (STAT 0)."""
    with smtp(server) as s:
        assert s.mail("someone@example.test")[0] == 250  # no SIZE= parameter
        assert s.rcpt(FULL)[0] == 250
        code, reply = s.data(b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 500)
    assert code == 552 and reply.startswith(b"5.2.2 ")
    p = pop(FULL, server)
    try:
        assert p.stat() == (0, 0)
    finally:
        p.quit()


def test_full_mailbox_among_several_gets_a_report_the_others_the_message(server) -> None:
    """ted sends to full2 (no room for 40 KB) and ann: 250; ann gets it; ted gets one RFC 3464
    report from <> (delivered from the queue with ``Return-Path: <>``): Action failed,
    Status 5.2.2."""
    marker = f"several-{next(_n)}".encode()
    with smtp(server) as s:
        s.mail(TED)
        assert s.rcpt(FULL2)[0] == 250 and s.rcpt(ANN)[0] == 250
        code, _ = s.data(b"Subject: " + marker + b"\r\n\r\n" + (b"x" * 78 + b"\r\n") * 500)
    assert code == 250
    assert len(find(server, ANN, marker)) == 1
    [report] = find(server, TED, marker, b"Status: 5.2.2")
    assert report.startswith(b"Return-Path: <>\n")
    assert b"Final-Recipient: rfc822; full2@pop.contoso.test" in report.replace(b"\r\n", b"\n")
    assert b"Action: failed" in report
    assert not any(marker in m for m in find(server, FULL2, timeout=0))


# --------------------------------------------------------------------------- fault 9


def test_notify_success_for_a_local_recipient(server) -> None:
    """smtplib with NOTIFY=SUCCESS and ORCPT for ann, ENVID and RET=HDRS: ann gets the
    message and the sender (ted) an "Action: delivered", Status 2.0.0 report."""
    marker = f"success-{next(_n)}".encode()
    with smtp(server) as s:
        s.sendmail(TED, [ANN], b"Subject: " + marker + b"\r\n\r\nbody\r\n",
                   mail_options=["RET=HDRS", "ENVID=env-" + marker.decode()],
                   rcpt_options=["NOTIFY=SUCCESS", f"ORCPT=rfc822;{ANN}"])
    assert len(find(server, ANN, marker)) == 1
    [report] = find(server, TED, marker, b"Action: delivered")
    text = report.replace(b"\r\n", b"\n")
    assert text.startswith(b"Return-Path: <>\n")
    assert b"Original-Envelope-Id: env-" + marker + b"\n" in text
    assert (f"Original-Recipient: rfc822;{ANN}\nFinal-Recipient: rfc822; {ANN}\n"
            "Action: delivered\nStatus: 2.0.0\n").encode() in text


def test_notify_success_passed_on_to_a_dsn_hop_without_a_report(server, hops) -> None:
    """To a next hop that offers DSN, NOTIFY/ORCPT/RET/ENVID go on with the message and no
    "relayed" report is sent (the next hop reports)."""
    marker = f"dsnhop-{next(_n)}".encode()
    with smtp(server) as s:
        s.sendmail(TED, ["x@dsn.test"], b"Subject: " + marker + b"\r\n\r\nbody\r\n",
                   mail_options=["RET=HDRS", "ENVID=e1"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x@dsn.test"])
    [got] = wait_until(lambda: [m for m in hops["dsn"].received if marker in m.content],
                       what="the message at the DSN hop")
    assert "RET=HDRS" in got.mail_options and "ENVID=E1" in got.mail_options  # aiosmtpd upper-cases
    assert "NOTIFY=SUCCESS,FAILURE" in got.rcpt_options
    assert "ORCPT=RFC822;X@DSN.TEST" in got.rcpt_options
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    assert find(server, TED, marker, timeout=0) == []


def test_notify_success_to_a_hop_without_dsn_gives_relayed(server, hops) -> None:
    """To a next hop without DSN, no DSN parameters are sent and the sender gets an
    "Action: relayed" report."""
    marker = f"plainhop-{next(_n)}".encode()
    with smtp(server) as s:
        s.sendmail(TED, ["y@nodsn.test"], b"Subject: " + marker + b"\r\n\r\nbody\r\n",
                   rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;y@nodsn.test"])
    [got] = wait_until(lambda: [m for m in hops["plain"].received if marker in m.content],
                       what="the message at the hop without DSN")
    assert got.rcpt_options == []
    assert not [o for o in got.mail_options if o.startswith(("RET=", "ENVID="))]
    [report] = find(server, TED, marker, b"Action: relayed")
    assert b"Original-Recipient: rfc822;y@nodsn.test" in report
    assert report.startswith(b"Return-Path: <>\n")


def test_notify_never_means_no_report_even_for_a_full_mailbox(server) -> None:
    """NOTIFY=NEVER for the full mailbox beside ann: ann gets the message, no report at all."""
    marker = f"never-{next(_n)}".encode()
    with smtp(server) as s:
        s.mail(TED)
        assert s.rcpt(FULL2, ["NOTIFY=NEVER"])[0] == 250 and s.rcpt(ANN)[0] == 250
        code, _ = s.data(b"Subject: " + marker + b"\r\n\r\n" + (b"x" * 78 + b"\r\n") * 500)
    assert code == 250
    assert len(find(server, ANN, marker)) == 1
    wait_until(lambda: queue_empty(server), what="the queue to empty")
    assert find(server, TED, marker, timeout=0) == []


# --------------------------------------------------------------------------- kept-back cases


def test_mailbox_exactly_at_its_quota_refuses_at_rcpt_without_size(server) -> None:
    """A mailbox whose files add up to exactly its quota (made while the server runs): smtplib's
    RCPT without MAIL SIZE= gets ``552 5.2.2`` at once (it can take nothing, whatever the
    grace), and the next recipient of the same transaction is still accepted."""
    box = f"atquota@{HOSTNAME}"
    server.add_mailbox(box, PASSWORD)
    server.admin("mailbox", "quota", box, "5000")
    (new_dir(server, box) / "1700000000.M1P1.filler.host").write_bytes(b"x" * 5000)
    with smtp(server) as s:
        assert s.mail("someone@example.test")[0] == 250
        code, reply = s.rcpt(box)
        assert (code, reply) == (552, f"5.2.2 <{box}>: mailbox full".encode())
        assert s.rcpt(ANN)[0] == 250
        s.rset()


def test_report_to_a_sender_in_a_domain_added_at_run_time_is_delivered_here(server) -> None:
    """``domain add`` while the server runs, then its user sends 40 KB to full2 (no room) and
    ann: the 5.2.2 report to the sender is final delivery into its mailbox here (Return-Path
    <>), not sent out to an MX; nothing stays in the queue."""
    server.admin("domain", "add", "fabrikam.test")
    bob = "bob@fabrikam.test"
    server.add_mailbox(bob, PASSWORD)
    marker = f"runtime-{next(_n)}".encode()
    with smtp(server) as s:
        s.mail(bob)
        assert s.rcpt(FULL2)[0] == 250 and s.rcpt(ANN)[0] == 250
        code, _ = s.data(b"Subject: " + marker + b"\r\n\r\n" + (b"x" * 78 + b"\r\n") * 500)
    assert code == 250
    bob_new = server.state_dir / "mailroot" / "fabrikam.test" / "bob" / "new"
    report = wait_until(lambda: [p.read_bytes() for p in bob_new.iterdir()], what="the report")
    assert report[0].startswith(b"Return-Path: <>\n")
    assert b"Status: 5.2.2" in report[0] and marker in report[0]
    wait_until(lambda: queue_empty(server), what="an empty queue")
