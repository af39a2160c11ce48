"""Byte-exact ESMTP dialogues over a StringTransport: every reply of CONTRACT section 6, EHLO,
STARTTLS injection, AUTH (PLAIN, LOGIN, CRAM-MD5, errors), pipelining order, submission rules,
limits and bad input. Replies are written out here, not imported from the server."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from pop3coexist.errors import AuthUnavailable
from tests.support.dialogue import run_dialogue, take
from tests.support.fakes import FakePasswordFileChecker
from tests.support.smtp_fakes import HOST, make_factory, open_session, smtp_config
from tests.support.smtp_replies import EHLO_CLEAR, EHLO_TLS, GREETING

TRUSTED = "192.0.2.7"


def start(factory, peer: str = "203.0.113.5", tls_capable: bool = True):
    proto, transport = open_session(factory, peer, tls_capable)
    assert take(transport) == GREETING
    return proto, transport


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_ehlo_in_clear_and_after_starttls() -> None:
    """EHLO lists exactly the implemented extensions; after STARTTLS no STARTTLS is offered."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR),
        (b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
        (b"EHLO client.test\r\n", EHLO_TLS),
        (b"STARTTLS\r\n", b"503 5.5.1 TLS already active\r\n"),
    ], transport=t)
    assert t.tls_started


def test_ehlo_without_tls_or_secrets() -> None:
    """No TLS configured: no STARTTLS (454 if asked); a checker without secrets: no CRAM-MD5."""
    from tests.support.fakes import FakeChecker

    factory, *_ = make_factory(tls=False, checker=FakeChecker({}, offers_secrets=False))
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR.replace(b"250-STARTTLS\r\n", b"")
         .replace(b" CRAM-MD5", b"")),
        (b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n"),
    ], transport=t)


def test_require_tls_for_auth_hides_auth_and_refuses_it() -> None:
    """require_tls_for_auth: no AUTH line in clear, 538 5.7.11 if tried; offered after STARTTLS."""
    factory, *_ = make_factory(smtp_config(require_tls_for_auth=True))
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR.replace(b"250-STARTTLS\r\n250 AUTH PLAIN LOGIN CRAM-MD5",
                                                    b"250 STARTTLS")),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
        (b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
        (b"EHLO client.test\r\n", EHLO_TLS),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"235 2.7.0 Authentication successful\r\n"),
    ], transport=t)


def test_starttls_discards_pipelined_commands_and_resets() -> None:
    """RFC 3207 4.2: commands sent with STARTTLS are dropped; the session starts over."""
    factory, store, *_ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR),
        (b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n",
         b"220 2.0.0 Ready to start TLS\r\n"),
        (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Send HELO or EHLO first\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
    ], transport=t)
    assert t.tls_written_before.endswith(b"220 2.0.0 Ready to start TLS\r\n")


