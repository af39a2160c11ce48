"""Incoming messages: the DATA stream -> a spool file -> the mail store and the outbound queue.

- ``MessageReader`` parses the DATA byte stream: only ``CRLF . CRLF`` ends it (a bare CR or LF
  never does, so SMTP smuggling cannot start a second message); it undoes dot-stuffing,
  converts CRLF to LF (Maildir convention: POP3 turns LF back into CRLF, so the client gets the
  exact bytes it sent), enforces the size limit, the line length limit (RFC 5321 section
  4.5.3.1.6), and counts hops. A bare CR is refused (RFC 5321 section 2.3.8). A bare LF is,
  by default, taken as a line end (``smtp.bare_newline = "normalize"``, as Postfix does:
  many scripts and curl send LF-only text) or refused (``"reject"``); either way it never
  ends the message. While the header section lasts it removes the fields a client may not set
  (``Return-Path``) and, where the content leaves the header section without an empty line
  (its first line, or a later one, is no header field: RFC 5322 section 2.1), inserts one, so
  the server's trace fields never swallow the client's text. On the first
  problem it stops storing (the spool file is removed at once) and only looks for the end.
- ``SpoolWriter`` streams into a new file in ``store.spool_dir()`` in large writes; memory does
  not grow with the message size.
- A spool file for local mailboxes starts with ``Return-Path`` (final delivery, RFC 5321
  section 4.4), a local-only prefix: the copy for the outbound queue leaves it out.
- ``commit_message`` (blocking, run off the reactor) makes the message durable: fsync, then
  ``store.deliver_within_quota`` (single-instance hard links into every mailbox with room
  under its quota and grace), then ``queue.enqueue`` for the other recipients, then the
  delivery reports the local recipients are owed (NOTIFY=SUCCESS: "delivered"; a full
  mailbox while others got the message: "failed", 5.2.2), then removes the spool file. Only
  after it returns does the server reply 250; when every mailbox was full, 552 5.2.2 and
  nothing is stored.
- ``GroupCommitter`` does the same for many sessions at once (group commit): messages whose
  DATA ended while a batch was being made durable wait for the next batch, and one batch costs
  two file-system syncs (the spool files' data, then the new directory entries) however many
  messages it holds. Each session's Deferred fires, in submission order, only after its own
  message is durable in every mailbox and queue it goes to.
- ``clean_spool`` removes what a crash left in the spool folder (call it at start).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3coexist.errors import MailError, QuotaExceeded
from pop3coexist.fsutil import current_pid
from pop3coexist.interfaces import (
    IBatchDelivery,
    IBatchEnqueue,
    ICommitter,
    ICopyCommitter,
    IFileRecycler,
    ISpool,
    LocalNotes,
)
from pop3coexist.smtp import dsn
from pop3coexist.smtp.received import BODY, END, FIELD, HopCounter, return_path_field
from pop3coexist.store.envelope import Envelope, Recipient
from pop3coexist.store.queue import new_queue_id as queue_id

log = Logger()

SPOOL_SUFFIX = ".smtp-spool"
WRITE_CHUNK = 256 * 1024
MAX_TEXT_LINE = 998  # octets without CRLF (RFC 5321 section 4.5.3.1.6)
# Header fields a client may not set, removed from the header section as it streams past
# (Postfix's message_drop_headers keeps the same one): Return-Path is added by the server
# that makes the final delivery (RFC 5321 section 4.4), never by a sender.
DROP_FIELDS = frozenset({b"return-path"})


def new_queue_id() -> str:
    """The message's id for logs, the Received header, the 250 reply and the outbound queue
    (one id from DATA to the last delivery line: ``store.queue.new_queue_id``)."""
    return queue_id()


@implementer(ISpool)
class SpoolWriter:
    """A new spool file, written in large chunks; ``abort`` removes it.

    With ``lazy=True`` the file is created only when the first WRITE_CHUNK bytes are there, or
    by ``finish`` (in the commit worker): a small message never makes the reactor wait for a
    file creation (which, on a busy journal, can block for milliseconds). An I/O error while
    writing is kept and raised by ``finish``, so the session answers 451 at the end of DATA.
    """

    def __init__(self, spool_dir: Path | str, queue_id: str, lazy: bool = False) -> None:
        self.queue_id = queue_id
        # the file's name as a str (os calls take it as it is; per message, pathlib's join
        # and its str() on every os call cost more than the calls, issue 17); ``path``
        # gives it as a Path
        self.file = f"{os.fspath(spool_dir)}/{queue_id}.{current_pid()}{SPOOL_SUFFIX}"
        self._path: Path | None = None
        self.local_prefix = 0  # leading octets for local mailboxes only (Return-Path)
        self.fd: int | None = None
        self._buffer = bytearray()
        self.size = 0
        self.error: OSError | None = None
        self._created = False
        self._done = False  # closed or aborted: nothing more is written
        if not lazy:
            self._create()

    @property
    def path(self) -> Path:
        """The spool file's path (it exists once created: see the class docstring)."""
        if self._path is None:
            self._path = Path(self.file)
        return self._path

    def _create(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.file, flags, 0o600)
        except FileNotFoundError:
            # the spool folder went away since the store last checked it: make it again
            # (only it: a missing state folder stays an error)
            os.mkdir(os.path.dirname(self.file), 0o700)
            self.fd = os.open(self.file, flags, 0o600)
        self._created = True

    def write(self, data: bytes) -> None:
        """Append ``data``; reaches the file in chunks of WRITE_CHUNK bytes or more."""
        if self._done or self.error is not None:
            return
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= WRITE_CHUNK:
            try:
                self._flush()
            except OSError as e:
                self.error = e
                self._buffer = bytearray()

    def write_local_prefix(self, data: bytes) -> None:
        """Write ``data`` first, as a part that only local mailboxes get: the ``Return-Path``
        of final delivery (RFC 5321 section 4.4). The copy for the outbound queue leaves it
        out (``commit_message``)."""
        if self.size:
            raise ValueError("the local-only prefix must come first")
        self.write(data)
        self.local_prefix = len(data)

    def _flush(self) -> None:
        if self.fd is None:
            self._create()
        view = memoryview(self._buffer)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        view.release()
        self._buffer.clear()

    def read(self) -> bytes:
        """The message as stored so far, without the local-only prefix (blocking when the
        file exists: a stage reads a big message off the reactor). Raises the OSError that
        stopped an earlier write, or one of its own."""
        if self.error is not None:
            raise self.error
        if not self._created:
            return bytes(self._buffer[self.local_prefix:])
        self._flush()
        assert self.fd is not None
        out = bytearray()
        offset = self.local_prefix
        while True:
            chunk = os.pread(self.fd, WRITE_CHUNK, offset)
            if not chunk:
                return bytes(out)
            out += chunk
            offset += len(chunk)

    def replace(self, data: bytes) -> None:
        """Make ``data`` the message, keeping the local-only prefix before it (a stage's edit:
        ``policy.stages.Message``). Blocking when the file exists; raises OSError."""
        if self.error is not None:
            raise self.error
        if self._done:
            raise ValueError("the spool file is closed")
        if not self._created:
            del self._buffer[self.local_prefix:]
            self._buffer += data
        else:
            self._flush()
            assert self.fd is not None
            os.ftruncate(self.fd, self.local_prefix)
            view = memoryview(data)
            offset = self.local_prefix
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
            os.lseek(self.fd, 0, os.SEEK_END)
        self.size = self.local_prefix + len(data)

    def finish(self, recycler: IFileRecycler | None = None) -> None:
        """Create the file if still needed and write what is buffered (no fsync: that is the
        committer's job, off the reactor). Raises the OSError that stopped an earlier write.

        With ``recycler`` (the queue: store/recycle.py), a file still to be created is a
        spent queue file renamed to the spool file's name, overwritten from its start and cut
        to the message's length here, before the committer's sync: a crash before that leaves
        a spool file that ``clean_spool`` removes at start, as a new one would."""
        if self.error is not None:
            raise self.error
        if self._done:
            return
        reused = False
        if self.fd is None and recycler is not None:
            self.fd = recycler.take_file(self.file)
            if self.fd is not None:
                self._created = reused = True
        if self._buffer or self.fd is None:
            self._flush()
        if reused:
            os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        """Close the file descriptor (idempotent); nothing more is written."""
        self._done = True
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None

    def abort(self) -> None:
        """Close and remove the file (idempotent): nothing of the message remains."""
        self.close()
        self._buffer = bytearray()
        if self._created:
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass


