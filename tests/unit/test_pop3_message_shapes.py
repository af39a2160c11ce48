"""Every file shape a Maildir writer may leave in new/ or cur/ (issue 11, fault 5): the POP3
size (``crlf_size``, ``Maildrop.size``, the ``,W=`` cached in the name after commit, LIST/STAT),
the RETR stream (DotStuffer over any chunk size, MessageProducer on the descriptor fast path and
on the thread path, ``open_message_cached``) and TOP all come from one canonical form. A client
that reads exactly LIST's count of unstuffed octets stays in step, and no line a client may
split off (at CR, LF or CRLF) starts with an unstuffed dot.

The expected canonical bytes of each shape are written out here: CRLF line ends; CRLF, LF,
CR CR LF and a bare CR each end one line; a CRLF added after an unended last line; NUL and
8-bit bytes kept; an empty file stays empty; Ctrl-Zs that end the file (the DOS end-of-file
mark of Windows stores) and an mbox ``From `` envelope line on top are not part of the message.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from pop3coexist.pop3.factory import POP3ServerFactory
from pop3coexist.pop3.stream import DotStuffer, MessageProducer
from pop3coexist.store.maildir import MaildirStore, crlf_size
from tests.support.dialogue import take
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.support.fakes import crlf_size as fake_crlf_size
from tests.unit.pop3_env import make_config

DOMAIN = "pop.contoso.test"
USER = f"ted@{DOMAIN}"
PASSWORD = "ted secret 1"

LONG = b"x" * 100_000
SHAPES: list[tuple[str, bytes, bytes]] = [
    # (name, stored bytes, canonical form: what the client gets after unstuffing)
    ("lf", b"Subject: a\n\nbody\n", b"Subject: a\r\n\r\nbody\r\n"),
    ("crlf", b"Subject: a\r\n\r\nbody\r\n", b"Subject: a\r\n\r\nbody\r\n"),
    ("no final newline", b"Subject: a\n\nlast line", b"Subject: a\r\n\r\nlast line\r\n"),
    ("no final newline, crlf", b"Subject: a\r\n\r\nlast", b"Subject: a\r\n\r\nlast\r\n"),
    ("cr at the end", b"Subject: a\n\nbody\r", b"Subject: a\r\n\r\nbody\r\n"),
    ("two crs at the end", b"x\r\r", b"x\r\n\r\n"),
    ("bare cr inside a line", b"Subject: a\n\nab\rcd\n", b"Subject: a\r\n\r\nab\r\ncd\r\n"),
    ("cr cr lf", b"Subject: a\r\r\n\r\r\nbody\r\r\n", b"Subject: a\r\n\r\nbody\r\n"),
    ("lf cr", b"a\n\rb\n", b"a\r\n\r\nb\r\n"),
    ("mixed lf and crlf", b"H: 1\r\nH2: 2\n\r\nb1\nb2\r\nb3", b"H: 1\r\nH2: 2\r\n\r\nb1\r\nb2\r\nb3\r\n"),
    ("old mac", b"H: 1\rH2: 2\r\rbody\r", b"H: 1\r\nH2: 2\r\n\r\nbody\r\n"),
    ("empty", b"", b""),
    ("one lf", b"\n", b"\r\n"),
    ("one cr", b"\r", b"\r\n"),
    ("only crs", b"\r" * 1000, b"\r\n" * 1000),
    ("dot lines", b".\n..\n.x\n", b".\r\n..\r\n.x\r\n"),
    ("a lone dot, no newline", b".", b".\r\n"),
    ("ends in crlf.crlf", b"Subject: a\r\n\r\nbody\r\n.\r\n", b"Subject: a\r\n\r\nbody\r\n.\r\n"),
    ("ends in lf.lf", b"body\n.\n", b"body\r\n.\r\n"),
    ("ends in a dot line without newline", b"body\n.", b"body\r\n.\r\n"),
    ("cr.cr inside", b"body\r.\r\nmore\n", b"body\r\n.\r\nmore\r\n"),
    ("cr.cr at the end", b"body\r.\r", b"body\r\n.\r\n"),
    ("lf.cr", b"x\n.\rQUIT\n", b"x\r\n.\r\nQUIT\r\n"),
    ("nul bytes", b"a\x00b\n\x00\n\x00", b"a\x00b\r\n\x00\r\n\x00\r\n"),
    ("8-bit", b"Subject: \xe9t\xe9\n\n\xff\xfe\n", b"Subject: \xe9t\xe9\r\n\r\n\xff\xfe\r\n"),
    ("very long line, no newline", LONG, LONG + b"\r\n"),
    ("very long lines", LONG + b"\n" + LONG + b"\r\n." + LONG, LONG + b"\r\n" + LONG + b"\r\n." + LONG + b"\r\n"),
    # a CRLF and a CR CR LF split across the 64 KB read chunks of crlf_size
    ("crlf across a 64k chunk", b"a" * 65535 + b"\r\n.b\r\n", b"a" * 65535 + b"\r\n.b\r\n"),
    ("cr cr lf across a 64k chunk", b"a" * 65535 + b"\r\r\n.b", b"a" * 65535 + b"\r\n.b\r\n"),
    ("bare cr at a 64k chunk end", b"a" * 65535 + b"\r.b", b"a" * 65535 + b"\r\n.b\r\n"),
    # the Windows POP3 service's store and other DOS tools: CRLF text, a Ctrl-Z (0x1A) at the end
    ("ctrl-z at the end", b"Subject: a\r\n\r\nbody\r\n\x1a", b"Subject: a\r\n\r\nbody\r\n"),
    ("ctrl-zs after an unended line", b"Subject: a\r\n\r\nbody\x1a\x1a", b"Subject: a\r\n\r\nbody\r\n"),
    ("cr then ctrl-z at the end", b"a\n.b\r\x1a", b"a\r\n.b\r\n"),
    ("ctrl-z inside is content", b"a\x1ab\n\x1a\n.\x1a\r\n", b"a\x1ab\r\n\x1a\r\n.\x1a\r\n"),
    ("only a ctrl-z", b"\x1a", b""),
    ("ctrl-z at the end of a 64k chunk", b"a" * 65535 + b"\x1a\r\nb\x1a", b"a" * 65535 + b"\x1a\r\nb\r\n"),
    # mbox tools: a From_ envelope line on top (RFC 4155), ">From" and "From " in the body
    ("mbox from_ line", b"From a@b.test Mon Jan  1 00:00:00 2024\nSubject: a\n\n>From x\nFrom y\n",
     b"Subject: a\r\n\r\n>From x\r\nFrom y\r\n"),
    ("mbox from_ line, crlf, no header", b"From a@b.test\r\n.body\r\n", b".body\r\n"),
    ("only a from_ line", b"From a@b.test", b""),
    ("a From: field is no from_ line", b"From: a@b.test\n\nx\n", b"From: a@b.test\r\n\r\nx\r\n"),
    ("a short first line", b"Fro", b"Fro\r\n"),
    (">From on top is kept", b">From a@b.test\nx\n", b">From a@b.test\r\nx\r\n"),
]
IDS = [name for name, _, _ in SHAPES]


def wire(canonical: bytes) -> bytes:
    """RFC 1939 section 3, written out here: each line CRLF, a leading dot doubled, '.' last."""
    assert canonical == b"" or canonical.endswith(b"\r\n")
    lines = canonical.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def top(canonical: bytes, n: int) -> bytes:
    """TOP msg n, unstuffed: the header, the blank line, then n body lines."""
    lines = canonical.split(b"\r\n")[:-1]
    if b"" in lines:
        cut = lines.index(b"")
        lines = lines[: cut + 1 + n]
    return b"".join(ln + b"\r\n" for ln in lines)


def client_reads(stream: bytes) -> tuple[bytes, bytes]:
    """What a strict client (poplib's way) makes of a multi-line response: the unstuffed
    message, and whatever followed the terminating line."""
    out = []
    pos = 0
    while True:
        end = stream.index(b"\r\n", pos)
        line = stream[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(out), stream[pos:]
        out.append((line[1:] if line.startswith(b"..") else line) + b"\r\n")


def assert_no_unstuffed_dot(stream: bytes) -> None:
    """However a client splits lines (CR, LF or CRLF), only the terminator is a lone-dot line
    and no line starts with a single dot; no CR or LF is sent outside a CRLF."""
    body = stream[: -len(b".\r\n")]
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
    pieces = re.split(rb"\r\n|\r|\n", body)
    assert all(not p.startswith(b".") or p.startswith(b"..") for p in pieces)


def stuff(data: bytes, chunk: int, body_lines: int | None = None) -> bytes:
    stuffer = DotStuffer(body_lines)
    out = [stuffer.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(out) + stuffer.finish()


@pytest.mark.parametrize("name, stored, canonical", SHAPES, ids=IDS)
def test_size_and_stream_agree_for_every_chunk_size(name: str, stored: bytes, canonical: bytes) -> None:
    """crlf_size (path, file, bytes) and the fake store's size equal the canonical length; the
    RETR stream is the canonical form dot-stuffed, the same for every chunk size, and a strict
    client reading it gets exactly LIST's count and nothing left over."""
    assert crlf_size(io.BytesIO(stored)) == len(canonical)
    assert fake_crlf_size(stored) == len(canonical)
    chunks = sorted({1, 2, 3, 7, 64, 4096, 65536, max(len(stored), 1)})
    if len(stored) > 5000:
        chunks = [c for c in chunks if c >= 64]
    for chunk in chunks:
        out = stuff(stored, chunk)
        assert out == wire(canonical), (name, chunk)
    message, rest = client_reads(out)
    assert len(message) == len(canonical) and rest == b""
    assert_no_unstuffed_dot(out)
    stuffer = DotStuffer()
    stuffer.feed(stored)
    stuffer.finish()
    assert stuffer.octets == len(canonical)  # what the server checks a RETR against


@pytest.mark.parametrize("name, stored, canonical", [s for s in SHAPES if len(s[1]) < 5000],
                         ids=[n for n, s, _ in SHAPES if len(s) < 5000])
def test_top_is_the_canonical_form_cut_after_n_body_lines(name: str, stored: bytes, canonical: bytes) -> None:
    """TOP msg n sends the header, the blank line and n body lines of the same canonical form
    (so TOP with enough lines is RETR), stuffed, for every chunk size."""
    lines = canonical.count(b"\r\n")
    for n in range(0, lines + 2):
        for chunk in (1, 2, 5, len(stored) or 1):
            out = stuff(stored, chunk, n)
            assert out == wire(top(canonical, n)), (name, n, chunk)
            assert_no_unstuffed_dot(out)
    assert stuff(stored, 4096, lines + 1) == stuff(stored, 4096)


def test_random_bytes_size_equals_stream() -> None:
    """Fuzz: random mixes of CR, LF, dots, NUL and text in random chunkings always give a
    stream whose unstuffed length is crlf_size and that no CR/LF split can desynchronise."""
    rng = random.Random(11)
    alphabet = [b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"a", b"bc", b" ", b"\x1a",
                b"From "]
    for _ in range(1500):
        stored = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        chunk = rng.randrange(1, 12)
        out = stuff(stored, chunk)
        assert out == stuff(stored, 1 << 16), stored
        message, rest = client_reads(out)
        assert rest == b""
        assert len(message) == crlf_size(io.BytesIO(stored)) == fake_crlf_size(stored), stored
        assert_no_unstuffed_dot(out)


# ----------------------------------------------------------------------------- the real store


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot", hostname="mx.test")
    s.check_writable()
    s.add_domain(DOMAIN)
    s.add_mailbox(DOMAIN, "ted")
    return s


def drop_shapes(store: MaildirStore) -> list[tuple[str, bytes, bytes]]:
    new = store.root / DOMAIN / "ted" / "new"
    for i, (_, stored, _) in enumerate(SHAPES):
        (new / f"{1700000000 + i}.M{i}P7.foreign.host").write_bytes(stored)
    return SHAPES


def produce(fileobj, chunk: int = 65536) -> bytes:
    transport = StringTransport()
    d = MessageProducer(transport, fileobj, DotStuffer(), sync_run_blocking, chunk).start()
    assert d.called
    return transport.value()


def test_maildir_sizes_names_and_streams_agree(store: MaildirStore) -> None:
    """Files of every shape dropped into new/: Maildrop.size is the canonical length; the
    stream read by descriptor (open_message, open_message_cached) and by a plain file object is
    the same; after commit the ,W= cached in the cur/ name is that length too, and a fresh
    session (a 'restart') lists the same sizes and UIDLs from the names alone."""
    shapes = drop_shapes(store)
    drop = store.open_maildrop(DOMAIN, "ted")
    try:
        assert len(drop) == len(shapes)
        sizes = [drop.size(i) for i in range(len(drop))]
        uidls = [drop.uidl(i) for i in range(len(drop))]
        assert sizes == [len(c) for _, _, c in shapes]
        for i, (_, stored, canonical) in enumerate(shapes):
            with drop.open_message(i) as f:
                assert produce(f) == wire(canonical)
            cached = drop.open_message_cached(i)
            if cached is not None:
                assert produce(cached, 4096) == wire(canonical)
            assert produce(io.BytesIO(stored), 1000) == wire(canonical)
        drop.commit(set())
    finally:
        drop.close()
    names = sorted((store.root / DOMAIN / "ted" / "cur").iterdir())
    by_time = {int(p.name.split(".", 1)[0]): p.name for p in names}
    for i, (_, _, canonical) in enumerate(shapes):
        assert f",W={len(canonical)}:2," in by_time[1700000000 + i]
    again = MaildirStore(store.root).open_maildrop(DOMAIN, "ted")
    try:
        assert [again.size(i) for i in range(len(again))] == sizes
        assert [again.uidl(i) for i in range(len(again))] == uidls
    finally:
        again.close()


def test_our_own_deliveries_cache_the_canonical_size(store: MaildirStore) -> None:
    """deliver_bytes and deliver_file name a message with ,W= equal to the size POP3 sends,
    whatever its shape (a DSN or a spooled file without a final newline included)."""
    for _, stored, canonical in SHAPES[:12]:
        path = store.deliver_bytes(DOMAIN, "ted", stored)
        assert path.name.endswith(f",S={len(stored)},W={len(canonical)}")
        spool = store.spool_dir() / "shape"
        spool.write_bytes(stored)
        [linked] = store.deliver_file(spool, [(DOMAIN, "ted")])
        assert linked.name.endswith(f",S={len(stored)},W={len(canonical)}")
        spool.unlink()


# ----------------------------------------------------------------------------- the protocol


def session(store: MaildirStore):
    clock = task.Clock()
    checker = FakeChecker({USER: PASSWORD}, local_domains=(DOMAIN,), offers_secrets=False)
    factory = POP3ServerFactory(make_config(), store, checker, reactor=clock,
                                run_blocking=sync_run_blocking)
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    take(transport)
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    return proto, transport, take(transport)


def test_list_stat_retr_and_top_over_the_real_store(store: MaildirStore) -> None:
    """Byte-level POP3 over a Maildir holding every shape: the log-in and STAT totals, each
    LIST line, RETR's '+OK n octets' and the RETR body all agree, and a client reading exactly
    n octets of unstuffed lines finds the terminator right after; TOP n 0 is the header."""
    shapes = drop_shapes(store)
    proto, t, greeting = session(store)
    total = sum(len(c) for _, _, c in shapes)
    assert greeting.endswith(f"has {len(shapes)} messages ({total} octets)\r\n".encode())
    proto.dataReceived(b"STAT\r\n")
    assert take(t) == f"+OK {len(shapes)} {total}\r\n".encode()
    proto.dataReceived(b"LIST\r\n")
    listing = take(t)
    expected = b"".join(b"%d %d\r\n" % (i + 1, len(c)) for i, (_, _, c) in enumerate(shapes))
    assert listing.endswith(b"\r\n" + expected + b".\r\n")
    for i, (name, _, canonical) in enumerate(shapes, start=1):
        proto.dataReceived(b"LIST %d\r\nRETR %d\r\nTOP %d 0\r\n" % (i, i, i))
        out = take(t)
        assert out.startswith(b"+OK %d %d\r\n+OK %d octets\r\n" % (i, len(canonical), len(canonical))), name
        retr = out.split(b"\r\n", 2)[2]
        message, rest = client_reads(retr)
        assert message == canonical, name
        assert rest.startswith(b"+OK"), name
        assert client_reads(rest.split(b"\r\n", 1)[1]) == (top(canonical, 0), b""), name
    proto.dataReceived(b"QUIT\r\n")
    take(t)


# ----------------------------------------------------------------------------- POP3 command framing


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_pop3_commands_end_at_bare_lf_and_refuse_stray_cr(store: MaildirStore, end: bytes) -> None:
    """POP3 command framing (the fault 3 kind, POP3 side): a bare LF ends a command like
    CRLF, pipelined or not; a CR or another control character inside a command line is refused
    with -ERR and nothing is acted on; the session goes on."""
    store.deliver_bytes(DOMAIN, "ted", b"Subject: a\n\nbody\n")
    clock = task.Clock()
    checker = FakeChecker({USER: PASSWORD}, local_domains=(DOMAIN,), offers_secrets=False)
    factory = POP3ServerFactory(make_config(), store, checker, reactor=clock,
                                run_blocking=sync_run_blocking)
    proto = factory.buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                        hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(t)
    take(t)
    proto.dataReceived(b"USER ted@pop.contoso\r.test" + end)
    assert take(t) == b"-ERR invalid characters in command\r\n"
    proto.dataReceived(b"PASS x" + end)
    assert take(t).startswith(b"-ERR ")
    proto.dataReceived(f"USER {USER}".encode() + end + f"PASS {PASSWORD}".encode() + end + b"STAT" + end)
    assert take(t) == (b"+OK send PASS\r\n+OK ted@pop.contoso.test has 1 messages (20 octets)\r\n"
                       b"+OK 1 20\r\n")
    proto.dataReceived(b"DELE 1\x00" + end + b"NOOP\r" + end + b"LIST\x0b1" + end + b"NOOP" + end)
    refused = b"-ERR invalid characters in command\r\n"
    # "NOOP\r" + LF is a CRLF line; "NOOP\r" + CRLF holds a stray CR
    noop = b"+OK\r\n" if end == b"\n" else refused
    assert take(t) == refused + noop + refused + b"+OK\r\n"
    proto.dataReceived(b"QUIT" + end)
    assert take(t) == b"+OK pop.contoso.test POP3 server signing off (1 messages left)\r\n"


def test_a_stale_size_in_a_file_name_is_trusted_and_reported(store: MaildirStore) -> None:
    """The ,W= in a file name is the fast path and is believed (no scan per session); when it
    does not match the bytes (another program's or an older version's name, a file changed in
    place), RETR still sends the canonical form and the server logs a warning naming both
    counts, so the administrator learns of it: once per session, however many messages are
    stale (a migrated store full of such names must not cost a log line per RETR)."""
    cur = store.root / DOMAIN / "ted" / "cur"
    (cur / "1700000000.M1P1.foreign.host,S=5,W=5:2,").write_bytes(b"abcde")
    (cur / "1700000001.M2P1.foreign.host,S=5,W=5:2,").write_bytes(b"fghij")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, t, greeting = session(store)
        assert greeting.endswith(b"has 2 messages (10 octets)\r\n")
        proto.dataReceived(b"RETR 1\r\n")
        assert take(t) == b"+OK 5 octets\r\nabcde\r\n.\r\n"
        proto.dataReceived(b"RETR 2\r\n")
        assert take(t) == b"+OK 5 octets\r\nfghij\r\n.\r\n"
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) for e in events)
    assert "RETR 1 of ted@pop.contoso.test: 7 octets sent, 5 announced" in text
    assert "RETR 2 of" not in text


