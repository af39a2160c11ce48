"""SMTP command-line framing (issue 11, fault 3), byte by byte over a StringTransport.

A command line ends at CRLF, or at a bare LF with ``smtp.bare_newline = "normalize"`` (the
default, as Postfix 3.7+ answers); with ``"reject"`` a bare-LF line is refused at once with
``500 5.5.2`` and the session goes on. A bare CR or another control character inside a command
or AUTH line is always refused with ``500 5.5.2``; none ever reaches a stored session value (HELO
name, AUTH identity, the Received header). The same holds between pipelined commands, in AUTH
continuation lines and after STARTTLS. Replies are written out here, not imported.
"""

from __future__ import annotations

import base64

import pytest

from tests.support.dialogue import run_dialogue, take
from tests.support.smtp_fakes import HOST, make_factory, open_session, smtp_config
from tests.support.smtp_replies import EHLO_CLEAR, EHLO_TLS, GREETING

HELO_OK = b"250 pop.contoso.test Hello [203.0.113.5]\r\n"
NOOP_OK = b"250 2.0.0 OK\r\n"
BARE_LF = (b"500 5.5.2 Syntax error: bare <LF> received; end command lines with <CR><LF> "
           b"(RFC 5321 section 2.3.8)\r\n")
BARE_CR = b"500 5.5.2 Syntax error: bare <CR> received (RFC 5321 section 2.3.8)\r\n"
CONTROL = b"500 5.5.2 Syntax error: control character in command line\r\n"
NO_HELO = b"503 5.5.1 Send HELO or EHLO first\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def start(mode: str = "normalize"):
    factory, store, checker, queue, clock = make_factory(smtp_config(bare_newline=mode))
    proto, transport = open_session(factory)
    assert take(transport) == GREETING
    return proto, transport, store


# ----------------------------------------------------------------------------- normalize


def test_bare_lf_ends_ehlo_and_the_name_is_clean() -> None:
    """The issue's input: ``EHLO a.example<LF>`` is answered at once, and the stored HELO name
    (and so the Received header) holds no LF; the following CRLF command is its own line."""
    proto, t, store = start()
    run_dialogue(proto, [
        (b"EHLO a.example\n", EHLO_CLEAR),
        (b"NOOP\r\n", NOOP_OK),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nhi\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued as ")),
    ], transport=t)
    assert proto._helo == "a.example"
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.startswith(b"Return-Path: <a@b.test>\nReceived: from a.example ([203.0.113.5])\n\tby pop.contoso.test ")


def test_bare_lf_noop_after_ehlo_is_answered_at_once() -> None:
    """After EHLO, ``NOOP<LF>`` gets its 250 at once (no wait for the idle timeout), and is
    not glued to the next line."""
    proto, t, _ = start()
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR),
        (b"NOOP\n", NOOP_OK),
        (b"RSET\r\n", NOOP_OK),
        (b"NOOP\n", NOOP_OK),
        (b"QUIT\n", b"221 2.0.0 pop.contoso.test closing connection\r\n"),
    ], transport=t)


def test_pipelined_mixed_line_ends_answered_in_order() -> None:
    """Pipelined commands separated by LF and CRLF alike are each answered, in order, and the
    message that follows DATA<LF> is stored with LF line ends (byte for byte)."""
    proto, t, store = start()
    run_dialogue(proto, [
        (b"EHLO client.test\nMAIL FROM:<a@b.test>\nRCPT TO:<ted@pop.contoso.test>\r\n"
         b"RCPT TO:<ann@pop.contoso.test>\nDATA\n",
         EHLO_CLEAR + b"250 2.1.0 Sender <a@b.test> OK\r\n"
         b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"
         b"250 2.1.5 Recipient <ann@pop.contoso.test> OK\r\n"
         b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\n\nline\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued as ")),
        (b"NOOP\n", NOOP_OK),
    ], transport=t)
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.endswith(b"\nSubject: s\n\nline\n")


def test_byte_by_byte_gives_the_same_answers() -> None:
    """Framing does not depend on how the bytes arrive: one byte at a time, a CR at the end of
    one read and the LF at the start of the next, gives the same replies."""
    proto, t, _ = start()
    for byte in b"EHLO a.example\nNOOP\r\nHELO b.example\r\n":
        proto.dataReceived(bytes([byte]))
    assert take(t) == EHLO_CLEAR + NOOP_OK + HELO_OK
    assert proto._helo == "b.example"


def test_auth_continuation_lines_end_at_bare_lf() -> None:
    """AUTH LOGIN's continuation lines ended by a bare LF are read at once, and the log-in
    succeeds with the right user name (no LF in it)."""
    proto, t, _ = start()
    run_dialogue(proto, [
        (b"EHLO c.test\n", EHLO_CLEAR),
        (b"AUTH LOGIN\n", b"334 VXNlcm5hbWU6\r\n"),
        (b64(b"ted@pop.contoso.test") + b"\n", b"334 UGFzc3dvcmQ6\r\n"),
        (b64(b"secret1") + b"\n", b"235 2.7.0 Authentication successful\r\n"),
    ], transport=t)
    assert proto.user == "ted@pop.contoso.test"


def test_bare_lf_after_starttls() -> None:
    """``STARTTLS<LF>`` starts TLS; what was pipelined after it is dropped; commands after the
    handshake may end in a bare LF too."""
    proto, t, _ = start()
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"STARTTLS\nMAIL FROM:<evil@x.test>\n", b"220 2.0.0 Ready to start TLS\r\n"),
        (b"MAIL FROM:<a@b.test>\n", NO_HELO),
        (b"EHLO c.test\n", EHLO_TLS),
    ], transport=t)
    assert t.tls_started


