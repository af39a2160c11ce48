"""Connection limits shared by all worker processes (``[server] workers = N``).

``SharedConnectionLimiter`` has the interface of ``policy.connlimit.ConnectionLimiter``
(``acquire(client) -> bool``, ``release(client)``, ``open``) but its limits hold across every
process that accepts connections on the same listeners: ``max_connections`` in total and
``max_connections_per_client`` per client IP address, exactly, over all workers together. The
state lives in one small file that every worker maps into memory (``mmap``); ``create_table``
makes it (the main process, before spawning workers) and ``reset_worker`` clears the counts
of a worker that died (the supervisor, before starting its replacement). Each limiter has
its own table: POP3 and SMTP, which have separate limits, use two files.

File layout (all integers little-endian, unsigned 32 bit)::

    header (64 bytes)   magic b"P3CXCONN", version (1), workers, slots, header size (64),
                        region size, zero padding
    region 0 .. workers-1, each REGION_HEADER + slots * ENTRY bytes:
      region header (64 bytes)   total open connections of that worker, live entries,
                                 pid of the writer (diagnostic), zero padding
      entries (24 bytes each)    client key (16 bytes), count, stored hash of the key

A client key is the client address packed to 16 bytes: IPv6 as is, IPv4 (and IPv4-mapped
IPv6, so ``::ffff:192.0.2.1`` counts as ``192.0.2.1``) as its IPv4-mapped IPv6 form, a
``%scope`` suffix dropped; every peer that is not an IP address (a UNIX socket) shares the
key ``ff..ff``, which no real peer can have (it is a multicast address). The table is open
addressing with linear probing from ``zlib.crc32(key) % slots`` (a stable hash: Python's own
``hash()`` differs between processes); an entry with count 0 is empty. Deletion is
backward-shift deletion, so there are no tombstones, probe chains stay intact and the table
never needs cleaning, however many distinct clients come and go.

Why one region per worker: each worker writes only its own region, and the worker's Python
dict of its own counts is the truth that region mirrors (it can be rebuilt from the dict at
any time, and is when it does not match). A limit check reads every region and sums them.
When a worker dies (even by ``kill -9``, even halfway through a write) its counts are exactly
its region, and ``reset_worker`` zeroes that region without touching anyone else's counts;
nothing has to be reconstructed or guessed. A worker also clears its own region when its
limiter is created (a new process has no connections yet) and when it is closed.

Locking: ``acquire``, ``release``, ``in_use``, ``reset_worker`` and the region clears take an
exclusive ``fcntl.flock`` on the file for the whole read-sum-then-write step, so two
processes can never both take the last free connection. Each limiter opens the file itself,
so it has its own open file description and flock excludes it even from another limiter in
the same process. The kernel drops the lock of a process that dies, so a crash never leaves
the file locked. One flock per call costs little: measured at 50,000-60,000 acquire+release
pairs per second with 4 workers' regions on a busy 2-CPU test machine
(``test_acquire_release_rate`` prints it), i.e. under 20 microseconds per connection, and the
lock is held for only part of that, so calling it from the reactor thread is fine.

Issue 17 measured it again against the CPU an SMTP message costs (about 3.7 ms summed over
the processes, one connection per message): 15-18 us of CPU per acquire+release with two
workers, of which the two lock/unlock pairs are 4.5 us (2.2 us a pair); under 0.5 % of a
message, so the lock stays and the limits stay exact (a lock-free counter would save at
most those 4.5 us, and per-worker quotas would make the limits approximate). What was cut
is Python work: ``acquire`` looks up the other workers' entries for the client only when
the sum of their totals could reach ``per_client`` (their count for one client is at most
their total), so the check is the same, and the region header takes the cached pid.

Slots: each region has ``slots`` entries, the most distinct clients ONE worker may have open
connections from at the same time. A worker that would need one more refuses the connection
(``acquire`` returns False) instead of overwriting anything. ``recommended_slots(total)``
gives the guidance: the next power of two >= 2 * max_connections, at least 1024, so a region
is at most half full even if one worker holds every connection from distinct clients, and
probe chains stay short. A file with the default 1024 slots is about 24 KiB per worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from zope.interface import implementer

from pop3coexist.interfaces import IClosable, ISharedConnectionLimiter

MAGIC = b"P3CXCONN"
VERSION = 1
HEADER_SIZE = 64
REGION_HEADER_SIZE = 64
ENTRY_SIZE = 24
KEY_SIZE = 16
MAX_WORKERS = 4096
MAX_SLOTS = 1 << 22

_HEADER = struct.Struct("<8sIIIII")  # magic, version, workers, slots, header size, region size
_REGION = struct.Struct("<III")  # total, live entries, pid
_COUNT_HASH = struct.Struct("<II")  # count, hash (follows the 16-byte key)
_U32 = struct.Struct("<I")

NON_IP_KEY = b"\xff" * KEY_SIZE
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


# forks of this process so far (os.register_at_fork): a limiter notes the count it was made
# at, so "am I in a forked child?" is one comparison, not a getpid() system call per
# acquire and release (issue 17)
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def recommended_slots(total: int) -> int:
    """Slots per region for a ``total`` connection limit: next power of two >= 2*total, min 1024."""
    want = max(1024, 2 * max(int(total), 1))
    return 1 << (want - 1).bit_length()


def client_key(client: str) -> bytes:
    """The 16-byte table key of the client address ``client`` (see the module docstring)."""
    text = client.split("%", 1)[0]
    try:
        if ":" in text:  # IPv6; an IPv4-mapped one packs to the same bytes as its IPv4 form
            return socket.inet_pton(socket.AF_INET6, text)
        return _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return NON_IP_KEY


def _key_hash(key: bytes) -> int:
    return zlib.crc32(key)


def _region_size(slots: int) -> int:
    return REGION_HEADER_SIZE + slots * ENTRY_SIZE


def _file_size(workers: int, slots: int) -> int:
    return HEADER_SIZE + workers * _region_size(slots)


def create_table(path: Path, workers: int, slots: int) -> None:
    """Create (or replace) the shared table at ``path`` for ``workers`` processes, all counts 0.

    The file is written under a temporary name in the same directory and renamed into place,
    so a reader sees either the old file or the complete new one; its mode is 0600. Call it
    in the main process before any worker opens the table: a limiter that has the old file
    open keeps counting in the old file.
    """
    path = Path(path)
    if not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"connection table {path}: workers must be 1..{MAX_WORKERS}, not {workers!r}")
    if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"connection table {path}: slots must be 1..{MAX_SLOTS}, not {slots!r}")
    header = _HEADER.pack(MAGIC, VERSION, workers, slots, HEADER_SIZE, _region_size(slots))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, _file_size(workers, slots))
        os.pwrite(fd, header, 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _open_table(path: Path) -> tuple[int, int, int]:
    """Open ``path`` read-write and validate its header: (fd, workers, slots)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise ValueError(
                f"connection table {path} is too short ({size} bytes): not made by create_table"
            )
        raw = os.pread(fd, _HEADER.size, 0)
        magic, version, workers, slots, header_size, region_size = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise ValueError(f"connection table {path} has a bad magic number: not a connection table")
        if version != VERSION:
            raise ValueError(
                f"connection table {path} has version {version}, this program reads {VERSION}"
            )
        if (
            header_size != HEADER_SIZE
            or not 1 <= workers <= MAX_WORKERS
            or not 1 <= slots <= MAX_SLOTS
            or region_size != _region_size(slots)
        ):
            raise ValueError(f"connection table {path} has an inconsistent header")
        if size != _file_size(workers, slots):
            raise ValueError(
                f"connection table {path} is {size} bytes, its header says "
                f"{_file_size(workers, slots)}: truncated or damaged"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, workers, slots


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def reset_worker(path: Path, worker: int) -> None:
    """Zero the counts of ``worker`` (one that died) in the table at ``path``, under the lock.

    The supervisor calls this after worker ``worker`` exited and before its replacement
    starts; every other worker's counts are left as they are.
    """
    path = Path(path)
    fd, workers, slots = _open_table(path)
    try:
        if not isinstance(worker, int) or not 0 <= worker < workers:
            raise ValueError(f"connection table {path}: worker must be 0..{workers - 1}, not {worker!r}")
        size = _region_size(slots)
        with _flocked(fd):
            os.pwrite(fd, bytes(size), HEADER_SIZE + worker * size)
    finally:
        os.close(fd)


@implementer(ISharedConnectionLimiter, IClosable)
class SharedConnectionLimiter:
    """A ConnectionLimiter whose limits hold across all workers sharing the table at ``path``.

    ``worker`` is this process's index (0 = the main twistd process, 1..N-1 the spawned
    workers); it must be unique among the processes using the table. Creating the limiter
    clears this worker's region (a new process has no connections). Use it from one thread.

    Create it in the process that uses it: a limiter inherited through ``fork`` shares its
    parent's open file description (so flock would not exclude the two) and region, so in a
    forked child ``acquire`` and ``release`` raise RuntimeError and ``close`` leaves the
    parent's counts alone.
    """

    def __init__(self, path: Path, worker: int, total: int, per_client: int) -> None:
        self.path = Path(path)
        self.total = total
        self.per_client = per_client
        self.rebuilds = 0  # times this worker's region did not match its own counts
        self._open = 0
        self._counts: dict[bytes, int] = {}
        self._pid = os.getpid()
        self._fork = _forks  # see _count_fork
        self._mm: mmap.mmap | None = None
        self._fd, self.workers, self.slots = _open_table(self.path)
        try:
            if not isinstance(worker, int) or not 0 <= worker < self.workers:
                raise ValueError(
                    f"connection table {self.path}: worker must be 0..{self.workers - 1}, "
                    f"not {worker!r}"
                )
            self.worker = worker
            self._region_size = _region_size(self.slots)
            self._mm = mmap.mmap(self._fd, _file_size(self.workers, self.slots))
            self._region_offsets = [HEADER_SIZE + w * self._region_size for w in range(self.workers)]
            self._mine = self._region_offsets[worker]
            self._others = [off for w, off in enumerate(self._region_offsets) if w != worker]
            with _flocked(self._fd):
                self._rebuild()
        except BaseException:
            self._dispose()
            raise

    # -- the ConnectionLimiter interface -------------------------------------------------

    @property
    def open(self) -> int:
        """Connections this process holds (acquired and not yet released)."""
        return self._open

    def acquire(self, client: str) -> bool:
        """Count a new connection from ``client``; False (and nothing counted) if over a limit.

        The limits are checked against the sum over all workers. A worker whose region has
        no free slot for one more distinct client also refuses.
        """
        mm = self._mm
        if mm is None:
            return False
        if _forks != self._fork:
            raise self._forked()
        key = client_key(client)
        mine = self._counts.get(key, 0)
        if mine == 0 and len(self._counts) >= self.slots:
            return False
        h = _key_hash(key)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            others = 0
            for off in self._others:
                others += _U32.unpack_from(mm, off)[0]
            if self._open + others >= self.total:
                return False
            # the others hold at most ``others`` connections from this client: when even
            # that leaves room, their entries need not be looked up (issue 17)
            if mine + others >= self.per_client:
                per_client = mine
                for off in self._others:
                    per_client += self._lookup(off, key, h)[1]
                if per_client >= self.per_client:
                    return False
            self._counts[key] = mine + 1
            self._open += 1
            self._sync(key, h, mine)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def release(self, client: str) -> None:
        """Forget one connection from ``client`` (once per successful acquire).

        A release for a client with no counted connection is ignored.
        """
        if self._mm is not None and _forks != self._fork:
            raise self._forked()
        key = client_key(client)
        mine = self._counts.get(key, 0)
        if mine <= 0:
            return
        if mine == 1:
            del self._counts[key]
        else:
            self._counts[key] = mine - 1
        self._open -= 1
        if self._mm is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._sync(key, _key_hash(key), mine)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Withdraw this worker's counts from the table and unmap it (idempotent).

        Afterwards ``acquire`` refuses and ``release`` only updates ``open``.
        """
        if self._mm is None:
            return
        if _forks != self._fork:  # a forked child: the region is the parent's
            self._dispose()
            return
        try:
            with _flocked(self._fd):
                self._mm[self._mine : self._mine + self._region_size] = bytes(self._region_size)
        finally:
            self._dispose()

    # -- reading the whole table ---------------------------------------------------------

    def busier_than_others(self) -> bool:
        """True when some other worker holds fewer connections than this one: a hint for
        spreading new connections (read without the lock; a torn read only mis-hints)."""
        mm = self._mm
        if mm is None or not self._others:
            return False
        mine = self._open
        return any(_U32.unpack_from(mm, off)[0] < mine for off in self._others)

    def in_use(self, client: str | None = None) -> int:
        """Open connections over all workers: in total, or from ``client`` (under the lock)."""
        mm = self._mm
        if mm is None:
            raise ValueError(f"connection table {self.path}: limiter is closed")
        with _flocked(self._fd):
            if client is None:
                return self._open + sum(_U32.unpack_from(mm, off)[0] for off in self._others)
            key = client_key(client)
            h = _key_hash(key)
            return self._counts.get(key, 0) + sum(self._lookup(off, key, h)[1] for off in self._others)

    def worker_totals(self) -> list[int]:
        """Open connections per worker, as recorded in the table (under the lock)."""
        mm = self._mm
        if mm is None:
            raise ValueError(f"connection table {self.path}: limiter is closed")
        with _flocked(self._fd):
            return [_U32.unpack_from(mm, off)[0] for off in self._region_offsets]

    def __repr__(self) -> str:
        return (
            f"<SharedConnectionLimiter {self.path} worker={self.worker} open={self._open} "
            f"total={self.total} per_client={self.per_client}>"
        )

    # -- the hash table (callers hold the lock) ------------------------------------------

    def _entry(self, region: int, index: int) -> int:
        return region + REGION_HEADER_SIZE + index * ENTRY_SIZE

    def _lookup(self, region: int, key: bytes, h: int) -> tuple[int, int]:
        """(slot index, count) of ``key`` in a region, or (first empty slot or -1, 0).

        Bounded by ``slots`` probes, so a damaged region (a worker killed mid-write, not yet
        reset) can make a count wrong but never hang the caller.
        """
        mm = self._mm
        assert mm is not None
        slots = self.slots
        i = h % slots
        for _ in range(slots):
            off = region + REGION_HEADER_SIZE + i * ENTRY_SIZE
            count = _U32.unpack_from(mm, off + KEY_SIZE)[0]
            if count == 0:
                return i, 0
            if mm[off : off + KEY_SIZE] == key:
                return i, count
            i += 1
            if i == slots:
                i = 0
        return -1, 0

    def _sync(self, key: bytes, h: int, was: int) -> None:
        """Mirror ``key``'s count (already changed from ``was`` in the dict) into the region.

        If the region does not hold ``was`` for the key, it no longer mirrors the dict (it
        was damaged): rebuild it from the dict instead of patching one entry.
        """
        mm = self._mm
        assert mm is not None
        count = self._counts.get(key, 0)
        index, old = self._lookup(self._mine, key, h)
        if index < 0 or old != was:
            self.rebuilds += 1
            self._rebuild()
            return
        off = self._entry(self._mine, index)
        if old == 0:
            mm[off : off + KEY_SIZE] = key
            _COUNT_HASH.pack_into(mm, off + KEY_SIZE, count, h)
        elif count > 0:
            _U32.pack_into(mm, off + KEY_SIZE, count)
        else:
            self._delete(index)
        self._write_region_header()

    def _delete(self, hole: int) -> None:
        """Backward-shift deletion: empty slot ``hole`` and pull later chain members back."""
        mm = self._mm
        assert mm is not None
        slots = self.slots
        j = hole
        for _ in range(slots - 1):
            j = (j + 1) % slots
            off = self._entry(self._mine, j)
            count, h = _COUNT_HASH.unpack_from(mm, off + KEY_SIZE)
            if count == 0:
                break
            home = h % slots
            # the entry at j may move to the hole unless its home lies cyclically in (hole, j]
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue
            dst = self._entry(self._mine, hole)
            mm[dst : dst + ENTRY_SIZE] = mm[off : off + ENTRY_SIZE]
            hole = j
        dst = self._entry(self._mine, hole)
        mm[dst : dst + ENTRY_SIZE] = bytes(ENTRY_SIZE)

    def _write_region_header(self) -> None:
        assert self._mm is not None
        _REGION.pack_into(self._mm, self._mine, self._open, len(self._counts), self._pid)

    def _rebuild(self) -> None:
        """Rewrite this worker's region from its own counts (the truth)."""
        mm = self._mm
        assert mm is not None
        mm[self._mine : self._mine + self._region_size] = bytes(self._region_size)
        for key, count in self._counts.items():
            index, _old = self._lookup(self._mine, key, _key_hash(key))
            off = self._entry(self._mine, index)
            mm[off : off + KEY_SIZE] = key
            _COUNT_HASH.pack_into(mm, off + KEY_SIZE, count, _key_hash(key))
        self._write_region_header()

    def _forked(self) -> RuntimeError:
        return RuntimeError(
            f"connection table {self.path}: this limiter (worker {self.worker}) belongs to "
            f"process {self._pid}; create a new one in process {os.getpid()}"
        )

    def _dispose(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
