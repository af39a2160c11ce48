"""Small file-system helpers shared by the modules that touch files: ``fsync_dir`` for
durability (store, queue, passwords); ``write_atomic``, a whole small file replaced so that
a reader (or a crash) sees the old contents or the new, never a part; and ``open_cached``, an open that never waits for the disk
(Linux openat2 with RESOLVE_CACHED), so the reactor thread may open a file itself when the
kernel already has the path in its cache (``open_cached_file``: the same, as the unbuffered
file object POP3's RETR and IMAP's FETCH read), and ``stat_cached`` / ``missing_cached`` on the
same terms (local file systems only: on NFS, CIFS or a FUSE mount such as GlusterFS an open or
an fstat may wait for a server, so paths there always answer "ask off the reactor";
``refresh_mounts``);
``retry_stale``, a read that starts again when a
shared file system (GlusterFS, NFS) answers ESTALE because another machine renamed a new
version over the file while it was read."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STALE_ATTEMPTS = 5

# This process's id, kept up to date across fork (os.register_at_fork): per message the store
# and the spool writer name files after it, and a getpid() system call each time was 2 of
# them per accepted message (issue 17).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """``os.getpid()`` without a system call: the id is read once at import and again in
    each child after ``os.fork`` (the worker processes are started with fork or exec, both
    covered)."""
    return _pid


def fsync_dir(path: Path | str) -> None:
    """Make a folder's entries (new, renamed or removed names) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o600, durable: bool = True,
                 sync_dir: bool = True) -> None:
    """Replace the file ``path`` by one holding ``data`` (bytes), atomically: a temporary
    file with a unique name in the same folder (``mkstemp``: never shared by two threads or
    processes), permissions ``mode``, written whole, fsynced when ``durable``, renamed over
    ``path``; then the folder is fsynced (``durable`` and ``sync_dir``; a caller writing
    several files in one folder syncs it once itself). Raises OSError (the temporary file
    is removed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


_SYS_OPENAT2 = 437  # the same number in every Linux architecture's table (since 5.6)
_RESOLVE_CACHED = 0x20  # since Linux 5.12: EAGAIN instead of waiting for the disk
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall():  # noqa: ANN202
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return call


_syscall = _load_syscall()
_cached_open_works = _syscall is not None
# open_cached's request, made once (never changed): building it per RETR cost more than the
# call (issue 17)
_READ_CACHED = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
_READ_CACHED_REF = ctypes.byref(_READ_CACHED)
_OPEN_HOW_SIZE = ctypes.sizeof(_OpenHow)
_remote_prefixes: tuple[str, ...] = ()


# File systems where an open or an fstat may wait for another machine or a user-space daemon
# even when the kernel has the path cached: FUSE sends FUSE_OPEN on every open and FUSE_GETATTR
# once its attribute timeout passed (GlusterFS, sshfs, virtiofs), NFS revalidates attributes
# with GETATTR (close-to-open consistency, RFC 7530 section 10.3.1), CIFS and the cluster file
# systems likewise. The cached paths below never answer for paths on them.
_REMOTE_TYPES = ("fuse", "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "9p", "glusterfs",
                 "lustre", "gpfs", "ocfs2", "gfs2", "afs", "virtiofs", "beegfs", "orangefs")
_noted_roots: set[str] = set()


def _remote_mounts(mountinfo: str | None = None) -> tuple[str, ...]:
    """Mount points (with a trailing "/") of the file systems in ``_REMOTE_TYPES``, from
    /proc/self/mountinfo (or the text given); () when it cannot be read."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return ()
    points = []
    for line in mountinfo.splitlines():
        if " - " not in line:
            continue
        fields, after = line.split(" - ", 1)[0].split(), line.split(" - ", 1)[1].split()
        if len(fields) >= 5 and after and after[0].startswith(_REMOTE_TYPES):
            points.append(fields[4].replace("\\040", " ").rstrip("/") + "/")
    return tuple(points)