# ----------------------------------------------------------------------------- reject


def test_reject_mode_refuses_bare_lf_lines_and_keeps_the_session() -> None:
    """``bare_newline = "reject"``: a command line ended by a bare LF is refused at once with
    500 5.5.2, not acted on (no HELO name stored), and the session goes on."""
    proto, t, _ = start("reject")
    run_dialogue(proto, [
        (b"EHLO a.example\n", BARE_LF),
        (b"MAIL FROM:<a@b.test>\r\n", NO_HELO),
        (b"EHLO a.example\r\n", EHLO_CLEAR),
        (b"NOOP\nRSET\r\n", BARE_LF + NOOP_OK),
        (b"QUIT\n", BARE_LF),
        (b"NOOP\r\n", NOOP_OK),
    ], transport=t)
    assert proto._helo == "a.example"


def test_reject_mode_bare_lf_in_auth_ends_the_exchange() -> None:
    """``reject``: a SASL continuation line ended by a bare LF is refused and ends the AUTH
    exchange (the next line is a command again); nobody is logged in."""
    proto, t, _ = start("reject")
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b64(b"ted@pop.contoso.test") + b"\n", BARE_LF),
        (b"NOOP\r\n", NOOP_OK),
    ], transport=t)
    assert proto.user is None


# ----------------------------------------------------------------------------- bare CR, controls


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("line", [
    b"EHLO a.example\rNOOP\r\n",
    b"HELO a.example\r\r\n",
    b"EHLO a.exa\rmple\n",
    b"HELO \ra.example\r\n",
])
def test_bare_cr_in_a_command_is_refused(mode: str, line: bytes) -> None:
    """A CR that is not part of the line end is refused with 500 5.5.2 in either mode (before
    the bare-LF rule when the line ends in CRLF); no HELO name is stored; the session goes on."""
    proto, t, _ = start(mode)
    expected = BARE_LF if mode == "reject" and not line.endswith(b"\r\n") else BARE_CR
    run_dialogue(proto, [
        (line, expected),
        (b"MAIL FROM:<a@b.test>\r\n", NO_HELO),
        (b"NOOP\r\n", NOOP_OK),
    ], transport=t)
    assert proto._helo is None


@pytest.mark.parametrize("control", [b"\x00", b"\x01", b"\t", b"\x0b", b"\x0c", b"\x1b", b"\x7f"])
def test_control_characters_in_a_command_are_refused(control: bytes) -> None:
    """NUL, TAB, VT, FF, ESC, DEL ... in a command line: 500 5.5.2, no HELO name stored."""
    proto, t, _ = start()
    run_dialogue(proto, [
        (b"HELO a" + control + b"b.example\r\n", CONTROL),
        (b"EHLO" + control + b"x.example\r\n", CONTROL),
        (b"MAIL FROM:<a@b.test>\r\n", NO_HELO),
    ], transport=t)
    assert proto._helo is None


def test_bare_cr_in_an_auth_line_ends_the_exchange() -> None:
    """A bare CR in a SASL continuation line: 500 5.5.2, the exchange is over, no log-in."""
    proto, t, _ = start()
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b"dGVk\rQG\r\n", BARE_CR),
        (b"NOOP\r\n", NOOP_OK),
    ], transport=t)
    assert proto.user is None


@pytest.mark.parametrize("name", [b"ted@pop.contoso.test\r\nX: y", b"ted\n", b"t\x00ed", b"ted\x7f"])
def test_auth_identity_with_control_characters_is_refused(name: bytes) -> None:
    """A user name with CR, LF or another control character inside the base64 (PLAIN authzid
    or authcid, LOGIN user name, CRAM-MD5 user) gets 501 5.5.2 and never becomes the session's
    user; the session goes on."""
    refused = b"501 5.5.2 Invalid authentication response: control character in the user name\r\n"
    proto, t, _ = start()
    rows = [(b"EHLO c.test\r\n", EHLO_CLEAR)]
    if b"\x00" not in name:
        rows += [
            (b"AUTH PLAIN " + b64(b"\x00" + name + b"\x00secret1") + b"\r\n", refused),
            (b"AUTH PLAIN " + b64(name + b"\x00ted@pop.contoso.test\x00secret1") + b"\r\n", refused),
        ]
    rows += [
        (b"AUTH LOGIN " + b64(name) + b"\r\n", refused),
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b64(name) + b"\r\n", refused),
        (b"AUTH CRAM-MD5\r\n", lambda got: got.startswith(b"334 ")),
        (b64(name + b" " + b"0" * 32) + b"\r\n",
         lambda got: got.startswith(b"501 5.5.2 Invalid authentication response: ")),
        (b"NOOP\r\n", NOOP_OK),
    ]
    run_dialogue(proto, rows, transport=t)
    assert proto.user is None


