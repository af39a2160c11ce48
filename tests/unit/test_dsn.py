"""RFC 3464 delivery reports (smtp/dsn.py): structure, fields, RET, NOTIFY, xtext."""

from __future__ import annotations

import email
import email.header
import re
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


# ---------------------------------------------------------------- every field through dsn.field
# A value with everything that could break a report's structure: CR, LF, a blank line, a new
# field, a per-recipient block, a boundary, NUL, ESC, a Unicode line separator, a bidi override,
# a lone surrogate (an undecodable octet kept by surrogateescape) and non-ASCII text.
HOSTILE = ("x\r\n\r\nFinal-Recipient: rfc822; evil@example.com\r\nBcc: evil@example.com\n"
           "\n--=_report_0\rStatus: 9.9.9\x00\x1b[31m\u2028\u202e\udcff caf\u00e9")


def _sound(data: bytes, recipients: int) -> Message:
    """The report is one multipart/report with three parts, ``recipients`` per-recipient
    blocks, no field added by a value, and its own parts ASCII lines of at most 998 octets
    with no control character."""
    own = data[: re.search(rb"Content-Type: (message|text)/rfc822", data).start()]
    assert own.isascii(), own
    assert b"\n" not in own.replace(b"\r\n", b""), "bare CR or LF"
    lines = own.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert not any(c < 0x20 and c not in (0x0D, 0x0A) or c == 0x7F for c in own), own
    assert not any(line.startswith((b"Bcc:", b"Status: 9.9.9")) for line in lines), own
    assert sum(line.startswith(b"Final-Recipient:") for line in lines) == recipients
    assert sum(line.startswith(b"--=_report_") for line in lines) == 3
    msg = _parse(data)
    parts = msg.get_payload()
    assert msg.get_content_type() == "multipart/report" and len(parts) == 3
    blocks = parts[1].get_payload()
    assert len(blocks) == 1 + recipients, [str(b) for b in blocks]
    return msg


@pytest.mark.parametrize("where", [
    "sender (To)", "reporting MTA (From, Message-ID, Reporting-MTA, text)", "ENVID",
    "received-from", "ORCPT", "recipient address", "status", "remote MTA",
    "remote reply (Diagnostic-Code, text)", "diagnostic", "second recipient's reply"])
def test_no_field_of_a_report_lets_a_value_break_it(where: str) -> None:
    """Issue 16, the dsn fuzzer's defect (a Status of ``5.1.51\\n`` matched ``^...$`` and its
    newline ended the per-recipient block: 3 blocks for 2 recipients). Every kind of field is
    now written by ``dsn.field``: the same hostile value in any of them adds no field, no block,
    no part, and leaves no control character or non-ASCII octet in the report's own parts."""
    env_kw: dict = {}
    r_kw: dict = {}
    mta = "pop.contoso.test"
    second = _rcpt("c@example.net")
    if where.startswith("sender"):
        env_kw["sender"] = HOSTILE
    elif where.startswith("reporting"):
        mta = HOSTILE
    elif where == "ENVID":
        env_kw["envid"] = HOSTILE
    elif where == "received-from":
        env_kw["received_from"] = HOSTILE
    elif where == "ORCPT":
        r_kw["orcpt"] = "rfc822;" + HOSTILE
    elif where == "recipient address":
        r_kw["addr"] = HOSTILE
    elif where == "status":
        r_kw["status"] = "5.1.1\n"
    elif where == "remote MTA":
        r_kw["remote_mta"] = HOSTILE
    elif where.startswith("remote reply"):
        r_kw["last_reply"] = "550 5.1.1 " + HOSTILE
    elif where == "diagnostic":
        r_kw["diagnostic"] = HOSTILE
    else:
        second.last_reply = "550 5.1.51\n" + HOSTILE
        second.status = "5.1.51\n"
    rcpt = _rcpt(r_kw.pop("addr", "b@example.net"), **r_kw)
    for kind in ("failed", "delayed", "delivered"):
        data = dsn.build_report(kind, _env(**env_kw), [rcpt, second], mta, b"Subject: x\r\n", 1.0)
        msg = _sound(data, 2)
        for block in msg.get_payload()[1].get_payload()[1:]:
            assert block["Status"][0] in "245" and "\n" not in block["Status"]


