"""Failed log-in delays shared by every worker process (``server.workers`` > 1).

``SharedAuthThrottle`` has the interface of throttle.AuthThrottle (``failure_delay``,
``success``, ``failures``) and the same rule (per source address: base, doubling, capped;
forgotten after ``forget_after`` seconds or at a success), but keeps its records in a table in
a mapped file that all processes share, so an attacker whose connections the kernel spreads
over N processes is slowed down as much as by one process.

File layout (little-endian): a 32-byte header (magic ``P3CXTHRT``, version, slots), then
``slots`` records of 32 bytes: the 16-byte client key (policy.sharedlimit.client_key: IPv4 and
IPv4-mapped IPv6 are one key), failures (u32), in use (u32: 1 a failure record, 2 a trusted
source whose last log-in succeeded), last failure, check slot taken or success (f64, the
clock's seconds). A key lives in one of PROBE consecutive slots from its hash; when all of them are
taken by others that are still fresh, the stalest is replaced (an attacker with that many
addresses colliding loses nothing but a few seconds of delay). Every read-modify-write holds an
exclusive ``flock`` on the file; ``trusted`` reads without it. ``admit_delay`` takes the
source's next check slot under the lock, so two processes never both check a guess from one
source inside one delay.

The main process creates the table when the server starts (``start``: after twistd's
``--uid`` switch); the workers open it when first used. No sockets here.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from zope.interface import implementer

from pop3coexist.interfaces import IAuthThrottle, IStartStop
from pop3coexist.policy.sharedlimit import client_key

MAGIC = b"P3CXTHRT"
VERSION = 1
SLOTS = 16384
PROBE = 8
_HEADER = struct.Struct("<8sII16x")  # magic, version, slots
_RECORD = struct.Struct("<16sIId")  # key, failures, in use, last failure


def create_throttle_table(path: Path, slots: int = SLOTS) -> None:
    """Create an empty table at ``path`` (temp file + rename, mode 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.ftruncate(fd, _HEADER.size + slots * _RECORD.size)
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, slots), 0)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@implementer(IAuthThrottle, IStartStop)
class SharedAuthThrottle:
    """AuthThrottle over the shared table at ``path`` (see the module docstring).

    ``create=True`` (the main process): ``start()`` makes the table afresh. Otherwise the table
    is opened at first use. Use from one thread (the reactor).
    """

    def __init__(self, clock: Any, path: Path, base: float = 2.0, maximum: float = 30.0,
                 forget_after: float = 900.0, create: bool = False) -> None:
        self.clock = clock
        self.path = Path(path)
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self.create = create
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._slots = 0

    def start(self) -> None:
        """Create the table (main process) and open it."""
        if self.create:
            create_throttle_table(self.path)
        self._open()

    def _open(self) -> mmap.mmap:
        if self._mm is not None:
            return self._mm
        fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise ValueError(f"log-in throttle table {self.path}: too short")
            mm = mmap.mmap(fd, size)
            magic, version, slots = _HEADER.unpack_from(mm, 0)
            if magic != MAGIC or version != VERSION or size != _HEADER.size + slots * _RECORD.size:
                mm.close()
                raise ValueError(f"log-in throttle table {self.path}: not a table of this version")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm, self._slots = fd, mm, slots
        return mm

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the AuthThrottle interface

    def failure_delay(self, source: str) -> float:
        """Record a failure from ``source``; return the seconds to wait before the -ERR/535."""
        mm = self._open()
        key = client_key(source)
        now = float(self.clock.seconds())
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            offset, failures, last = self._find(mm, key, now, for_insert=True)
            if now - last > self.forget_after:
                failures = 0
            failures += 1
            _RECORD.pack_into(mm, offset, key, failures, 1, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        return self._delay(failures)

    def _delay(self, failures: int) -> float:
        if self.base <= 0 or failures <= 0:
            return 0.0
        return min(self.maximum, self.base * (2 ** min(failures - 1, 62)))

    def success(self, source: str) -> None:
        """A successful log-in from ``source`` clears its failures and marks it trusted."""
        mm = self._open()
        key = client_key(source)
        now = float(self.clock.seconds())
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            offset, _failures, _ = self._find(mm, key, now, for_insert=True)
            _RECORD.pack_into(mm, offset, key, 0, 2, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]

    def admit_delay(self, source: str) -> float:
        """See IAuthThrottle."""
        mm = self._open()
        key = client_key(source)
        now = float(self.clock.seconds())
        offset, failures, last = self._find(mm, key, now, for_insert=False)
        if offset < 0 or failures == 0 or now - last > self.forget_after:
            return 0.0  # no lock needed: nothing to wait for, nothing to take
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            offset, failures, last = self._find(mm, key, now, for_insert=False)
            if offset < 0 or failures == 0 or now - last > self.forget_after:
                return 0.0
            wait = last + self._delay(failures) - now
            if wait > 0:
                return wait
            _RECORD.pack_into(mm, offset, key, failures, 1, now)  # this check takes the slot
            return 0.0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]

    def trusted(self, source: str) -> bool:
        """See IAuthThrottle."""
        mm = self._open()
        now = float(self.clock.seconds())
        offset = self._find(mm, client_key(source), now, for_insert=False)[0]
        if offset < 0:
            return False
        _k, failures, used, last = _RECORD.unpack_from(mm, offset)
        return used == 2 and failures == 0 and now - last <= self.forget_after

    def failures(self, source: str) -> int:
        """Failures recorded for ``source`` and not yet forgotten."""
        mm = self._open()
        now = float(self.clock.seconds())
        offset, failures, last = self._find(mm, client_key(source), now, for_insert=False)
        if offset < 0 or now - last > self.forget_after:
            return 0
        return failures

    def _find(self, mm: mmap.mmap, key: bytes, now: float,
              for_insert: bool) -> tuple[int, int, float]:
        """(offset, failures, last) of ``key``'s record; not found: (-1, 0, 0.0), or with
        ``for_insert`` the offset of a free, forgotten or else the stalest slot and 0 failures."""
        start = zlib.crc32(key) % self._slots
        spare, spare_last = -1, float("inf")
        for i in range(PROBE):
            offset = _HEADER.size + ((start + i) % self._slots) * _RECORD.size
            k, failures, used, last = _RECORD.unpack_from(mm, offset)
            if used and k == key:
                return offset, failures, last
            if not used or now - last > self.forget_after:
                last = float("-inf")  # free, or as good as free
            if last < spare_last:
                spare, spare_last = offset, last
        if for_insert:
            return spare, 0, 0.0
        return -1, 0, 0.0
