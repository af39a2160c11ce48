"""Final delivery by ESMTP, byte by byte (issue 11, faults 4, 7, 9 and 19): the header/body
boundary of incoming content, Return-Path at final delivery only, the quota (with its grace)
at the end of DATA, and the delivery reports local recipients are owed (RFC 3461 / 3464).
Replies and stored bytes are written out here, not imported from the server."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from pop3coexist.config import QuotaGrace
from pop3coexist.store.maildir import MaildirStore
from tests.support.dialogue import run_dialogue, take
from tests.support.smtp_fakes import HOST, make_factory, open_session, smtp_config

EHLO = b"EHLO client.test\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as [0-9a-f]+\r\n\Z")
TRACE_RE = re.compile(rb"\AReturn-Path: <([^>]*)>\nReceived: from [^\n]*\n(?:\t[^\n]*\n)+")


def send(factory, mail: bytes, rcpts: list[bytes], content: bytes, peer: str = "203.0.113.5"):
    """One transaction; returns the reply to the end of DATA."""
    proto, t = open_session(factory, peer)
    take(t)
    proto.dataReceived(EHLO)
    take(t)
    proto.dataReceived(b"MAIL FROM:" + mail + b"\r\n")
    assert take(t).startswith(b"250 ")
    for rcpt in rcpts:
        proto.dataReceived(b"RCPT TO:" + rcpt + b"\r\n")
        assert take(t).startswith(b"250 "), rcpt
    proto.dataReceived(b"DATA\r\n")
    assert take(t) == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    proto.dataReceived(content + b".\r\n")
    return take(t)


def after_trace(message: bytes, sender: str = "a@b.test") -> bytes:
    """The stored message without our Return-Path and Received fields (checked here)."""
    m = TRACE_RE.match(message)
    assert m is not None, message
    assert m.group(1) == sender.encode()
    return message[m.end():]


def real_store(tmp_path: Path, grace: QuotaGrace | None = None) -> MaildirStore:
    store = MaildirStore(tmp_path / "mailroot", quota_grace=grace)
    store.add_domain(HOST)
    for box in ("ted", "ann"):
        store.add_mailbox(HOST, box)
    return store


def mailbox(store: MaildirStore, box: str) -> list[bytes]:
    new = store.root / HOST / box / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())]


def report_of(item: tuple[bytes, dict]) -> tuple[bytes, dict]:
    """A queued delivery report: its bytes and envelope (from <>, NOTIFY=NEVER)."""
    data, env = item
    assert env["sender"] == ""
    assert [r["notify"] for r in env["recipients"]] == [["NEVER"]]
    return data, env


# --------------------------------------------------------------------------- fault 4


@pytest.mark.parametrize(("content", "stored"), [
    # no header section at all: the empty line goes between our fields and the content
    (b"  indented first line\r\nsecond\r\n", b"\n  indented first line\nsecond\n"),
    (b"\tfolded-looking first line\r\n", b"\n\tfolded-looking first line\n"),
    (b"From a@b.test Mon Jan  1 00:00:00 2024\r\nSubject: x\r\n", b"\nFrom a@b.test Mon Jan  1 00:00:00 2024\nSubject: x\n"),
    (b"just text, no colon\r\n\r\npara 2\r\n", b"\njust text, no colon\n\npara 2\n"),
    (b"two words: is not a field\r\n", b"\ntwo words: is not a field\n"),
    (b":starts with a colon\r\n", b"\n:starts with a colon\n"),
    (b"N\xc3\xa4me: 8-bit field name\r\n", b"\nN\xc3\xa4me: 8-bit field name\n"),
    # an empty first line already is the boundary: nothing added
    (b"\r\nbody after an empty header section\r\n", b"\nbody after an empty header section\n"),
    # a header section that stops without its empty line: the empty line is inserted there
    (b"Subject: s\r\nX-A: 1\r\n continued\r\nbody line\r\n\r\nmore\r\n",
     b"Subject: s\nX-A: 1\n continued\n\nbody line\n\nmore\n"),
    # well-formed content is stored as sent (obsolete "name :" is still a field)
    (b"Subject : old style\r\nTo: x@y.test\r\n\r\nbody\r\n", b"Subject : old style\nTo: x@y.test\n\nbody\n"),
    (b"Subject: only a header\r\n", b"Subject: only a header\n"),
    (b"", b""),
    # kept-back cases that hold: mbox quoting, NUL in a name, white space, the client's
    # Return-Path anywhere in the header section (folded, spaced, after a blank-looking line)
    (b">From a@b.test\r\nSubject: x\r\n\r\nb\r\n", b"\n>From a@b.test\nSubject: x\n\nb\n"),
    (b"Sub\x00ject: nul in the name\r\n\r\nb\r\n", b"\nSub\x00ject: nul in the name\n\nb\n"),
    (b"Subject:no space\r\n\r\nb\r\n", b"Subject:no space\n\nb\n"),
    (b"   \r\nSubject: x\r\n", b"\n   \nSubject: x\n"),
    (b"Subject: a\r\nReturn-Path: <evil@x.test>\r\nTo: b@y.test\r\n\r\nb\r\n",
     b"Subject: a\nTo: b@y.test\n\nb\n"),
    (b"Return-Path:\r\n <evil@x.test>\r\nSubject: a\r\n\r\nb\r\n", b"Subject: a\n\nb\n"),
    (b"RETURN-PATH : <evil@x.test>\r\nSubject: a\r\n\r\nb\r\n", b"Subject: a\n\nb\n"),
    (b"Subject: a\r\n \r\nReturn-Path: <e@x.test>\r\n\r\nb\r\n", b"Subject: a\n \n\nb\n"),
    (b"Subject: a\r\n\r\nReturn-Path: <kept@x.test>\r\n", b"Subject: a\n\nReturn-Path: <kept@x.test>\n"),
])
def test_content_that_does_not_start_with_a_header_field_becomes_body(content: bytes,
                                                                      stored: bytes) -> None:
    """RFC 5322 2.1/2.2/3.6.8: a line that is no header field (indented with nothing to
    continue, empty, no ``name:``, an mbox ``From `` line, 8-bit in the name) ends the header
    section; the empty line is inserted before it (as Postfix does), so our trace fields never
    swallow it and TOP n 0 shows only header fields."""
    factory, store, *_ = make_factory()
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>"], content))
    [msg] = store.messages(f"ted@{HOST}")
    assert after_trace(msg) == stored


def test_boundary_is_found_whatever_the_chunking() -> None:
    """The first line arrives one byte at a time: the same bytes are stored."""
    factory, store, *_ = make_factory()
    proto, t = open_session(factory)
    take(t)
    proto.dataReceived(EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n")
    take(t)
    for byte in b"Subject: s\r\n not folded: continues Subject\r\nno header\r\n.\r\n":
        proto.dataReceived(bytes([byte]))
    assert QUEUED.match(take(t))
    [msg] = store.messages(f"ted@{HOST}")
    assert after_trace(msg) == b"Subject: s\n not folded: continues Subject\n\nno header\n"


# --------------------------------------------------------------------------- fault 19


def test_return_path_first_and_the_clients_own_is_dropped() -> None:
    """RFC 5321 4.4: the delivering server adds ``Return-Path: <reverse-path>`` as the first
    line; a Return-Path the client sent in the header (with its folded lines) is removed, one
    in the body stays."""
    factory, store, *_ = make_factory()
    content = (b"Return-Path: <forged@evil.test>\r\n\tfolded part\r\nSubject: s\r\n"
               b"RETURN-PATH : <also@evil.test>\r\n\r\nReturn-Path: <in the body>\r\n")
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>"], content))
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.startswith(b"Return-Path: <a@b.test>\nReceived: from client.test ([203.0.113.5])\n")
    assert after_trace(msg) == b"Subject: s\n\nReturn-Path: <in the body>\n"


def test_return_path_of_the_null_sender() -> None:
    """``MAIL FROM:<>`` (a bounce): ``Return-Path: <>``."""
    factory, store, *_ = make_factory()
    assert QUEUED.match(send(factory, b"<>", [b"<ted@pop.contoso.test>"], b"Subject: s\r\n\r\nx\r\n"))
    [msg] = store.messages(f"ted@{HOST}")
    assert after_trace(msg, sender="") == b"Subject: s\n\nx\n"


def test_relayed_copy_never_carries_return_path() -> None:
    """Relay only: nothing for a local mailbox, so no Return-Path in what is queued; mixed:
    the mailbox copy has it, the queued copy (relayed onward) does not, same bytes otherwise."""
    factory, store, _, queue, _ = make_factory()
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<bob@exchange.northwindtraders.test>"],
                             b"Subject: r\r\n\r\nx\r\n"))
    [(relayed, _)] = queue.items
    assert relayed.startswith(b"Received: from client.test ")
    queue.items.clear()
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>",
                                                      b"<bob@exchange.northwindtraders.test>"],
                             b"Return-Path: <x@y.test>\r\nSubject: m\r\n\r\nx\r\n"))
    [(queued, env)] = queue.items
    assert [r["address"] for r in env["recipients"]] == ["bob@exchange.northwindtraders.test"]
    assert queued.startswith(b"Received: ") and b"Return-Path" not in queued
    [stored] = store.messages(f"ted@{HOST}")
    assert stored == b"Return-Path: <a@b.test>\n" + queued
    assert list(store.spool_dir().iterdir()) == []


# --------------------------------------------------------------------------- fault 7


def test_one_recipient_over_quota_at_end_of_data_gets_552_and_nothing_is_stored(
        tmp_path: Path) -> None:
    """Quota 20,000 bytes, empty mailbox, a 40 KB message without SIZE=: RCPT 250, then
    ``552 5.2.2`` at the end of DATA; no file in the mailbox, the spool or the queue."""
    store = real_store(tmp_path, QuotaGrace(percent=10))
    store.set_quota(HOST, "ted", 20000)
    factory, _, _, queue, _ = make_factory(store=store)
    body = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 500
    assert send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>"], body) == (
        b"552 5.2.2 Mailbox full\r\n")
    assert mailbox(store, "ted") == []
    assert list(store.spool_dir().iterdir()) == [] and queue.items == []


def test_grace_lets_the_last_message_in_then_the_mailbox_takes_nothing(tmp_path: Path) -> None:
    """With a 10% grace a message may take the mailbox up to 22,000 bytes of a 20,000 quota;
    past the grace it is refused; a mailbox at or over its quota then refuses at RCPT."""
    store = real_store(tmp_path, QuotaGrace(percent=10))
    store.set_quota(HOST, "ted", 20000)
    factory, *_ = make_factory(store=store)
    over_grace = b"Subject: 1\r\n\r\n" + (b"y" * 98 + b"\r\n") * 221  # > 22,000 with our fields
    assert send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>"], over_grace) == (
        b"552 5.2.2 Mailbox full\r\n")
    within = b"Subject: 2\r\n\r\n" + (b"y" * 98 + b"\r\n") * 205  # about 21,000 bytes
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>"], within))
    assert 20000 < store.usage(HOST, "ted")[1] <= 22000
    proto, t = open_session(factory)
    take(t)
    run_dialogue(proto, [
        (EHLO, lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"552 5.2.2 <ted@pop.contoso.test>: mailbox full\r\n"),
    ], transport=t)


def test_several_recipients_one_full_the_others_get_it_and_the_sender_a_report(
        tmp_path: Path) -> None:
    """Never refuse the whole message for one full mailbox: ann gets it; ted's mailbox is full,
    so the sender gets one RFC 3464 report (Action: failed, Status: 5.2.2, ORCPT and ENVID
    kept) from <>, RET=HDRS honoured."""
    store = real_store(tmp_path)
    store.set_quota(HOST, "ted", 100)
    factory, _, _, queue, _ = make_factory(store=store)
    body = b"Subject: for two\r\n\r\n" + b"z" * 300 + b"\r\n"
    reply = send(factory, b"<a@b.test> RET=HDRS ENVID=env-1",
                 [b"<ted@pop.contoso.test> ORCPT=rfc822;Ted@pop.contoso.test",
                  b"<ann@pop.contoso.test>"], body)
    assert QUEUED.match(reply)
    assert mailbox(store, "ted") == []
    [stored] = mailbox(store, "ann")
    assert stored.endswith(b"Subject: for two\n\n" + b"z" * 300 + b"\n")
    [(data, env)] = [report_of(item) for item in queue.items]
    assert [r["address"] for r in env["recipients"]] == ["a@b.test"]
    assert b"Original-Envelope-Id: env-1\r\n" in data
    assert (b"Original-Recipient: rfc822;Ted@pop.contoso.test\r\n"
            b"Final-Recipient: rfc822; ted@pop.contoso.test\r\nAction: failed\r\n"
            b"Status: 5.2.2\r\n") in data
    assert b"Content-Type: text/rfc822-headers" in data and b"z" * 300 not in data
    assert b"Return-Path" not in data  # the returned header is the message as received
    assert b"ann@pop.contoso.test" not in data


def test_full_mailbox_beside_a_relayed_recipient(tmp_path: Path) -> None:
    """One local recipient full, one remote: the remote copy is queued and the failure
    reported; nothing goes into the full mailbox."""
    store = real_store(tmp_path)
    store.set_quota(HOST, "ted", 10)
    factory, _, _, queue, _ = make_factory(store=store)
    reply = send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>",
                                          b"<bob@exchange.northwindtraders.test>"], b"x\r\n")
    assert QUEUED.match(reply)
    envs = [env for _, env in queue.items]
    assert [r["address"] for r in envs[0]["recipients"]] == ["bob@exchange.northwindtraders.test"]
    assert b"Status: 5.2.2" in report_of(queue.items[1])[0]
    assert mailbox(store, "ted") == []


@pytest.mark.parametrize(("mail", "notify"), [(b"<>", b""), (b"<a@b.test>", b" NOTIFY=NEVER"),
                                              (b"<a@b.test>", b" NOTIFY=SUCCESS,DELAY")])
def test_full_mailbox_report_never_to_null_sender_nor_against_notify(
        tmp_path: Path, mail: bytes, notify: bytes) -> None:
    """No failure report to ``<>`` (CONTRACT 6), nor when NOTIFY excludes FAILURE (RFC 3461
    4.1); the others still get the message."""
    store = real_store(tmp_path)
    store.set_quota(HOST, "ted", 10)
    factory, _, _, queue, _ = make_factory(store=store)
    reply = send(factory, mail, [b"<ted@pop.contoso.test>" + notify, b"<ann@pop.contoso.test>"],
                 b"x\r\n")
    assert QUEUED.match(reply)
    assert len(mailbox(store, "ann")) == 1 and mailbox(store, "ted") == []
    assert queue.items == []  # ann asked for nothing; ted's NOTIFY (or <>) rules out a report


def test_quota_check_and_link_are_atomic_across_threads(tmp_path: Path) -> None:
    """Eight deliveries of 600 bytes end at once for a mailbox with room for one (quota 1,000,
    no grace): exactly one gets in (the check and the link hold the mailbox's quota lock)."""
    store = real_store(tmp_path)
    store.set_quota(HOST, "ted", 1000)
    source = tmp_path / "msg"
    source.write_bytes(b"m" * 600)
    barrier = threading.Barrier(8)
    results: list[tuple[list, list]] = []

    def one() -> None:
        other = MaildirStore(store.root)  # another process would have its own store
        barrier.wait()
        results.append(other.deliver_within_quota(source, [(HOST, "ted")]))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(len(w) for w, _ in results) == [0] * 7 + [1]
    assert store.usage(HOST, "ted") == (1, 600)


def test_quota_rule_with_grace(tmp_path: Path) -> None:
    """The rule: fits under the quota; past it only while under the quota and within the grace
    (bytes or percent); a mailbox at or over its quota takes nothing."""
    pct = MaildirStore(tmp_path, quota_grace=QuotaGrace(percent=10))
    assert not pct.quota_refuses(0, 1000, 1000)
    assert not pct.quota_refuses(500, 600, 1000)  # 1,100 = quota + 10%
    assert pct.quota_refuses(500, 601, 1000)
    assert pct.quota_refuses(1000, 1, 1000)
    assert not pct.quota_refuses(10**9, 10**9, None)
    fixed = MaildirStore(tmp_path, quota_grace=QuotaGrace(bytes=50))
    assert not fixed.quota_refuses(999, 51, 1000) and fixed.quota_refuses(999, 52, 1000)
    assert MaildirStore(tmp_path).quota_refuses(0, 1001, 1000)  # default store: no grace


@pytest.mark.parametrize(("grace", "usage", "size", "quota", "refused"), [
    (QuotaGrace(), 1000, 0, 1000, True),  # exactly at the quota, size unknown (RCPT, no SIZE=)
    (QuotaGrace(), 1000, 1, 1000, True),
    (QuotaGrace(), 999, 1, 1000, False),  # fills it exactly
    (QuotaGrace(), 999, 2, 1000, True),  # grace 0: not one octet past
    (QuotaGrace(percent=10), 1000, 0, 1000, True),  # at the quota: the grace is spent
    (QuotaGrace(percent=10), 999, 101, 1000, False),  # fits only with the grace
    (QuotaGrace(percent=10), 999, 102, 1000, True),
    (QuotaGrace(bytes=100), 999, 101, 1000, False),
    (QuotaGrace(bytes=100), 1500, 0, 1000, True),  # over the quota (after a grace delivery)
    (QuotaGrace(percent=10), 0, 0, 0, True),  # quota 0: nothing, not even an empty mailbox
    (QuotaGrace(percent=100), 0, 1, 0, True),
])
def test_quota_rule_edges(tmp_path: Path, grace: QuotaGrace, usage: int, size: int, quota: int,
                          refused: bool) -> None:
    """At or over its quota a mailbox takes nothing, whatever the size (0 when RCPT has no
    SIZE=) and the grace; below it a message fits up to quota + grace."""
    assert MaildirStore(tmp_path, quota_grace=grace).quota_refuses(usage, size, quota) is refused


def test_mailbox_exactly_at_its_quota_is_refused_at_rcpt_without_size(tmp_path: Path) -> None:
    """A mailbox whose usage equals its quota (1,000 of 1,000 bytes) gets ``552 5.2.2`` at RCPT
    when MAIL has no SIZE= (the size is not known yet): it could take nothing; the session
    goes on and another recipient is still accepted."""
    store = real_store(tmp_path, QuotaGrace(percent=10))
    store.set_quota(HOST, "ted", 1000)
    (store.root / HOST / "ted" / "new" / "1.filler.host").write_bytes(b"a" * 1000)
    factory, *_ = make_factory(store=store)
    proto, t = open_session(factory)
    take(t)
    run_dialogue(proto, [
        (EHLO, lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"552 5.2.2 <ted@pop.contoso.test>: mailbox full\r\n"),
        (b"RCPT TO:<ann@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ann@pop.contoso.test> OK\r\n"),
    ], transport=t)


def test_quota_grace_config() -> None:
    """``domains.quota_grace``: a size or a percentage; 10% when not set; bad values name the
    key."""
    from pop3coexist.config import ConfigError, parse_config

    base = '[server]\nhostname = "h.test"\nstate_dir = "/tmp/x"\n[domains]\nlocal = ["h.test"]\n'
    assert parse_config(base).domains.quota_grace == QuotaGrace(percent=10.0)
    assert parse_config(base + 'quota_grace = "1MB"\n').domains.quota_grace == QuotaGrace(bytes=10**6)
    assert parse_config(base + 'quota_grace = "25%"\n').domains.quota_grace == QuotaGrace(percent=25.0)
    assert parse_config(base + "quota_grace = 0\n").domains.quota_grace == QuotaGrace()
    for bad in ('"lots"', '"150%"', "-1", "true"):
        with pytest.raises(ConfigError, match="quota_grace"):
            parse_config(base + f"quota_grace = {bad}\n")


# --------------------------------------------------------------------------- fault 9


def test_notify_success_for_a_local_recipient_gives_a_delivered_report(tmp_path: Path) -> None:
    """RFC 3461 5.2.2 / RFC 3464: NOTIFY=SUCCESS (ORCPT, ENVID, RET=FULL) for a mailbox here:
    one "delivered" report (Status 2.0.0) to the sender from <>, the whole message returned;
    the recipient that asked nothing is not listed."""
    store = real_store(tmp_path)
    factory, _, _, queue, _ = make_factory(store=store)
    reply = send(factory, b"<a@b.test> RET=FULL ENVID=QQ+2B1",
                 [b"<ted@pop.contoso.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;t+2Bx@pop.contoso.test",
                  b"<ann@pop.contoso.test>"], b"Subject: dsn\r\n\r\nfull body\r\n")
    assert QUEUED.match(reply)
    assert len(mailbox(store, "ted")) == 1 and len(mailbox(store, "ann")) == 1
    [(data, env)] = [report_of(item) for item in queue.items]
    assert [r["address"] for r in env["recipients"]] == ["a@b.test"]
    assert b"Subject: Successful Mail Delivery Report\r\n" in data
    assert b"Original-Envelope-Id: QQ+1\r\n" in data
    assert (b"Original-Recipient: rfc822;t+x@pop.contoso.test\r\n"
            b"Final-Recipient: rfc822; ted@pop.contoso.test\r\nAction: delivered\r\n"
            b"Status: 2.0.0\r\n") in data
    assert b"ann@pop.contoso.test" not in data
    assert b"Content-Type: message/rfc822" in data and b"full body\r\n" in data


@pytest.mark.parametrize("notify", [b"", b" NOTIFY=NEVER", b" NOTIFY=FAILURE,DELAY"])
def test_no_report_for_local_delivery_unless_success_is_asked(notify: bytes) -> None:
    """Without SUCCESS in NOTIFY, a local delivery sends no report."""
    factory, store, _, queue, _ = make_factory()
    assert QUEUED.match(send(factory, b"<a@b.test>", [b"<ted@pop.contoso.test>" + notify], b"x\r\n"))
    assert len(store.messages(f"ted@{HOST}")) == 1 and queue.items == []


def test_no_delivered_report_to_the_null_sender() -> None:
    """``MAIL FROM:<>`` with NOTIFY=SUCCESS: delivered, no report (never to <>)."""
    factory, store, _, queue, _ = make_factory()
    assert QUEUED.match(send(factory, b"<>", [b"<ted@pop.contoso.test> NOTIFY=SUCCESS"], b"x\r\n"))
    assert len(store.messages(f"ted@{HOST}")) == 1 and queue.items == []


def test_relay_recipient_keeps_its_dsn_parameters_for_the_queue() -> None:
    """A relayed recipient's NOTIFY/ORCPT and the message's RET/ENVID go to the queue (the
    runner passes them on to a DSN hop, or reports "relayed"); no report at acceptance."""
    factory, _, _, queue, _ = make_factory(smtp_config())
    assert QUEUED.match(send(factory, b"<a@b.test> RET=HDRS ENVID=e2",
                             [b"<bob@exchange.northwindtraders.test> NOTIFY=SUCCESS "
                              b"ORCPT=rfc822;bob@exchange.northwindtraders.test"], b"x\r\n"))
    [(_, env)] = queue.items
    assert env["ret"] == "HDRS" and env["envid"] == "e2" and env["sender"] == "a@b.test"
    assert env["recipients"] == [{"address": "bob@exchange.northwindtraders.test",
                                  "orcpt": "rfc822;bob@exchange.northwindtraders.test",
                                  "notify": ["SUCCESS"]}]


def test_config_default_grace_reaches_the_service_store(tmp_path: Path) -> None:
    """The server's store gets ``domains.quota_grace`` (Components)."""
    from pop3coexist.config import parse_config
    from pop3coexist.service import Components

    cfg = parse_config(f'[server]\nhostname = "h.test"\nstate_dir = "{tmp_path}"\n'
                       '[domains]\nquota_grace = "2KB"\n')
    assert Components(cfg).store.quota_grace == QuotaGrace(bytes=2000)


def test_which_local_recipients_ask_for_a_delivered_report() -> None:
    """The committer's quick test for "no report owed" agrees with dsn.wants_notice: a
    "delivered" report only where NOTIFY lists SUCCESS (any case) and not NEVER; no NOTIFY
    (None, empty) asks for failures and delays only (RFC 3461 section 4.1)."""
    from pop3coexist.smtp.dsn import wants_notice
    from pop3coexist.smtp.incoming import _asks_success
    from pop3coexist.store.envelope import Recipient

    for notify in (None, [], ["SUCCESS"], ["success", "FAILURE"], ["NEVER"], ["FAILURE"],
                   ["DELAY", "Success"], ["NEVER", "SUCCESS"]):
        given = {"address": "ted@pop.contoso.test", "orcpt": None, "notify": notify}
        entry = Recipient(given["address"], notify=notify or None)
        assert _asks_success(given) == wants_notice(entry, "delivered"), notify
    assert not _asks_success(None)