def test_starttls_forgets_authentication() -> None:
    """A log-in made before STARTTLS does not survive it (RFC 3207 4.2)."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"235 2.7.0 Authentication successful\r\n"),
        (b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
    ], transport=t)
    assert proto.user is None


def test_full_transaction_and_stored_bytes() -> None:
    """MAIL, RCPT, DATA, dot-unstuffing, LF storage, Received header, 250 with queue id."""
    factory, store, _, queue, _ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<a@b.test> SIZE=30 BODY=8BITMIME\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<Ted@Pop.Contoso.Test>\r\n", b"250 2.1.5 Recipient <Ted@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: x\r\n\r\n..leading dot\r\n.\r\n",
         lambda got: got.startswith(b"250 2.0.0 Ok: queued as ") and got.endswith(b"\r\n")),
        (b"QUIT\r\n", b"221 2.0.0 pop.contoso.test closing connection\r\n"),
    ], transport=t)
    [msg] = store.messages(f"ted@{HOST}")
    head, _, rest = msg.partition(b"Subject: x\n")
    assert rest == b"\n.leading dot\n"
    assert head.startswith(b"Return-Path: <a@b.test>\n"
                           b"Received: from client.test ([203.0.113.5])\n\tby pop.contoso.test "
                           b"(pop3coexist) with ESMTP id ")
    assert b"\tfor <Ted@pop.contoso.test>; " in head
    assert queue.items == []
    assert list(store.spool_dir().iterdir()) == []


def test_single_instance_for_two_local_recipients_and_queue_for_relay() -> None:
    """One DATA: one delivery call for both mailboxes; the relay-domain recipient is queued
    with its DSN parameters and BODY (RFC 6152) in the envelope."""
    factory, store, _, queue, _ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<a@b.test> RET=HDRS ENVID=abc+2Bdef BODY=8bitmime\r\n",
         b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<theodore@pop.contoso.test>\r\n",
         b"250 2.1.5 Recipient <theodore@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<ann@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ann@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<bob@exchange.northwindtraders.test> NOTIFY=SUCCESS,FAILURE "
         b"ORCPT=rfc822;bob@exchange.northwindtraders.test\r\n",
         b"250 2.1.5 Recipient <bob@exchange.northwindtraders.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"hello\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued as ")),
    ], transport=t)
    delivers = [c for c in store.calls if c[0] == "deliver_within_quota"]
    assert len(delivers) == 1
    assert delivers[0][1][1] == [("pop.contoso.test", "ted"), ("pop.contoso.test", "ann")]
    [(data, env)] = queue.items
    assert data.endswith(b"\n\nhello\n") or data.endswith(b"hello\n")
    # the queued copy is relayed onward: no Return-Path (RFC 5321 section 4.4), the mailboxes
    # have one
    assert data.startswith(b"Received: ")
    assert store.messages(f"ted@{HOST}")[0] == b"Return-Path: <a@b.test>\n" + data
    assert env["sender"] == "a@b.test"
    assert env["ret"] == "HDRS" and env["envid"] == "abc+def"
    assert env["body"] == "8BITMIME"
    assert env["recipients"] == [{"address": "bob@exchange.northwindtraders.test",
                                  "orcpt": "rfc822;bob@exchange.northwindtraders.test",
                                  "notify": ["SUCCESS", "FAILURE"]}]
    assert env["hops"] == 1 and env["received_from"] == "c.test ([203.0.113.5])"


def test_contract_replies() -> None:
    """550 5.1.1, 554 5.7.1, 552 5.3.4 at MAIL, 452 4.5.3 and 552 5.2.2 byte for byte."""
    factory, store, *_ = make_factory(smtp_config(max_message_size=1000, max_recipients=100))
    store.would_exceed_quota = lambda domain, mailbox, size: mailbox == "ann"
    proto, t = start(factory)
    rows = [
        (b"EHLO c.test\r\n", lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<a@b.test> SIZE=1001\r\n",
         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
        (b"MAIL FROM:<a@b.test> SIZE=100\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<nobody@pop.contoso.test>\r\n",
         b"550 5.1.1 <nobody@pop.contoso.test>: no such user here\r\n"),
        (b"RCPT TO:<x@foreign.example>\r\n",
         b"554 5.7.1 Relay access denied for <x@foreign.example>\r\n"),
        (b"RCPT TO:<ann@pop.contoso.test>\r\n", b"552 5.2.2 <ann@pop.contoso.test>: mailbox full\r\n"),
    ]
    run_dialogue(proto, rows, transport=t)
    for _i in range(100):
        proto.dataReceived(b"RCPT TO:<ted@pop.contoso.test>\r\n")
    assert take(t) == b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n" * 100
    run_dialogue(proto, [(b"RCPT TO:<ted@pop.contoso.test>\r\n", b"452 4.5.3 Too many recipients\r\n")],
                 transport=t)


def test_quota_uses_store_would_exceed_quota_when_present() -> None:
    """With a store offering would_exceed_quota, RCPT asks it with the MAIL SIZE."""
    factory, store, *_ = make_factory()
    asked = []

    def would_exceed(domain, mailbox, size):
        asked.append((domain, mailbox, size))
        return size > 50

    store.would_exceed_quota = would_exceed
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<a@b.test> SIZE=51\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"552 5.2.2 <ted@pop.contoso.test>: mailbox full\r\n"),
    ], transport=t)
    assert asked == [("pop.contoso.test", "ted", 51)]


def test_locked_mailbox_still_receives() -> None:
    """A locked mailbox (or domain) is accepted at RCPT and delivered to."""
    factory, store, *_ = make_factory()
    store.locked_domains.add("pop.contoso.test")
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"HELO c.test\r\n", b"250 pop.contoso.test Hello [203.0.113.5]\r\n"),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"x\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 ")),
    ], transport=t)
    [msg] = store.messages(f"ted@{HOST}")
    assert b" with SMTP id " in msg


def test_size_exceeded_during_data_stores_nothing() -> None:
    """SIZE checked during DATA: 552 5.3.4 after the end, no file left, nothing delivered."""
    factory, store, _, queue, _ = make_factory(smtp_config(max_message_size=100))
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR.replace(b"SIZE 10000000", b"SIZE 100")),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"x" * 60 + b"\r\n", b""),
        (b"y" * 60 + b"\r\n", b""),
        (b".\r\n", b"552 5.3.4 Message too big: the limit is 100 octets\r\n"),
        (b"NOOP\r\n", b"250 2.0.0 OK\r\n"),
    ], transport=t)
    assert store.messages(f"ted@{HOST}") == []
    assert list(store.spool_dir().iterdir()) == []


def test_hop_count() -> None:
    """max_hop_count 3: two Received lines pass (ours is the third), three get 554 5.4.6."""
    factory, store, *_ = make_factory(smtp_config(max_hop_count=3))
    proto, t = start(factory)
    run_dialogue(proto, [(b"EHLO c.test\r\n", EHLO_CLEAR)], transport=t)
    for n, expected in ((2, b"250 2.0.0 "), (3, b"554 5.4.6 Too many hops (3 Received headers): "
                                                 b"probably a mail loop\r\n")):
        proto.dataReceived(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n"
                           + b"Received: from x by y; date\r\n" * n + b"Subject: s\r\n\r\nbody\r\n.\r\n")
        out = take(t)
        assert out.startswith(b"250 2.1.0 Sender <a@b.test> OK\r\n250 2.1.5 Recipient "
                              b"<ted@pop.contoso.test> OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        assert out.split(b"<CR><LF>\r\n", 1)[1].startswith(expected)
    assert len(store.messages(f"ted@{HOST}")) == 1


def test_submission_requires_auth_and_own_sender() -> None:
    """Submission: 530 5.7.0 before AUTH; after AUTH only the user's own addresses (553 5.7.1);
    an alias of the user is its own; authenticated clients may relay. (The null sender:
    tests/unit/test_smtp_logins.py.)"""
    factory, _, _, queue, _ = make_factory(mode="submission")
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<ted@pop.contoso.test>\r\n", b"530 5.7.0 Authentication required\r\n"),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"235 2.7.0 Authentication successful\r\n"),
        (b"MAIL FROM:<ann@pop.contoso.test>\r\n",
         b"553 5.7.1 Sender address <ann@pop.contoso.test> is not yours\r\n"),
        (b"MAIL FROM:<Theodore@pop.contoso.test>\r\n",
         b"250 2.1.0 Sender <Theodore@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<x@foreign.example>\r\n", b"250 2.1.5 Recipient <x@foreign.example> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"hi\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 ")),
    ], transport=t)
    [(data, env)] = queue.items
    assert b" with ESMTPA id " in data
    assert env["recipients"][0]["address"] == "x@foreign.example"


def test_sender_check_can_be_switched_off() -> None:
    """smtp.sender_must_match_login = false lets an authenticated user send as anyone."""
    factory, *_ = make_factory(smtp_config(sender_must_match_login=False))
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"235 2.7.0 Authentication successful\r\n"),
        (b"MAIL FROM:<ann@pop.contoso.test>\r\n", b"250 2.1.0 Sender <ann@pop.contoso.test> OK\r\n"),
    ], transport=t)


def test_auth_login_and_cram_md5() -> None:
    """AUTH LOGIN with prompts, and CRAM-MD5 over the server's challenge."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b64(b"ted@pop.contoso.test") + b"\r\n", b"334 UGFzc3dvcmQ6\r\n"),
        (b64(b"secret1") + b"\r\n", b"235 2.7.0 Authentication successful\r\n"),
        (b"AUTH LOGIN\r\n", b"503 5.5.1 Already authenticated\r\n"),
    ], transport=t)
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nAUTH CRAM-MD5\r\n")
    out = take(t)
    challenge = base64.b64decode(out.rsplit(b"334 ", 1)[1].strip())
    assert challenge.startswith(b"<") and challenge.endswith(b"@pop.contoso.test>")
    digest = hmac.new(b"secret2", challenge, hashlib.md5).hexdigest().encode()
    run_dialogue(proto, [(b64(b"ann@pop.contoso.test " + digest) + b"\r\n",
                          b"235 2.7.0 Authentication successful\r\n")], transport=t)
    assert proto.user == "ann@pop.contoso.test"


