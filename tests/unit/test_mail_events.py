"""The mail events an ESMTP and a POP3 session emit, over a StringTransport with the fakes:
connect and disconnect, each refusal (with its command, codes and recipient) and no event for
a syntax or sequence error, the accepted message (with the queue id of its 250, which the
queued envelope carries too), the local mailboxes stored, log-ins with method and outcome."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest
from twisted.logger import globalLogPublisher

from tests.support.dialogue import run_dialogue
from tests.support.smtp_fakes import HOST, make_factory, open_session
from tests.support.smtp_replies import EHLO_CLEAR, GREETING


@pytest.fixture
def mail_events() -> Iterator[list[dict]]:
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if "mail_event" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_smtp_session_events(mail_events: list[dict]) -> None:
    """connect, a refused recipient (550 5.1.1, with the recipient and the sender), no event for
    503/501, accepted with the 250's queue id (the queued envelope's id too), stored for the
    local mailbox, disconnect."""
    factory, _store, _, queue, _ = make_factory()
    proto, t = open_session(factory, "203.0.113.5")
    replies: list[bytes] = []
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", GREETING + EHLO_CLEAR),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"503 5.5.1 Need MAIL command first\r\n"),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<nobody@pop.contoso.test>\r\n", lambda got: got.startswith(b"550 5.1.1")),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", lambda got: got.startswith(b"250")),
        (b"RCPT TO:<bob@exchange.northwindtraders.test>\r\n", lambda got: got.startswith(b"250")),
        (b"DATA\r\n", lambda got: got.startswith(b"354")),
        (b"hello\r\n.\r\n", lambda got: replies.append(got) is None),
    ], transport=t)
    qid = re.match(rb"250 2.0.0 Ok: queued as ([0-9a-f]+)\r\n", replies[0]).group(1).decode()
    proto.connectionLost(None)
    names = [e["mail_event"] for e in mail_events]
    assert names == ["connect", "refused", "stored", "accepted", "disconnect"]
    connect, refused, stored, accepted, _ = mail_events
    assert connect["client"] == "203.0.113.5" and connect["listener"] == "smtp"
    assert (refused["command"], refused["code"], refused["enhanced"], refused["recipient"],
            refused["sender"], refused["queue_id"]) == (
        "RCPT", 550, "5.1.1", "nobody@pop.contoso.test", "a@b.test", None)
    assert accepted["queue_id"] == stored["queue_id"] == qid
    assert accepted["recipients"] == [f"ted@{HOST}", "bob@exchange.northwindtraders.test"]
    assert accepted["sender"] == "a@b.test" and accepted["size"] > 0
    assert stored["mailboxes"] == [f"ted@{HOST}"]
    [(_data, env)] = queue.items
    assert env["id"] == qid


def test_smtp_login_events(mail_events: list[dict]) -> None:
    """AUTH: a failed log-in is an event with its method and the throttle's delay; a good one
    names the user; the password is in neither."""
    factory, *_ = make_factory()
    proto, t = open_session(factory)
    bad = base64.b64encode(b"\0ted@pop.contoso.test\0wrong")
    good = base64.b64encode(b"\0ted@pop.contoso.test\0secret1")
    run_dialogue(proto, [
        (b"EHLO c.test\r\n", lambda got: True),
        (b"AUTH PLAIN " + bad + b"\r\n", lambda got: True),
    ], transport=t)
    factory.reactor.advance(60)
    run_dialogue(proto, [(b"AUTH PLAIN " + good + b"\r\n", lambda got: b"235 2.7.0" in got)],
                 transport=t)
    logins = [e for e in mail_events if e["mail_event"] == "login"]
    assert [(e["method"], e["outcome"], e["user"]) for e in logins] == [
        ("PLAIN", "failed", "ted@pop.contoso.test"), ("PLAIN", "ok", "ted@pop.contoso.test")]
    assert logins[0]["delay"] > 0
    assert not any("secret1" in repr(e) or "wrong" in repr(e) for e in mail_events)
