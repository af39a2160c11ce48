"""The durable outbound queue under ``<state_dir>/queue`` (implements interfaces.IOutboundQueue).

Layout (README "On disk")::

    queue/msg/<id>         the message, stored once (a hard link of the fsynced spool file)
    queue/env/<id>.json    the envelope: sender, DSN parameters, per-recipient state
    queue/tmp/             files being written (temp + fsync + rename)
    queue/free/            spent bodies and envelopes kept for reuse (store/recycle.py; never read
                           as messages, emptied by ``recover``, trimmed after a minute idle)
    queue/flush            marker: ``queue flush`` from another process (polled by the runner)
    queue/rescan           marker: a message was added or removed by another process

Every change is durable before the call returns: the body link is fsynced (its folder too)
before the envelope is written; an envelope is written to tmp/, fsynced, renamed over the old
one, and env/ is fsynced. A message whose envelope is gone is no longer queued; at start
``recover`` removes bodies without an envelope (an ``enqueue`` that never returned) and
half-written temp files. A recipient's state only moves to delivered after the next hop
said so, so a crash at any point can repeat a delivery but never lose one. JSON only, no pickle.

The envelope is typed (store/envelope.py: ``Envelope``, ``Recipient``, their ``State`` and the
``Notice`` still owed) and its JSON is the one written before it was: queue files of earlier
versions load, and a file loaded and saved again is unchanged. ``enqueue`` takes the submission
dict of IOutboundQueue; ``load`` / ``save`` speak ``Envelope``. A file that is not an envelope
is moved aside to ``queue/damaged/`` (logged).

Claims: every serving process (and, over a shared volume, every node) runs a delivery runner,
and a message is delivered by whoever claims it (README "Outbound queue claims"):

- an *owner* is one runner: ``<node>.w<worker>.<boot>`` (node id, worker number, a new id per
  process start: ``make_owner``); it has a folder ``queue/claimed/<owner>/`` holding a file
  ``lease`` whose mtime it touches every ``LEASE / 6`` seconds;
- claim = ``rename(env/<id>.json, claimed/<owner>/<id>.json)``: atomic, so of two runners one
  gets the envelope and the other ENOENT; nobody else delivers a claimed message;
- born claimed: while a runner is running (``claim_new``), a message its own process queues
  is written straight into its claim folder and its ``Envelope`` kept in memory
  (``take_born``), so the runner starts it with no rename, no read and no thread hop; a crash
  leaves it claimed by a dead owner, taken back like any other claim. When the claim folder
  was taken back meanwhile, the envelope goes to env/ as before;
- release (a deferral) = set the envelope's mtime to its next attempt, rename it back to env/:
  in env/, an envelope's mtime is when it is due, so a scan needs no JSON to find due work;
- delivered or failed = unlink the claimed envelope (fsync its folder), then the body;
- take back = ``rename(claimed/<owner>, claimed/.takeback.<owner>.<taker>)`` (one taker wins),
  then each envelope goes back to env/. Done at once for a worker the main process saw die and
  for every owner of this node at start-up (the state lock says none of them lives), and by
  any runner for an owner whose lease is older than ``LEASE`` (a dead node);
- an owner whose lease touch finds its folder gone (taken back) starts a new incarnation, and
  its saves and removes of the taken messages fail (``save`` returns False, ``remove`` leaves
  the body), so it drops them; it starts no transaction unless its lease was renewed within
  ``LEASE / 2``. Two deliveries of one message at once are so excluded while the clocks of
  the nodes agree within ``LEASE / 2``.

Delivery is at least once: a runner that dies (or loses its lease) after the next hop's reply
to the final dot but before the envelope says so leaves the message to be sent again after the
take back (RFC 5321 section 6.1 accepts such duplicates; the next hop sees the same Message-ID).

What is fsynced (the rule, issue 17): a change that creates or keeps work is durable before
anyone acts on it: a new message before its 250 (``enqueue``, or the group commit's syncfs
for ``enqueue_unsynced``), a deferral (attempts, next attempt, last reply) and a report owed
or cleared (``save``) before the runner goes on. A change that only ends work the next hop has
already taken is not synced: the removal of a delivered or failed message (``remove_many``:
envelope unlinked, then its body; the file system writes the names out within its commit
interval, 5 s on ext4). A crash that undoes such a removal brings the envelope back, and the
message is sent again (the duplicate RFC 5321 section 6.1 accepts, as after a crash between
the next hop's 250 and the removal); on a file system that does not keep the order of the two
unlinks, it can leave an envelope without its body, which start-up moves aside to damaged/
(logged; that message was delivered). A failure's report is queued durably and the notice
cleared durably before the removal, so a re-run never sends a report twice.

Recycling (``recycle`` > 0, README "On disk"; issue 17): a removed message's envelope, and its
body when it has no other link (``st_nlink == 1``: no mailbox shares it), are renamed into
``queue/free/`` instead of unlinked (``FilePool.put``, bounded); a new envelope temp file, and
through ``take_file`` (IFileRecycler) a new spool file, is one of them renamed back and
overwritten in place, then cut to its length and synced as a new file is, its data always
before any name that means "queued" points at it (a batched enqueue's envelope is written
ahead by ``prepare_envelope``, synced with the spool files' data). A crash leaves a
reused file only under a temp or spool name (removed at start) or in free/ (emptied by
``recover``). A pooled file holds a delivered message's bytes until it is reused or trimmed
(``trim_pool``, a minute). Off on a shared queue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist.fsutil import fsync_dir as _fsync_dir
from pop3coexist.interfaces import IBatchEnqueue, IFileRecycler, IOutboundQueue
from pop3coexist.store.envelope import ENVELOPE_VERSION, Envelope, Notice, Recipient, State
from pop3coexist.store.recycle import FilePool

__all__ = ["ENVELOPE_VERSION", "Envelope", "FileQueue", "Notice", "Recipient", "State"]

T = TypeVar("T")
log = Logger()

_ID_RE = re.compile(r"^[0-9a-f]{16,40}$")
ORPHAN_AGE = 600.0  # seconds: a body without envelope older than this is a dead enqueue
LEASE = 120.0  # seconds: an owner whose lease file is older than this is taken back
LEASE_TOUCH = LEASE / 6  # how often an owner touches its lease
LEASE_FILE = "lease"
TAKEBACK = ".takeback."
RECYCLE = 0  # spent files kept for reuse per process and kind (queue.recycle; 0: off)
_NODE_RE = re.compile(r"[^A-Za-z0-9_-]")


def make_owner(node: str | None = None, worker: int = 0) -> str:
    """The owner name of this process's runner: ``<node>.w<worker>.<boot>``. ``node`` defaults
    to the host name (characters other than letters, digits, ``-`` and ``_`` become ``_``);
    ``boot`` is new at every call (pid + random), so a restarted process is a new owner."""
    node = _NODE_RE.sub("_", node or socket.gethostname() or "node") or "node"
    return f"{node}.w{int(worker)}.{os.getpid():x}{secrets.token_hex(3)}"


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _validate(envelope: dict) -> None:
    """Raise ValueError with a clear message if ``envelope`` is not the documented shape."""
    if not isinstance(envelope, dict):
        raise ValueError("envelope must be a dict")
    sender = envelope.get("sender")
    if not isinstance(sender, str):
        raise ValueError("envelope sender must be a string ('' for the null sender)")
    rcpts = envelope.get("recipients")
    if not isinstance(rcpts, list) or not rcpts:
        raise ValueError("envelope needs at least one recipient")
    for r in rcpts:
        if not isinstance(r, dict) or not isinstance(r.get("address"), str) or "@" not in r["address"]:
            raise ValueError(f"bad recipient in envelope: {r!r}")
        notify = r.get("notify")
        if notify is not None and (
            not isinstance(notify, list) or not all(isinstance(n, str) for n in notify)
        ):
            raise ValueError(f"bad NOTIFY for {r['address']}: {notify!r}")
    if envelope.get("ret") not in (None, "FULL", "HDRS"):
        raise ValueError(f"bad RET value {envelope.get('ret')!r}")


def new_queue_id() -> str:
    """A unique queue id, sortable by time: 16 hex digits of the time in ns + 8 random. The
    SMTP server names a message by it from DATA on (Received, the 250 reply, the mail log),
    and the queue keeps it (``enqueue`` with the envelope's ``id``)."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


@implementer(IOutboundQueue, IBatchEnqueue, IFileRecycler)
class FileQueue:
    """See IOutboundQueue; plus the runner's API (load/save/remove) and the admin API.

    All methods except ``wake``, ``set_waker`` and ``drain_new`` are blocking.
    """

    def __init__(self, root: Path, hostname: str, clock: Callable[[], float] = time.time,
                 lease: float = LEASE, shared: bool = False, recycle: int = RECYCLE) -> None:
        self.root = Path(root)
        # other nodes use this queue too (server.local_dir): their temp files may be live
        self.shared = shared
        self.lease = lease  # seconds (queue.claim_lease): an older lease file is a dead owner
        self.hostname = hostname
        self.clock = clock
        self.msg_dir = self.root / "msg"
        self.env_dir = self.root / "env"
        self.tmp_dir = self.root / "tmp"
        self.claimed_dir = self.root / "claimed"
        self.free_dir = self.root / "free"
        # spent bodies and envelopes reused (store/recycle.py); off on a shared volume
        limit = 0 if shared else recycle
        self.bodies = FilePool(str(self.free_dir), "b.", limit)
        self.envelopes = FilePool(str(self.free_dir), "e.", limit)
        self.owner: str | None = None  # claims (set_owner): None for the admin and tests
        self.lease_renewed = 0.0  # time.monotonic() of the last good lease touch
        self._waker: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._new: list[str] = []
        self._made = False
        # messages queued straight into this owner's claim (module docstring: born claimed)
        self.claim_new = False
        self._born: dict[str, Envelope] = {}
        # envelopes written ahead into spent files for batched enqueues (prepare_envelope)
        self._prepared: dict[str, tuple[str, Envelope]] = {}

    def __repr__(self) -> str:
        return f"<FileQueue {self.root}>"

    # ------------------------------------------------------------------ layout

    def ensure_dirs(self) -> None:
        """Create the queue folders if missing (blocking)."""
        if self._made:
            return
        for d in (self.root, self.msg_dir, self.env_dir, self.tmp_dir, self.claimed_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._made = True

    def new_id(self) -> str:
        """A unique, sortable (by time) queue id: see ``new_queue_id``."""
        return new_queue_id()

    def body_path(self, qid: str) -> Path:
        return self.msg_dir / self._check_id(qid)

    def body_name(self, qid: str) -> str:
        """``body_path`` as a str: the delivery runner opens it once per message, and a Path
        made and turned into a str per message cost it ~1.5% of its CPU (issue 17)."""
        return f"{self.msg_dir}/{self._check_id(qid)}"

    def envelope_path(self, qid: str) -> Path:
        return self.env_dir / f"{self._check_id(qid)}.json"

    @staticmethod
    def _check_id(qid: str) -> str:
        if not isinstance(qid, str) or not _ID_RE.match(qid):
            raise KeyError(qid)
        return qid

    # ------------------------------------------------------------------ IOutboundQueue

    def enqueue(self, source: object, envelope: dict) -> str:
        """See IOutboundQueue.enqueue. Raises ValueError for a malformed envelope."""
        qid = self._enqueue(source, envelope, sync=True)
        with self._lock:
            self._new.append(qid)
        self.wake()
        return qid

    def enqueue_unsynced(self, source: object, envelope: dict) -> str:
        """See IBatchEnqueue: the body link, the envelope's data and its name are made durable
        by the caller's sync (one ``syncfs`` for a whole batch of messages)."""
        return self._enqueue(source, envelope, sync=False)

    def publish(self, ids: list[str]) -> None:
        """See IBatchEnqueue."""
        if not ids:
            return
        with self._lock:
            self._new.extend(ids)
        self.wake()

    def discard(self, qid: str) -> None:
        """See IBatchEnqueue."""
        with self._lock:
            self._born.pop(qid, None)
        for path in (self._mine(qid), self.envelope_path(qid), self.body_path(qid)):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def take_born(self, qid: str) -> Envelope | None:
        """The envelope of ``qid`` when this process queued it into this owner's claim (born
        claimed: module docstring) and nobody took it yet; None otherwise (then ``claim``).
        Never blocks. The caller owns the object from then on."""
        with self._lock:
            return self._born.pop(qid, None)

    def forget_born(self) -> None:
        """Stop queueing into the claim (the runner stops): new messages go to env/."""
        with self._lock:
            self.claim_new = False
            self._born.clear()

    def sync_target(self) -> Path:
        """See IBatchEnqueue."""
        self.ensure_dirs()
        return self.env_dir

    def _enqueue(self, source: object, envelope: dict, sync: bool) -> str:
        _validate(envelope)
        self.ensure_dirs()
        given = envelope.get("id")
        qid = given if isinstance(given, str) and _ID_RE.match(given) else self.new_id()
        src = Path(source)  # type: ignore[arg-type]
        while True:
            body = self.msg_dir / qid
            try:
                os.link(src, body)
                break
            except FileExistsError:  # the id is taken (never by chance: 32 random bits/ns)
                log.warn("queue: id {qid} is taken; using a new one", qid=qid)
                qid = self.new_id()
            except OSError as e:
                # EXDEV: another file system; EMLINK, or ENOSPC from a GlusterFS brick past
                # storage.max-hardlinks: the link limit; copy instead (and say so)
                if e.errno not in (errno.EXDEV, errno.EMLINK, errno.ENOSPC):
                    raise
                if body.exists():
                    qid = self.new_id()
                    continue
                log.warn("queue: {src} cannot be linked ({why}); copying", src=str(src),
                         why=e.strerror)
                self._copy_durable(src, body)
                break
        prepared = None if sync else self._pop_prepared(given)
        if prepared is not None and qid != given:  # written for another id: not this one
            _unlink_quiet(prepared[0])
            prepared = None
        try:
            if prepared is not None:  # its data is on disk already (prepare_envelope)
                self._place_prepared(*prepared)
                return qid
            if sync:
                _fsync_dir(self.msg_dir)
            record = self._record(qid, envelope, body.stat().st_size)
            born = self.claim_new and self.owner is not None
            if not (born and self._create_claimed(record, sync)):
                born = False
                self.save(record, create=True, sync=sync)
            if born:
                with self._lock:
                    if self.claim_new:
                        self._born[qid] = record
        except BaseException:
            # no envelope, no queue entry: a body left alone in msg/ would be a half-written
            # message nobody delivers or removes (issue 16 soak, the disk-full fault)
            with contextlib.suppress(OSError):
                body.unlink()
            if prepared is not None:
                _unlink_quiet(prepared[0])
            raise
        return qid

    def _record(self, qid: str, envelope: dict, size: int) -> Envelope:
        """The Envelope of a new message ``qid`` of ``size`` octets from the submission dict."""
        now = self.clock()
        return Envelope(
            id=qid,
            sender=envelope["sender"],
            ret=envelope.get("ret"),
            envid=envelope.get("envid"),
            body=envelope.get("body"),
            received_from=envelope.get("received_from", ""),
            arrival=float(envelope.get("arrival") or now),
            queued=now,
            hops=int(envelope.get("hops") or 0),
            size=size,
            recipients=[
                Recipient(
                    address=r["address"],
                    orcpt=r.get("orcpt"),
                    notify=[n.upper() for n in r["notify"]] if r.get("notify") else None,
                )
                for r in envelope["recipients"]
            ],
        )

    def _place_prepared(self, tmp: str, record: Envelope) -> None:
        """Rename a prepared envelope (``prepare_envelope``) to its place: this owner's claim
        (born claimed) or env/ when there is no claim to go to."""
        qid = record.id
        if self.claim_new and self.owner is not None:
            try:
                os.rename(tmp, f"{self.claimed_dir}/{self.owner}/{qid}.json")
            except FileNotFoundError:  # the claim folder was taken back: env/ as before
                pass
            else:
                with self._lock:
                    if self.claim_new:
                        self._born[qid] = record
                return
        os.replace(tmp, self.envelope_path(qid))

    def _pop_prepared(self, qid: object) -> tuple[str, Envelope] | None:
        if not self._prepared or not isinstance(qid, str):
            return None
        with self._lock:
            return self._prepared.pop(qid, None)

    def _create_claimed(self, env: Envelope, sync: bool) -> bool:
        """Write a new envelope into this owner's claim (born claimed); False when the claim
        folder is gone (taken back: the caller writes it to env/)."""
        qid = env.id
        owner = self.owner
        if owner is None:
            return False
        folder = f"{self.claimed_dir}/{owner}"
        tmp = f"{self.tmp_dir}/env.{qid}.{secrets.token_hex(4)}"
        data = json.dumps(env.to_json(), separators=(",", ":"), sort_keys=True).encode()
        fd, reused = self._new_file(tmp, sync)
        try:
            try:
                self._write_all(fd, data, reused)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, f"{folder}/{qid}.json")
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if sync:
            _fsync_dir(Path(folder))
        return True

    def _new_file(self, tmp: str, synced: bool) -> tuple[int, bool]:
        """A new temp file for an envelope, open for writing at offset 0, and whether it is a
        spent envelope from the pool (``_write_all`` cuts it to its new length). Only for an
        envelope ``synced`` before its rename: a reused file's name must never reach the disk
        before its new data, or a crash could show the spent envelope (or a mix of the two)
        under the new name; a batched enqueue gets a reused file through
        ``prepare_envelope`` instead, whose data the group commit syncs before any name."""
        fd = self.envelopes.take(tmp) if synced else None
        if fd is not None:
            return fd, True
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        return os.open(tmp, flags, 0o600), False

    @staticmethod
    def _write_all(fd: int, data: bytes, reused: bool) -> None:
        """Write ``data`` at the start of ``fd``; a ``reused`` file is cut there (it may be
        longer; one the same length frees and allocates no blocks)."""
        n = os.write(fd, data)  # a regular file takes a small write whole
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                k = os.write(fd, view)
                view = view[k:]
        if reused:
            os.ftruncate(fd, len(data))

    # ------------------------------------------------------------------ IFileRecycler

    def prepare_envelope(self, source: str, envelope: dict) -> int | None:
        """See IFileRecycler: the envelope of a coming ``enqueue_unsynced(source, envelope)``
        written now into a spent envelope file under a temp name, so that the caller's sync of
        the spool files' data covers it before any name points at it; None when no spent
        envelope is at hand (or the submission names no id): the enqueue writes a new file."""
        given = envelope.get("id")
        if not isinstance(given, str) or not _ID_RE.match(given) or not len(self.envelopes):
            return None
        tmp = f"{self.tmp_dir}/env.{given}.{secrets.token_hex(4)}"
        fd = self.envelopes.take(tmp)
        if fd is None:
            return None
        try:
            _validate(envelope)
            record = self._record(given, envelope, os.stat(source).st_size)
            data = json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True).encode()
            self._write_all(fd, data, True)
        except (OSError, ValueError, KeyError, TypeError):
            os.close(fd)
            _unlink_quiet(tmp)
            return None  # the enqueue meets (and reports) the same trouble
        with self._lock:
            old = self._prepared.pop(given, None)
            self._prepared[given] = (tmp, record)
        if old is not None:
            _unlink_quiet(old[0])
        return fd

    def drop_prepared(self, qids: list[str]) -> None:
        """See IFileRecycler: forget the prepared envelopes of ``qids`` not enqueued (their
        message failed before): their temp files are unlinked."""
        if not self._prepared:
            return
        with self._lock:
            gone = [self._prepared.pop(q) for q in qids if q in self._prepared]
        for tmp, _ in gone:
            _unlink_quiet(tmp)

    def take_file(self, dest: str) -> int | None:
        """See IFileRecycler: a spent message body renamed to ``dest``, open at offset 0."""
        return self.bodies.take(dest)

    def trim_pool(self) -> int:
        """Unlink the spent files pooled longer than a minute (privacy: they hold delivered
        messages); return how many. Blocking; the delivery runner's periodic work calls it."""
        return self.bodies.trim() + self.envelopes.trim()

    def _spend(self, pool: FilePool, path: str, check_links: bool) -> None:
        """Put a spent queue file into ``pool``, or unlink it (pool off or full, or another
        name still points at it). Raises FileNotFoundError when it is gone."""
        if not pool.put(path, check_links):
            os.unlink(path)

    def enqueue_bytes(self, data: bytes, envelope: dict) -> str:
        """Write ``data`` to a fsynced temp file and enqueue it (used for delivery reports)."""
        self.ensure_dirs()
        tmp = self.tmp_dir / f"in.{self.new_id()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self.enqueue(tmp, envelope)
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Connect ``wake`` to the delivery runner (any thread may call wake)."""
        self._waker = waker

    def wake(self) -> None:
        """See IOutboundQueue.wake."""
        waker = self._waker
        if waker is not None:
            try:
                waker()
            except Exception:
                log.failure("queue waker failed")

    def drain_new(self) -> list[str]:
        """Ids enqueued by this process since the last call (for the runner)."""
        with self._lock:
            new, self._new = self._new, []
        return new

    # ------------------------------------------------------------------ runner API

    def ids(self) -> list[str]:
        """Ids of every queued message, claimed or not, oldest first.

        Two passes over env/ and the claim folders, their union: a runner may move an
        envelope (claim, release, take back: one rename) while a pass reads the folders one
        after the other, and a release into env/ after env/ was read but before its claim
        folder was would hide it from that pass; the second pass, after the move, sees it
        where it went (an admin's listing showed a queued message as gone)."""
        out: set[str] = set()
        for _ in range(2):
            out.update(self._ids_in(self.env_dir))
            for d in self._claim_dirs():
                out.update(self._ids_in(d))
        return sorted(out)

    def ready_ids(self) -> list[str]:
        """Ids of the queued messages nobody has claimed, oldest first."""
        return sorted(self._ids_in(self.env_dir))

    def due_ids(self, before: float) -> list[str]:
        """Unclaimed messages due at ``before`` (an envelope's mtime in env/ is its due time)."""
        out = []
        try:
            with os.scandir(self.env_dir) as it:
                for e in it:
                    name = e.name
                    if not name.endswith(".json") or not _ID_RE.match(name[:-5]):
                        continue
                    try:
                        if e.stat().st_mtime <= before:
                            out.append(name[:-5])
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        out.sort()
        return out

    @staticmethod
    def _ids_in(folder: Path) -> list[str]:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n[:-5] for n in names if n.endswith(".json") and _ID_RE.match(n[:-5])]

    def _claim_dirs(self) -> list[Path]:
        try:
            return [self.claimed_dir / n for n in os.listdir(self.claimed_dir)]
        except FileNotFoundError:
            return []

    def _mine(self, qid: str) -> Path | None:
        if self.owner is None:
            return None
        return self.claimed_dir / self.owner / f"{self._check_id(qid)}.json"

    def _find(self, qid: str) -> Path | None:
        """Where the envelope of ``qid`` is now: this owner's claim, env/, another's claim."""
        mine = self._mine(qid)
        if mine is not None and os.path.exists(mine):
            return mine
        path = self.envelope_path(qid)
        if os.path.exists(path):
            return path
        for d in self._claim_dirs():
            p = d / path.name
            if os.path.exists(p):
                return p
        return None

    def envelope_file(self, qid: str) -> Path | None:
        """Where the envelope of ``qid`` is now (env/ or a runner's claim), or None."""
        return self._find(qid)

    def load(self, qid: str) -> Envelope | None:
        """The envelope of ``qid`` wherever it is (claimed or not), or None if it is no longer
        queued (or damaged: logged and moved aside)."""
        self._check_id(qid)
        found = self._at_envelope(qid, lambda path: (path, path.read_bytes()))
        if found is None:
            return None
        path, data = found
        return self._parse(qid, path, data)

    def _at_envelope(self, qid: str, act: Callable[[Path], T]) -> T | None:
        """``act(path)`` on the envelope of ``qid`` wherever it is; None when it was not found
        twice in a row (delivered, failed or deleted). A claim, release or take back may move
        it between the looks (``_find`` reads env/ and the claims one after the other: see
        ``ids``) or between the look and ``act`` (FileNotFoundError): look again."""
        missed = 0
        for _ in range(4):
            path = self._find(qid)
            if path is None:
                missed += 1
                if missed == 2:
                    return None
                continue
            try:
                return act(path)
            except FileNotFoundError:
                continue
        return None

    def _parse(self, qid: str, path: Path, data: bytes) -> Envelope | None:
        try:
            env = Envelope.from_json(json.loads(data))
            if env.id != qid:
                raise ValueError("id mismatch")
        except ValueError as e:
            log.error("queue: envelope {qid} is damaged ({why}); moved aside", qid=qid, why=str(e))
            self._quarantine(qid, path)
            return None
        return env

    def save(self, env: Envelope, create: bool = False, sync: bool = True) -> bool:
        """Durably replace the envelope (temp, fsync, rename, fsync folder), where it is: in
        this owner's claim when claimed, else in env/ (``create``: a new message). ``sync``
        False: no fsync (the caller syncs the file system: ``enqueue_unsynced``).

        Without ``create``, an envelope that was deleted meanwhile (``queue delete``) or taken
        back from this owner is not brought back: returns False.
        """
        self.ensure_dirs()
        qid = self._check_id(env.id)
        if create:
            path = self.envelope_path(qid)
        elif self.owner is not None:  # a runner writes only what it has claimed
            path = self._mine(qid)  # type: ignore[assignment]
            if not os.path.exists(path):
                return False  # deleted, or taken back (another runner's now)
        else:
            found = self._find(qid)
            if found is None:
                return False
            path = found
        tmp = self.tmp_dir / f"env.{qid}.{secrets.token_hex(4)}"
        data = json.dumps(env.to_json(), separators=(",", ":"), sort_keys=True).encode()
        fd, reused = self._new_file(str(tmp), sync)
        try:
            try:
                self._write_all(fd, data, reused)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except FileNotFoundError:  # the claim folder was taken back meanwhile
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        if sync:
            _fsync_dir(path.parent)
        return True

    def remove(self, qid: str) -> None:
        """Forget a message: envelope first (durably), then its body. With an owner, a message
        it has claimed; one that is no longer in its claim (deleted, taken back) keeps its
        body, which is then not this runner's to remove."""
        mine = self._mine(qid)
        if mine is not None:
            try:
                self._spend(self.envelopes, str(mine), False)
            except FileNotFoundError:
                return  # deleted (with its body) or taken back: not this runner's any more
            _fsync_dir(mine.parent)
        else:
            path = self._unlink_envelope(qid)
            if path is not None:
                _fsync_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            self._spend(self.bodies, str(self.body_path(qid)), True)

    def _unlink_envelope(self, qid: str) -> Path | None:
        """Unlink the envelope of ``qid`` wherever it is (no owner: the admin); where it was,
        or None when it was not found twice in a row (``_at_envelope``: a runner moving it
        between the look and the unlink is looked for again), so that a deleted message never
        leaves its envelope behind without its body."""

        def unlink(path: Path) -> Path:
            path.unlink()
            return path

        return self._at_envelope(qid, unlink)

    def remove_many(self, qids: list[str]) -> None:
        """``remove`` for several delivered or failed messages (the group removal of the
        delivery runner): every envelope unlinked, then the bodies, with no folder sync
        (module docstring, "What is fsynced": a crash may only bring a removed message back
        for a second delivery)."""
        bodies = []
        mine_dir = None if self.owner is None else f"{self.claimed_dir}/{self.owner}"
        for qid in qids:
            self._check_id(qid)
            if mine_dir is not None:
                try:
                    self._spend(self.envelopes, f"{mine_dir}/{qid}.json", False)
                except FileNotFoundError:
                    continue  # deleted (with its body) or taken back: not ours any more
                bodies.append(qid)
                continue
            self._unlink_envelope(qid)
            bodies.append(qid)
        msg_dir = str(self.msg_dir)
        for qid in bodies:
            with contextlib.suppress(FileNotFoundError):
                self._spend(self.bodies, f"{msg_dir}/{qid}", True)

    # ------------------------------------------------------------------ claims

    def set_owner(self, owner: str) -> None:
        """Become the runner ``owner`` (make_owner): its claim folder and lease. Blocking."""
        self.ensure_dirs()
        d = self.claimed_dir / owner
        d.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(d / LEASE_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        self.owner = owner
        self.lease_renewed = time.monotonic()

    def touch_lease(self) -> bool:
        """Renew this owner's lease (blocking). False when its folder was taken back: the
        owner then continues as a new incarnation (its old claims are another's now)."""
        if self.owner is None:
            return True
        try:
            os.utime(self.claimed_dir / self.owner / LEASE_FILE)
        except FileNotFoundError:
            old = self.owner
            node, worker, _boot = old.split(".", 2)
            self.set_owner(make_owner(node, int(worker[1:])))
            log.error("queue: the claims of {old} were taken back (its lease expired); "
                      "continuing as {new}", old=old, new=self.owner)
            return False
        self.lease_renewed = time.monotonic()
        return True

    def lease_fresh(self) -> bool:
        """True while this owner's lease was renewed within LEASE / 2 (a runner starts no
        transaction otherwise: its claims may be taken back before it ends)."""
        return self.owner is None or time.monotonic() - self.lease_renewed < self.lease / 2

    def claim(self, qid: str) -> Envelope | None:
        """Claim ``qid`` for this owner and return its envelope; None when it is not queued
        or another runner claimed it first. Blocking. Without an owner: ``load``."""
        if self.owner is None:
            return self.load(qid)
        mine = self._mine(qid)
        assert mine is not None
        if not os.path.exists(mine):
            try:
                os.rename(self.envelope_path(qid), mine)
            except FileNotFoundError:
                if not (self.claimed_dir / self.owner).is_dir():
                    self.touch_lease()  # taken back: a new incarnation, then try once more
                    try:
                        os.rename(self.envelope_path(qid), self._mine(qid))  # type: ignore[arg-type]
                    except FileNotFoundError:
                        return None
                else:
                    return None
            mine = self._mine(qid)
        try:
            data = mine.read_bytes()  # type: ignore[union-attr]
        except FileNotFoundError:  # deleted (queue delete) right after the claim
            return None
        return self._parse(qid, mine, data)  # type: ignore[arg-type]

    def release(self, qid: str, due: float) -> None:
        """Give a claimed message back to env/, due at ``due`` (epoch seconds: its mtime).
        Blocking. Nothing happens if it is no longer in this owner's claim."""
        mine = self._mine(qid)
        if mine is None:
            return
        try:
            os.utime(mine, (due, due))
            os.rename(mine, self.envelope_path(qid))
        except FileNotFoundError:
            pass

    def release_all(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """At a clean stop: every claim of this owner but those in ``keep`` (still being
        delivered) back to env/, due now; the claim folder removed when empty. Blocking. The
        number released."""
        if self.owner is None:
            return 0
        d = self.claimed_dir / self.owner
        n = self._move_back(d, keep)
        if keep and self._ids_in(d):
            return n  # the rest is taken back when this process is known to be gone
        with contextlib.suppress(OSError):
            (d / LEASE_FILE).unlink()
        with contextlib.suppress(OSError):
            d.rmdir()
        self.owner = None
        return n

    def take_back(self, prefix: str = "", expired: float | None = None) -> int:
        """Take the claims of other owners back into env/ (blocking); the number of messages.

        ``prefix``: owners whose name starts with it (``"<node>."``: every runner of a node,
        ``"<node>.w3."``: worker 3), known to be dead. ``expired`` (seconds): also any owner
        whose lease is older than that. A take back another runner left half done is finished
        once it is as old.
        """
        n = 0
        now = time.time()
        for d in self._claim_dirs():
            name = d.name
            if name == self.owner:
                continue
            if name.startswith(TAKEBACK):
                try:
                    old = now - d.stat().st_mtime
                except FileNotFoundError:
                    continue
                if expired is not None and old > expired:
                    n += self._finish_take_back(d)
                continue
            dead = bool(prefix) and name.startswith(prefix)
            if not dead and expired is not None:
                try:
                    dead = now - (d / LEASE_FILE).stat().st_mtime > expired
                except FileNotFoundError:
                    try:
                        dead = now - d.stat().st_mtime > expired
                    except FileNotFoundError:
                        continue
            if not dead:
                continue
            grave = self.claimed_dir / f"{TAKEBACK}{name}.{self.owner or secrets.token_hex(4)}"
            try:
                os.rename(d, grave)  # one taker wins; the owner's saves fail from now on
            except (FileNotFoundError, FileExistsError, OSError):
                continue
            log.warn("queue: claims of {owner} taken back", owner=name)
            n += self._finish_take_back(grave)
        return n

    def _finish_take_back(self, grave: Path) -> int:
        n = self._move_back(grave)
        for name in (LEASE_FILE,):
            with contextlib.suppress(OSError):
                (grave / name).unlink()
        with contextlib.suppress(OSError):
            grave.rmdir()
        return n

    def _move_back(self, folder: Path, keep: set[str] | frozenset[str] = frozenset()) -> int:
        n = 0
        now = time.time()
        for qid in self._ids_in(folder):
            if qid in keep:
                continue
            src = folder / f"{qid}.json"
            try:
                os.utime(src, (now, now))
                os.rename(src, self.envelope_path(qid))
                n += 1
            except FileNotFoundError:
                continue
        if n:
            with contextlib.suppress(OSError):
                _fsync_dir(self.env_dir)
        return n

    def recover(self, node: str | None = None) -> dict[str, int]:
        """At start: take back the claims of every runner of ``node`` (none of them lives:
        the state lock says so), drop temp files and bodies of enqueues that never finished.
        Blocking."""
        self.ensure_dirs()
        counts = {"tmp": 0, "orphans": 0}
        # spent files of earlier processes (store/recycle.py): delivered messages' bytes
        self.bodies.empty()
        self.envelopes.empty()
        if node is not None:
            self.owner = None  # a new start: every earlier claim of this node is taken back
            counts["taken_back"] = self.take_back(prefix=_NODE_RE.sub("_", node) + ".")
        now = time.time()
        for name in os.listdir(self.tmp_dir):
            try:
                # shared with other nodes: a young temp file may be another node's write
                if self.shared and now - (self.tmp_dir / name).stat().st_mtime < ORPHAN_AGE:
                    continue
                (self.tmp_dir / name).unlink()
                counts["tmp"] += 1
            except OSError:
                pass
        envs = set(self.ids())
        bodies = set(os.listdir(self.msg_dir))
        for qid in sorted(set(self.ready_ids()) - bodies):
            # an envelope whose body never reached the disk (a crash inside a batched enqueue
            # on a file system that does not keep the order of names): never delivered. Look
            # again first: another node (or process) may have queued it since the listing
            if (self.msg_dir / qid).exists():
                continue
            log.error("queue: envelope {qid} has no body (an enqueue that never got its 250, "
                      "or a removal cut short by a crash); moved aside", qid=qid)
            self._quarantine(qid)
            envs.discard(qid)
        for name in os.listdir(self.msg_dir):
            if name in envs or not _ID_RE.match(name):
                continue
            p = self.msg_dir / name
            try:
                # a young body may belong to an enqueue still running in another process
                if now - p.stat().st_mtime < ORPHAN_AGE or self._find(name) is not None:
                    continue
                p.unlink()
                counts["orphans"] += 1
            except OSError:
                pass
        return counts

    def _quarantine(self, qid: str, path: Path | None = None) -> None:
        bad = self.root / "damaged"
        bad.mkdir(exist_ok=True)
        try:
            os.replace(path or self.envelope_path(qid), bad / f"{qid}.json")
        except OSError:
            pass

    def _copy_durable(self, src: Path, dest: Path) -> None:
        tmp = self.tmp_dir / f"copy.{dest.name}"
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while True:
                chunk = fin.read(1 << 16)
                if not chunk:
                    break
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)

    # ------------------------------------------------------------------ admin API

    def entries(self) -> list[dict]:
        """One dict per queued message, oldest first: id, arrival, age, sender, size and the
        recipients with state, attempts, last reply and next attempt."""
        now = self.clock()
        out = []
        for qid in self.ids():
            env = self.load(qid)
            if env is None:
                continue
            out.append(
                {
                    "id": qid,
                    "arrival": env.arrival,
                    "age": max(0.0, now - float(env.arrival or now)),
                    "sender": env.sender,
                    "size": env.size,
                    "recipients": [
                        {
                            "address": r.address,
                            "state": str(r.state),
                            "attempts": r.attempts,
                            "last_reply": r.last_reply,
                            "next_attempt": r.next_attempt if r.state == State.DEFERRED else None,
                        }
                        for r in env.recipients
                    ],
                }
            )
        return out

    def request_flush(self) -> None:
        """Ask the running server (maybe another process) to retry everything now."""
        self._touch("flush")
        self.wake()

    def request_rescan(self) -> None:
        """Ask the running runner (maybe another process) to read the queue folder again:
        for messages it was not told about (a worker whose note to it was lost)."""
        self._touch("rescan")

    def take_marker(self, name: str) -> bool:
        """True (and the marker removed) if ``flush`` or ``rescan`` was requested."""
        try:
            (self.root / name).unlink()
            return True
        except FileNotFoundError:
            return False

    def delete(self, qid: str) -> None:
        """Remove a message from the queue (no report: smtp/bounce.py deletes with one).
        KeyError if unknown."""
        env = self.load(self._check_id(qid))
        if env is None:
            raise KeyError(qid)
        self.remove(qid)
        self._touch("rescan")

    def _touch(self, name: str) -> None:
        self.ensure_dirs()
        p = self.root / name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
