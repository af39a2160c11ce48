"""DotStuffer and MessageProducer: CRLF normalisation, dot-stuffing and TOP limits give the
same bytes whatever the chunk boundaries; the producer reads in bounded chunks, honours
pause/resume and stops on connection loss."""

from __future__ import annotations

import io

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from pop3coexist.pop3.stream import DotStuffer, MessageProducer
from tests.support.fakes import sync_run_blocking

CASES = [
    # (stored, RETR output without the terminator)
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\nb", b"a\r\nb\r\n"),
    (b".\n", b"..\r\n"),
    (b".a\n.b\r\n..c\n", b"..a\r\n..b\r\n...c\r\n"),
    (b"x\r\n.\r\n", b"x\r\n..\r\n"),
    (b"x\n\n.\n", b"x\r\n\r\n..\r\n"),
    (b"a\rb\n", b"a\r\nb\r\n"),  # a bare CR ends a line (pop3coexist.canonical)
    (b"a\r\r\n", b"a\r\n"),  # CR CR LF (a double conversion) is one line end
    (b"a\r.\r\nb\n", b"a\r\n..\r\nb\r\n"),  # no unstuffed "." line for a client splitting at CR
    (b"ends with CR\r", b"ends with CR\r\n"),
    (b"", b""),
    (b"no newline at all", b"no newline at all\r\n"),
    (b"\n", b"\r\n"),
    (b"\r\n.", b"\r\n..\r\n"),
]


def run(data: bytes, chunk: int, body_lines: int | None = None) -> bytes:
    stuffer = DotStuffer(body_lines)
    out = [stuffer.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    out.append(stuffer.finish())
    return b"".join(out)


@pytest.mark.parametrize("stored, expected", CASES)
def test_retr_output_is_independent_of_chunk_size(stored, expected):
    """Every chunk size from 1 octet up gives the same CRLF, dot-stuffed output + '.' line."""
    for chunk in range(1, max(len(stored), 1) + 2):
        assert run(stored, chunk) == expected + b".\r\n", chunk


def test_cr_at_chunk_end_and_dot_at_chunk_start():
    """A CR ending one chunk and the LF starting the next are one line end; a '.' starting
    a chunk right after an LF is stuffed; a '.' in mid-line is not."""
    s = DotStuffer()
    assert s.feed(b"one\r") == b"one"
    assert s.feed(b"\n.two") == b"\r\n..two"
    assert s.feed(b".three\n") == b".three\r\n"
    assert s.feed(b".four") == b"..four"
    assert s.finish() == b"\r\n.\r\n"


TOP_MSG = b"H1: a\nH2: b\n\n.b1\nb2\r\nb3\n"


@pytest.mark.parametrize("lines, expected", [
    (0, b"H1: a\r\nH2: b\r\n\r\n"),
    (1, b"H1: a\r\nH2: b\r\n\r\n..b1\r\n"),
    (2, b"H1: a\r\nH2: b\r\n\r\n..b1\r\nb2\r\n"),
    (3, b"H1: a\r\nH2: b\r\n\r\n..b1\r\nb2\r\nb3\r\n"),
    (99, b"H1: a\r\nH2: b\r\n\r\n..b1\r\nb2\r\nb3\r\n"),
])
def test_top_limits_for_every_chunk_size(lines, expected):
    """TOP n m: header, blank line, m body lines; identical for all chunk sizes."""
    for chunk in range(1, len(TOP_MSG) + 2):
        assert run(TOP_MSG, chunk, lines) == expected + b".\r\n", chunk


def test_top_blank_line_with_crlf_split_across_chunks():
    """The header/body separator CRLF split over two chunks still ends the header."""
    s = DotStuffer(0)
    assert s.feed(b"H: v\r\n\r") == b"H: v\r\n"
    assert s.feed(b"\nbody\n") == b"\r\n"
    assert s.done
    assert s.finish() == b".\r\n"


def test_top_without_body_and_unterminated_body_line():
    """A message that is only a header gives the header; an unterminated last body line
    counts as a line and gets CRLF."""
    assert run(b"H: v\n", 3, 0) == b"H: v\r\n.\r\n"
    assert run(b"H: v\n\nlast", 2, 5) == b"H: v\r\n\r\nlast\r\n.\r\n"


class RecordingFile(io.BytesIO):
    """A BytesIO that records the size of every read and whether it was closed."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(size if size is not None else -1)
        return super().read(size)


def test_producer_reads_in_bounded_chunks_and_finishes():
    """A large message is read in chunk_size pieces (never whole), streamed fully, the
    producer unregistered and the file closed."""
    data = (b"x" * 99 + b"\n") * 2000  # 200 000 octets
    f = RecordingFile(data)
    transport = StringTransport()
    done = MessageProducer(transport, f, DotStuffer(), sync_run_blocking, 4096).start()
    assert done.called
    assert max(f.reads) == 4096 and len(f.reads) == 200_000 // 4096 + 2
    assert transport.value() == data.replace(b"\n", b"\r\n") + b".\r\n"
    assert transport.producer is None and f.closed


def test_producer_stops_on_connection_loss():
    """stopProducing (connection lost) closes the file and fails the finished Deferred."""
    pending: list[defer.Deferred] = []

    def later(f, *args):
        d = defer.Deferred()
        pending.append(d)
        return d

    f = RecordingFile(b"abc\n")
    transport = StringTransport()
    p = MessageProducer(transport, f, DotStuffer(), later, 2)
    done = p.start()
    failures = []
    done.addErrback(failures.append)
    p.stopProducing()
    pending[0].callback(b"ab")  # a read that completes afterwards writes nothing
    assert f.closed and failures and transport.value() == b""