def test_auth_errors_and_session_goes_on() -> None:
    """Bare AUTH, unknown mechanism, bad base64, '*' cancel, wrong password (delayed 535),
    directory down (454): each a clear reply, the session continues."""
    factory, _, checker, _, clock = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"AUTH PLAIN\r\n", b"503 5.5.1 Send EHLO first\r\n"),
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH \r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH NTLM\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH PLAIN !!!\r\n", b"501 5.5.2 Invalid base64 data\r\n"),
        (b"AUTH PLAIN\r\n", b"334 \r\n"),
        (b"*\r\n", b"501 5.7.0 Authentication cancelled\r\n"),
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b"not base64!\r\n", b"501 5.5.2 Invalid base64 data\r\n"),
        (b"AUTH PLAIN " + b64(b"no-nul-here") + b"\r\n",
         b"501 5.5.2 Invalid authentication response: PLAIN response must be authzid NUL authcid "
         b"NUL password\r\n"),
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0wrong") + b"\r\nNOOP\r\n", b""),
    ], transport=t)
    clock.advance(2)
    assert take(t) == b"535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 OK\r\n"
    checker.fail = AuthUnavailable()
    run_dialogue(proto, [
        (b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n",
         b"454 4.7.0 Temporary authentication failure\r\n"),
    ], transport=t)
    assert b"wrong" not in repr(checker.attempts).encode()