# ----------------------------------------------------------------------------- table

PLAIN_IR = b64(b"\0ted@pop.contoso.test\0secret1")
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
UNRECOGNIZED = b"500 5.5.2 Command unrecognized\r\n"

# (mode, bytes sent after EHLO, replies expected, logged in afterwards)
FRAMING = [
    ("normalize", b"AUTH PLAIN " + PLAIN_IR + b"\n", AUTH_OK, True),
    ("normalize", b"AUTH PLAIN\n" + PLAIN_IR + b"\n", b"334 \r\n" + AUTH_OK, True),
    ("normalize", b"AUTH PLAIN\r\n" + PLAIN_IR + b"\n", b"334 \r\n" + AUTH_OK, True),
    ("normalize", b"AUTH PLAIN " + PLAIN_IR + b"\r\r\n", BARE_CR, False),
    ("normalize", b"AUTH PLAIN\n" + PLAIN_IR + b"\rNOOP\r\n", b"334 \r\n" + BARE_CR, False),
    ("normalize", b"AUTH LOGIN\r\n\n", b"334 VXNlcm5hbWU6\r\n"
     b"501 5.5.2 Invalid authentication response: empty user name\r\n", False),
    ("normalize", b"MAIL FROM:<a@b.test>\rRCPT TO:<ted@pop.contoso.test>\r\n", BARE_CR, False),
    ("normalize", b"MAIL FROM:<a@b.test>\nRCPT TO:<ted@pop.contoso.test>\r\nRSET\n",
     b"250 2.1.0 Sender <a@b.test> OK\r\n250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"
     + NOOP_OK, False),
    ("normalize", b"NOOP\n\r\n", NOOP_OK + UNRECOGNIZED, False),
    ("normalize", b"NOOP\r\n\n", NOOP_OK + UNRECOGNIZED, False),
    ("normalize", b"\n", UNRECOGNIZED, False),
    ("normalize", b"NOOP\n\rNOOP\r\n", NOOP_OK + BARE_CR, False),
    ("reject", b"AUTH PLAIN " + PLAIN_IR + b"\n", BARE_LF, False),
    ("reject", b"AUTH PLAIN\r\n" + PLAIN_IR + b"\n", b"334 \r\n" + BARE_LF, False),
    ("reject", b"MAIL FROM:<a@b.test>\nRCPT TO:<ted@pop.contoso.test>\r\n",
     BARE_LF + b"503 5.5.1 Need MAIL command first\r\n", False),
    ("reject", b"NOOP\r\n\n", NOOP_OK + BARE_LF, False),
    ("reject", b"NOOP\r\r\n", BARE_CR, False),
]


@pytest.mark.parametrize(("mode", "sent", "expected", "logged_in"), FRAMING)
def test_framing_table(mode: str, sent: bytes, expected: bytes, logged_in: bool) -> None:
    """Each mix of CRLF, bare LF and bare CR in MAIL, RCPT, AUTH PLAIN initial responses and
    continuation lines gets exactly these replies at once (nothing waits for more input), and
    logs in only where the line was taken."""
    proto, t, _ = start(mode)
    run_dialogue(proto, [(b"EHLO c.test\r\n", EHLO_CLEAR), (sent, expected)], transport=t)
    assert (proto.user == "ted@pop.contoso.test") is logged_in


@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_starttls_with_bare_lf(mode: str) -> None:
    """``STARTTLS<LF>`` with commands pipelined after it: in normalize mode TLS starts and the
    pipelined lines are dropped; in reject mode the line is refused, TLS does not start, and
    the pipelined lines are each answered (refused in turn), never acted on."""
    proto, t, _ = start(mode)
    run_dialogue(proto, [(b"EHLO c.test\r\n", EHLO_CLEAR)], transport=t)
    proto.dataReceived(b"STARTTLS\nMAIL FROM:<evil@x.test>\nRCPT TO:<ted@pop.contoso.test>\n")
    if mode == "normalize":
        assert take(t) == b"220 2.0.0 Ready to start TLS\r\n"
        assert t.tls_started and proto._txn is None
    else:
        assert take(t) == BARE_LF * 3
        assert not t.tls_started and proto._txn is None