class MessageReader:
    """Parses one DATA stream into a SpoolWriter (see the module docstring).

    ``feed(data)`` returns None while the message goes on, or the number of bytes of ``data``
    that belong to it (through the terminating ``.CRLF``); the rest is the next command.
    After the end, ``error`` is None or the MailError to reply with.
    """

    def __init__(
        self,
        sink: SpoolWriter,
        max_size: int,
        max_hops: int,
        max_line: int = MAX_TEXT_LINE,
        allow_bare_lf: bool = True,
    ) -> None:
        self.sink = sink
        self.allow_bare_lf = allow_bare_lf
        self.max_size = max_size or sys.maxsize  # 0: no fixed maximum (RFC 1870 section 4)
        self.max_hops = max_hops
        self.max_line = max_line
        self.size = 0  # octets of content as the client sent it, CRLF line ends, unstuffed
        self.error: MailError | None = None
        self.hops = HopCounter()
        self._dropping = False  # inside a header field that DROP_FIELDS removes
        self._pending = b""  # the current line so far; always starts at a line start
        self._line_start = True  # _pending starts right after CRLF (or at the start of DATA)
        self._tail = b""  # in error mode: the last bytes seen (to find the end marker)
        self.done = False

    # -- the end marker

    def feed(self, data: bytes) -> int | None:
        if self.error is not None:
            return self._feed_discard(data)
        head = len(self._pending)
        buf = self._pending + data if head else data
        start = self._line_start
        if start and buf.startswith(b".\r\n"):
            end_line = 0
        else:
            k = buf.find(b"\r\n.\r\n")
            end_line = k + 2 if k >= 0 else -1
        if end_line >= 0:
            self._pending = b""
            self._content(buf[:end_line], start)
            self.done = True
            return end_line + 3 - head
        if self.allow_bare_lf:
            cut = buf.rfind(b"\n") + 1  # any line end: a bare LF counts as one
        else:
            cut = buf.rfind(b"\r\n") + 2 if b"\r\n" in buf else 0
        if cut > 0:
            self._pending = buf[cut:]
            self._line_start = buf[cut - 2 : cut] == b"\r\n"
            self._content(buf[:cut], start)
        else:
            self._pending = buf
        # a partial line may hold max_line octets, a stuffed dot and the CR of its CRLF
        if self.error is None and len(self._pending) > self.max_line + 1 + (
            self._pending[:1] == b"."
        ):
            # a line longer than allowed and still no CRLF: stop storing, keep looking for the end
            self._fail(self._too_long())
        elif self.error is not None:
            self._tail = (self._lead() + self._pending)[-4:]
            self._pending = b""
        return None

    def _lead(self) -> bytes:
        """The line end just before _pending (what the end marker search must see)."""
        return b"\r\n" if self._line_start else b"\n"

    def _feed_discard(self, data: bytes) -> int | None:
        head = len(self._tail)
        buf = self._tail + data
        k = buf.find(b"\r\n.\r\n")
        if k >= 0:
            self.done = True
            self._tail = b""
            return k + 5 - head
        self._tail = buf[-4:]
        return None

    def _too_long(self) -> MailError:
        return MailError(550, "5.6.0", f"Message refused: a line is longer than {self.max_line} "
                         "octets (RFC 5321 section 4.5.3.1.6)")

    def _fail(self, error: MailError) -> None:
        if self.error is None:
            self.error = error
            self.sink.abort()
        self._tail = (self._lead() + self._pending)[-4:]
        self._pending = b""

    # -- complete lines

    def _content(self, body: bytes, line_start: bool = True) -> None:
        """``body``: complete lines, each ending in CRLF (or a bare LF when those are allowed);
        ``line_start``: the body starts right after a CRLF, where a dot is stuffing."""
        if not body or self.error is not None:
            return
        # issue 17: each pass over the bytes counts (a 4 KB message in one piece: 30 us of
        # counts and replaces before); the same checks, in fewer passes
        n_cr = body.count(b"\r")
        n_lf = body.count(b"\n")
        # dot-stuffing is undone at CRLF line starts only (RFC 5321 section 4.5.2); a
        # removed dot never makes or breaks a CRLF
        unstuffed = body.replace(b"\r\n.", b"\r\n")
        dots = len(body) - len(unstuffed)
        if line_start and body[:1] == b".":
            unstuffed = unstuffed[1:]
            dots += 1
        lines = unstuffed.split(b"\r\n")
        crlf = len(lines) - 1
        bare_lf = n_lf != crlf
        if n_cr != crlf or (bare_lf and not self.allow_bare_lf):
            what = "CR or LF" if not self.allow_bare_lf else "CR"
            self.error_now(MailError(550, "5.5.2",
                                     f"Message refused: bare {what} in data (RFC 5321 section 2.3.8)"))
            return
        out = b"\n".join(lines)
        if bare_lf:  # a bare LF ends a line too
            lines = out.split(b"\n")
        # body ends with a line end: the last item is empty and does not change the maximum
        if max(map(len, lines)) > self.max_line:
            self.error_now(self._too_long())
            return
        self.size += len(body) - dots
        if self.size > self.max_size:
            self.error_now(MailError(552, "5.3.4",
                                     f"Message too big: the limit is {self.max_size} octets"))
            return
        if self.hops.in_header:
            out = self._header_section(out)
            if self.hops.count + 1 > self.max_hops:
                self.error_now(MailError(554, "5.4.6",
                                         f"Too many hops ({self.hops.count} Received headers): "
                                         "probably a mail loop"))
                return
        self.sink.write(out)

    def _header_section(self, out: bytes) -> bytes:
        """``out`` (LF lines) seen while the header section lasts: counts hops, drops the
        fields a client must not set (``DROP_FIELDS``), and inserts the empty line where the
        content leaves the header section without one (RFC 5322 section 2.1: a line that is
        not a header field, first or later, starts the body), as Postfix does; so our trace
        fields never swallow the client's first line, and TOP n 0 shows only header fields."""
        # line by line only up to the end of the header section; the rest is one slice
        # (issue 17: splitting and joining a whole message cost more than its header)
        hops = self.hops
        kept: list[bytes] = []
        pos = 0
        end = len(out)
        while pos < end:
            eol = out.find(b"\n", pos) + 1  # out ends with a line end: eol > pos
            kind = hops.line(out[pos : eol - 1])
            if kind == BODY:
                kept.append(b"\n")
                kept.append(out[pos:])
                break
            if kind == FIELD:
                self._dropping = hops.name in DROP_FIELDS
            elif kind == END:
                kept.append(out[pos:])
                break
            if not self._dropping:
                kept.append(out[pos:eol])
            pos = eol
        return b"".join(kept)

    def error_now(self, error: MailError) -> None:
        """Stop storing: remove the spool file and only look for the end from now on."""
        if self.error is None:
            self.error = error
            self.sink.abort()

    def abort(self) -> None:
        """The connection went away mid-DATA: remove the spool file."""
        self.sink.abort()