def refresh_mounts(roots: Iterable[Path | str] = (), mountinfo: str | None = None) -> bool:
    """Read the mount table again (at start and on SIGHUP: a volume mounted later counts) and
    note ``roots`` (the mail root, the queue, the state folder): a root that lies on a remote
    or FUSE file system through a symlink is matched by the name it is configured with too.
    Returns True when any noted root is on such a file system (the cached paths are then off
    for it). Paths are compared as given: callers pass absolute paths under a noted root."""
    global _remote_prefixes
    _noted_roots.update(os.fspath(r) for r in roots)
    prefixes = list(_remote_mounts(mountinfo))
    remote_root = False
    for root in sorted(_noted_roots):
        if file_system_type(root, mountinfo).startswith(_REMOTE_TYPES):
            remote_root = True
            for name in {root, os.path.realpath(root)}:
                prefixes.append(name.rstrip("/") + "/")
    _remote_prefixes = tuple(dict.fromkeys(prefixes))
    return remote_root


def _on_remote(path: Path | str | bytes) -> bool:
    name = path if type(path) is str else os.fsdecode(path)  # bytes too (the prefixes are str)
    return name.startswith(_remote_prefixes) or name + "/" in _remote_prefixes


_remote_prefixes = _remote_mounts()


def open_cached(path: Path | str) -> int | None:
    """A read-only descriptor of ``path`` if it can be opened without any disk I/O, else None
    (the path is not in the cache, the file is gone, or this kernel cannot say: the caller
    then opens it off the reactor). Never blocks on the disk."""
    global _cached_open_works
    if not _cached_open_works or (_remote_prefixes and _on_remote(path)):
        return None
    # a str encoded as os.fsencode would, without its Python-level checks (once per RETR)
    name = path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str else os.fsencode(path)
    fd = _syscall(_SYS_OPENAT2, _AT_FDCWD, name, _READ_CACHED_REF, _OPEN_HOW_SIZE)
    if fd >= 0:
        return int(fd)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.E2BIG):
        _cached_open_works = False  # an old kernel or a sandbox: always use the thread
    return None


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_nowait_reads = _RWF_NOWAIT is not None and hasattr(os, "preadv")


def nowait_reads() -> bool:
    """Whether ``pread_nowait`` can work here (it turns False for good the first time the
    kernel or file system says it cannot)."""
    return _nowait_reads


def pread_nowait(fd: int, buf: bytearray, offset: int) -> int | None:
    """``preadv(fd, [buf], offset, RWF_NOWAIT)``: the octets read into ``buf`` (0 at the
    end of the file), never waiting for the disk; None when the page cache does not hold them
    yet, or when this kernel or file system cannot read without waiting (remembered: every
    later call is None at once, see ``nowait_reads``). Other OSError propagates."""
    global _nowait_reads
    if not _nowait_reads:
        return None
    try:
        return os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait_reads = False  # this kernel or file system cannot: the callers' other way
            return None
        raise


def read_cached(path: str, size: int) -> bytes | None:
    """The whole file at ``path`` if the kernel can open it and has all its pages cached (no
    disk I/O: ``open_cached``, then one ``preadv(RWF_NOWAIT)``) and it holds exactly ``size``
    octets (the size the caller saw before: a file grown or shrunk since gives None); else
    None. No file object and no ``fstat``: on the reactor, per message read, those cost as
    much as the read (issue 17). OSError other than "would block" propagates."""
    if not _nowait_reads:
        return None
    fd = open_cached(path)
    if fd is None:
        return None
    buf = bytearray(size + 1)  # one octet more: a file that grew reads longer
    try:
        n = pread_nowait(fd, buf, 0)
    finally:
        os.close(fd)
    if n != size:
        return None
    del buf[size:]
    return bytes(buf)


