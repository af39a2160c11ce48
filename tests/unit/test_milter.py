"""The milter client (pop3coexist.milter) without a real milter: the codec's bytes, and the
conversation of one SMTP session against a scripted fake milter that reads and writes the
protocol's bytes over an in-memory transport (time through ``task.Clock``). Then the
content-check outcomes (policy/content.py) and the quarantine store (store/quarantine.py)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pop3coexist.config import MilterConfig
from pop3coexist.errors import MailError
from pop3coexist.interfaces import (
    IContentFilter,
    IContentFilterFactory,
    IQuarantine,
    SMTPSession,
)
from pop3coexist.milter import codec
from pop3coexist.milter.client import MilterConnection, MilterUnavailable, Wire, endpoint_for
from pop3coexist.milter.conversation import MilterSet, reply_error
from pop3coexist.policy.content import FilterOutcomes, FilterResult, notice_message
from pop3coexist.policy.stages import ACCEPT, CONTINUE, Message, Outcome, Recipient
from pop3coexist.store.quarantine import Quarantine

SESSION = SMTPSession("192.0.2.7", "client.example", "127.0.0.1", client_port=40001,
                      auth_type="PLAIN")


def result(d: Any) -> Any:
    """The result of a Deferred (or coroutine) that has fired; a Failure is raised."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# --------------------------------------------------------------------------- codec


def test_packets_are_length_command_data() -> None:
    """encode: 32-bit length counting the command byte; OPTNEG offers version 6 with our
    action and step masks (CHGFROM and RCPT_REJ not offered)."""
    assert codec.encode(b"Q") == b"\x00\x00\x00\x01Q"
    assert codec.encode(b"H", b"x\0") == b"\x00\x00\x00\x03Hx\x00"
    packet = codec.optneg()
    assert packet[4:5] == b"O"
    version, actions, proto = struct.unpack("!III", packet[5:])
    assert version == 6 and not actions & codec.F_CHGFROM and actions & codec.F_QUARANTINE
    assert not proto & codec.P_RCPT_REJ and proto & codec.P_NR_HDR


def test_connect_and_macro_packets() -> None:
    """SMFIC_CONNECT: name NUL family port(16) address NUL; SMFIC_MACRO: stage command then
    name/value pairs, empty values left out."""
    assert codec.connect("unknown", b"4", 25, "192.0.2.1") == codec.encode(
        b"C", b"unknown\x004\x00\x19192.0.2.1\x00")
    assert codec.macros(b"M", {"{mail_addr}": "a@b", "{auth_authen}": ""}) == codec.encode(
        b"D", b"M{mail_addr}\x00a@b\x00")


def test_decoder_splits_a_stream_and_refuses_bad_lengths() -> None:
    """Packets split anywhere come out whole; a zero or huge length is a protocol error."""
    d = codec.Decoder()
    stream = codec.encode(b"c") + codec.encode(b"h", b"X\0y\0")
    assert d.feed(stream[:3]) == []
    assert d.feed(stream[3:7]) == [(b"c", b"")]
    assert d.feed(stream[7:]) == [(b"h", b"X\0y\0")]
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(b"\x00\x00\x00\x00")
    with pytest.raises(codec.ProtocolError):
        codec.Decoder().feed(b"\x7f\x00\x00\x00")


@pytest.mark.parametrize("code,data,args,index", [
    (b"h", b"X-A\0v\0", ["X-A", "v"], 0),
    (b"i", b"\x00\x00\x00\x02X-B\0w\0", ["X-B", "w"], 2),
    (b"m", b"\x00\x00\x00\x01Subject\0\0", ["Subject", ""], 1),
    (b"+", b"<c@d>\0", ["<c@d>"], 0),
    (b"-", b"<c@d>\0", ["<c@d>"], 0),
    (b"2", b"<c@d>\0NOTIFY=NEVER\0", ["<c@d>", "NOTIFY=NEVER"], 0),
    (b"q", b"infected\0", ["infected"], 0),
    (b"y", b"550 5.7.1 no\0", ["550 5.7.1 no"], 0),
])
def test_replies_parse(code: bytes, data: bytes, args: list[str], index: int) -> None:
    """Each filter reply's strings and index come out as libmilter writes them."""
    reply = codec.parse_reply(code, data)
    assert reply.args == args and reply.index == index