def commit_message(
    store,
    queue,
    spool: SpoolWriter,
    local_recipients: list[tuple[str, str]],
    envelope: dict | None,
    fsync: Callable[[int], None] = os.fsync,
    notes: LocalNotes | None = None,
    partial: bool = False,
) -> list[tuple[str, str]]:
    """Blocking. Make the message durable everywhere it goes, then remove the spool file;
    return the local mailboxes whose quota refused it (their "failed" reports are queued).

    Order: fsync the spool file; hard-link it into each local mailbox that has room under its
    quota (``deliver_within_quota`` fsyncs the ``new/`` folders); enqueue it for the other
    recipients (durable on return; without the local-only ``Return-Path``); queue the
    delivery reports the local recipients are owed (``LocalNotes``); remove the spool file.
    ``QuotaExceeded`` when every recipient's mailbox refused it (nothing is stored), unless
    ``partial`` (a list copy: each full mailbox gets its report instead). Any
    exception leaves the spool file removed and propagates: the caller answers with a failure
    and the client will retry (or, for the quota, has its 552).
    """
    try:
        spool.finish()
        if spool.fd is None:
            raise OSError("the spool file is gone")
        fsync(spool.fd)
        spool.close()
        queued = bool(envelope is not None and envelope.get("recipients"))
        written: list = []
        refused: list[tuple[str, str]] = []
        if local_recipients:
            written, refused = deliver_local(store, spool, local_recipients,
                                             others=queued or partial)
        try:
            if queued:
                enqueue_spool(queue, spool, envelope)
            send_local_reports(queue, spool, local_recipients, refused, notes)
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return refused
    finally:
        spool.abort()


