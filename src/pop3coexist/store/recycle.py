"""A bounded pool of spent queue files, reused instead of unlinked and created (issue 17).

Why: on ext4 without a journal, every new inode's allocation walks the free inodes of its group
deleted in the last minutes (``recently_deleted`` in fs/ext4/ialloc.c), and every unlink frees
the inode and its blocks (a discard when mounted with ``discard``). The relay path creates and
deletes two files per message (the spool file that becomes the queue body, the envelope), a
steady churn that makes every next create slower. PostgreSQL recycles its WAL segments for the
same reason. Here a delivered or failed message's body (only when no other name points at its
inode: ``st_nlink == 1``) and its envelope are renamed into ``queue/free/`` (``put``), and a new
spool file or envelope temp file is one of them renamed back (``take``), overwritten in place
and cut to its new length (same-size messages free and allocate no blocks).

Rules that keep it safe:

- a pooled file is never a message: ``queue/free/`` is read by nobody but the pool; a file taken
  is renamed to a name that a crash leaves to the existing clean-ups (a spool file: removed at
  start by ``smtp.incoming.clean_spool``; a queue temp file: ``FileQueue.recover``);
- ``take`` returns an open descriptor whose ``fstat`` shows one link and that nobody else has
  open (a write lease, fcntl(2) ``F_SETLEASE``, is granted only to a file's one opener): a
  file another name still points to, or that a reader opened before it was spent (a backup
  streaming the body), is never overwritten (it is unlinked instead). Where leases are
  missing the pool turns itself off;
- two processes taking the same name: ``rename`` is atomic, one wins, the other gets ENOENT and
  tries the next name (or the caller creates a new file as before);
- durability is the caller's as before: the data (and the length) of a taken file are synced
  by the same fsync / syncfs that a new file gets before anyone relies on it. A file reused in
  place must have its new data on disk before any name that means "message" points at it,
  or a crash (ext4 without a journal keeps no order) could show the spent message's bytes
  under the new name: a spool file is synced before it is linked into a mailbox or the queue
  (the group commit's first sync; ``commit_message``'s fsync), a synced envelope before its
  rename; an envelope of a batched enqueue (whose sync comes after its rename) gets a spent
  file only through ``FileQueue.prepare_envelope``, written before the group commit's first
  sync, else a new file (which a crash shows empty, never as an old envelope);
- privacy: a pooled file holds a delivered message's bytes until reused, so the pool is small
  (``limit`` files per process and kind), ``trim`` unlinks files pooled longer than ``max_age``
  seconds (the delivery runner calls it from its periodic work), and ``empty`` (at start,
  ``FileQueue.recover``) unlinks every pooled file.

``FilePool`` is a store-level object (``FileQueue`` owns one per kind: bodies, envelopes); the
SMTP side reaches it through ``interfaces.IFileRecycler`` (``FileQueue.take_file``).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["FilePool"]

DEFAULT_MAX_AGE = 60.0  # seconds a spent file may wait in the pool before it is unlinked
_SETLEASE: int | None = getattr(fcntl, "F_SETLEASE", None)  # Linux only: else the pool is off
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class FilePool:
    """Spent files of one kind (``prefix``) in ``folder``; thread-safe, blocking.

    ``limit`` bounds the files this object put in the pool and has not taken or trimmed yet
    (0: the pool is off: ``put`` refuses, ``take`` finds nothing).
    """

    def __init__(self, folder: str, prefix: str, limit: int,
                 max_age: float = DEFAULT_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.prefix = prefix
        self.limit = max(int(limit), 0)
        self.max_age = max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._names: deque[tuple[float, str]] = deque()  # (pooled at, name), oldest first
        self._seq = itertools.count()
        self._tag = f"{prefix}{os.getpid():x}."
        self._made = False
        self.cross_device = False  # a take's rename met EXDEV: takes find nothing from then on
        self._swept = clock()
        self.put_count = 0  # statistics (tests, bench): files pooled and files reused
        self.taken_count = 0

    def __len__(self) -> int:
        return len(self._names)

    def _ensure(self) -> None:
        if not self._made:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self._made = True

    def put(self, path: str, check_links: bool = True) -> bool:
        """Move the spent file ``path`` into the pool instead of unlinking it; True when done.
        False (the caller unlinks as before) when the pool is off or full, or, with
        ``check_links``, when another name still points at the file (``st_nlink != 1``).
        Raises FileNotFoundError when ``path`` is gone; other OSErrors give False."""
        if not self.limit or len(self._names) >= self.limit:
            return False
        if check_links and os.lstat(path).st_nlink != 1:
            return False
        with self._lock:
            if len(self._names) >= self.limit:
                return False
            name = f"{self._tag}{next(self._seq)}"
        try:
            self._ensure()
            os.rename(path, f"{self.folder}/{name}")
        except FileNotFoundError:
            raise
        except OSError:
            return False
        with self._lock:
            self._names.append((self.clock(), name))
            self.put_count += 1
        return True

    def take(self, dest: str) -> int | None:
        """Rename a pooled file to ``dest`` (which must not exist: a fresh temp name) and return
        a descriptor open for reading and writing at offset 0, its old bytes still there (the
        caller overwrites them and truncates to the new length); None when the pool has none
        (the caller creates a file as before). Never returns a file with other links."""
        while True:
            with self._lock:
                if not self._names or self.cross_device:
                    return None
                _, name = self._names.pop()  # the newest: its pages are likely still cached
            src = f"{self.folder}/{name}"
            try:
                os.rename(src, dest)
            except OSError as e:
                if e.errno == errno.EXDEV:  # dest on another file system: never from here
                    with self._lock:
                        self._names.append((self.clock(), name))
                        self.cross_device = True
                    return None
                continue  # taken or trimmed by someone else: the next one
            try:
                fd = os.open(dest, _OPEN_FLAGS)
            except OSError:
                _unlink(dest)
                continue
            try:
                alone = os.fstat(fd).st_nlink == 1 and _alone(fd)
            except OSError:
                alone = False
            if alone:
                with self._lock:
                    self.taken_count += 1
                return fd
            os.close(fd)
            _unlink(dest)
            if alone is None:  # no leases here: nobody can tell; spent files are unlinked
                with self._lock:
                    self.limit = 0
                    self._names.clear()
                return None

    def trim(self, max_age: float | None = None) -> int:
        """Unlink the files pooled more than ``max_age`` seconds ago (default ``self.max_age``);
        return how many. Blocking; the delivery runner calls it from its periodic work."""
        age = self.max_age if max_age is None else max_age
        cutoff = self.clock() - age
        gone = []
        with self._lock:
            while self._names and self._names[0][0] <= cutoff:
                gone.append(self._names.popleft()[1])
        n = 0
        for name in gone:
            if _unlink(f"{self.folder}/{name}"):
                n += 1
        now = self.clock()
        if now - self._swept >= age:  # the files of processes that ended (a worker's restart)
            self._swept = now
            n += self._sweep(time.time() - age)
        return n

    def _sweep(self, before: float) -> int:
        """Unlink the files of this kind renamed into the pool before ``before`` (wall clock,
        their ctime) by anyone: a live owner's ``take`` then just finds the next one."""
        n = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.startswith(self.prefix):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_ctime < before and _unlink(entry.path):
                    n += 1
            except OSError:
                continue
        return n

    def empty(self) -> int:
        """Unlink every file of this kind in the folder, this process's or not (at start: a
        pooled file of a process that ended is nobody's); return how many."""
        with self._lock:
            self._names.clear()
        n = 0
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith(self.prefix) and _unlink(f"{self.folder}/{name}"):
                n += 1
        return n


def _alone(fd: int) -> bool | None:
    """True when no other open file description refers to ``fd``'s file (a reader that opened
    the message before it was spent, e.g. a backup still streaming it), False when one does,
    None when this system cannot tell. A write lease (fcntl(2) F_SETLEASE, Linux) is granted
    only to the file's one opener; it is given back at once."""
    if _SETLEASE is None:
        return None
    try:
        fcntl.fcntl(fd, _SETLEASE, fcntl.F_WRLCK)
    except OSError as e:
        return False if e.errno in (errno.EAGAIN, errno.EBUSY) else None
    fcntl.fcntl(fd, _SETLEASE, fcntl.F_UNLCK)
    return True


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False
