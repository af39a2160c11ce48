"""Streaming a stored message to a POP3 client (RETR, TOP) without holding it in memory.

- ``DotStuffer``: a stateful transformer from stored bytes (whatever line ends a Maildir writer
  left) to the POP3 multi-line form of the message's canonical form (``pop3coexist.canonical``):
  every line end (CRLF, a bare LF, CR CR LF, a bare CR) sent as CRLF, a CRLF added after a last line that has none, a leading
  ``.`` doubled on every line (RFC 1939 section 3), and, for TOP, the header, the blank line
  and at most N body lines. Unstuffed, RETR's output is exactly ``store.maildir.crlf_size``
  octets (LIST's count); since a bare CR is a line end here, no line a client may split off
  (at CR, LF or CRLF) starts with an unstuffed dot. Chunk boundaries anywhere (a CR at the
  end of one chunk, a ``.`` at the start of the next) give the same output as one big chunk.
- ``MessageProducer``: an ``IPushProducer`` that reads the message file in large chunks,
  feeds them through a ``DotStuffer`` and writes them to the transport, reading the next chunk
  only while the transport is not paused. A real file is first read with
  ``preadv(RWF_NOWAIT)``: that returns what is in the page cache at once and never waits for
  the disk (EAGAIN instead), so it is safe on the reactor thread and saves a thread hop per
  chunk (on a virtual machine, waking a pool thread costs more than reading 64 KB). Only what
  is not cached is read off the reactor (``run_blocking``). File objects without a file
  descriptor are always read through ``run_blocking``. The ``+OK`` line (``prefix``) goes out
  with the first chunk and the terminating ``.`` with the last, each by ``netutil.send_now``,
  so a small message is one send on the socket.
- ``read_whole_cached`` and ``wire_form``: RETR's short cut for a message that fits in one
  chunk and is in the page cache (the common case): the whole file in one ``preadv`` on the
  reactor thread, turned into the reply in a few C-speed ``bytes`` operations (stored CRLF or
  LF text with no line that starts with ``.`` needs no per-line work at all), sent in one
  write, with no producer, no Deferred and no thread. Anything unusual (a bare CR, CR CR LF, a
  Ctrl-Z at the end, an mbox ``From `` first line) goes through ``DotStuffer`` instead, so
  the output is always byte for byte what the streaming path sends. A maildrop that
  provides ``ICachedMessageRead`` hands the session the stored bytes itself (one ``openat2``,
  one ``preadv``, one ``close``: no file object, no ``fstat``); ``read_whole_cached`` is
  then the second try, for an open file.

No sockets are opened here and no file formats are interpreted beyond line ends (whose rule
is ``pop3coexist.canonical``'s).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3coexist import fsutil
from pop3coexist.canonical import LineEnds
from pop3coexist.netutil import send_now

CHUNK_SIZE = 256 * 1024
TERMINATOR = b".\r\n"
_LINE_DOT = re.compile(rb"\n\.")

log = Logger(namespace="pop3coexist.pop3.stream")


class DotStuffer:
    """Transforms a message, chunk by chunk, into CRLF-terminated, dot-stuffed lines.

    Line ends are those of ``pop3coexist.canonical`` (CRLF, a bare LF, CR CR LF, a bare CR:
    so a file with mixed or old-Mac line ends, or a stray CR, is sent as lines a client
    splitting at any of them would see alike); NUL and every other byte is content.
    ``body_lines`` None sends the whole message (RETR); a number sends the header, the blank
    line after it and that many body lines (TOP). ``done`` is true once a TOP limit is
    reached: further input is ignored. ``finish()`` returns the tail: a CRLF if the message
    did not end with a line end, then the terminating ``.`` line. ``octets`` counts what was
    sent without the stuffing and the terminator: after a RETR, the size LIST must have said.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self.body_lines = body_lines
        self.done = False
        self._ends = LineEnds()  # holds back CRs at the end of a chunk
        self._bol = True  # the next byte starts a line
        self._line_len = 0  # content octets of the current line so far (line mode)
        self._in_header = True
        self._remaining = body_lines if body_lines is not None else 0
        self.octets = 0  # canonical octets sent so far (CRLF line ends, no dot-stuffing)

    def feed(self, data: bytes) -> bytes:
        """Transform one chunk; returns the bytes to send (possibly empty)."""
        if self.done:
            return b""
        return self._emit(self._ends.feed(data))

    def _emit(self, text: bytes) -> bytes:
        """``text`` has one LF per line end: send it as CRLF lines, stuffed, TOP-limited."""
        if not text:
            return b""
        if self.body_lines is None:
            return self._feed_fast(text)
        return self._feed_lines(text)

    def _feed_fast(self, data: bytes) -> bytes:
        self.octets += len(data) + data.count(b"\n")
        out = data.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._bol and out.startswith(b"."):
            out = b"." + out
        self._bol = out.endswith(b"\n")
        return out

    def _feed_lines(self, data: bytes) -> bytes:
        out: list[bytes] = []
        parts = data.split(b"\n")
        last = len(parts) - 1
        for i, content in enumerate(parts):
            if content:
                if self._bol and content.startswith(b"."):
                    out.append(b".")
                out.append(content)
                self.octets += len(content)
                self._line_len += len(content)
                self._bol = False
            if i == last:
                break
            out.append(b"\r\n")
            self.octets += 2
            if self._in_header:
                if self._line_len == 0:
                    self._in_header = False
                    if self._remaining <= 0:
                        self.done = True
            else:
                self._remaining -= 1
                if self._remaining <= 0:
                    self.done = True
            self._line_len = 0
            self._bol = True
            if self.done:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        """The tail after the last chunk: line ends for CRs held back, a final CRLF if the
        last line had none, and ``.\\r\\n``."""
        tail = b""
        if not self.done:
            tail = self._emit(self._ends.finish())
        if not self.done and not self._bol:
            tail += b"\r\n"
            self.octets += 2
        self.done = True
        return tail + TERMINATOR