def test_failed_auth_delay_grows_per_address() -> None:
    """The second failure from the same address waits twice as long (AuthThrottle)."""
    factory, _, _, _, clock = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\n")
    take(t)
    bad = b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0wrong") + b"\r\n"
    proto.dataReceived(bad)
    clock.advance(2)
    assert take(t) == b"535 5.7.8 Authentication credentials invalid\r\n"
    proto.dataReceived(bad)
    clock.advance(3.9)
    assert take(t) == b""
    clock.advance(0.2)
    assert take(t) == b"535 5.7.8 Authentication credentials invalid\r\n"


def test_locked_mailbox_cannot_log_in() -> None:
    """A locked mailbox still receives mail but its owner's AUTH fails (535 5.7.8)."""
    factory, store, _, _, clock = make_factory()
    store.locked_mailboxes.add(("pop.contoso.test", "ted"))
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nAUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n")
    clock.advance(2)
    assert take(t).endswith(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert proto.user is None


def test_pipelined_commands_answer_in_order_while_auth_is_pending() -> None:
    """A held log-in keeps the pipelined MAIL/RCPT waiting; replies come out in order."""
    factory, _, checker, _, _ = make_factory(mode="submission")
    checker.hold = True
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\n")
    take(t)
    proto.dataReceived(b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n"
                       b"MAIL FROM:<ted@pop.contoso.test>\r\nRCPT TO:<ann@pop.contoso.test>\r\n")
    assert take(t) == b""
    checker.release()
    assert take(t) == (b"235 2.7.0 Authentication successful\r\n"
                       b"250 2.1.0 Sender <ted@pop.contoso.test> OK\r\n"
                       b"250 2.1.5 Recipient <ann@pop.contoso.test> OK\r\n")


def test_pipelined_transaction_in_one_packet() -> None:
    """RFC 2920: a whole transaction in one write gets all replies in order."""
    factory, store, *_ = make_factory()
    proto, t = start(factory, peer=TRUSTED)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n"
                       b"RCPT TO:<x@foreign.example>\r\nRCPT TO:<nobody@pop.contoso.test>\r\nDATA\r\n"
                       b"body\r\n.\r\nRSET\r\nQUIT\r\n")
    out = take(t).split(b"\r\n")
    assert out[8:] == [
        b"250 2.1.0 Sender <a@b.test> OK",
        b"250 2.1.5 Recipient <ted@pop.contoso.test> OK",
        b"250 2.1.5 Recipient <x@foreign.example> OK",
        b"550 5.1.1 <nobody@pop.contoso.test>: no such user here",
        b"354 End data with <CR><LF>.<CR><LF>",
        out[13],
        b"250 2.0.0 OK",
        b"221 2.0.0 pop.contoso.test closing connection",
        b"",
    ]
    assert out[13].startswith(b"250 2.0.0 Ok: queued as ")