IMPOSSIBLE_W = [
    # (file name, stored bytes): S= right, W= no canonical form of S octets can have
    ("1700000201.M1P1.foreign.host,S=27,W=3", b"Subject: W too small\n\nbody\n"),
    ("1700000202.M1P1.foreign.host,S=25,W=53", b"Subject: W too big\n\nbody\n"),
    ("1700000203.M1P1.foreign.host,S=25,W=0", b"Subject: W of nothing\n\nx\n"),
]


def test_a_size_field_no_canonical_form_can_have_is_not_trusted(store: MaildirStore) -> None:
    """A name whose ``,S=`` is right but whose ``,W=`` is under S or over 2 S + 2 (copied from
    another file, written by another rule) is not believed, at no cost of I/O to decide: LIST
    and STAT give what RETR sends, and the name is put right at QUIT."""
    box = store.root / DOMAIN / "ted" / "new"
    for name, stored in IMPOSSIBLE_W:
        assert int(name.split(",S=")[1].split(",")[0]) == len(stored)
        (box / name).write_bytes(stored)
    canon = [stored.replace(b"\n", b"\r\n") for _, stored in IMPOSSIBLE_W]
    proto, t, greeting = session(store)
    assert greeting.endswith(f"has 3 messages ({sum(map(len, canon))} octets)\r\n".encode())
    for i, canonical in enumerate(canon, start=1):
        proto.dataReceived(b"LIST %d\r\nRETR %d\r\n" % (i, i))
        out = take(t)
        assert out.startswith(b"+OK %d %d\r\n+OK %d octets\r\n" % (i, len(canonical), len(canonical)))
    proto.dataReceived(b"QUIT\r\n")
    take(t)
    names = sorted(p.name for p in (store.root / DOMAIN / "ted" / "cur").iterdir())
    assert names == [name.split(",", 1)[0] + f",S={len(stored)},W={len(c)}:2,"
                     for (name, stored), c in zip(IMPOSSIBLE_W, canon, strict=True)]