def deliver_local(
    store, spool: SpoolWriter, local: list[tuple[str, str]], *, others: bool, sync: bool = True
) -> tuple[list, list[tuple[str, str]]]:
    """Blocking. Deliver the spool file to the local mailboxes that have room (the quota is
    checked on the real size, with the grace); return ``(paths written, refused)``. Raises
    ``QuotaExceeded`` (``.recipient``: the first full mailbox) when every local recipient was
    refused and ``others`` is false: the whole message then gets ``552 5.2.2``, nothing stored.
    """
    options = {"sync": False} if not sync and IBatchDelivery.providedBy(store) else {}
    written, refused = store.deliver_within_quota(spool.file, local, **options)
    if refused and not written and not others:
        domain, mailbox = refused[0]
        exc = QuotaExceeded(f"mailbox {mailbox}@{domain} is over its quota")
        exc.recipient = refused[0]  # type: ignore[attr-defined]
        raise exc
    return list(written), list(refused)


def enqueue_spool(queue, spool: SpoolWriter, envelope: dict, unsynced: bool = False) -> str:
    """Blocking. Enqueue the spool file for the outbound queue; a spool file that starts with
    a local-only ``Return-Path`` is enqueued as a fsynced copy without it (a copy relayed
    onward never carries one: RFC 5321 section 4.4). ``unsynced``: by
    ``IBatchEnqueue.enqueue_unsynced`` (the group commit syncs and publishes). The queue id."""
    put = queue.enqueue_unsynced if unsynced else queue.enqueue
    if not spool.local_prefix:
        return put(spool.path, envelope)
    copy = spool.path.with_name(f"{spool.queue_id}-relay.{os.getpid()}{SPOOL_SUFFIX}")
    try:
        with open(spool.path, "rb") as src, open(copy, "wb") as out:
            src.seek(spool.local_prefix)
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return put(copy, envelope)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(copy)