@pytest.mark.parametrize("code,data", [(b"y", b"250 ok\0"), (b"h", b"X\0"), (b"Z", b""),
                                       (b"m", b"\x00"), (b"h", b"X\0v")])
def test_malformed_replies_are_protocol_errors(code: bytes, data: bytes) -> None:
    """A 2xx reply code, a missing string, an unknown reply, a short index, a missing NUL."""
    with pytest.raises(codec.ProtocolError):
        codec.parse_reply(code, data)


def test_reply_code_texts() -> None:
    """SMFIR_REPLYCODE: the milter's code and text, multi-line kept; an enhanced code that is
    missing or of the other class becomes x.7.1."""
    e = reply_error("550 5.7.1 Virus found: Eicar", "message")
    assert (e.code, e.enhanced, e.text) == (550, "5.7.1", "Virus found: Eicar")
    e = reply_error("451-4.7.0 busy\r\n451 4.7.0 later", "rcpt")
    assert (e.code, e.enhanced, e.text) == (451, "4.7.0", "busy\nlater")
    e = reply_error("554 2.0.0 odd", "mail")
    assert (e.code, e.enhanced) == (554, "5.7.1")


def test_endpoints() -> None:
    """inet:host:port, Sendmail's inet:port@host, inet6 and unix: give endpoints; others
    are refused."""
    clock = task.Clock()
    assert endpoint_for(clock, "inet:127.0.0.1:7357", 5)._port == 7357
    assert endpoint_for(clock, "inet:7357@127.0.0.1", 5)._host == "127.0.0.1"
    assert endpoint_for(clock, "inet6:[::1]:7357", 5)._host == "::1"
    assert endpoint_for(clock, "unix:/run/m.sock", 5)._path == "/run/m.sock"
    for bad in ("tcp:1:2", "inet:host", "unix:", "inet:h:99999"):
        with pytest.raises(ValueError):
            endpoint_for(clock, bad, 5)


# --------------------------------------------------------------------------- a fake milter


