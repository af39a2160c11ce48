"""Byte-level regression tests for the defects the fuzzers found (issue 16 item 1); each
crashing input is also a file in tests/fuzz/corpus/<harness>/regress-*, replayed by
test_harness_properties.py. The checker defect's test is in test_checker_properties.py."""

from __future__ import annotations

from pathlib import Path

from pop3coexist.smtp import client as c
from pop3coexist.smtp import dsn
from pop3coexist.store.envelope import Envelope, Recipient
from tests.unit.test_outbound_client import Harness

EHLO = (b"250-mx.example.net hello", b"250 8BITMIME")


def test_a_250_to_data_is_not_delivery(tmp_path: Path) -> None:
    """A next hop that answers DATA with 250 instead of 354 got our message counted as
    delivered although its body was never sent (lost mail); now the accepted recipients get a
    temporary 451 4.5.0 protocol error and stay queued."""
    h = Harness(tmp_path)
    h.server(b"220 mx.example.net ESMTP", *EHLO)
    assert h.server(b"250 2.1.0 ok").startswith(b"RCPT TO:<b@example.net>")
    assert h.server(b"250 2.1.5 ok") == b"DATA\r\n"
    sent = h.server(b"250 2.0.0 queued as nothing")
    assert b"leading dot" not in sent and sent == b"QUIT\r\n"
    [reply] = h.close().replies
    assert not reply.delivered and reply.code == 451, reply
    assert reply.reply.startswith("451 4.5.0 protocol error after DATA: 250"), reply


def test_next_hop_reply_text_loses_its_control_characters(tmp_path: Path) -> None:
    """A reply with NUL, escape sequences or BEL from a next hop was kept as it was in the
    recipient's reply (the queue state, the log, the DSN); it is one printable line now."""
    h = Harness(tmp_path)
    h.server(b"220 mx.example.net ESMTP", *EHLO, b"250 ok")
    h.server(b"550 5.1.1 no\x00such \x1b[31muser\x07")
    [reply] = h.close().replies
    assert reply.reply == "550 5.1.1 no?such ?[31muser?", reply


def test_a_3xx_reply_derives_no_class_3_status() -> None:
    """A 354 to RCPT (a next hop's protocol error) derived the RFC 3463 code 3.0.0, a class
    that does not exist; it is 4.0.0 (temporary) now."""
    assert c.RecipientReply("b@example.net", 354, "354 go").enhanced == "4.0.0"
    assert c.RecipientReply("b@example.net", 550, "550 no").enhanced == "5.0.0"


def test_dsn_fields_carry_no_control_characters() -> None:
    """A remote reply, ENVID or ORCPT with control characters (ESC, BEL, VT) went into the
    report's header fields and text as they were; every such character is ``?`` now."""
    r = Recipient("x@y.test", orcpt="rfc822;x@y\x1b.test", notify=None)
    r.last_reply = "550 5.1.1 no \x1b[31m such\x07 user"
    env = Envelope(id="q1", sender="a@b.test", recipients=[r], ret=None, envid="EN\x0bV1",
                   arrival=1_700_000_000.0, received_from=None)
    report = dsn.build_report("failed", env, [r], "pop.contoso.test", b"", 1_700_000_100.0)
    assert b"\x1b" not in report and b"\x07" not in report and b"\x0b" not in report
    assert b"Diagnostic-Code: X-Pop3coexist; 550 5.1.1 no ?[31m such? user\r\n" in report


def test_a_malformed_reply_line_is_a_protocol_error(tmp_path: Path) -> None:
    """"25 0ok" was read as reply code 25 (Twisted's int() of "25 ") and kept as the
    recipient's reply; a line that is not three digits 2xx-5xx then SP, "-" or its end is a
    protocol error now: temporary (451 4.5.0) and the connection is dropped."""
    h = Harness(tmp_path)
    h.server(b"220 mx.example.net ESMTP", *EHLO, b"250 ok")
    h.server(b"25 0ok")
    assert h.transport.disconnecting
    [reply] = h.close().replies
    assert reply.code == 451 and reply.reply.startswith("451 4.5.0 protocol error"), reply


def test_sieve_errors_that_quote_the_script_are_one_printable_line() -> None:
    """The sieve fuzzer's input (corpus/sieve/regress-newline-in-error): ``require
    ["relational, not size ...\\n..."]`` gave the error ``unknown extension "relational, not
    size :over 100K,\\n    header :count"``, two lines: the admin tool's one-line error and
    the log took the script's text as it was. Every SieveSyntaxError and SieveRuntimeError
    message is now one printable line (non-printable characters as escapes) of at most 300
    characters, whatever it quotes."""
    from pop3coexist.policy import sieve, sieve_run

    corpus = Path(__file__).parent / "corpus" / "sieve" / "regress-newline-in-error"
    try:
        sieve.parse(corpus.read_bytes())
    except sieve.SieveSyntaxError as e:
        assert e.line == 1 and "\n" not in str(e) and "100K,\\n    header" in e.message, e
    else:
        raise AssertionError("the script parsed")
    err = sieve.check('require "a\r\nBYE \\"x\\"\u2028' + "b" * 400 + '";')
    assert err is not None and err.isprintable() and len(err) <= len("line 1: ") + 300, err
    assert err.startswith('line 1: unknown extension "a\\r\\nBYE "x"\\u2028bbb'), err
    assert str(sieve_run.SieveRuntimeError(3, "redirect: \"a\nb\" is not an address")) == (
        'line 3: redirect: "a\\nb" is not an address')


def test_xtext_of_an_undecodable_octet_does_not_raise() -> None:
    """dsn.xtext_encode raised UnicodeEncodeError on a lone surrogate (an ORCPT or ENVID with
    an undecodable octet kept by surrogateescape) while a report or the next hop's RCPT was
    being written; the octet is encoded as itself now."""
    assert dsn.xtext_encode("a\udcffb") == "a+FFb"
    assert dsn.xtext_encode("\ud800") == "?"  # a surrogate that stands for no octet
    assert dsn.orcpt_param("rfc822;x\udcfe@y.test") == "rfc822;x+FE@y.test"
