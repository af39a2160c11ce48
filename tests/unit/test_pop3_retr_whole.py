"""RETR's short cut (issue 17): a message that fits in one chunk and is in the page cache is
read in one ``preadv`` on the reactor (``stream.read_whole_cached``), turned into the reply by
``stream.wire_form`` and sent in one write. These tests pin that the short cut's bytes are
exactly the streaming path's (``DotStuffer``) for every input class (LF, CRLF, bare CR, CR CR
LF, lines starting with ``.``, no final newline, empty, Ctrl-Z end, mbox ``From `` line, NUL),
that it reads nothing it should not (too big, not a real file), and that the session takes it
only when nothing is queued for the client (else the transport-paused stream keeps memory
bounded).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from pop3coexist import fsutil
from pop3coexist.pop3 import server as server_module
from pop3coexist.pop3 import stream
from pop3coexist.pop3.factory import POP3ServerFactory
from pop3coexist.pop3.stream import DotStuffer, read_whole_cached, wire_form
from pop3coexist.store.maildir import MaildirStore
from tests.support.dialogue import take
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.unit.pop3_env import make_config
from tests.unit.test_pop3_message_shapes import SHAPES, client_reads

DOMAIN = "pop.contoso.test"
USER = f"ted@{DOMAIN}"
PASSWORD = "ted secret 1"


def streamed(data: bytes, chunk: int) -> tuple[bytes, int]:
    """The streaming path's output and octet count for ``data`` fed in ``chunk``-sized pieces."""
    stuffer = DotStuffer()
    out = [stuffer.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    out.append(stuffer.finish())
    return b"".join(out), stuffer.octets


@pytest.mark.parametrize("name, stored, canonical", SHAPES, ids=[n for n, _, _ in SHAPES])
def test_wire_form_is_the_streams_output_for_every_shape(name: str, stored: bytes,
                                                          canonical: bytes) -> None:
    """For every stored shape of test_pop3_message_shapes, wire_form gives the very bytes and
    octet count of the DotStuffer (one chunk and small chunks), and a client reading it gets
    the canonical message and nothing after the terminator."""
    out, octets = wire_form(stored)
    assert (out, octets) == streamed(stored, max(len(stored), 1))
    if len(stored) < 5000:
        assert (out, octets) == streamed(stored, 3)
    assert octets == len(canonical)
    assert client_reads(out) == (canonical, b"")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"a", b"bc",
                                 b" ", b"\x1a", b"From ", b"\r\r\n", b"\n."]), max_size=30))
def test_wire_form_equals_the_stream_on_random_mixes(parts: list[bytes]) -> None:
    """Any mix of CR, LF, CRLF, dots, NUL, Ctrl-Z and ``From `` gives the streaming path's
    bytes and count."""
    data = b"".join(parts)
    assert wire_form(data) == streamed(data, 1 << 16)


def test_wire_form_of_plain_text_needs_no_stuffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """LF-only and CRLF-only text, with or without dot lines, never build a DotStuffer (the
    point of the short cut); a bare CR does."""
    built: list[int] = []
    real = stream.DotStuffer

    def counting(*args):
        built.append(1)
        return real(*args)

    monkeypatch.setattr(stream, "DotStuffer", counting)
    assert wire_form(b"Subject: a\n\n.x\nbody\n") == (b"Subject: a\r\n\r\n..x\r\nbody\r\n.\r\n", 24)
    assert wire_form(b".a\r\nb\r\n") == (b"..a\r\nb\r\n.\r\n", 7)
    assert wire_form(b"") == (b".\r\n", 0)
    assert built == []
    assert wire_form(b"a\rb\n") == (b"a\r\nb\r\n.\r\n", 6)
    assert built == [1]


def test_read_whole_cached_reads_small_real_files_only(tmp_path: Path) -> None:
    """A small cached file comes back whole without moving its offset (the stream may still
    read it from where it was); an empty file is b""; a file over the limit or a file object
    without a descriptor is None (the stream's job)."""
    path = tmp_path / "m"
    data = bytes(random.Random(5).randrange(256) for _ in range(5000))
    path.write_bytes(data)
    with open(path, "rb") as f:
        got = read_whole_cached(f, 5000)
        if got is None:  # a kernel without RWF_NOWAIT: the stream always reads
            pytest.skip("preadv(RWF_NOWAIT) is not available here")
        assert got == data and f.tell() == 0
        assert read_whole_cached(f, 4999) is None
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "empty", "rb") as f:
        assert read_whole_cached(f, 10) == b""
    assert read_whole_cached(io.BytesIO(data), 1 << 20) is None


def _session(store: MaildirStore, chunk: int | None = None):
    checker = FakeChecker({USER: PASSWORD}, local_domains=(DOMAIN,), offers_secrets=False)
    factory = POP3ServerFactory(make_config(), store, checker, reactor=task.Clock(),
                                run_blocking=sync_run_blocking)
    if chunk is not None:
        factory.chunk_size = chunk
    proto = factory.buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                        hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(t)
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    take(t)
    return proto, t


def _store(root: Path) -> MaildirStore:
    s = MaildirStore(root, hostname="mx.test")
    s.check_writable()
    s.add_domain(DOMAIN)
    s.add_mailbox(DOMAIN, "ted")
    new = s.root / DOMAIN / "ted" / "new"
    for i, (_, stored, _) in enumerate(SHAPES):
        (new / f"{1700000000 + i}.M{i}P7.foreign.host").write_bytes(stored)
    return s


def test_session_replies_are_the_same_with_and_without_the_short_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined RETRs of every shape: the replies with the short cut taken (nothing queued)
    are byte for byte those of the streaming path (something queued), and the short cut takes
    no producer; a message over one chunk is streamed either way; DELE and QUIT follow."""
    n = len(SHAPES)
    script = b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)) + b"DELE 1\r\nQUIT\r\n"
    replies = {}
    for queued in (True, False):
        monkeypatch.setattr(server_module, "nothing_queued", lambda t, q=queued: not q)
        producers: list[object] = []
        real_producer = server_module.MessageProducer

        def tracking(*args, _seen=producers, _real=real_producer, **kw):
            _seen.append(1)
            return _real(*args, **kw)

        monkeypatch.setattr(server_module, "MessageProducer", tracking)
        proto, t = _session(_store(tmp_path / f"queued-{queued}"), chunk=70_000)
        proto.dataReceived(script)
        replies[queued] = take(t)
        big = sum(1 for _, stored, _ in SHAPES if len(stored) > 70_000)
        if not queued and fsutil.nowait_reads():
            assert len(producers) == big  # only the messages over one chunk were streamed
        else:
            assert len(producers) == n
        assert proto._octets_sent == sum(len(c) for _, _, c in SHAPES)
        monkeypatch.setattr(server_module, "MessageProducer", real_producer)
    assert replies[True] == replies[False]
    assert replies[True].endswith(b"+OK message 1 deleted\r\n+OK %s POP3 server signing off "
                                  b"(%d messages left)\r\n" % (proto.factory.hostname.encode(), n - 1))