def open_cached_file(path: str) -> io.FileIO | None:
    """``open_cached(path)`` as an unbuffered read-only ``io.FileIO`` (the caller closes it),
    or None when only the disk could open it. ``path`` is a str: on the reactor, once per
    message read, pathlib's join and ``os.fdopen``'s buffered reader cost more than the open
    itself (about 7 us a call, issue 17); a whole-file ``read()`` needs no buffer."""
    fd = open_cached(path)
    return None if fd is None else io.FileIO(fd, "rb")


_O_PATH = getattr(os, "O_PATH", 0o10000000)
# _path_cached's request, made once (never changed), and the encoding os.fsencode uses
_PATH_CACHED = _OpenHow(_O_PATH | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
_PATH_CACHED_REF = ctypes.byref(_PATH_CACHED)
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def stat_cached(path: Path | str) -> os.stat_result | None:
    """``os.stat(path)`` (symlinks followed) when the kernel's cache alone can answer, else
    None: the path is not all in the dentry cache, it is missing, or this kernel cannot say.
    Never blocks on the disk (openat2 with O_PATH and RESOLVE_CACHED, then fstat of that
    descriptor: an inode in memory); the reactor thread may call it, and takes None as
    "ask off the reactor"."""
    fd = _path_cached(path)
    if fd < 0:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def missing_cached(path: Path | str) -> bool:
    """True when the kernel's cache alone says that ``path`` does not exist (a cached negative
    entry: ENOENT); False when it exists, or when only the disk could say. Never blocks."""
    fd = _path_cached(path)
    if fd >= 0:
        os.close(fd)
        return False
    return -fd == errno.ENOENT


def _path_cached(path: Path | str) -> int:
    """An O_PATH descriptor of ``path`` resolved from the cache alone, or -errno (-EAGAIN:
    the disk is needed; -ENOSYS: this kernel cannot say)."""
    if not _cached_open_works or (_remote_prefixes and _on_remote(path)):
        return -errno.ENOSYS
    # a str is encoded as os.fsencode would, without its Python-level checks (issue 17:
    # RCPT's cached look-up calls this three times per recipient)
    name = path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str else os.fsencode(path)
    fd = _syscall(_SYS_OPENAT2, _AT_FDCWD, name, _PATH_CACHED_REF, _OPEN_HOW_SIZE)
    if fd >= 0:
        return int(fd)
    return -(ctypes.get_errno() or errno.EAGAIN)


def retry_stale(read: Callable[[], T], attempts: int = STALE_ATTEMPTS) -> T:
    """``read()``, called again (it must open the file by its path each time) while it fails
    with ESTALE, at most ``attempts`` times in all; the last ESTALE, or any other OSError,
    propagates. On a shared volume a reader can open a file's old version just as another
    node renames a new one over it (measured on GlusterFS: 1-2 reads in 45,000); the path
    names the new version at once, so the next attempt reads it."""
    for attempt in range(attempts):
        try:
            return read()
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# File systems whose syncfs(2) does not make a write durable where it is kept: FUSE (GlusterFS's
# client holds writes in its write-behind cache, and the kernel sends no FUSE_SYNCFS to it),
# and the network file systems, whose servers only sync on fsync. fsync of each file and
# folder does reach them.
_SYNCFS_UNTRUSTED = ("fuse", "nfs", "nfs4", "cifs", "smb3", "ceph", "9p", "glusterfs", "lustre",
                     "gpfs", "ocfs2", "gfs2")


def file_system_type(path: Path | str, mountinfo: str | None = None) -> str:
    """The type of the file system holding ``path`` (``ext4``, ``fuse.glusterfs``, ...) from
    /proc/self/mountinfo (the longest mount point that contains the path); "" when unknown."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split()
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if after and inside and len(point) >= len(best):
            best, kind = point, after[0]
    return kind


def syncfs_is_durable(path: Path | str, mountinfo: str | None = None) -> bool:
    """False when the file system holding ``path`` is one whose syncfs(2) does not make data
    durable (FUSE, NFS and other network or cluster file systems): sync each file instead."""
    kind = file_system_type(path, mountinfo)
    return not kind.startswith(_SYNCFS_UNTRUSTED)