def read_whole_cached(fileobj: Any, limit: int) -> bytes | None:
    """The whole of the open message file ``fileobj`` if it holds at most ``limit`` octets
    and the page cache has all of it, read at once without waiting for the disk
    (``preadv(RWF_NOWAIT)``); else None (the caller streams it with ``MessageProducer``, which
    starts from the file's current offset: this read does not move it). OSError propagates."""
    if not fsutil.nowait_reads():
        return None
    try:
        fd = fileobj.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    size = os.fstat(fd).st_size
    if size > limit:
        return None
    if size == 0:
        return b""
    buf = bytearray(size)
    n = fsutil.pread_nowait(fd, buf, 0)
    if n != size:  # partly cached, or the file changed under us: let the stream read it
        return None
    return bytes(buf)


def wire_form(data: bytes) -> tuple[bytes, int]:
    """A whole stored message -> (the RETR reply's body: CRLF lines, dot-stuffed, with the
    terminating ``.`` line; the canonical octets LIST counts, without stuffing or terminator).

    Exactly what ``DotStuffer`` gives for ``data`` in any chunking (the unit tests compare
    them): LF-only and CRLF-only text take a path of a few ``bytes`` operations; any other CR,
    a Ctrl-Z at the end or an mbox ``From `` line (``pop3coexist.canonical``) takes the
    ``DotStuffer``."""
    if b"\r" in data:
        lf = data.replace(b"\r\n", b"\n")
        if b"\r" in lf:  # a CR that is no CRLF's: the general rule
            return _stuffed(data)
    else:
        lf = data
    if lf.startswith(b"From ") or lf.endswith(b"\x1a"):
        return _stuffed(data)
    wire = lf.replace(b"\n", b"\r\n")
    if wire and not wire.endswith(b"\n"):
        wire += b"\r\n"
    octets = len(wire)
    # a line that starts with "." (the same lines in ``lf``): re's search finds "\n." in
    # about half the time of ``in`` (whose skip table stalls at every LF, issue 17)
    if _LINE_DOT.search(lf) is not None:
        wire = wire.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire + TERMINATOR, octets


def _stuffed(data: bytes) -> tuple[bytes, int]:
    stuffer = DotStuffer()
    out = stuffer.feed(data)
    out += stuffer.finish()
    return out, stuffer.octets


