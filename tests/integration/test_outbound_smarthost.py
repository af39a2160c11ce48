"""Outbound delivery to a real smart host (aiosmtpd with STARTTLS and AUTH), the runner in a
subprocess: TLS policies, each AUTH mechanism, a wrong password, down-then-up."""

from __future__ import annotations

import email
from pathlib import Path

import pytest

from pop3coexist.store.queue import FileQueue
from tests.support.certs import make_ca_and_cert
from tests.support.dnsserver import DnsServer
from tests.support.programs import free_port
from tests.support.smarthost import Runner, SmartHost, enqueue, wait_until, write_config

pytestmark = pytest.mark.integration

BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: relay test\r\n\r\n.dot\r\nhello\r\n"


@pytest.fixture
def certs(tmp_path: Path):  # noqa: ANN201
    return make_ca_and_cert(tmp_path / "certs", "smarthost.test")


@pytest.fixture
def cleanup():  # noqa: ANN201
    items: list = []
    yield items
    for item in reversed(items):
        item.stop()


def _queue(config: Path) -> FileQueue:
    return FileQueue(config.parent / "state" / "queue", "pop.contoso.test")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_relay_over_verified_tls_with_each_auth_mechanism(tmp_path: Path, certs, cleanup, mechanism: str) -> None:  # noqa: ANN001
    """tls=required against a certificate the ca_file vouches for, AUTH with the one mechanism
    offered: the message arrives inside TLS, authenticated, dot-unstuffed, and leaves the queue."""
    host = SmartHost(cert=certs.cert, key=certs.key, users={"relay@contoso.test": "pa ss"},
                     mechanisms=(mechanism,)).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="required", ca_file=certs.ca_cert,
                       username="relay@contoso.test", password="pa ss")
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net", "c@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = host.wait_for(1)
    assert msg.tls and msg.login == "relay@contoso.test"
    assert msg.mail_from == "a@example.org" and msg.rcpt_tos == ["b@example.net", "c@example.net"]
    assert email.message_from_bytes(msg.content).get_payload() == ".dot\r\nhello\r\n"
    assert host.auth_attempts == [(mechanism, True)]
    assert all(inside for _, inside in host.commands)
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    log = runner.log()
    assert f"{qid} to=<b@example.net> relay=127.0.0.1" in log and "reply=250 2.0.0 OK queued" in log
    assert "pa ss" not in log


def test_one_session_carries_many_messages_with_their_own_replies(tmp_path: Path, certs, cleanup) -> None:  # noqa: ANN001
    """Connection reuse over verified TLS and AUTH (one connection allowed to the smart host):
    five queued messages and the failure report go over one session with one log-in; a 550
    and a 450 to one message's RCPT fail and defer that message alone."""
    host = SmartHost(cert=certs.cert, key=certs.key, users={"relay@contoso.test": "pa ss"},
                     mechanisms=("PLAIN",),
                     rcpt_replies={"x@example.net": "550 5.1.1 no such user",
                                   "y@example.net": "450 4.2.1 try again"}).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="required", ca_file=certs.ca_cert,
                       username="relay@contoso.test", password="pa ss",
                       retry_intervals=("1h",), max_connections_per_host=1)
    queue = _queue(cfg)
    ids = {r: enqueue(queue, [f"{r}@example.net"], BODY) for r in "bxycd"}
    runner = Runner(cfg).start()
    cleanup.append(runner)
    msgs = host.wait_for(4)
    assert sorted(tuple(m.rcpt_tos) for m in msgs) == [
        ("a@example.org",), ("b@example.net",), ("c@example.net",), ("d@example.net",)]
    wait_until(lambda: queue.ids() == [ids["y"]], what="all but the deferred message to leave")
    assert host.auth_attempts == [("PLAIN", True)] and all(m.tls for m in msgs)
    log = runner.log()
    assert f"{ids['x']} to=<x@example.net>" in log and "state=failed" in log
    assert f"{ids['y']} to=<y@example.net>" in log and "reply=450 4.2.1 try again" in log


def test_wrong_password_defers_and_logs_the_reply(tmp_path: Path, certs, cleanup) -> None:  # noqa: ANN001
    """A refused log-in at the smart host defers the mail and the log carries the 535 reply;
    the password appears nowhere in the log."""
    host = SmartHost(cert=certs.cert, key=certs.key, users={"relay": "right"}).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="required", ca_file=certs.ca_cert,
                       username="relay", password="wrong-secret", retry_intervals=("1h",))
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: "state=deferred" in runner.log(), what="a deferral in the log")
    log = runner.log()
    assert "smart host refused AUTH" in log and "535" in log
    assert "wrong-secret" not in log
    # the attempt is logged before its new state is saved: wait for the save
    def saved_deferred() -> bool:  # one read: the envelope may be replaced between two
        entries = queue.entries()
        return bool(entries) and entries[0]["recipients"][0]["state"] == "deferred"

    wait_until(saved_deferred, what="the recipient to be saved as deferred")
    [entry] = queue.entries()
    assert entry["id"] == qid
    assert host.received == []


def test_tls_required_with_wrong_certificate_sends_nothing_in_clear(tmp_path: Path, certs, cleanup) -> None:  # noqa: ANN001
    """tls=required and a certificate from a CA we do not trust: no MAIL is ever sent (in clear
    or otherwise), the mail waits in the queue, and the log says why."""
    other = make_ca_and_cert(tmp_path / "other", "smarthost.test", ca_name="some other CA")
    host = SmartHost(cert=certs.cert, key=certs.key, users={"relay": "pw"}).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="required", ca_file=other.ca_cert,
                       username="relay", password="pw", retry_intervals=("1h",))
    queue = _queue(cfg)
    enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: "state=deferred" in runner.log(), what="a deferral in the log")
    assert "TLS failure" in runner.log() and "certificate" in runner.log()
    assert host.commands == [] and host.received == [] and host.auth_attempts == []
    # the attempt is logged before its new state is saved: wait for the save
    def saved_deferred() -> bool:  # one read: the envelope may be replaced between two
        entries = queue.entries()
        return bool(entries) and entries[0]["recipients"][0]["state"] == "deferred"

    wait_until(saved_deferred, what="the recipient to be saved as deferred")


