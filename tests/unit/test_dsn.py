"""RFC 3464 delivery reports (smtp/dsn.py): structure, fields, RET, NOTIFY, xtext."""

from __future__ import annotations

import email
from email.message import Message
from pathlib import Path

import pytest

from pop3coexist.smtp import dsn
from pop3coexist.store.envelope import Envelope, Recipient, State

ORIGINAL = b"From: a@example.org\nTo: b@example.net\nSubject: report me\n\nline one\n.dot line\n"


def _env(**kw: object) -> Envelope:
    env = {"id": "0000000000000001aaaaaaaa", "sender": "a@example.org", "ret": None, "envid": None,
           "arrival": 1_700_000_000.0, "received_from": "c.example [192.0.2.1]", "recipients": []}
    env.update(kw)
    return Envelope(**env)  # type: ignore[arg-type]


def _rcpt(addr: str, **kw: object) -> Recipient:
    r = {"orcpt": None, "notify": None, "state": State.FAILED, "attempts": 1,
         "last_reply": "550 5.1.1 <b@example.net>: no such user", "remote_mta": "mx.example.net",
         "status": "5.1.1", "last_attempt": 1_700_000_100.0}
    r.update(kw)
    return Recipient(addr, **r)  # type: ignore[arg-type]


def _parse(data: bytes) -> Message:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF in report"
    return email.message_from_bytes(data)


def test_failure_report_is_a_multipart_report_with_the_rfc3464_fields(tmp_path: Path) -> None:
    """A failure report parses as multipart/report with Reporting-MTA, Arrival-Date and,
    per recipient, Final-Recipient, Action, Status, Remote-MTA and Diagnostic-Code."""
    p = tmp_path / "m"
    p.write_bytes(ORIGINAL)
    data = dsn.build_report(
        "failed", _env(), [_rcpt("b@example.net")], "pop.contoso.test",
        dsn.read_original(p, True), 1_700_000_200.0,
    )
    msg = _parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<a@example.org>" and msg["Auto-Submitted"] == "auto-replied"
    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "no such user" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; pop.contoso.test"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; b@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <b@example.net>: no such user"
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload(0)
    assert inner["Subject"] == "report me"
    assert ".dot line" in inner.get_payload()


def test_ret_hdrs_returns_only_the_header(tmp_path: Path) -> None:
    """RET=HDRS: the third part is text/rfc822-headers without the body."""
    p = tmp_path / "m"
    p.write_bytes(ORIGINAL)
    env = _env(ret="HDRS")
    full = dsn.include_full(env, "failed")
    assert full is False
    data = dsn.build_report("failed", env, [_rcpt("b@example.net")], "h.test",
                            dsn.read_original(p, full), 1.0)
    part = _parse(data).get_payload(2)
    assert part.get_content_type() == "text/rfc822-headers"
    assert b"Subject: report me" in data and b"line one" not in data


def test_orcpt_envid_and_local_diagnostics(tmp_path: Path) -> None:
    """ORCPT gives Original-Recipient, ENVID Original-Envelope-Id (both stored decoded); a failure
    with no remote reply has no Remote-MTA and an X- diagnostic type."""
    rcpt = _rcpt("b@example.net", orcpt="rfc822;B+ab@example.net", remote_mta=None,
                 last_reply="421 4.4.1 connection refused", status="4.4.7")
    data = dsn.build_report("failed", _env(envid="QQ=1"), [rcpt], "h.test", b"", 1.0)
    per_msg, per_rcpt = _parse(data).get_payload(1).get_payload()
    assert per_msg["Original-Envelope-Id"] == "QQ=1"
    assert per_rcpt["Original-Recipient"] == "rfc822;B+ab@example.net"
    assert per_rcpt["Remote-MTA"] is None
    assert per_rcpt["Status"] == "4.4.7"
    assert per_rcpt["Diagnostic-Code"].startswith("X-Pop3coexist; 421 4.4.1")


def test_delayed_and_relayed_reports(tmp_path: Path) -> None:
    """A delayed report says Action: delayed (with Will-Retry-Until); relayed says relayed."""
    rcpt = _rcpt("b@example.net", state="deferred", status="4.2.0",
                 last_reply="451 4.2.0 busy", will_retry_until=1_700_172_800.0)
    per = _parse(dsn.build_report("delayed", _env(), [rcpt], "h.test", b"", 1.0)).get_payload(1)
    assert per.get_payload(1)["Action"] == "delayed"
    assert per.get_payload(1)["Status"] == "4.2.0"
    assert per.get_payload(1)["Will-Retry-Until"]
    rel = _rcpt("b@example.net", state="delivered", status="2.0.0", last_reply="250 2.0.0 ok")
    per = _parse(dsn.build_report("relayed", _env(), [rel], "h.test", b"", 1.0)).get_payload(1)
    assert per.get_payload(1)["Action"] == "relayed"
    assert per.get_payload(1)["Status"] == "2.0.0"


@pytest.mark.parametrize(
    ("notify", "kind", "wanted"),
    [
        (None, "failed", True), (None, "delayed", True), (None, "relayed", False),
        (["NEVER"], "failed", False), (["SUCCESS"], "failed", False),
        (["SUCCESS"], "relayed", True), (["FAILURE"], "delayed", False),
        (["delay", "failure"], "delayed", True),
    ],
)
def test_notify_decides_which_reports_are_sent(notify: list[str] | None, kind: str, wanted: bool) -> None:
    """NOTIFY (RFC 3461 4.1): absent means FAILURE,DELAY; NEVER means nothing."""
    assert dsn.wants_notice(Recipient("b@example.net", notify=notify), kind) is wanted


def test_report_envelope_is_from_null_sender_and_asks_for_nothing() -> None:
    """A report goes from <> to the original sender with NOTIFY=NEVER (no report loops)."""
    env = dsn.report_envelope(_env(), 5.0)
    assert env["sender"] == ""
    assert env["recipients"] == [{"address": "a@example.org", "orcpt": None, "notify": ["NEVER"]}]


def test_xtext_round_trip() -> None:
    """xtext encodes +, = and controls as +XX and decodes back."""
    assert dsn.xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert dsn.xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert dsn.orcpt_param("rfc822;x+y@example.net") == "rfc822;x+2By@example.net"
    assert dsn.orcpt_param("x@example.net") == "rfc822;x@example.net"


def test_header_injection_is_flattened() -> None:
    """CR/LF in a reply text cannot add header lines to the report."""
    rcpt = _rcpt("b@example.net", last_reply="550 5.1.1 x\r\nBcc: evil@example.com")
    data = dsn.build_report("failed", _env(), [rcpt], "h.test", b"", 1.0)
    assert b"\r\nBcc:" not in data
