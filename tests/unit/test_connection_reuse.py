"""SMTP connection reuse and PIPELINING in the outbound client (smtp/client.py
``ConnectionCache``), byte by byte over StringTransport with a fake reactor."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pop3coexist.smtp import client as c

BODY = b"Subject: t\n\nhello\n"
EHLO = (b"250-sink.example.net", b"250 SIZE 1000000")
EHLO_PIPE = (b"250-sink.example.net", b"250-PIPELINING", b"250 SIZE 1000000")


class FakeReactor(Clock):
    """A Clock whose connectTCP hands each connection to the test (``conns``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conns: list[Conn] = []

    def connectTCP(self, host: str, port: int, factory: c.OutboundClientFactory,
                   timeout: float = 30) -> None:
        self.conns.append(Conn(self, factory))


class Conn:
    """One client connection over a StringTransport; ``server(line)`` feeds replies."""

    def __init__(self, reactor: FakeReactor, factory: c.OutboundClientFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.proto.callLater = reactor.callLater
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def server(self, *lines: bytes) -> bytes:
        for line in lines:
            self.proto.dataReceived(line + b"\r\n")
        out = self.transport.value()
        self.transport.clear()
        return out

    def lose(self) -> None:
        self.proto.connectionLost(Failure(error.ConnectionDone()))


def txn(tmp_path: Path, *rcpts: str) -> c.Transaction:
    body = tmp_path / "body"
    body.write_bytes(BODY)
    return c.Transaction(sender="a@example.org",
                         recipients=[{"address": r, "notify": None, "orcpt": None}
                                     for r in rcpts or ("b@example.net",)],
                         body_path=body, size=len(BODY))


SETTINGS = c.ClientSettings(helo="pop.contoso.test", tls="none")


def send(cache: c.ConnectionCache, t: c.Transaction) -> list[c.TransactionResult]:
    out: list[c.TransactionResult] = []
    cache.deliver("127.0.0.1", 25, SETTINGS, t, "sink").addCallback(out.append)
    return out


def plain_transaction(conn: Conn, final: bytes) -> bytes:
    """Play the next hop's side of a new connection's one transaction without PIPELINING:
    greeting, EHLO, MAIL and RCPT accepted, DATA's 354, then ``final`` (the reply to the
    dot); returns what the client wrote after ``final``."""
    conn.server(b"220 x")
    conn.server(*EHLO)
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    conn.server(b"354 go")
    return conn.server(final)


def first_message(reactor: FakeReactor, cache: c.ConnectionCache, tmp_path: Path,
                  ehlo: tuple[bytes, ...] = EHLO) -> Conn:
    """Open a connection and deliver one message over it (plain, one command at a time)."""
    got = send(cache, txn(tmp_path))
    conn = reactor.conns[-1]
    conn.server(b"220 sink")
    conn.server(*ehlo)
    if b"250-PIPELINING" in ehlo:
        conn.server(b"250 ok", b"250 ok")
    else:
        conn.server(b"250 ok")
        conn.server(b"250 ok")
    conn.server(b"354 go")
    assert conn.server(b"250 2.0.0 queued") == b""  # no QUIT: the session is kept
    assert got and got[0].replies[0].delivered
    return conn


def test_second_message_reuses_the_session_without_ehlo(tmp_path: Path) -> None:
    """After a message's 250 the session stays open; the next message to the same host starts
    with MAIL at once (RFC 5321 4.1.1.5) over the same connection."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    assert cache.idle_count() == 1
    got = send(cache, txn(tmp_path, "x@example.net"))
    assert conn.transport.value().startswith(b"MAIL FROM:<a@example.org>")
    conn.transport.clear()
    assert conn.server(b"250 ok") == b"RCPT TO:<x@example.net>\r\n"
    assert conn.server(b"250 ok") == b"DATA\r\n"
    assert conn.server(b"354 go").endswith(b"\r\n.\r\n")
    conn.server(b"250 2.0.0 queued as 2")
    assert len(reactor.conns) == 1 and cache.opened == 1
    assert got[0].replies[0].reply == "250 2.0.0 queued as 2" and got[0].remote_mta == "sink"


def test_per_connection_message_cap_quits(tmp_path: Path) -> None:
    """With ``max_messages = 2`` the second message's 250 is followed by QUIT, and a third
    message opens a new connection."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor, max_messages=2)
    conn = first_message(reactor, cache, tmp_path)
    send(cache, txn(tmp_path))
    conn.transport.clear()
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    conn.server(b"354 go")
    assert conn.server(b"250 queued") == b"QUIT\r\n"
    assert cache.idle_count() == 0
    send(cache, txn(tmp_path))
    assert len(reactor.conns) == 2


def test_idle_session_is_closed_after_the_idle_time(tmp_path: Path) -> None:
    """An unused session gets QUIT after ``idle`` seconds and is no longer offered."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor, idle=2.0)
    conn = first_message(reactor, cache, tmp_path)
    reactor.advance(1.9)
    assert conn.transport.value() == b""
    reactor.advance(0.2)
    assert conn.transport.value() == b"QUIT\r\n" and cache.idle_count() == 0
    conn.transport.clear()
    conn.server(b"221 bye")
    assert conn.transport.disconnecting
    conn.lose()
    send(cache, txn(tmp_path))
    assert len(reactor.conns) == 2


def test_4xx_and_5xx_inside_a_reused_session_touch_only_their_message(tmp_path: Path) -> None:
    """A 452 to one message's RCPT and a 554 to another's final dot are those messages'
    replies; the session carries on (RSET after the transaction that had no DATA), and the
    next message is delivered over it."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    got = send(cache, txn(tmp_path))
    conn.transport.clear()
    conn.server(b"250 ok")
    assert conn.server(b"452 4.2.2 mailbox full") == b""  # no DATA, no QUIT
    assert got[0].replies[0].code == 452 and not got[0].hop_failed
    assert cache.idle_count() == 1
    got = send(cache, txn(tmp_path))
    assert conn.transport.value() == b"RSET\r\n"  # MAIL was accepted, the transaction is open
    conn.transport.clear()
    assert conn.server(b"250 reset").startswith(b"MAIL FROM:")
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    conn.server(b"354 go")
    assert conn.server(b"554 5.7.1 content refused") == b""
    assert got[0].replies[0].code == 554 and got[0].replies[0].permanent
    got = send(cache, txn(tmp_path))
    assert conn.transport.value().startswith(b"MAIL FROM:")  # no RSET after a final reply
    conn.transport.clear()
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    conn.server(b"354 go")
    conn.server(b"250 queued")
    assert got[0].replies[0].delivered and len(reactor.conns) == 1


def test_session_dropped_while_idle_or_before_mail_reply_is_retried_on_a_new_one(
        tmp_path: Path) -> None:
    """A session the server closed while it was idle is not offered again; one that dies
    after the next MAIL was sent (nothing said about the message) is retried once on a new
    connection, so the message's fate is the new connection's."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    conn.lose()  # closed while idle
    assert cache.idle_count() == 0
    send(cache, txn(tmp_path))
    assert len(reactor.conns) == 2
    conn2 = reactor.conns[1]
    plain_transaction(conn2, b"250 queued")
    got = send(cache, txn(tmp_path))  # reuses conn2, which dies after MAIL
    assert conn2.transport.value().startswith(b"MAIL FROM:")
    conn2.lose()
    assert not got and len(reactor.conns) == 3  # retried on a new connection
    conn3 = reactor.conns[2]
    plain_transaction(conn3, b"250 queued as 3")
    assert got[0].replies[0].reply == "250 queued as 3"


def test_connection_lost_after_the_dot_of_a_reused_session_is_not_retried(
        tmp_path: Path) -> None:
    """Lost after the end of the message was sent: the next hop may have the message, so it
    is a 421 deferral for this message (at least once), not a silent retry elsewhere."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    got = send(cache, txn(tmp_path))
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    assert conn.server(b"354 go").endswith(b".\r\n")
    conn.lose()
    assert len(reactor.conns) == 1
    rep = got[0].replies[0]
    assert rep.code == 421 and not rep.elsewhere and not got[0].hop_failed


def test_pipelining_sends_mail_rcpt_data_in_one_write(tmp_path: Path) -> None:
    """With PIPELINING offered (RFC 2920) MAIL, every RCPT and DATA go in one write; each
    recipient keeps its own reply; when every RCPT is refused the refused DATA ends the
    transaction, and the next pipelined group starts with RSET."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    got = send(cache, txn(tmp_path, "b@example.net", "x@example.net"))
    conn = reactor.conns[0]
    conn.server(b"220 x")
    assert conn.server(*EHLO_PIPE) == (
        b"MAIL FROM:<a@example.org> SIZE=%d\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<x@example.net>\r\nDATA\r\n" % len(BODY))
    assert conn.server(b"250 ok", b"550 5.1.1 unknown", b"250 ok") == b""
    assert conn.server(b"354 go") == b"Subject: t\r\n\r\nhello\r\n.\r\n"
    conn.server(b"250 queued")
    replies = {r.address: r.code for r in got[0].replies}
    assert replies == {"b@example.net": 550, "x@example.net": 250}
    got = send(cache, txn(tmp_path))
    conn.transport.clear()
    conn.server(b"250 ok", b"550 5.1.1 unknown")
    assert conn.server(b"554 5.5.1 no valid recipients") == b""
    assert got[0].replies[0].code == 550 and cache.idle_count() == 1
    got = send(cache, txn(tmp_path))
    assert conn.transport.value().startswith(b"RSET\r\nMAIL FROM:")
    conn.transport.clear()
    assert conn.server(b"250 reset", b"250 ok", b"250 ok") == b""
    conn.server(b"354 go")
    conn.server(b"250 queued")
    assert got[0].replies[0].delivered


def test_pipelined_mail_refused_and_421_end_as_without_pipelining(tmp_path: Path) -> None:
    """A refused MAIL in a pipelined group is the message's reply (QUIT after it; no body
    even when a broken server says 354); a 421 mid-group marks the recipients ``elsewhere``."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    got = send(cache, txn(tmp_path))
    conn = reactor.conns[0]
    conn.server(b"220 x")
    conn.server(*EHLO_PIPE)
    conn.server(b"550 5.7.1 sender refused", b"503 no MAIL")
    assert conn.server(b"503 no MAIL") == b"QUIT\r\n"
    conn.lose()
    assert got[0].replies[0].code == 550
    got = send(cache, txn(tmp_path))
    conn = reactor.conns[1]
    conn.server(b"220 x")
    conn.server(*EHLO_PIPE)
    assert conn.server(b"250 ok", b"421 4.3.2 going down") == b"QUIT\r\n"
    conn.lose()
    assert got[0].replies[0].elsewhere and got[0].hop_failed


def test_close_all_quits_idle_sessions_and_keeps_no_more(tmp_path: Path) -> None:
    """When the runner stops every idle session gets QUIT, and a transaction ending later
    is not kept."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    cache.close_all()
    assert conn.transport.value() == b"QUIT\r\n" and cache.idle_count() == 0


def test_without_a_cache_the_client_still_quits_after_one_message(tmp_path: Path) -> None:
    """``deliver`` (no cache) keeps its one-message sessions: QUIT after the final reply,
    also when the server offers PIPELINING."""
    reactor = FakeReactor()
    d = c.deliver(reactor, "127.0.0.1", 25, SETTINGS, txn(tmp_path))
    got: list = []
    d.addCallback(got.append)
    conn = reactor.conns[0]
    conn.server(b"220 x")
    conn.server(*EHLO_PIPE)
    conn.server(b"250 ok", b"250 ok")
    conn.server(b"354 go")
    assert conn.server(b"250 queued") == b"QUIT\r\n"
    conn.server(b"221 bye")
    conn.lose()
    assert got[0].replies[0].delivered


def test_reuse_limits_come_from_the_smarthost_keys(tmp_path: Path) -> None:
    """``smarthost.reuse_messages``, ``reuse_idle`` and ``reuse_idle_per_host`` set the
    delivery runner's connection cache (defaults: 100 messages, 2 s, 8 per host); 0 s and 0
    connections are allowed (no idle connection kept), 0 messages is a config error."""
    from pop3coexist.config import parse_config
    from pop3coexist.errors import ConfigError
    from pop3coexist.smtp.outbound import OutboundService
    from pop3coexist.store.queue import FileQueue

    base = f'[server]\nhostname = "mx.example.test"\nstate_dir = "{tmp_path}"\n'
    queue = FileQueue(tmp_path / "queue", "mx.example.test")
    runner = OutboundService(parse_config(base), queue, reactor=Clock())
    assert (runner.connections.max_messages, runner.connections.idle,
            runner.connections.per_host) == (100, 2.0, 8)
    tuned = parse_config(base + '[smarthost]\nreuse_messages = 1\nreuse_idle = "0s"\n'
                                'reuse_idle_per_host = 0\n')
    runner = OutboundService(tuned, queue, reactor=Clock())
    assert (runner.connections.max_messages, runner.connections.idle,
            runner.connections.per_host) == (1, 0.0, 0)
    with pytest.raises(ConfigError, match="reuse_messages"):
        parse_config(base + "[smarthost]\nreuse_messages = 0\n")


def test_reused_and_retried_results_name_the_remote_mta_and_fire_once(tmp_path: Path) -> None:
    """The result handed over by plain callbacks (no coroutine per reused message, issue 17)
    names the remote MTA given to ``deliver``, on a reused session and on the new connection
    that decides after the reused one died before MAIL's reply; each Deferred fires once."""
    reactor = FakeReactor()
    cache = c.ConnectionCache(reactor)
    conn = first_message(reactor, cache, tmp_path)
    got: list[c.TransactionResult] = []
    cache.deliver("127.0.0.1", 25, SETTINGS, txn(tmp_path), "mx.example.net").addCallback(
        got.append)
    conn.server(b"250 ok")
    conn.server(b"250 ok")
    conn.server(b"354 go")
    conn.server(b"250 reused")
    assert [r.remote_mta for r in got] == ["mx.example.net"]
    got.clear()
    cache.deliver("127.0.0.1", 25, SETTINGS, txn(tmp_path), "mx.example.net").addCallback(
        got.append)
    conn.lose()  # dies after MAIL: nothing said about the message
    assert not got and len(reactor.conns) == 2
    conn2 = reactor.conns[1]
    plain_transaction(conn2, b"250 fresh")
    assert [(r.remote_mta, r.replies[0].reply) for r in got] == [("mx.example.net",
                                                                   "250 fresh")]