def test_the_status_regression_input_of_the_fuzzer() -> None:
    """The dsn harness's crashing input (tests/fuzz/corpus/dsn/regress-status-newline): two
    recipients with empty addresses and a Status of ``5.1.51`` plus LF give two blocks, the
    invalid status replaced by the one derived from the reply (5.0.0)."""
    from tests.fuzz.harnesses import fuzz_dsn

    corpus = Path(__file__).parents[1] / "fuzz" / "corpus" / "dsn"
    fuzz_dsn((corpus / "regress-status-newline").read_bytes())
    fuzz_dsn((corpus / "regress-utf8-notification").read_bytes())
    assert dsn.status_of(_rcpt("b@x.test", status="5.1.51\n", last_reply=None), "failed") == "5.0.0"


def test_utf8_addresses_use_rfc6533_and_the_text_part_is_utf8() -> None:
    """A non-ASCII recipient and ORCPT are written as RFC 6533 ``utf-8`` addresses in
    utf-8-addr-xtext (``\\x{HEX}``, also for ``+``, ``=`` and ``\\``); the human-readable part
    becomes UTF-8 quoted-printable and shows the address as it is; a non-ASCII sender is an
    RFC 2047 encoded group in To (RFC 6857 section 3.1.10), never raw UTF-8 in the header."""
    rcpt = _rcpt("j\u00fcrgen@b\u00fccher.test", orcpt="rfc822;J\u00fcrgen+x=y@b\u00fccher.test")
    data = dsn.build_report("failed", _env(sender="s\u00e9n@x.test"), [rcpt], "h.test", b"", 1.0)
    msg = _sound(data, 1)
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen@b\\x{FC}cher.test"
    assert block["Original-Recipient"] == "utf-8;J\\x{FC}rgen\\x{2B}x\\x{3D}y@b\\x{FC}cher.test"
    text = msg.get_payload()[0]
    assert text.get_content_charset() == "utf-8"
    assert "<j\u00fcrgen@b\u00fccher.test>: 550 5.1.1" in text.get_payload(decode=True).decode()
    assert msg["To"] == "=?utf-8?b?c8OpbkB4LnRlc3Q=?= :;"
    assert str(email.header.make_header(email.header.decode_header(msg["To"]))) == "s\u00e9n@x.test :;"


def test_envid_that_is_not_printable_is_written_as_xtext() -> None:
    """A printable ENVID is written as it was received (RFC 3464 section 2.2.1); one with
    spaces, controls or non-ASCII as RFC 3461 xtext, so that nothing of it is lost."""
    data = dsn.build_report("failed", _env(envid="a b\u00e9\x00"), [_rcpt("b@x.test")], "h", b"", 1.0)
    per_msg = _sound(data, 1).get_payload()[1].get_payload()[0]
    assert per_msg["Original-Envelope-Id"] == "a+20b+C3+A9+00"


def test_a_long_diagnostic_is_folded_not_cut() -> None:
    """A remote reply of 3000 octets is folded into lines of at most 998 octets (RFC 5322
    section 2.1.1); unfolded, the Diagnostic-Code holds all of its words."""
    words = " ".join(f"w{i}" for i in range(600))
    data = dsn.build_report("failed", _env(), [_rcpt("b@x.test", last_reply="550 5.1.1 " + words)],
                            "h", b"", 1.0)
    block = _sound(data, 1).get_payload()[1].get_payload()[1]
    assert " ".join(block["Diagnostic-Code"].split()) == "smtp; 550 5.1.1 " + words


def test_field_never_raises_and_returns_one_safe_line() -> None:
    """``dsn.field`` for every field name it knows and an unknown one, with hostile values of
    every type it may be given, returns lines of at most 998 octets, folded with CRLF SP only,
    with no control character."""
    for name in [*dsn._SYNTAX, "Action", "X-Other"]:
        for value in (HOSTILE, "", "\udcff" * 2000, "a" * 3000, 5, "utf-8;" + HOSTILE):
            line = dsn.field(name, value)
            physical = line.split("\r\n")
            assert all(len(p.encode("utf-8")) <= 998 for p in physical), name
            assert all(p.startswith(" ") for p in physical[1:]), name
            assert not any(dsn._unsafe(c) for c in line.replace("\r\n ", "")), (name, line)
            if name is not None:
                assert line.isascii(), (name, line)


def test_an_orcpt_of_type_utf8_is_not_encoded_twice() -> None:
    """An ORCPT received as RFC 6533 ``utf-8;`` (already utf-8-addr-xtext) is written once
    encoded, not with its backslashes encoded again."""
    rcpt = _rcpt("j@x.test", orcpt="utf-8;j\\x{FC}rgen@x.test")
    data = dsn.build_report("failed", _env(), [rcpt], "h.test", b"", 1.0)
    block = _sound(data, 1).get_payload()[1].get_payload()[1]
    assert block["Original-Recipient"] == "utf-8;j\\x{FC}rgen@x.test"