@dataclass
class FakeMilter:
    """A milter over an in-memory transport: it decodes what the client writes and answers
    from ``script`` (command byte -> list of reply packets; default: continue), with the
    ``actions`` and ``protocol`` flags it negotiates. ``silent``: commands it never answers
    (a hung milter)."""

    actions: int = codec.ACTIONS_OFFERED
    protocol: int = 0
    script: dict[bytes, list[bytes]] = field(default_factory=dict)
    silent: set[bytes] = field(default_factory=set)
    seen: list[tuple[bytes, bytes]] = field(default_factory=list)
    down: bool = False

    def opener(self, clock: task.Clock):
        async def open_(reactor, name, socket, connect_timeout, command_timeout):
            if self.down:
                raise MilterUnavailable("connection refused")
            wire = Wire()
            transport = _Transport(self, wire)
            wire.makeConnection(transport)
            return await MilterConnection.negotiate(wire, clock, name, command_timeout)
        return open_

    def answer(self, code: bytes, data: bytes) -> list[bytes]:
        self.seen.append((code, data))
        if code == codec.OPTNEG:
            return [codec.encode(b"O", struct.pack("!III", 6, self.actions, self.protocol))]
        if code in (codec.MACRO, codec.ABORT, codec.QUIT) or code in self.silent:
            return []
        if code in codec.NO_REPLY and self.protocol & codec.NO_REPLY[code]:
            return []
        return self.script.get(code, [codec.encode(codec.CONTINUE)])

    def commands(self) -> list[bytes]:
        return [c for c, _ in self.seen if c != codec.MACRO]

    def macros(self, stage: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for c, d in self.seen:
            if c == codec.MACRO and d[:1] == stage:
                parts = d[1:-1].split(b"\0")
                out.update({parts[i].decode(): parts[i + 1].decode()
                            for i in range(0, len(parts) - 1, 2)})
        return out


class _Transport(StringTransport):
    def __init__(self, milter: FakeMilter, wire: Wire) -> None:
        super().__init__()
        self.milter, self.wire, self.decoder = milter, wire, codec.Decoder()

    def write(self, data: bytes) -> None:
        out = b""
        for code, payload in self.decoder.feed(data):
            out += b"".join(self.milter.answer(code, payload))
        if out:
            self.wire.dataReceived(out)

    def loseConnection(self) -> None:
        self.wire.connectionLost(None)


def milter_cfg(**kw: Any) -> MilterConfig:
    values = {"socket": "inet:127.0.0.1:1", "name": "fake", "listeners": ("smtp",),
              "connect_timeout": 5.0, "command_timeout": 10.0, "content_timeout": 20.0,
              "default_action": "tempfail", "virus_scanner": False}
    values.update(kw)
    return MilterConfig(**values)


class MemorySpool:
    """An ISpool in memory."""

    def __init__(self, data: bytes) -> None:
        self.queue_id, self.data, self.aborted = "Q1", data, False

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    def replace(self, data: bytes) -> None:
        self.data = data

    def abort(self) -> None:
        self.aborted = True


MESSAGE = (b"Received: from client.example\n\tby pop.contoso.test\nSubject: hi\n"
           b"From: a@example.org\n\nline one\nline two\n")


def new_message(data: bytes = MESSAGE) -> Message:
    rcpt = Recipient({"address": "ted@pop.contoso.test", "orcpt": None, "notify": None},
                     ("pop.contoso.test", "ted"))
    return Message("Q1", MemorySpool(data), "a@example.org", [rcpt], session=SESSION)


def conversation(*milters: tuple[FakeMilter, MilterConfig], clock: task.Clock | None = None):
    clock = clock or task.Clock()
    opener_map = {cfg.name: m.opener(clock) for m, cfg in milters}

    async def opener(reactor, name, socket, ct, cmt):
        return await opener_map[name](reactor, name, socket, ct, cmt)

    factory = MilterSet([cfg for _, cfg in milters], clock, "pop.contoso.test", "smtp", opener)
    verifyObject(IContentFilterFactory, factory)
    conv = factory.open()
    verifyObject(IContentFilter, conv)
    return conv


def through_rcpt(conv, user: str | None = None) -> None:
    result(conv.connect(SESSION))
    result(conv.helo(SESSION))
    result(conv.mail(SESSION, "a@example.org", user, ["SIZE=100"]))
    result(conv.rcpt(SESSION, "ted@pop.contoso.test", True))


# --------------------------------------------------------------------------- the conversation


def test_every_step_goes_to_the_milter_with_its_macros() -> None:
    """Connect, HELO, MAIL, RCPT, DATA, each header (value without its leading space,
    folds as LF), EOH, the body in CRLF lines, EOM; the macros scanners read."""
    m = FakeMilter()
    conv = conversation((m, milter_cfg()))
    through_rcpt(conv, user="ann@pop.contoso.test")
    verdict = result(conv.check(new_message()))
    assert verdict.action == "continue"
    assert m.commands() == [b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L", b"N", b"B",
                            b"E"]
    data = dict((c, d) for c, d in m.seen if c != codec.MACRO)
    assert data[b"C"] == b"unknown\x004" + struct.pack("!H", 40001) + b"192.0.2.7\x00"
    assert data[b"M"] == b"<a@example.org>\x00SIZE=100\x00"
    assert data[b"R"] == b"<ted@pop.contoso.test>\x00"
    headers = [d for c, d in m.seen if c == b"L"]
    assert headers[0] == b"Received\x00from client.example\n\tby pop.contoso.test\x00"
    assert headers[1] == b"Subject\x00hi\x00"
    assert data[b"B"] == b"line one\r\nline two\r\n"
    assert m.macros(b"C")["{client_addr}"] == "192.0.2.7"
    assert m.macros(b"C")["j"] == "pop.contoso.test"
    assert m.macros(b"C")["{daemon_name}"] == "smtp"
    assert m.macros(b"M") == {"{mail_addr}": "a@example.org", "{mail_host}": "example.org",
                              "{mail_mailer}": "smtp", "{auth_authen}": "ann@pop.contoso.test",
                              "{auth_type}": "PLAIN"}
    assert m.macros(b"R")["{rcpt_mailer}"] == "local"
    assert m.macros(b"E") == {"i": "Q1"}


def test_steps_the_milter_declines_are_not_sent_or_not_awaited() -> None:
    """SMFIP_NOHELO / NOHDRS / NOBODY: those steps are not sent; SMFIP_NR_*: sent without
    waiting (the fake answers nothing, and the conversation still completes); the symlist of
    the negotiation reply decides the macros."""
    m = FakeMilter(protocol=codec.P_NOHELO | codec.P_NOHDRS | codec.P_NOBODY
                   | codec.P_NR_CONN | codec.P_NR_MAIL | codec.P_NR_RCPT | codec.P_NR_EOH)
    conv = conversation((m, milter_cfg()))
    through_rcpt(conv)
    assert result(conv.check(new_message())).action == "continue"
    assert m.commands() == [b"O", b"C", b"M", b"R", b"T", b"N", b"E"]


def test_refusals_answer_their_command() -> None:
    """A reject at RCPT is 550 5.7.1 for that recipient; the milter's own reply code at MAIL
    is the MAIL reply; a tempfail at HELO is 451 4.7.1; at connect a reject is 554."""
    m = FakeMilter(script={codec.RCPT: [codec.encode(codec.REJECT)]})
    conv = conversation((m, milter_cfg()))
    result(conv.connect(SESSION))
    result(conv.mail(SESSION, "a@example.org", None, []))
    with pytest.raises(MailError) as e:
        result(conv.rcpt(SESSION, "x@pop.contoso.test", True))
    assert e.value.reply() == "550 5.7.1 Command rejected"
    m2 = FakeMilter(script={codec.MAIL: [codec.encode(codec.REPLYCODE,
                                                      b"553 5.7.1 Sender blocked\0")]})
    conv = conversation((m2, milter_cfg()))
    result(conv.connect(SESSION))
    with pytest.raises(MailError) as e:
        result(conv.mail(SESSION, "a@example.org", None, []))
    assert e.value.reply() == "553 5.7.1 Sender blocked"
    m3 = FakeMilter(script={codec.HELO: [codec.encode(codec.TEMPFAIL)],
                            codec.CONNECT: [codec.encode(codec.CONTINUE)]})
    conv = conversation((m3, milter_cfg()))
    result(conv.connect(SESSION))
    with pytest.raises(MailError) as e:
        result(conv.helo(SESSION))
    assert e.value.code == 451
    m4 = FakeMilter(script={codec.CONNECT: [codec.encode(codec.REJECT)]})
    with pytest.raises(MailError) as e:
        result(conversation((m4, milter_cfg())).connect(SESSION))
    assert e.value.code == 554


def test_end_of_message_actions_edit_the_message() -> None:
    """At EOM: add, insert, change and delete header fields, replace the body (two chunks),
    add and delete recipients, quarantine; only the negotiated actions count."""
    eom = [
        codec.encode(codec.ADDHEADER, b"X-Virus-Status\0Clean\0"),
        codec.encode(codec.INSHEADER, b"\x00\x00\x00\x00Authentication-Results\0mx; none\0"),
        codec.encode(codec.CHGHEADER, b"\x00\x00\x00\x01Subject\0[scanned] hi\0"),
        codec.encode(codec.CHGHEADER, b"\x00\x00\x00\x01From\0\0"),
        codec.encode(codec.REPLBODY, b"new body\r\n"),
        codec.encode(codec.REPLBODY, b"second line\r\n"),
        codec.encode(codec.ADDRCPT, b"<archive@pop.contoso.test>\0"),
        codec.encode(codec.DELRCPT, b"<ted@pop.contoso.test>\0"),
        codec.encode(codec.QUARANTINE, b"suspicious\0"),
        codec.encode(codec.CONTINUE),
    ]
    m = FakeMilter(script={codec.BODYEOB: eom})
    conv = conversation((m, milter_cfg(virus_scanner=True)))
    through_rcpt(conv)
    msg = new_message()
    verdict = result(conv.check(msg))
    assert msg.spool.data == (b"Authentication-Results: mx; none\n"
                              b"Received: from client.example\n\tby pop.contoso.test\n"
                              b"Subject: [scanned] hi\nX-Virus-Status: Clean\n\n"
                              b"new body\nsecond line\n")
    assert verdict.added == ["archive@pop.contoso.test"]
    assert verdict.removed == ["ted@pop.contoso.test"]
    assert (verdict.action, verdict.reason, verdict.virus) == ("quarantine", "suspicious", True)
    m2 = FakeMilter(actions=codec.F_ADDHDRS, script={codec.BODYEOB: eom})
    conv = conversation((m2, milter_cfg()))
    through_rcpt(conv)
    msg = new_message()
    verdict = result(conv.check(msg))
    assert verdict.action == "continue" and not verdict.added
    assert b"[scanned]" not in msg.spool.data and b"X-Virus-Status: Clean" in msg.spool.data


def test_skip_ends_the_body_and_a_reject_at_eom_refuses_with_the_text() -> None:
    """SMFIR_SKIP after the first body chunk: no more chunks, then EOM; a reply code at EOM
    is the message's refusal; the next milter is not asked."""
    big = MESSAGE + b"x" * 200000 + b"\n"
    m = FakeMilter(script={codec.BODY: [codec.encode(codec.SKIP)],
                           codec.BODYEOB: [codec.encode(codec.REPLYCODE,
                                                        b"550 5.7.1 Virus found: X\0")]})
    other = FakeMilter()
    conv = conversation((m, milter_cfg()), (other, milter_cfg(name="second")))
    through_rcpt(conv)
    verdict = result(conv.check(new_message(big)))
    assert m.commands().count(b"B") == 1
    assert verdict.action == "reject" and verdict.error.reply() == "550 5.7.1 Virus found: X"
    assert b"E" not in other.commands() and b"A" in other.commands()  # told to abort


def test_a_milter_down_applies_its_default_action() -> None:
    """tempfail: MAIL, RCPT and the message get 451 4.7.1 for the rest of the session;
    accept: the session goes on and the message is reported unscanned."""
    m = FakeMilter(down=True)
    conv = conversation((m, milter_cfg(default_action="tempfail")))
    result(conv.connect(SESSION))
    with pytest.raises(MailError) as e:
        result(conv.mail(SESSION, "a@example.org", None, []))
    assert e.value.reply() == "451 4.7.1 Service unavailable - try again later"
    assert result(conv.check(new_message())).action == "tempfail"
    conv = conversation((FakeMilter(down=True), milter_cfg(default_action="accept")))
    through_rcpt(conv)
    verdict = result(conv.check(new_message()))
    assert verdict.action == "continue" and verdict.unscanned == ["fake"]


def test_a_milter_that_does_not_answer_times_out() -> None:
    """No reply to EOM within content_timeout (task.Clock): the milter is closed and its
    default_action (tempfail) answers the message."""
    clock = task.Clock()
    m = FakeMilter(silent={codec.BODYEOB})
    conv = conversation((m, milter_cfg()), clock=clock)
    through_rcpt(conv)
    d = conv.check(new_message())
    assert not d.called
    clock.advance(19)
    assert not d.called
    clock.advance(2)
    assert result(d).action == "tempfail"


def test_accept_at_connect_leaves_the_milter_out_of_the_session() -> None:
    """SMFIR_ACCEPT at connect: nothing more is sent to that milter."""
    m = FakeMilter(script={codec.CONNECT: [codec.encode(codec.ACCEPT)]})
    conv = conversation((m, milter_cfg()))
    through_rcpt(conv)
    assert result(conv.check(new_message())).action == "continue"
    assert m.commands() == [b"O", b"C", b"Q"]


# --------------------------------------------------------------------------- outcomes


@dataclass
class FakeQueue:
    items: list = field(default_factory=list)
    woken: int = 0

    def enqueue_bytes(self, data: bytes, envelope: dict) -> str:
        self.items.append((data, envelope))
        return f"N{len(self.items)}"

    def enqueue(self, source: object, envelope: dict) -> str:
        self.items.append((Path(str(source)).read_bytes(), envelope))
        return f"N{len(self.items)}"

    def wake(self) -> None:
        self.woken += 1


@pytest.fixture
def no_threads(monkeypatch):
    import pop3coexist.policy.content as content

    monkeypatch.setattr(content.threads, "deferToThread",
                        lambda f, *a: defer.maybeDeferred(f, *a))


def outcomes(tmp_path: Path, queue: FakeQueue) -> FilterOutcomes:
    async def postmaster():
        return "postmaster@pop.contoso.test"

    async def resolve(address):
        if address.startswith("nobody"):
            return None
        return Recipient({"address": address, "orcpt": None, "notify": None})

    return FilterOutcomes("pop.contoso.test", Quarantine(tmp_path / "quarantine"), queue,
                          postmaster, resolve)


def test_a_virus_reject_is_logged_and_told_to_the_postmaster(tmp_path, no_threads) -> None:
    """REJECT by a virus scanner: the stage refuses with the milter's reply, a structured
    log event with mail_event="milter_verdict" carries the verdict, and the postmaster
    notice (from <>) names sender, recipients, verdict and queue id."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        queue = FakeQueue()
        msg = new_message()
        error = MailError(550, "5.7.1", "Virus found: Eicar")
        verdict = result(outcomes(tmp_path, queue).apply(
            msg, FilterResult("reject", error, "clamav", error.text, virus=True)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert verdict.outcome is Outcome.REFUSE and verdict.error is error
    [event] = [e for e in events if e.get("mail_event") == "milter_verdict"]
    assert (event["queue_id"], event["milter"], event["verdict"], event["virus"]) == (
        "Q1", "clamav", "reject", True)
    assert event["recipients"] == ["ted@pop.contoso.test"]
    [(data, envelope)] = queue.items
    assert envelope["sender"] == "" and envelope["recipients"][0]["address"] == \
        "postmaster@pop.contoso.test"
    assert b"Sender:     <a@example.org>" in data and b"Queue id:   Q1" in data
    assert b"550 5.7.1 Virus found: Eicar" in data and b"<ted@pop.contoso.test>" in data


def test_quarantine_keeps_the_message_and_release_queues_it(tmp_path, no_threads) -> None:
    """QUARANTINE: ACCEPT (250), the spool is dropped, the entry holds the message and its
    envelope (local recipient as mailbox@domain); release hands it to the queue and removes
    it; delete and unknown ids."""
    queue = FakeQueue()
    msg = new_message()
    verdict = result(outcomes(tmp_path, queue).apply(
        msg, FilterResult("quarantine", None, "clamav", "infected", virus=False)))
    assert verdict is ACCEPT and msg.spool.aborted
    q = Quarantine(tmp_path / "quarantine")
    verifyObject(IQuarantine, q)
    [entry] = q.list()
    assert entry["id"] == "Q1" and entry["info"]["reason"] == "infected"
    assert entry["envelope"]["recipients"][0]["address"] == "ted@pop.contoso.test"
    assert (tmp_path / "quarantine" / "Q1.eml").read_bytes() == MESSAGE
    assert json.loads((tmp_path / "quarantine" / "Q1.json").read_text())["size"] == len(MESSAGE)
    assert q.release("Q1", queue) == "N1"
    assert queue.items[0][0] == MESSAGE and q.list() == []
    with pytest.raises(KeyError):
        q.delete("Q1")
    with pytest.raises(KeyError):
        q.release("../etc", queue)


def test_recipient_changes_and_discard(tmp_path, no_threads) -> None:
    """Added recipients join (one that cannot receive is left out), deleted ones leave;
    deleting every recipient drops the message; DISCARD drops it with 250."""
    queue = FakeQueue()
    msg = new_message()
    verdict = result(outcomes(tmp_path, queue).apply(
        msg, FilterResult("continue", added=["archive@example.net", "nobody@x"],
                          removed=["TED@pop.contoso.test"])))
    assert verdict is CONTINUE
    assert [r.address for r in msg.recipients] == ["archive@example.net"]
    msg = new_message()
    assert result(outcomes(tmp_path, queue).apply(
        msg, FilterResult("continue", removed=["ted@pop.contoso.test"]))) is ACCEPT
    assert msg.spool.aborted
    msg = new_message()
    assert result(outcomes(tmp_path, queue).apply(
        msg, FilterResult("discard", milter="m"))) is ACCEPT
    assert msg.spool.aborted and queue.items == []


def test_notice_text() -> None:
    """The notice is a plain RFC 5322 message to the postmaster naming the quarantine verbs
    for a held message."""
    data = notice_message("pop.contoso.test", "pm@pop.contoso.test", "Q9", "a@b.example",
                          ["c@d.example"], FilterResult("quarantine", None, "clamav", "Eicar"),
                          "client.example ([192.0.2.1])", now=0)
    assert data.startswith(b"From: Mail Delivery System <MAILER-DAEMON@pop.contoso.test>\n")
    assert b"Subject: Infected mail quarantined: queue id Q9" in data
    assert b"quarantine list | release Q9 | delete Q9" in data


# --------------------------------------------------------------------------- in an SMTP session


class PickyMilter(FakeMilter):
    """Refuses RCPT TO ann with its own reply text."""

    def answer(self, code: bytes, data: bytes) -> list[bytes]:
        if code == codec.RCPT and b"<ann@" in data:
            self.seen.append((code, data))
            return [codec.encode(codec.REPLYCODE, b"550 5.7.1 No mail for the trap\0")]
        return super().answer(code, data)


def test_an_smtp_session_asks_the_milter_at_each_command(no_threads) -> None:
    """Through the real ESMTP session and delivery avatar (fakes for store, checker, queue):
    the greeting waits for the connect step; a milter's RCPT refusal answers that RCPT only;
    after AUTH the same conversation goes on (no second connect) and MAIL carries the
    {auth_authen} macro; the message gets the milter's header and is committed."""
    from tests.support.dialogue import run_dialogue
    from tests.support.smtp_fakes import HOST, make_factory, open_session
    from tests.support.smtp_replies import GREETING

    clock = task.Clock()
    m = PickyMilter(script={codec.BODYEOB: [codec.encode(codec.ADDHEADER, b"X-Scanned\0yes\0"),
                                           codec.encode(codec.ACCEPT)]})
    milters = MilterSet([milter_cfg()], clock, HOST, "smtp", m.opener(clock))
    factory, store, _checker, _queue, _ = make_factory(content_filters=milters, clock=clock)
    proto, t = open_session(factory)
    assert t.value() == GREETING
    t.clear()
    plain = base64_plain("ted@pop.contoso.test", "secret1")
    run_dialogue(proto, [
        (b"EHLO client.test\r\n", lambda out: out.startswith(b"250-")),
        (b"AUTH PLAIN " + plain + b"\r\n", b"235 2.7.0 Authentication successful\r\n"),
        (b"MAIL FROM:<ted@pop.contoso.test>\r\n", b"250 2.1.0 Sender <ted@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<ann@pop.contoso.test>\r\n", b"550 5.7.1 No mail for the trap\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: hi\r\n\r\nbody\r\n.\r\n", lambda out: out.startswith(b"250 2.0.0 Ok")),
    ], transport=t)
    assert m.commands().count(b"C") == 1 and m.commands().count(b"O") == 1
    assert m.macros(b"M")["{auth_authen}"] == "ted@pop.contoso.test"
    assert m.macros(b"M")["{auth_type}"] == "PLAIN"
    [data] = store.messages("ted@pop.contoso.test")
    assert b"X-Scanned: yes" in data


def base64_plain(user: str, password: str) -> bytes:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode())
