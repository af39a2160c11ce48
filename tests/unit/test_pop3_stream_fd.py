"""MessageProducer reading a real file by descriptor: page-cache hits are read on the spot
with preadv(RWF_NOWAIT) (no thread hop), anything not cached goes through run_blocking, and
either way the client gets the same bytes, in bounded chunks, with pause/resume honoured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from pop3coexist import fsutil
from pop3coexist.pop3 import stream
from pop3coexist.pop3.stream import DotStuffer, MessageProducer
from tests.support.fakes import sync_run_blocking

DATA = b"".join(b"line %d\n" % i + (b".dot\n" if i % 7 == 0 else b"") for i in range(30000))
EXPECTED = DATA.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"


class CountingRunner:
    """run_blocking that runs at once and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, f, *args):
        self.calls += 1
        return sync_run_blocking(f, *args)


def message(tmp_path: Path) -> Path:
    path = tmp_path / "msg"
    path.write_bytes(DATA)
    return path


@pytest.mark.skipif(not fsutil.nowait_reads(), reason="no preadv(RWF_NOWAIT) here")
def test_cached_file_is_streamed_without_thread_hops(tmp_path: Path) -> None:
    """A file in the page cache (just written) goes out whole with no run_blocking call."""
    runner = CountingRunner()
    transport = StringTransport()
    with open(message(tmp_path), "rb") as f:
        done = MessageProducer(transport, f, DotStuffer(), runner, 4096).start()
        assert done.called and f.closed
    assert transport.value() == EXPECTED
    assert runner.calls == 0
    assert transport.producer is None


def test_uncached_reads_go_through_run_blocking(tmp_path: Path, monkeypatch) -> None:
    """When the cache does not have the data (EAGAIN), each chunk is read by pread off the
    reactor, at the right offsets, in chunks of at most chunk_size."""
    def eagain(*args):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    sizes: list[int] = []
    real_pread = os.pread

    def pread(fd, n, offset):
        sizes.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(stream.os, "preadv", eagain)
    monkeypatch.setattr(stream.os, "pread", pread)
    runner = CountingRunner()
    transport = StringTransport()
    with open(message(tmp_path), "rb") as f:
        MessageProducer(transport, f, DotStuffer(), runner, 4096).start()
    assert transport.value() == EXPECTED
    assert max(sizes) == 4096 and runner.calls == len(sizes) == -(-len(DATA) // 4096)


def test_pause_and_resume_with_cached_reads(tmp_path: Path) -> None:
    """A paused transport stops the reading; resume goes on from the same offset."""
    transport = StringTransport()
    with open(message(tmp_path), "rb") as f:
        p = MessageProducer(transport, f, DotStuffer(), sync_run_blocking, 4096)
        transport.registerProducer = lambda producer, streaming: None  # type: ignore[method-assign]
        transport.unregisterProducer = lambda: None  # type: ignore[method-assign]
        real_write = transport.write
        writes = []

        def write(data: bytes) -> None:
            writes.append(len(data))
            real_write(data)
            if len(writes) % 3 == 0:
                p.pauseProducing()

        transport.write = write  # type: ignore[method-assign]
        done = p.start()
        rounds = 0
        while not done.called:
            assert len(writes) % 3 == 0
            p.resumeProducing()
            rounds += 1
        assert rounds > 3
    assert transport.value() == EXPECTED


def test_top_through_the_descriptor_path(tmp_path: Path) -> None:
    """TOP (header, blank line, N body lines) gives the same result by descriptor."""
    path = tmp_path / "top"
    path.write_bytes(b"Subject: x\nFrom: y\n\nbody 1\n.body 2\nbody 3\n")
    transport = StringTransport()
    with open(path, "rb") as f:
        done: defer.Deferred = MessageProducer(transport, f, DotStuffer(2), sync_run_blocking, 8).start()
    assert done.called
    assert transport.value() == b"Subject: x\r\nFrom: y\r\n\r\nbody 1\r\n..body 2\r\n.\r\n"


def test_file_shrinking_under_us_ends_the_message(tmp_path: Path) -> None:
    """If the file is shorter than fstat said (truncated meanwhile), what was there is sent
    and the message is terminated (no endless loop)."""
    path = message(tmp_path)
    transport = StringTransport()
    with open(path, "rb") as f:
        p = MessageProducer(transport, f, DotStuffer(), sync_run_blocking, 4096)
        p._use_fd()
        os.truncate(path, 10000)
        p._use_fd = lambda: None  # type: ignore[method-assign]
        p._size = len(DATA)
        done = p.start()
    assert done.called
    assert transport.value().endswith(b".\r\n")