def copy_spool(spool: SpoolWriter, sender: str, header: bytes) -> SpoolWriter:
    """Blocking. A new spool file beside ``spool``: ``Return-Path: <sender>`` (its local-only
    prefix), ``header`` (LF line ends), then ``spool``'s message without its own local prefix
    (the list copy of a message; policy/stages.py). Written, not yet fsynced (the commit does);
    ``spool`` is flushed to its file first and otherwise unchanged."""
    spool.finish()
    copy = SpoolWriter(spool.path.parent, new_queue_id())
    try:
        copy.write_local_prefix(return_path_field(sender))
        copy.write(header)
        with open(spool.path, "rb") as src:
            src.seek(spool.local_prefix)
            while chunk := src.read(WRITE_CHUNK):
                copy.write(chunk)
        copy.finish()
    except BaseException:
        copy.abort()
        raise
    log.info("{id}: list copy from <{sender}> is {copy}", id=spool.queue_id, sender=sender,
             copy=copy.queue_id)
    return copy


def send_local_reports(
    queue,
    spool: SpoolWriter,
    local: list[tuple[str, str]],
    refused: list[tuple[str, str]],
    notes: LocalNotes | None,
) -> None:
    """Blocking. Queue the RFC 3464 reports the local recipients are owed: "failed" (Status
    5.2.2) for the mailboxes in ``refused`` unless their NOTIFY excludes FAILURE, "delivered"
    (Status 2.0.0) for the others whose NOTIFY includes SUCCESS (RFC 3461 sections 4.1, 5.2.2).
    Each goes to the sender from ``<>``, with ENVID, ORCPT and RET honoured; never to ``<>``.
    Durable on return (``queue.enqueue``); raises what the queue raises."""
    if notes is None:
        if refused:
            log.warn("{id}: {n} mailbox(es) over quota and nobody to report it to",
                     id=spool.queue_id, n=len(refused))
        return
    if not refused and not any(_asks_success(notes.recipients.get(key)) for key in local):
        return  # the usual case: nobody refused, nobody asked for NOTIFY=SUCCESS
    gone = set(refused)
    kinds: dict[str, list[Recipient]] = {"failed": [], "delivered": []}
    for key in local:
        given = notes.recipients.get(key) or {"address": f"{key[1]}@{key[0]}"}
        entry = Recipient(given["address"], orcpt=given.get("orcpt"), notify=given.get("notify"))
        if key in gone:
            entry.status, entry.last_reply = "5.2.2", "552 5.2.2 Mailbox full: over its quota"
            entry.diagnostic = "smtp; 552 5.2.2 Mailbox full: over its quota"
            kind = "failed"
        else:
            entry.status, entry.last_reply = "2.0.0", "250 2.0.0 delivered to mailbox"
            kind = "delivered"
        if dsn.wants_notice(entry, kind):
            kinds[kind].append(entry)
    if not any(kinds.values()):
        return
    if not notes.sender:
        log.info("{id}: no delivery report: the sender is <> (RFC 3461 section 6.2)",
                 id=spool.queue_id)
        return
    env = Envelope(id=spool.queue_id, sender=notes.sender, recipients=[], ret=notes.ret,
                   envid=notes.envid, arrival=notes.arrival, received_from=notes.received_from)
    now = time.time()
    for kind, rcpts in kinds.items():
        if not rcpts:
            continue
        full = dsn.include_full(env, kind)
        original = dsn.read_original(spool.path, full, offset=spool.local_prefix)
        data = dsn.build_report(kind, env, rcpts, notes.reporting_mta, original, now, full)
        report = spool.path.with_name(f"{spool.queue_id}-{kind}.{os.getpid()}{SPOOL_SUFFIX}")
        try:
            with open(report, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            queue.enqueue(report, dsn.report_envelope(env, now))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(report)
        log.info("{id}: {kind} report for {addrs} queued to <{sender}>", id=spool.queue_id,
                 kind=kind, addrs=", ".join(f"<{r.address}>" for r in rcpts),
                 sender=notes.sender)


def _asks_success(given: dict | None) -> bool:
    """Whether a local recipient's NOTIFY (as the client gave it) asks for a "delivered"
    report: SUCCESS listed and not NEVER (RFC 3461 section 4.1; as ``dsn.wants_notice``)."""
    notify = given.get("notify") if given else None
    if not notify:
        return False
    upper = [n.upper() for n in notify]
    return "SUCCESS" in upper and "NEVER" not in upper


def _load_syncfs() -> Callable[[int], None] | None:
    """``syncfs(2)`` (Linux): one call makes every file and folder on one file system durable."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return syncfs


SYNCFS = _load_syncfs()


class _Pending:
    """One message waiting for a batch: its spool file, where it goes, and its Deferred."""

    __slots__ = ("spool", "local", "envelope", "notes", "deferred", "error", "written", "refused",
                 "partial", "queued")

    def __init__(self, spool: SpoolWriter, local: list[tuple[str, str]], envelope: dict | None,
                 notes: LocalNotes | None = None, partial: bool = False) -> None:
        self.partial = partial
        self.spool = spool
        self.local = local
        self.envelope = envelope
        self.notes = notes
        self.refused: list[tuple[str, str]] = []
        self.deferred: defer.Deferred = defer.Deferred()
        self.error: BaseException | None = None
        self.written: list[Any] = []
        self.queued: str | None = None  # the queue id of an unsynced enqueue (IBatchEnqueue)


@implementer(ICommitter, ICopyCommitter)
class GroupCommitter:
    """Group commit of incoming messages: many sessions' messages made durable by one batch.

    ``commit(spool, local_recipients, envelope)`` returns a Deferred that fires once the
    message is durable everywhere (with the local mailboxes whose quota refused it: their
    delivery reports are queued) (then the session replies 250), or fails with the
    exception that stopped it (QuotaExceeded when every recipient's mailbox is full,
    StoreError, OSError: the session replies 552 or 451). ``notes`` (LocalNotes) allows the
    delivery reports of local recipients. At most one batch runs at a time (in ``run_blocking``, off the reactor); what arrives
    meanwhile forms the next batch, so the more sessions, the more messages share a sync.

    A batch, in the worker: write out each spool file; sync their data (``syncfs`` on Linux, or
    ``fsync`` of each file when the batch holds fewer than ``syncfs_min`` messages or syncfs is
    missing; measured on the bench machine, batches of 20 files: 4,300 files/s with syncfs,
    1,000/s with an fsync each); hard-link
    each into its mailboxes with the store's folder fsync deferred, enqueue the other
    recipients (the queue is durable on return); sync the new directory entries once (syncfs,
    or fsync of each distinct ``new/`` folder); queue the delivery reports owed (rare: a
    NOTIFY=SUCCESS or a full mailbox); remove the spool files. A failing data sync
    fails the whole batch and nothing is linked; a failing folder sync fails the messages that
    were linked in that batch (their links are removed again). A failure of one message's
    delivery (quota, a vanished mailbox) fails that message only.

    Messages for the outbound queue are the exception: see ``commit``.

    ``sync_fs(fd)`` and ``fsync(fd)`` are injectable for tests (a failing disk, an order log).
    ``run_batch`` (like ``run_blocking``, which it defaults to) runs the batches.
    """

    def __init__(
        self,
        store: Any,
        queue: Any,
        run_blocking: Callable[..., defer.Deferred],
        *,
        max_batch: int = 512,
        syncfs_min: int = 3,
        sync_fs: Callable[[int], None] | None = SYNCFS,
        fsync: Callable[[int], None] = os.fsync,
        run_batch: Callable[..., defer.Deferred] | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.run_blocking = run_blocking
        # the batches, one at a time (smtp/serial.py SerialThread: a cheaper hand-off than
        # the thread pool's, issue 17); the per-message commits and copies use run_blocking
        self.run_batch = run_batch or run_blocking
        self.max_batch = max_batch
        self.syncfs_min = max(syncfs_min, 2)
        self.sync_fs = sync_fs
        self.fsync = fsync
        self._pending: list[_Pending] = []
        self._running = False
        self.batches = 0  # statistics (bench, logs): batches run and messages committed
        self.messages = 0
        self._deferred_sync = IBatchDelivery.providedBy(store)
        # relayed messages join the batch when the queue's syncs can be batched (one syncfs)
        self._batch_queue = IBatchEnqueue.providedBy(queue) and sync_fs is not None
        # spool files made from the queue's spent files (store/recycle.py)
        self._recycler = queue if IFileRecycler.providedBy(queue) else None

    def commit(
        self,
        spool: SpoolWriter,
        local_recipients: list[tuple[str, str]],
        envelope: dict | None,
        notes: LocalNotes | None = None,
    ) -> defer.Deferred:
        """Queue one message for the next batch; see the class docstring.

        A message that also goes to the outbound queue joins the batch when the queue
        provides ``IBatchEnqueue`` and ``syncfs`` exists: it is enqueued without fsyncs and the
        batch's one ``syncfs`` (step 3) makes its body link, envelope and the Maildir links
        durable together; the runner hears of it after that (``publish``). Otherwise it is
        committed on its own, in parallel with the others (``commit_message``): the queue then
        makes each message durable with its own fsyncs, which would run one after the other
        inside a batch (measured: relay 99 msg/s in batches, 151 alone). Issue 17: relay
        commits in the batch cut the syncs per relayed message from 4 to 2-3 per batch.
        """
        return self._commit(spool, local_recipients, envelope, notes, False)

    def commit_copy(
        self,
        spool: SpoolWriter,
        local_recipients: list[tuple[str, str]],
        envelope: dict | None,
        notes: LocalNotes | None = None,
    ) -> defer.Deferred:
        """See ICopyCommitter: ``commit`` where a full mailbox is reported, never a refusal of
        the whole copy."""
        return self._commit(spool, local_recipients, envelope, notes, True)

    def _commit(self, spool: SpoolWriter, local_recipients: list[tuple[str, str]],
                envelope: dict | None, notes: LocalNotes | None,
                partial: bool) -> defer.Deferred:
        if envelope is not None and envelope.get("recipients") and not self._batch_queue:
            return self.run_blocking(commit_message, self.store, self.queue, spool,
                                     list(local_recipients), envelope, self.fsync, notes,
                                     partial)
        item = _Pending(spool, list(local_recipients), envelope, notes, partial)
        self._pending.append(item)
        self._kick()
        return item.deferred

    def copy(self, spool: SpoolWriter, sender: str, header: bytes) -> defer.Deferred:
        """See ICopyCommitter: a new spool file (made off the reactor) with ``Return-Path:
        <sender>``, ``header``, then the message of ``spool``."""
        return self.run_blocking(copy_spool, spool, sender, header)

    def _kick(self) -> None:
        if self._running or not self._pending:
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._running = True
        try:
            d = self.run_batch(self._run_batch, batch)
        except Exception as e:  # the thread pool refused the work
            for item in batch:
                item.error = item.error or e
            d = defer.succeed(None)
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, result: object, batch: list[_Pending]) -> None:
        self._running = False
        if isinstance(result, Failure):
            log.failure("SMTP group commit failed", result)
            for item in batch:
                item.error = item.error or result.value
        self.batches += 1
        for item in batch:
            if item.error is None:
                self.messages += 1
                item.deferred.callback(list(item.refused))
            else:
                item.deferred.errback(Failure(item.error))
        self._kick()

    # -- the worker side (blocking)

    def _sync(self, fds: list[int]) -> None:
        """Make the data (and the folder entries) behind ``fds`` durable: one syncfs per file
        system for ``syncfs_min`` or more, else an fsync each (a syncfs also writes out other
        dirty data of that file system, which only pays off when it replaces several fsyncs)."""
        if self.sync_fs is not None and len(fds) >= self.syncfs_min:
            by_device: dict[int, int] = {}
            for fd in fds:
                by_device.setdefault(os.fstat(fd).st_dev, fd)
            for fd in by_device.values():
                self.sync_fs(fd)
        else:
            for fd in fds:
                self.fsync(fd)

    def _run_batch(self, batch: list[_Pending]) -> None:
        live: list[_Pending] = []
        for item in batch:
            try:
                item.spool.finish(self._recycler)
                if item.spool.fd is None:
                    raise OSError("the spool file is gone")
                live.append(item)
            except BaseException as e:
                item.error = e
                item.spool.abort()
        # the envelopes of queued messages written ahead into spent files (store/recycle.py),
        # so that step 1 makes their data durable before step 2 names them
        prepared, prepared_ids = self._prepare_envelopes(live)
        try:
            # 1. the spool files' data (and their size) on disk, before any link to them
            try:
                self._sync([item.spool.fd for item in live] + prepared)  # type: ignore[misc]
            except BaseException as e:
                for item in live:
                    item.error = e
                live = []
            finally:
                for fd in prepared:
                    os.close(fd)
            for item in live:
                item.spool.close()
            # 2. link into the mailboxes, enqueue for the others
            linked: list[_Pending] = []
            for item in live:
                try:
                    self._deliver(item)
                    linked.append(item)
                except BaseException as e:
                    item.error = e
                    self._unlink(item)
            # 3. the new directory entries on disk (and the queued messages: one syncfs)
            if self._deferred_sync or any(item.queued for item in linked):
                folders = sorted({os.path.dirname(str(p)) for item in linked for p in item.written})
                try:
                    self._sync_folders(folders, queue=any(item.queued for item in linked))
                except BaseException as e:
                    for item in linked:
                        item.error = e
                        self._unlink(item)
            # 4. the delivery reports owed (NOTIFY=SUCCESS, a full mailbox): durable on return
            for item in linked:
                if item.error is None:
                    try:
                        send_local_reports(self.queue, item.spool, item.local, item.refused,
                                           item.notes)
                    except BaseException as e:
                        item.error = e
                        self._unlink(item)
            # 5. the queued messages to the delivery runner
            published = [item.queued for item in linked if item.queued and item.error is None]
            if published:
                self.queue.publish(published)
        finally:
            if prepared_ids:  # those not enqueued (a failed message): their temp files go
                self._recycler.drop_prepared(prepared_ids)  # type: ignore[union-attr]
            for item in batch:
                if item.queued and item.error is not None:
                    with contextlib.suppress(OSError):
                        self.queue.discard(item.queued)
                    item.queued = None
                item.spool.abort()

    def _prepare_envelopes(self, live: list[_Pending]) -> tuple[list[int], list[str]]:
        """IFileRecycler.prepare_envelope for each message the batch will enqueue unsynced:
        the descriptors to sync in step 1 (and close), and the queue ids prepared."""
        fds: list[int] = []
        ids: list[str] = []
        if self._recycler is None or not self._batch_queue:
            return fds, ids
        for item in live:
            env = item.envelope
            if env is not None and env.get("recipients") and not item.spool.local_prefix:
                fd = self._recycler.prepare_envelope(item.spool.file, env)
                if fd is not None:
                    fds.append(fd)
                    ids.append(env["id"])
        return fds, ids

    def _deliver(self, item: _Pending) -> None:
        queued = bool(item.envelope is not None and item.envelope.get("recipients"))
        if item.local:
            # The quota is checked again on the real size (RCPT knew only MAIL SIZE=): the
            # mailboxes without room are refused, the others get the message (deliver_local).
            item.written, item.refused = deliver_local(
                self.store, item.spool, item.local, others=queued or item.partial,
                sync=not self._deferred_sync,
            )
        if queued and self._batch_queue:  # durable by the batch's syncfs (step 3)
            item.queued = enqueue_spool(self.queue, item.spool, item.envelope,  # type: ignore[arg-type]
                                        unsynced=True)
        elif queued:
            enqueue_spool(self.queue, item.spool, item.envelope)  # type: ignore[arg-type]

    def _sync_folders(self, folders: list[str], queue: bool = False) -> None:
        """Sync the ``new/`` folders; with ``queue``, a ``syncfs`` of the queue's file system
        too (the envelopes' data and the body and envelope names of unsynced enqueues)."""
        fds: list[int] = []
        try:
            for folder in folders:
                fds.append(os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
            if queue:
                qfd = os.open(self.queue.sync_target(), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                fds.append(qfd)
                by_device: dict[int, int] = {}
                for fd in fds:
                    by_device.setdefault(os.fstat(fd).st_dev, fd)
                if os.fstat(qfd).st_dev in by_device and self.sync_fs is not None:
                    for fd in by_device.values():  # one syncfs per file system
                        self.sync_fs(fd)
                    return
            if fds:
                self._sync(fds)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _unlink(item: _Pending) -> None:
        """Remove the mailbox links of a message that will not get its 250."""
        for path in item.written:
            with contextlib.suppress(OSError):
                os.unlink(path)
        item.written = []


def clean_spool(spool_dir: Path, older_than: float = 0.0, pid: int | None = None) -> int:
    """Remove spool files a crash left behind (only ours, by suffix); return how many.

    Call at start before the listeners open (``older_than`` = 0) or, while running, with an age
    in seconds that no live session can reach, or with the ``pid`` of a process that ended
    (only the files that process wrote).
    """
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith(SPOOL_SUFFIX):
            continue
        if pid is not None and not entry.name.endswith(f".{pid}{SPOOL_SUFFIX}"):
            continue
        try:
            if older_than and now - entry.stat().st_mtime < older_than:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