NAMED = [
    # (file name, stored bytes): size fields that do not describe the file, or are missing
    ("1700000101.M1P1.foreign.host,S=5,W=7", b"Subject: wrong S\n\nbody line\n"),
    ("1700000102.M1P1.foreign.host,S=99,W=3", b"Subject: both wrong\n\nbody\n"),
    ("1700000103.M1P1.foreign.host,W=99", b"Subject: only W\n\nbody\n"),
    ("1700000104.M1P1.foreign.host,S=22", b"Subject: only S\n\nbody\n"),
    ("1700000105.M1P1.foreign.host,S=1,T=9,W=2", b"Subject: other field\n\nbody\n"),
]


@pytest.mark.parametrize("folder, info", [("new", ""), ("cur", ":2,S")])
def test_size_fields_that_do_not_match_the_file_are_not_trusted(store: MaildirStore, folder: str,
                                                               info: str) -> None:
    """A name whose ``,S=`` is not the file's real size (or that has no ``,S=``, or no ``,W=``)
    is not believed: LIST, STAT and RETR's '+OK n octets' give the size of what RETR sends. At
    QUIT the name gets the right fields (cur/ flags kept), so the next session reads them from
    the name; the UIDLs never change."""
    box = store.root / DOMAIN / "ted" / folder
    for name, stored in NAMED:
        (box / (name + info)).write_bytes(stored)
    canon = [stored.replace(b"\n", b"\r\n") for _, stored in NAMED]
    uidls = []
    for _session in range(2):
        proto, t, greeting = session(store)
        assert greeting.endswith(f"has 5 messages ({sum(map(len, canon))} octets)\r\n".encode())
        proto.dataReceived(b"UIDL\r\n")
        uidls.append(take(t))
        for i, canonical in enumerate(canon, start=1):
            proto.dataReceived(b"LIST %d\r\nRETR %d\r\n" % (i, i))
            out = take(t)
            assert out.startswith(b"+OK %d %d\r\n+OK %d octets\r\n" % (i, len(canonical), len(canonical)))
            assert client_reads(out.split(b"\r\n", 2)[2]) == (canonical, b"")
        proto.dataReceived(b"QUIT\r\n")
        take(t)
    assert uidls[0] == uidls[1]
    assert uidls[0].split(b"\r\n", 1)[1] == b"".join(
        b"%d 17000001%02d.M1P1.foreign.host\r\n" % (i, i) for i in range(1, 6)) + b".\r\n"
    names = sorted(p.name for p in (store.root / DOMAIN / "ted" / "cur").iterdir())
    flags = ":2," if folder == "new" else info
    fixed = [name.split(",", 1)[0] + f",S={len(stored)},W={len(c)}"
             for (name, stored), c in zip(NAMED, canon, strict=True)]
    fixed[4] += ",T=9"
    assert names == [name + flags for name in fixed]