BAD_COMMANDS = [
    (b"FOO\r\n", b"500 5.5.2 Command unrecognized\r\n"),
    (b"\xff\xfe\r\n", b"500 5.5.2 Syntax error: command is not ASCII\r\n"),
    (b"HELO\r\n", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    (b"EHLO\r\n", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Send HELO or EHLO first\r\n"),
    (b"EHLO c.test\r\n", EHLO_CLEAR),
    (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
    (b"DATA\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
    (b"MAIL\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL FROM:a@b.test\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL FROM:<a@b@c.test>\r\n", b"501 5.1.7 Bad sender address syntax: malformed local part\r\n"),
    (b"MAIL FROM:<a@b.test> SIZE=abc\r\n", b"501 5.5.4 Syntax: SIZE=octets\r\n"),
    (b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n", b"501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME\r\n"),
    (b"MAIL FROM:<a@b.test> RET=ALL\r\n", b"501 5.5.4 Syntax: RET=FULL or RET=HDRS\r\n"),
    (b"MAIL FROM:<a@b.test> ENVID=a+zz\r\n", b"501 5.5.4 Malformed xtext value (RFC 3461 section 4)\r\n"),
    (b"MAIL FROM:<a@b.test> SMTPUTF8\r\n", b"555 5.5.4 Unsupported parameter SMTPUTF8\r\n"),
    (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2\r\n", b"501 5.5.4 Parameter SIZE given twice\r\n"),
    (b"MAIL FROM:<a@b.test> =x\r\n", b"501 5.5.4 Malformed parameter\r\n"),
    (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
    (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Sender already specified\r\n"),
    (b"RCPT TO:<>\r\n", b"501 5.1.3 Bad recipient address syntax: empty\r\n"),
    (b"RCPT TO:<@a.test,ted@pop.contoso.test>\r\n",
     b"501 5.1.3 Bad recipient address syntax: malformed source route\r\n"),
    (b"RCPT TO:<ted@pop.contoso.test> NOTIFY=NEVER,SUCCESS\r\n",
     b"501 5.5.4 Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY\r\n"),
    (b"RCPT TO:<ted@pop.contoso.test> ORCPT=rfc822\r\n", b"501 5.5.4 Syntax: ORCPT=addr-type;xtext\r\n"),
    (b"RCPT TO:<ted@pop.contoso.test> FOO=1\r\n", b"555 5.5.4 Unsupported parameter FOO\r\n"),
    (b"DATA\r\n", b"554 5.5.1 No valid recipients\r\n"),
    (b"DATA x\r\n", b"501 5.5.4 Syntax: DATA\r\n"),
    (b"RSET x\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
    (b"VRFY ted\r\n", b"252 2.5.0 Cannot VRFY user; try RCPT to attempt delivery\r\n"),
    (b"EXPN list\r\n", b"502 5.5.1 EXPN not available\r\n"),
    (b"BDAT 10 LAST\r\n", b"502 5.5.1 BDAT not available (no CHUNKING)\r\n"),
    (b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
    (b"NOOP\r\n", b"250 2.0.0 OK\r\n"),
    (b"X" * 3000 + b"\r\n", b"500 5.5.2 Line too long\r\n"),
    (b"RSET\r\n", b"250 2.0.0 OK\r\n"),
]


def test_bad_commands_get_5xx_and_session_goes_on() -> None:
    """Every malformed command or parameter gets a 5xx with an enhanced code; then NOOP works."""
    factory, *_ = make_factory()
    split = BAD_COMMANDS.index((b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"))
    proto, t = start(factory)
    run_dialogue(proto, BAD_COMMANDS[:split], transport=t)  # a session hangs up after 20 errors
    proto, t = start(factory)
    run_dialogue(proto, [(b"EHLO c.test\r\n", EHLO_CLEAR), *BAD_COMMANDS[split:]], transport=t)


def test_endless_line_is_refused_once_and_skipped() -> None:
    """A command line with no CRLF in sight is refused once; the rest up to CRLF is skipped."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"A" * 20000, b"500 5.5.2 Line too long\r\n"),
        (b"B" * 20000, b""),
        (b"C\r\nNOOP\r\n", b"250 2.0.0 OK\r\n"),
    ], transport=t)


def test_too_many_errors_hangs_up() -> None:
    """After 20 bad commands the server says 421 4.7.0 and closes."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"BAD\r\n" * 25)
    out = take(t)
    assert out == b"500 5.5.2 Command unrecognized\r\n" * 20 + \
        b"421 4.7.0 pop.contoso.test Too many errors, closing connection\r\n"
    assert t.disconnecting


def test_connection_control_and_limits() -> None:
    """client_deny gives 554 5.7.1 at connect; the connection limit 421 4.7.0; closing frees it."""
    import ipaddress

    factory, *_ = make_factory(smtp_config(client_deny=(ipaddress.ip_network("203.0.113.0/24"),)))
    proto, t = open_session(factory, "203.0.113.5")
    assert take(t) == b"554 5.7.1 Access denied: your address is refused here\r\n"
    assert t.disconnecting
    factory, *_ = make_factory(smtp_config(max_connections_per_client=1))
    p1, t1 = open_session(factory, "203.0.113.5")
    p2, t2 = open_session(factory, "203.0.113.5")
    assert take(t2) == b"421 4.7.0 pop.contoso.test Too many connections, try again later\r\n"
    p2.connectionLost(None)
    p1.connectionLost(None)
    p3, t3 = open_session(factory, "203.0.113.5")
    assert take(t3) == GREETING


def test_idle_timeout_counts_from_the_last_input() -> None:
    """The idle timer is not moved per command (issue 17) but the timeout still counts from
    the last input: a NOOP at 400 s keeps the session past 600 s; it ends 600 s after the
    NOOP with 421 4.4.2, and only one timer is ever pending."""
    factory, _, _, _, clock = make_factory()
    proto, t = start(factory)
    clock.advance(400)
    proto.dataReceived(b"NOOP\r\n")
    assert take(t) == b"250 2.0.0 OK\r\n"
    clock.advance(300)  # the timer set at the greeting fires at 600 and is set again
    assert take(t) == b"" and not t.disconnecting
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(299)
    assert take(t) == b""
    clock.advance(1)
    assert take(t) == b"421 4.4.2 pop.contoso.test Error: timeout exceeded\r\n"
    assert t.disconnecting


def test_a_waiting_command_does_not_time_out_and_the_idle_time_starts_when_it_ends() -> None:
    """While a command waits (a held log-in) the session does not time out, however long;
    the idle time counts from the reply: 599 s later it is still open, at 600 s it ends."""
    factory, _, checker, _, clock = make_factory(mode="submission")
    checker.hold = True
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\n")
    take(t)
    proto.dataReceived(b"AUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0secret1") + b"\r\n")
    clock.advance(1500)
    assert take(t) == b"" and not t.disconnecting
    checker.release()
    assert take(t) == b"235 2.7.0 Authentication successful\r\n"
    clock.advance(599)
    assert take(t) == b""
    clock.advance(1)
    assert take(t) == b"421 4.4.2 pop.contoso.test Error: timeout exceeded\r\n"


def test_closing_stops_the_idle_timer() -> None:
    """A session that ends (QUIT, then the connection is lost) leaves no timer behind."""
    factory, _, _, _, clock = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"QUIT\r\n")
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_the_helo_steps_session_facts_are_the_sessions_after_ehlo() -> None:
    """The content filters' HELO step sees the EHLO name, client and listener; once the EHLO
    succeeded the session's own facts (MAIL, RCPT, DATA) are that same object, not made
    again (issue 17); a failed or new EHLO, TLS or a log-in still make new ones."""
    factory, *_ = make_factory()
    proto, t = start(factory)
    seen = []
    hello = proto.delivery.hello
    proto.delivery.hello = lambda session: (seen.append(session), hello(session))[1]
    proto.dataReceived(b"EHLO c.test\r\n")
    assert take(t).startswith(b"250-pop.contoso.test Hello [203.0.113.5]\r\n")
    assert (seen[0].helo, seen[0].client_ip, seen[0].listener_ip) == ("c.test", "203.0.113.5",
                                                                       "127.0.0.1")
    assert proto._session() is seen[0]
    proto.dataReceived(b"EHLO other.test\r\n")
    take(t)
    assert proto._session() is seen[1] and seen[1].helo == "other.test"


def test_messages_per_connection() -> None:
    """After max_messages_per_connection accepted messages, MAIL gets 421 4.7.0 and a close."""
    factory, *_ = make_factory(smtp_config(max_messages_per_connection=1))
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n"
                       b"DATA\r\nx\r\n.\r\n")
    take(t)
    run_dialogue(proto, [(b"MAIL FROM:<a@b.test>\r\n", b"421 4.7.0 pop.contoso.test Too many "
                          b"messages in this session, closing connection\r\n")], transport=t)
    assert t.disconnecting


def test_idle_timeout_and_mid_data_timeout_leave_nothing() -> None:
    """After idle_timeout the server says 421 4.4.2; a message cut by the timeout is removed."""
    factory, store, _, _, clock = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n"
                       b"DATA\r\n" + b"partial\r\n" * 40000)  # past the in-memory buffer
    take(t)
    assert len(list(store.spool_dir().iterdir())) == 1
    clock.advance(599)
    assert take(t) == b""
    clock.advance(2)
    assert take(t) == b"421 4.4.2 pop.contoso.test Error: timeout exceeded\r\n"
    assert list(store.spool_dir().iterdir()) == []
    assert store.messages(f"ted@{HOST}") == []


def test_disconnect_mid_data_removes_spool_file() -> None:
    """A client that goes away mid-DATA leaves nothing: no delivery, spool file removed."""
    factory, store, *_ = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n"
                       b"DATA\r\n" + b"line\r\n" * 100000)
    assert len(list(store.spool_dir().iterdir())) == 1
    proto.connectionLost(None)
    assert list(store.spool_dir().iterdir()) == []
    assert store.messages(f"ted@{HOST}") == []


@pytest.mark.parametrize("failure", ["deliver", "enqueue"])
def test_storage_failure_is_a_temporary_error(failure: str) -> None:
    """If delivery or queueing fails, the client gets 451 4.3.0 (never 250) and no spool file
    remains."""
    from pop3coexist.errors import StoreError

    factory, store, _, queue, _ = make_factory()
    if failure == "deliver":
        store.fail["deliver_within_quota"] = StoreError("disk full")
    else:
        queue.fail = OSError("disk full")
    proto, t = start(factory, peer=TRUSTED)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n"
                       b"RCPT TO:<x@foreign.example>\r\nDATA\r\nx\r\n.\r\n")
    assert take(t).endswith(
        b"451 4.3.0 Local error in processing; message not accepted, try again later\r\n")
    assert list(store.spool_dir().iterdir()) == []


def test_directory_down_at_rcpt_is_temporary() -> None:
    """resolve_recipient failing with AuthUnavailable gives 451 4.4.3, not 550."""
    factory, _, checker, _, _ = make_factory()
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    take(t)
    checker.fail = AuthUnavailable()
    run_dialogue(proto, [(b"RCPT TO:<ted@pop.contoso.test>\r\n",
                          b"451 4.4.3 Directory lookup failed, try again later\r\n")], transport=t)


def test_unauthorized_login_from_checker_is_not_logged_with_secret(caplog) -> None:
    """A failing checker never gets the password into a reply."""
    factory, _, checker, _, clock = make_factory()
    checker.fail = UnauthorizedLogin()
    proto, t = start(factory)
    proto.dataReceived(b"EHLO c.test\r\nAUTH PLAIN " + b64(b"\0ted@pop.contoso.test\0topsecret") + b"\r\n")
    clock.advance(5)
    assert b"topsecret" not in take(t)


def test_domain_list_is_reused_for_a_second_then_reread() -> None:
    """RCPT reads the store's domains at most once a second: a burst of RCPTs to known domains
    costs one read; a domain the cached list does not know costs one more read (it may have
    just been added), and a domain added by `domain add` counts at once, not a second later
    (no 554 relay refusal, no relaying of its mail in the meantime)."""
    clock = task.Clock()
    factory, store, *_ = make_factory(clock=clock)
    proto, t = start(factory)

    def reads() -> int:
        return [c[0] for c in store.calls].count("list_domains")

    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<ann@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ann@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<x@exchange.northwindtraders.test>\r\n",
         b"250 2.1.5 Recipient <x@exchange.northwindtraders.test> OK\r\n"),
    ], transport=t)
    assert reads() == 1
    run_dialogue(proto, [
        (b"RCPT TO:<joe@new.test>\r\n", b"554 5.7.1 Relay access denied for <joe@new.test>\r\n"),
    ], transport=t)
    assert reads() == 2
    store.add("joe@new.test")  # new.test is now a local domain (joe has no account)
    run_dialogue(proto, [
        (b"RCPT TO:<joe@new.test>\r\n", b"550 5.1.1 <joe@new.test>: no such user here\r\n"),
    ], transport=t)
    assert reads() == 3  # the re-read found new.test and is the cache now
    clock.advance(1.5)
    run_dialogue(proto, [
        (b"RCPT TO:<joe@new.test>\r\n", b"550 5.1.1 <joe@new.test>: no such user here\r\n"),
    ], transport=t)
    assert reads() == 4


def test_domain_rereads_are_shared_between_sessions() -> None:
    """Re-reads on a miss are shared: while one read of the store's domains runs, any number of
    sessions that need a fresh one wait for the single next read, so ten sessions' RCPTs to a
    domain added since the cached read cost two more reads in all (not one each), and each gets
    the answer for a local domain (550 5.1.1 for a name with no mailbox), none a 554."""
    from twisted.internet import defer

    from pop3coexist.smtp.server import SMTPServerFactory
    from tests.support.fakes import FakeChecker, FakeMailStore, sync_run_blocking
    from tests.support.smtp_fakes import FakeQueue

    held: list[defer.Deferred] = []

    def run_blocking(f, *args, **kwargs):
        if getattr(f, "__name__", "") == "list_domains":
            d: defer.Deferred = defer.Deferred()
            held.append(d)
            return d
        return sync_run_blocking(f, *args, **kwargs)

    store = FakeMailStore()
    store.add(f"ted@{HOST}")
    factory = SMTPServerFactory(smtp_config(), store, FakeChecker({f"ted@{HOST}": "pw"}), FakeQueue(),
                                tls_options=object(), reactor=task.Clock(), run_blocking=run_blocking)
    first, t1 = start(factory)
    first.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\n")
    assert len(held) == 1
    held[0].callback([HOST])  # read 1: the list is cached for a second
    assert take(t1).endswith(b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n")
    store.add_domain("new.test")  # `domain add`, within that second
    sessions = []
    for _ in range(10):
        proto, t = start(factory)
        proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@new.test>\r\n")
        sessions.append((proto, t))
    assert len(held) == 2  # one re-read runs, the other sessions wait for the next one
    held[1].callback(["new.test", HOST])
    assert len(held) == 3
    held[2].callback(["new.test", HOST])
    assert len(held) == 3
    for _proto, t in sessions:
        assert take(t).endswith(b"250 2.1.0 Sender <a@b.test> OK\r\n"
                                b"550 5.1.1 <joe@new.test>: no such user here\r\n")


def test_blocking_resolver_is_used_in_one_hop() -> None:
    """A checker that provides IBlockingRecipientLookup (the password file) is asked in the
    same thread hop as the mailbox check; unknown users still get 550 5.1.1."""
    asked: list[str] = []

    class Recording(FakePasswordFileChecker):
        def resolve_recipient_blocking(self, address: str) -> str | None:
            asked.append(address)
            return super().resolve_recipient_blocking(address)

        def resolve_recipient(self, address: str) -> defer.Deferred:
            raise AssertionError("the blocking look-up is the one used")

    checker = Recording({"ted@pop.contoso.test": "secret1"})
    factory, *_ = make_factory(checker=checker)
    proto, t = start(factory)
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", EHLO_CLEAR),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<Ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <Ted@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<nobody@pop.contoso.test>\r\n",
         lambda got: got.startswith(b"550 5.1.1 ")),
    ], transport=t)
    assert asked == ["ted@pop.contoso.test", "nobody@pop.contoso.test"]
