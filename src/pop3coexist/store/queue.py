"""The durable outbound queue under ``<state_dir>/queue`` (implements interfaces.IOutboundQueue).

Layout (README "On disk")::

    queue/msg/<id>         the message, stored once (a hard link of the fsynced spool file)
    queue/env/<id>.json    the envelope: sender, DSN parameters, per-recipient state
    queue/tmp/             files being written (temp + fsync + rename)
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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist.fsutil import fsync_dir as _fsync_dir
from pop3coexist.interfaces import IOutboundQueue
from pop3coexist.store.envelope import ENVELOPE_VERSION, Envelope, Notice, Recipient, State

__all__ = ["ENVELOPE_VERSION", "Envelope", "FileQueue", "Notice", "Recipient", "State"]

log = Logger()

_ID_RE = re.compile(r"^[0-9a-f]{16,40}$")
ORPHAN_AGE = 600.0  # seconds: a body without envelope older than this is a dead enqueue


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


@implementer(IOutboundQueue)
class FileQueue:
    """See IOutboundQueue; plus the runner's API (load/save/remove) and the admin API.

    All methods except ``wake``, ``set_waker`` and ``drain_new`` are blocking.
    """

    def __init__(self, root: Path, hostname: str, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.hostname = hostname
        self.clock = clock
        self.msg_dir = self.root / "msg"
        self.env_dir = self.root / "env"
        self.tmp_dir = self.root / "tmp"
        self._waker: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._new: list[str] = []
        self._made = False

    def __repr__(self) -> str:
        return f"<FileQueue {self.root}>"

    # ------------------------------------------------------------------ layout

    def ensure_dirs(self) -> None:
        """Create the queue folders if missing (blocking)."""
        if self._made:
            return
        for d in (self.root, self.msg_dir, self.env_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._made = True

    def new_id(self) -> str:
        """A unique, sortable (by time) queue id: see ``new_queue_id``."""
        return new_queue_id()

    def body_path(self, qid: str) -> Path:
        return self.msg_dir / self._check_id(qid)

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
        try:
            _fsync_dir(self.msg_dir)
            now = self.clock()
            size = body.stat().st_size
            record = Envelope(
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
            self.save(record, create=True)
        except BaseException:
            # no envelope, no queue entry: a body left alone in msg/ would be a half-written
            # message nobody delivers or removes (issue 16 soak, the disk-full fault)
            with contextlib.suppress(OSError):
                body.unlink()
            raise
        with self._lock:
            self._new.append(qid)
        self.wake()
        return qid

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
        """Ids of every queued message, oldest first."""
        try:
            names = os.listdir(self.env_dir)
        except FileNotFoundError:
            return []
        out = [n[:-5] for n in names if n.endswith(".json") and _ID_RE.match(n[:-5])]
        out.sort()
        return out

    def load(self, qid: str) -> Envelope | None:
        """The envelope of ``qid``, or None if it is no longer queued (or damaged: logged and
        moved aside)."""
        path = self.envelope_path(qid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            env = Envelope.from_json(json.loads(data))
            if env.id != qid:
                raise ValueError("id mismatch")
        except ValueError as e:
            log.error("queue: envelope {qid} is damaged ({why}); moved aside", qid=qid, why=str(e))
            self._quarantine(qid)
            return None
        return env

    def save(self, env: Envelope, create: bool = False) -> bool:
        """Durably replace the envelope (temp, fsync, rename, fsync folder).

        Without ``create``, an envelope that was deleted meanwhile (``queue delete``) is not
        brought back: returns False.
        """
        self.ensure_dirs()
        qid = self._check_id(env.id)
        path = self.envelope_path(qid)
        if not create and not path.exists():
            return False
        tmp = self.tmp_dir / f"env.{qid}.{secrets.token_hex(4)}"
        data = json.dumps(env.to_json(), separators=(",", ":"), sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        _fsync_dir(self.env_dir)
        return True

    def remove(self, qid: str) -> None:
        """Forget a message: envelope first (durably), then its body."""
        try:
            self.envelope_path(qid).unlink()
        except FileNotFoundError:
            pass
        _fsync_dir(self.env_dir)
        try:
            self.body_path(qid).unlink()
        except FileNotFoundError:
            pass

    def recover(self) -> dict[str, int]:
        """At start: drop temp files and bodies of enqueues that never finished. Blocking."""
        self.ensure_dirs()
        counts = {"tmp": 0, "orphans": 0}
        for name in os.listdir(self.tmp_dir):
            try:
                (self.tmp_dir / name).unlink()
                counts["tmp"] += 1
            except OSError:
                pass
        envs = set(self.ids())
        now = time.time()
        for name in os.listdir(self.msg_dir):
            if name in envs or not _ID_RE.match(name):
                continue
            p = self.msg_dir / name
            try:
                # a young body may belong to an enqueue still running in another process
                if now - p.stat().st_mtime < ORPHAN_AGE or (self.env_dir / f"{name}.json").exists():
                    continue
                p.unlink()
                counts["orphans"] += 1
            except OSError:
                pass
        return counts

    def _quarantine(self, qid: str) -> None:
        bad = self.root / "damaged"
        bad.mkdir(exist_ok=True)
        try:
            os.replace(self.envelope_path(qid), bad / f"{qid}.json")
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