@implementer(IPushProducer)
class MessageProducer:
    """Streams one open message file to ``transport`` through ``stuffer``.

    ``start()`` returns a Deferred that fires (with None) after the terminating ``.`` line is
    written, or fails if reading fails (the caller must then drop the connection: a partial
    message cannot be taken back). The file is always closed at the end.
    """

    def __init__(
        self,
        transport: Any,
        fileobj: Any,
        stuffer: DotStuffer,
        run_blocking: Callable[..., defer.Deferred],
        chunk_size: int = CHUNK_SIZE,
        prefix: bytes = b"",
    ) -> None:
        self.transport = transport
        self._prefix = prefix  # sent with the first chunk (the +OK line)
        self.fileobj = fileobj
        self.stuffer = stuffer
        self.run_blocking = run_blocking
        self.chunk_size = chunk_size
        self.finished: defer.Deferred = defer.Deferred()
        self._paused = False
        self._reading = False
        self._stopped = False
        self._in_pump = False
        self._fd: int | None = None  # set when reading by file descriptor (pread)
        self._offset = 0
        self._size = 0

    def start(self) -> defer.Deferred:
        self._use_fd()
        self.transport.registerProducer(self, True)
        self._pump()
        return self.finished

    def _use_fd(self) -> None:
        """Read by descriptor and offset when the file object has one (a real file)."""
        if not fsutil.nowait_reads():
            return
        try:
            fd = self.fileobj.fileno()
            offset = self.fileobj.tell()
            size = os.fstat(fd).st_size
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return
        self._fd, self._offset, self._size = fd, offset, size

    def _read_cached(self) -> bytes | None:
        """The next chunk if the page cache has it (b"" at the end), else None. Never blocks."""
        assert self._fd is not None
        if self._offset >= self._size:
            return b""
        buf = bytearray(min(self.chunk_size, self._size - self._offset))
        n = fsutil.pread_nowait(self._fd, buf, self._offset)
        if n is None:
            return None  # not cached yet (or no such reads here: the threads read it)
        if n == 0:
            self._size = self._offset  # the file shrank: what was there is all there is
            return b""
        self._offset += n
        return bytes(buf) if n == len(buf) else bytes(memoryview(buf)[:n])

    def _read_blocking(self, offset: int) -> bytes:
        """Off the reactor: the next chunk by pread (the cache did not have it)."""
        assert self._fd is not None
        return os.pread(self._fd, min(self.chunk_size, max(self._size - offset, 0)) or 1, offset)

    # -- IPushProducer

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        if not self._in_pump:
            self._pump()

    def stopProducing(self) -> None:  # noqa: N802
        """The connection is gone: stop reading and close the file."""
        if self._stopped:
            return
        self._stopped = True
        self._close_file()
        if not self.finished.called:
            self.finished.errback(Failure(ConnectionAbortedError("connection lost during transfer")))

    # -- the loop

    def _pump(self) -> None:
        """Read and send chunks until paused, done, or a read is still pending."""
        self._in_pump = True
        try:
            while not self._paused and not self._stopped and not self._reading:
                if self._fd is not None:
                    try:
                        data = self._read_cached()
                    except OSError:
                        self._read_failed(Failure())
                        return
                    if data is not None:
                        self._chunk(data)
                        continue
                    self._reading = True
                    d = self.run_blocking(self._read_blocking, self._offset)
                    d.addCallback(self._advance)
                else:
                    self._reading = True
                    d = self.run_blocking(self.fileobj.read, self.chunk_size)
                d.addCallbacks(self._chunk, self._read_failed)
        finally:
            self._in_pump = False

    def _advance(self, data: bytes) -> bytes:
        self._offset += len(data)
        if not data:
            self._size = self._offset
        return data

    def _send(self, data: bytes) -> None:
        if self._prefix:
            data, self._prefix = self._prefix + data, b""
        if data:
            send_now(self.transport, data)

    def _chunk(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if data:
            out = self.stuffer.feed(data)
            # the last chunk (known by the size read by descriptor) goes out with the end
            last = self._fd is not None and self._offset >= self._size
            if not self.stuffer.done and not last:
                self._send(out)
                if not self._in_pump:
                    self._pump()
                return
            self._end(out)
            return
        self._end()

    def _end(self, out: bytes = b"") -> None:
        self._send(out + self.stuffer.finish())
        self._stopped = True
        self._close_file()
        self.transport.unregisterProducer()
        self.finished.callback(None)

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self._stopped:
            return
        log.failure("reading a message for RETR/TOP failed", failure)
        self._stopped = True
        self._close_file()
        self.transport.unregisterProducer()
        self.finished.errback(failure)

    def _close_file(self) -> None:
        try:
            self.fileobj.close()
        except Exception:  # noqa: BLE001 - closing a read-only file; nothing to recover
            log.failure("closing a message file failed")