def test_opportunistic_tls_without_verification(tmp_path: Path, certs, cleanup) -> None:  # noqa: ANN001
    """tls=opportunistic uses STARTTLS when offered even with an unverifiable certificate."""
    host = SmartHost(cert=certs.cert, key=certs.key).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="opportunistic")
    enqueue(_queue(cfg), ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = host.wait_for(1)
    assert msg.tls and msg.login is None


def test_mixed_recipient_replies_from_a_real_server(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Per-recipient replies from aiosmtpd: 250 delivered, 550 failed (one report to the
    sender, through the same smart host), 450 deferred and retried alone."""
    host = SmartHost(rcpt_replies={"x@example.net": "550 5.1.1 no such user",
                                   "y@example.net": "450 4.2.1 try again"}).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="none", retry_intervals=("1s",))
    queue = _queue(cfg)
    enqueue(queue, ["b@example.net", "x@example.net", "y@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    msgs = host.wait_for(2)
    first, report = msgs[0], msgs[1]
    assert first.rcpt_tos == ["b@example.net"]
    assert report.mail_from in ("", "<>") and report.rcpt_tos == ["a@example.org"]
    parsed = email.message_from_bytes(report.content)
    assert parsed.get_content_type() == "multipart/report"
    blocks = parsed.get_payload(1).get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; x@example.net"]
    assert blocks[0]["Remote-MTA"] == "dns; 127.0.0.1"
    wait_until(lambda: runner.log().count("to=<y@example.net>") >= 2, what="a retry of y")
    host.rcpt_replies.pop("y@example.net")
    msgs = host.wait_for(3)
    assert msgs[2].rcpt_tos == ["y@example.net"]
    assert sum(m.rcpt_tos.count("b@example.net") for m in msgs) == 1
    wait_until(lambda: queue.ids() == [], what="the queue to empty")


def test_smarthost_down_then_up(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """With second-scale retry intervals: refused while the smart host is down, delivered
    after a retry once it is up."""
    port = free_port()
    cfg = write_config(tmp_path / "run", f"[127.0.0.1]:{port}", retry_intervals=("1s",))
    queue = _queue(cfg)
    enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: "connection refused" in runner.log(), what="a refused connection")
    host = SmartHost(port=port).start()
    cleanup.append(host)
    [msg] = host.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ["b@example.net"]
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert "attempts=2" in runner.log() or "attempts=3" in runner.log()


def test_admin_flush_from_another_process(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """`queue flush` (FileQueue.request_flush in this process) makes the running server retry
    long before the next scheduled attempt."""
    port = free_port()
    cfg = write_config(tmp_path / "run", f"[127.0.0.1]:{port}", retry_intervals=("1h",))
    queue = _queue(cfg)
    enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: "connection refused" in runner.log(), what="a refused connection")
    host = SmartHost(port=port).start()
    cleanup.append(host)
    queue.request_flush()
    host.wait_for(1, timeout=10)
    wait_until(lambda: queue.ids() == [], what="the queue to empty")


def test_smart_host_name_whose_first_address_refuses(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """RFC 5321 section 5.1 against a real DNS server: the smart host's name has two A records,
    127.0.0.2 first (nothing listens there: connection refused) and 127.0.0.1 (the aiosmtpd
    smart host). The message is delivered at the first attempt through the second address,
    with no retry (the retry interval is an hour)."""
    host = SmartHost().start()
    cleanup.append(host)
    dns = DnsServer(tmp_path / "dns", {"relay.test": [("smart.relay.test", "A", "127.0.0.2"),
                                                      ("smart.relay.test", "A", "127.0.0.1")]})
    cleanup.append(dns.start())
    order = [r.address for r in dns.resolver().resolve("smart.relay.test", "A")]
    assert order == ["127.0.0.2", "127.0.0.1"]  # the refusing address comes first
    cfg = write_config(tmp_path / "run", f"smart.relay.test:{host.port}",
                       retry_intervals=("1h",), extra=dns.config())
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = host.wait_for(1)
    assert msg.rcpt_tos == ["b@example.net"]
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert f"{qid} to=<b@example.net> relay=smart.relay.test" in runner.log()
    assert "attempts=1 state=delivered" in runner.log()


def test_direct_mx_delivery_on_the_configured_port(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """No smart host: a recipient domain's MX (a real DNS server: example.net MX 10
    mx.example.net, A 127.0.0.1) is reached on smarthost.mx_port, here the aiosmtpd sink's
    OS-picked port; the message is delivered at the first attempt."""
    host = SmartHost().start()
    cleanup.append(host)
    dns = DnsServer(tmp_path / "dns", {"example.net": [("example.net", "MX", 10, "mx.example.net"),
                                                       ("mx.example.net", "A", "127.0.0.1")]})
    cleanup.append(dns.start())
    cfg = write_config(tmp_path / "run", "", retry_intervals=("1h",), extra=dns.config(),
                       mx_port=host.port)
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = host.wait_for(1)
    assert msg.rcpt_tos == ["b@example.net"]
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert f"{qid} to=<b@example.net> relay=mx.example.net" in runner.log()
