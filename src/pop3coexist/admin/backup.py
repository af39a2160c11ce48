"""``pop3coexist-admin backup FILE|-`` and ``restore FILE|- [--verify]`` (README "Backup and
restore").

The archive is a POSIX (pax) tar stream, compressed with Zstandard (the ``zstandard`` package,
frames with content checksums) unless the file name ends in ``.tar`` or ``--format tar`` is
given. Its members are paths relative to ``state_dir``; the last member, ``MANIFEST.json``,
names every file with its size and SHA-256 (and the hard links between them: a message
delivered to several mailboxes is one file on disk and one in the archive), when the backup
began, and the ``--since`` time of an incremental one.

What is in it: every file under ``state_dir`` that is state, found by walking, not from a
fixed list (so files other parts add, such as alias tables or scripts beside a mailbox, come
along): the mailboxes, their metadata, the queue, ``passwords.json`` and ``passwords.key``.
Left out (``is_excluded``): ``run/`` (locks, shared tables, listeners.json), ``tmp/`` folders
(messages being written; the empty folder itself is kept), the spool ``mailroot/.spool``,
lock files, the temporary files of atomic replaces, a removal or mailbox creation under way,
the queue's flush/rescan markers and a restore's staging folder.

Consistency while the server serves (the rules, README "Backup and restore"):

1. The backup takes no lock the server takes: it never blocks delivery or a log-in.
2. The walk starts after the backup began, and a ``250`` is sent only once the message is
   renamed into ``new/`` (or its queue envelope written), so every message that had its ``250``
   before is listed, unless a client deleted it first.
3. A Maildir message is a complete, never-changed file once it has a name in ``new/`` or
   ``cur/`` (``tmp/`` is excluded): it is in the archive whole or not at all.
4. A POP3 session's QUIT renames ``new/`` -> ``cur/`` and deletes files: ``new/`` is read
   before ``cur/``, a file seen twice (by its maildir unique part) is kept once, and a file
   that vanished is looked for again by unique part (renamed: taken under its new name;
   gone: deleted by its owner, not in the snapshot).
5. An IMAP folder of a mailbox (Maildir++ ``.<name>/`` with its ``new/``, ``cur/``,
   ``maildirfolder``, ``dovecot-uidlist``, ``dovecot-keywords``; store/folders.py) is a
   Maildir like the INBOX: its messages are read by the same rules (an IMAP flag change
   renames a file, as QUIT does), their ``:2,`` flag letters are in their names, and the
   uid list comes along so a restored folder keeps its UIDVALIDITY and UIDs (clients do not
   fetch it again); the mailbox's ``subscriptions`` is a state file like any other. A folder
   being deleted (``..deleted.*``) is left out.
6. The queue is read before the mailboxes: a message the runner moves from the queue into a
   mailbox is in the queue part (envelope still there) or already in the mailbox.
   A queue message is its body and its envelope, read body-after-envelope-listing; a pair
   whose body vanished was delivered meanwhile and is left out.

Restore reads the whole archive into a staging folder inside ``state_dir`` and checks every
checksum against the manifest before anything is put in place; a damaged archive changes
nothing. Files are then hard-linked into place (atomic: a reader sees the whole file or none),
queue bodies before their envelopes, without replacing anything: a message whose maildir
unique part is already in its folder (``new/`` or ``cur/`` of the INBOX or of the IMAP
folder it was in) is skipped, so restoring twice,
or restoring into a running server, makes no duplicates. A state file that exists with other
contents is kept and reported. The password file is merged address by address
(``PasswordFile.merge_from``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from pop3coexist.admin.owner import StateOwner
from pop3coexist.config import Config
from pop3coexist.errors import AdminError, StoreError
from pop3coexist.fsutil import fsync_dir

FORMAT = "pop3coexist-backup"
VERSION = 1
MANIFEST = "MANIFEST.json"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
STAGING_PREFIX = ".restore-"
SMALL_FILE = 64 << 20  # state files up to this size are read whole (a consistent copy)
SINCE_MARGIN = 2.0  # seconds taken off an earlier backup's start (file time granularity)

# a message of a mailbox's INBOX or of one of its IMAP folders (Maildir++ ``.<name>/``)
_MAILDIR_MESSAGE = re.compile(r"^mailroot/[^/]+/[^/]+/(?:\.[^/]+/)?(new|cur)/[^/]+$")


# --------------------------------------------------------------------------- what is state


def is_excluded(parts: tuple[str, ...], is_dir: bool) -> bool:
    """True when the path ``parts`` (relative to ``state_dir``) is not state worth a backup.

    A ``tmp`` folder is excluded by its contents only (the walker records the folder itself),
    so it is not excluded here.
    """
    name = parts[-1]
    if len(parts) == 1 and name in ("run", "nodes"):  # nodes/: locks and probes of live nodes
        return True
    if parts[:2] == ("mailroot", ".spool"):
        return True
    if parts in (("queue", "flush"), ("queue", "rescan")):
        return True
    if name.startswith((".removed.", ".new.", ".probe.", "..deleted.", STAGING_PREFIX)):
        return True
    if not is_dir and (name.endswith((".lock", ".lck", ".tmp")) or ".tmp." in name):
        return True
    return False


def maildir_unique(name: str) -> str:
    """The maildir(5) unique part of a message file name (before ``:`` info and ``,S=``)."""
    from pop3coexist.store.maildir import unique_part

    return unique_part(name)


# --------------------------------------------------------------------------- the archive out


class _Hashing:
    """A reader that hashes what it passes on (tarfile reads exactly the member's size)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data


class _Output:
    """Where the archive goes: standard output, or a new file that appears only when complete.

    On Linux the file is made with ``O_TMPFILE`` (no name until it is linked in at the end), so
    a backup killed at any point leaves nothing behind; elsewhere a hidden ``.NAME.partial``
    is renamed at the end. An existing FILE is never overwritten.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.fd: int | None = None
        self.partial: Path | None = None
        if target == "-":
            self.stream: BinaryIO = sys.stdout.buffer
            return
        path = Path(target)
        if path.exists() or path.is_symlink():
            raise AdminError(f"{target} exists: give a new file name (a backup never overwrites)")
        folder = path.parent if str(path.parent) else Path(".")
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise AdminError(f"cannot write in {folder}: {e.strerror}")
            self.partial = folder / f".{path.name}.partial"
            self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.stream = os.fdopen(self.fd, "wb", closefd=False)

    def finish(self) -> None:
        """Make the archive durable and give it its name."""
        self.stream.flush()
        if self.fd is None:
            return
        os.fsync(self.fd)
        path = Path(self.target)
        try:
            if self.partial is not None:
                os.link(self.partial, path)
                os.unlink(self.partial)
            else:
                _link_open_file(self.fd, path)
        except FileExistsError:
            raise AdminError(f"{self.target} appeared while the backup ran; the backup was not kept")
        with contextlib.suppress(OSError):
            fsync_dir(path.parent if str(path.parent) else ".")

    def abort(self) -> None:
        if self.partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.partial)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            os.close(self.fd)
            self.fd = None


def _link_open_file(fd: int, path: Path) -> None:
    """Give the ``O_TMPFILE`` file ``fd`` the name ``path`` (linkat with AT_SYMLINK_FOLLOW
    through /proc, which needs no privilege; a directory descriptor makes Python call linkat
    rather than link, which would not follow the /proc link)."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.abspath(path), src_dir_fd=root,
                follow_symlinks=True)
    finally:
        os.close(root)


@dataclass
class BackupSummary:
    """What one backup holds (counted as written)."""

    messages: int = 0
    queued: int = 0
    other: int = 0
    links: int = 0
    bytes: int = 0
    vanished: int = 0  # files deleted by their owner between the listing and the read
    started: float = 0.0


class _Writer:
    """Walks ``state_dir`` in the order of the consistency rules and writes tar members."""

    def __init__(self, state_dir: Path, tar: tarfile.TarFile, since: float | None) -> None:
        self.root = state_dir
        self.tar = tar
        self.since = since
        self.files: list[dict[str, Any]] = []
        self.dirs: list[str] = []
        self.inodes: dict[tuple[int, int], dict[str, Any]] = {}
        self.summary = BackupSummary()

    # -- members

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def add_dir(self, path: Path) -> None:
        rel = self._rel(path)
        info = tarfile.TarInfo(rel)
        info.type = tarfile.DIRTYPE
        info.mode = 0o700
        try:
            info.mtime = int(os.stat(path).st_mtime)
        except OSError:
            info.mtime = int(time.time())
        self.tar.addfile(info)
        self.dirs.append(rel)

    def _changed(self, st: os.stat_result) -> bool:
        return self.since is None or max(st.st_mtime, st.st_ctime) >= self.since

    def add_file(self, path: Path, kind: str, immutable: bool) -> bool:
        """Add one file; False when it no longer exists (``FileNotFoundError`` at open)."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return False
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return True
            if not self._changed(st):
                return True
            rel = self._rel(path)
            key = (st.st_dev, st.st_ino)
            first = self.inodes.get(key) if st.st_nlink > 1 else None
            if first is not None:
                info = tarfile.TarInfo(rel)
                info.type = tarfile.LNKTYPE
                info.linkname = first["path"]
                info.mode = 0o600
                info.mtime = int(st.st_mtime)
                self.tar.addfile(info)
                self.files.append({"path": rel, "link": first["path"], "size": first["size"],
                                   "sha256": first["sha256"]})
                self.summary.links += 1
                self._count(kind, 0)
                return True
            if immutable or st.st_size > SMALL_FILE:
                source: IO[bytes] = f
                size = st.st_size
            else:
                data = f.read()  # a consistent copy of a file that may be replaced or grow
                source, size = io.BytesIO(data), len(data)
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mode = 0o600
            info.mtime = int(st.st_mtime)
            reader = _Hashing(source)
            self.tar.addfile(info, reader)
            entry = {"path": rel, "size": size, "sha256": reader.sha.hexdigest(),
                     "mtime": st.st_mtime}
            self.files.append(entry)
            if st.st_nlink > 1:
                self.inodes[key] = entry
            self._count(kind, size)
            return True

    def _count(self, kind: str, size: int) -> None:
        s = self.summary
        s.bytes += size
        if kind == "message":
            s.messages += 1
        elif kind == "envelope":
            s.queued += 1
        elif kind == "other":
            s.other += 1

    # -- the walk

    def walk(self) -> None:
        top = _listdir(self.root)
        order = [n for n in ("queue", "mailroot") if n in top]
        order += [n for n in top if n not in order]
        for name in order:
            self._generic(self.root / name)

    def _generic(self, path: Path) -> None:
        parts = path.relative_to(self.root).parts
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_excluded(parts, is_dir):
            return
        if is_dir:
            self.add_dir(path)
            if parts == ("queue",):
                self._queue(path)
            elif parts[-1] == "tmp":
                return  # a message being written: never in a backup
            elif parts[0] == "mailroot" and (len(parts) == 3 or (
                    len(parts) == 4 and parts[3].startswith("."))) and _is_maildir(path):
                self._maildir(path)  # a mailbox (INBOX) or one of its IMAP folders
            else:
                for name in _listdir(path):
                    self._generic(path / name)
        elif stat.S_ISREG(st.st_mode):
            self.add_file(path, "other", immutable=False)

    def _queue(self, queue: Path) -> None:
        env_dir, msg_dir = queue / "env", queue / "msg"
        for name in _listdir(queue):
            # free/: spent files kept for reuse (store/recycle.py), no message any more
            if name not in ("env", "msg", "claimed", "free"):
                self._generic(queue / name)
        for sub in (msg_dir, env_dir):
            if sub.is_dir():
                self.add_dir(sub)
        # a message a delivery runner has claimed (store/queue.py) is kept as unclaimed:
        # its envelope goes into the archive as env/<id>.json, the claim itself is not kept
        sources = [(env_dir, name) for name in _listdir(env_dir)]
        for owner in _listdir(queue / "claimed"):
            sources += [(queue / "claimed" / owner, name)
                        for name in _listdir(queue / "claimed" / owner)]
        seen: set[str] = set()
        for folder, name in sources:
            if (not name.endswith(".json") or name in seen
                    or is_excluded(("queue", "env", name), False)):
                continue
            qid = name[:-5]
            found = _read_envelope(queue, folder / name)
            if found is None:
                continue  # delivered or deleted since the listing
            env_data, env_st = found
            if not self.add_file(msg_dir / qid, "body", immutable=True):
                continue  # the body went first: removed (delivered) meanwhile
            seen.add(name)
            self._add_bytes(env_dir / name, env_data, env_st, "envelope")

    def _add_bytes(self, path: Path, data: bytes, st: os.stat_result, kind: str) -> None:
        if not self._changed(st):
            return
        rel = self._rel(path)
        info = tarfile.TarInfo(rel)
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(st.st_mtime)
        self.tar.addfile(info, io.BytesIO(data))
        self.files.append({"path": rel, "size": len(data),
                           "sha256": hashlib.sha256(data).hexdigest(), "mtime": st.st_mtime})
        self._count(kind, len(data))

    def _maildir(self, box: Path) -> None:
        for name in _listdir(box):
            if name not in ("new", "cur"):
                self._generic(box / name)  # tmp/ (the folder only), metadata, scripts
        seen: set[str] = set()
        for sub in ("new", "cur"):  # new/ first: QUIT moves new -> cur, never back
            folder = box / sub
            self.add_dir(folder)
            for name in _listdir(folder):
                if name.startswith("."):
                    continue
                unique = maildir_unique(name)
                if unique in seen:
                    continue  # read in new/ already, moved to cur/ since
                if self.add_file(folder / name, "message", immutable=True):
                    seen.add(unique)
                    continue
                moved = _find_unique(box, unique)  # renamed (new -> cur, size fields, flags)
                if moved is not None and self.add_file(moved, "message", immutable=True):
                    seen.add(unique)
                else:
                    self.summary.vanished += 1  # deleted by its owner (POP3 DELE + QUIT)


def _is_maildir(path: Path) -> bool:
    return (path / "new").is_dir() and (path / "cur").is_dir()


def _read_envelope(queue: Path, path: Path) -> tuple[bytes, os.stat_result] | None:
    """An envelope's bytes and stat, following it if a runner claimed or released it since
    the listing (it moves between env/ and claimed/<owner>/); None when it is gone."""
    for _ in range(3):
        try:
            return path.read_bytes(), os.stat(path)  # replaced atomically: old or new, whole
        except FileNotFoundError:
            pass
        places = [queue / "env"] + [queue / "claimed" / o for o in _listdir(queue / "claimed")]
        moved = [d / path.name for d in places if (d / path.name).exists()]
        if not moved:
            return None
        path = moved[0]
    return None


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _find_unique(box: Path, unique: str) -> Path | None:
    for sub in ("cur", "new"):
        for name in _listdir(box / sub):
            if maildir_unique(name) == unique:
                return box / sub / name
    return None


# --------------------------------------------------------------------------- backup


def parse_since(text: str, owner: StateOwner | None = None) -> float:
    """``--since``: seconds since the epoch, an ISO 8601 time (local time when it has no
    offset), or an earlier backup file (its start, less a margin). AdminError otherwise."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
        return when.timestamp()
    except ValueError:
        pass
    if os.path.isfile(text):
        manifest, _ = read_archive(text, None, owner)
        return float(manifest["started"]) - SINCE_MARGIN
    raise AdminError(f"--since {text!r}: give seconds since 1970, an ISO time "
                     "(2026-11-30T08:00) or an earlier backup file")


def backup(config: Config, target: str, *, since: str | None = None,
           compress: bool | None = None, out: Any = None) -> BackupSummary:
    """Write a backup of ``config``'s ``state_dir`` to ``target`` (a new file, or ``-``).

    ``compress``: Zstandard (True), plain tar (False), or by the name (None: ``.tar`` is plain).
    Prints one summary line to ``out`` (stderr when the archive goes to stdout). Reads the
    state only: nothing in ``state_dir`` is created or changed. AdminError on failure (the
    partial archive is discarded).
    """
    state_dir = config.server.state_dir
    if not state_dir.is_dir():
        raise AdminError(f"state_dir {state_dir} does not exist: nothing to back up")
    owner = StateOwner(state_dir)
    since_time = parse_since(since, owner) if since is not None else None
    if compress is None:
        compress = not target.endswith(".tar")
    with contextlib.suppress(OSError):
        if os.nice(0) == 0:
            os.nice(5)  # the server comes first
    output = _Output(target)  # as the invoking user: the archive is outside the state
    started = time.time()
    try:
        with owner.acting():
            summary = _write_archive(state_dir, output.stream, since_time, compress, started,
                                     config.server.hostname)
        output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        output.close()
    where = out if out is not None else (sys.stderr if target == "-" else sys.stdout)
    kind = "incremental backup" if since_time is not None else "backup"
    print(f"{kind} {target}: {summary.messages} messages, {summary.queued} queued, "
          f"{summary.other} other files, {summary.links} hard links, {summary.bytes} bytes "
          f"in {time.time() - started:.1f} s", file=where)
    return summary


def _write_archive(state_dir: Path, stream: BinaryIO, since: float | None, compress: bool,
                   started: float, hostname: str) -> BackupSummary:
    import zstandard

    sink: Any = stream
    zw = None
    if compress:
        zw = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
            stream, closefd=False)
        sink = zw
    tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                       errors="surrogateescape")
    writer = _Writer(state_dir, tar, since)
    writer.summary.started = started
    writer.walk()
    manifest = {
        "format": FORMAT, "version": VERSION, "hostname": hostname,
        "host": socket.gethostname(), "state_dir": str(state_dir),
        "started": started, "finished": time.time(), "since": since,
        "counts": {"messages": writer.summary.messages, "queued": writer.summary.queued,
                   "other": writer.summary.other, "links": writer.summary.links,
                   "bytes": writer.summary.bytes},
        "dirs": writer.dirs, "files": writer.files,
    }
    data = json.dumps(manifest, indent=0, ensure_ascii=True).encode("ascii")
    info = tarfile.TarInfo(MANIFEST)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
    tar.close()
    if zw is not None:
        zw.flush(zstandard.FLUSH_FRAME)
        zw.close()
    return writer.summary


# --------------------------------------------------------------------------- reading archives


class _Peeked:
    """A reader with its first bytes already taken (to sniff the Zstandard magic)."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        self.head = head
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.f.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            if len(data) < n:
                data += self.f.read(n - len(data))
            return data
        return self.f.read(n)


@dataclass
class _Member:
    path: str
    size: int = 0
    sha256: str = ""
    staged: Path | None = None
    link: str | None = None


@dataclass
class _Read:
    dirs: list[str] = field(default_factory=list)
    members: dict[str, _Member] = field(default_factory=dict)


def _safe_path(name: str) -> str:
    parts = name.split("/")
    if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or "\\" in name or "\0" in name):
        raise AdminError(f"archive damaged or not ours: unsafe member name {name!r}")
    return name


def read_archive(source: str, staging: Path | None,
                 owner: StateOwner | None = None) -> tuple[dict[str, Any], _Read]:
    """Read a backup, hash every member, and check them against its manifest.

    With ``staging`` each file's content is also written (fsynced) under that folder. Returns
    ``(manifest, what was read)``; AdminError naming the first problem (a damaged or
    incomplete archive, a checksum that does not match, a member the manifest lacks).
    """
    ctx = owner.as_invoker() if owner is not None else contextlib.nullcontext()
    with ctx:
        if source == "-":
            raw: IO[bytes] = sys.stdin.buffer
        else:
            try:
                raw = open(source, "rb")  # noqa: SIM115 - closed below
            except OSError as e:
                raise AdminError(f"cannot read {source}: {e.strerror}")
    try:
        return _read_stream(raw, source, staging)
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


def _read_stream(raw: IO[bytes], source: str, staging: Path | None) -> tuple[dict[str, Any], _Read]:
    head = raw.read(4)
    stream: Any = _Peeked(head, raw)
    if head == ZSTD_MAGIC:
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    got = _Read()
    manifest: dict[str, Any] | None = None
    counter = 0
    try:
        import zstandard

        zerror: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        zerror = ()
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            for member in tar:
                if manifest is not None:
                    raise AdminError(f"{source}: archive damaged: members after {MANIFEST}")
                name = _safe_path(member.name)
                if name == MANIFEST:
                    f = tar.extractfile(member)
                    assert f is not None
                    try:
                        manifest = json.loads(f.read())
                    except ValueError:
                        raise AdminError(f"{source}: archive damaged: {MANIFEST} is not JSON")
                    continue
                if member.isdir():
                    got.dirs.append(name)
                elif member.islnk():
                    got.members[name] = _Member(name, link=_safe_path(member.linkname))
                elif member.isreg():
                    f = tar.extractfile(member)
                    assert f is not None
                    sha = hashlib.sha256()
                    staged = None
                    if staging is not None:
                        counter += 1
                        staged = staging / f"{counter:08d}"
                        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     0o600)
                        with os.fdopen(fd, "wb") as out:
                            for chunk in iter(lambda f=f: f.read(1 << 16), b""):
                                sha.update(chunk)
                                out.write(chunk)
                            out.flush()
                            os.fsync(out.fileno())
                    else:
                        for chunk in iter(lambda f=f: f.read(1 << 16), b""):
                            sha.update(chunk)
                    got.members[name] = _Member(name, member.size, sha.hexdigest(), staged)
                else:
                    raise AdminError(f"{source}: archive damaged or not ours: member {name!r} "
                                     "is neither a file, a folder nor a hard link")
    except (tarfile.TarError, EOFError, *zerror) as e:
        raise AdminError(f"{source}: archive damaged or incomplete: {e}")
    except OSError as e:
        if staging is not None and e.errno == errno.ENOSPC:
            raise AdminError(f"no space left to stage the restore in {staging.parent}")
        raise AdminError(f"{source}: archive damaged or incomplete: {e.strerror or e}")
    if manifest is None:
        raise AdminError(f"{source}: archive incomplete: no {MANIFEST} at its end (a backup "
                         "that was interrupted?)")
    _check(manifest, got, source)
    return manifest, got


def _check(manifest: dict[str, Any], got: _Read, source: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdminError(f"{source}: not a pop3coexist backup")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise AdminError(f"{source}: backup format version {manifest.get('version')} is newer "
                         f"than this pop3coexist reads ({VERSION})")
    listed: set[str] = set()
    for entry in manifest.get("files", []):
        path = entry.get("path")
        listed.add(path)
        member = got.members.get(path)
        if member is None:
            raise AdminError(f"{source}: archive damaged: {path} is missing")
        if entry.get("link"):
            target = got.members.get(entry["link"])
            if member.link != entry["link"] or target is None or target.link is not None:
                raise AdminError(f"{source}: archive damaged: the hard link {path} does not "
                                 "match the manifest")
            member = target
        if member.size != entry.get("size") or member.sha256 != entry.get("sha256"):
            raise AdminError(f"{source}: archive damaged: {path} does not match its checksum")
    extra = set(got.members) - listed
    if extra:
        raise AdminError(f"{source}: archive damaged: {sorted(extra)[0]} is not in the manifest")


# --------------------------------------------------------------------------- restore


@dataclass
class RestoreSummary:
    """What a restore did."""

    restored: int = 0
    duplicates: int = 0  # messages already in their mailbox (by maildir unique part)
    same: int = 0  # files already there with the same contents
    kept: list[str] = field(default_factory=list)  # files already there with other contents
    accounts: int = 0  # addresses merged into an existing password file
    queued: int = 0


def verify(source: str, out: Any = None) -> dict[str, Any]:
    """``restore --verify``: read and check the archive; change nothing. AdminError if bad."""
    manifest, got = read_archive(source, None)
    counts = manifest.get("counts", {})
    kind = "incremental backup" if manifest.get("since") else "backup"
    made = datetime.datetime.fromtimestamp(float(manifest["started"])).isoformat(timespec="seconds")
    print(f"{source}: OK: {kind} of {manifest.get('hostname')} begun {made}, "
          f"{len(got.members)} files ({counts.get('messages', 0)} messages, "
          f"{counts.get('queued', 0)} queued), {counts.get('bytes', 0)} bytes, every checksum "
          "matches", file=out or sys.stdout)
    return manifest


def restore(config: Config, source: str, out: Any = None) -> RestoreSummary:
    """Restore ``source`` into ``config``'s ``state_dir`` (empty, or a running server's).

    The archive is staged and checked first; nothing is put in place unless every checksum
    matches. See the module docstring for what is merged and what is kept.
    """
    state_dir = config.server.state_dir
    owner = StateOwner(state_dir)
    with owner.acting():
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise AdminError(f"cannot create state_dir {state_dir}: {e.strerror}")
        _remove_stale_staging(state_dir)
        staging = state_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        try:
            manifest, got = read_archive(source, staging, owner)
            summary = _commit(config, manifest, got)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"restored {source} into {state_dir}: {summary.restored} files put in place "
          f"({summary.queued} queued messages), {summary.duplicates} messages already there, "
          f"{summary.same} files unchanged, {summary.accounts} accounts merged", file=out or sys.stdout)
    for path in summary.kept[:20]:
        print(f"kept {path}: it exists with other contents (the archive's copy was not used)",
              file=sys.stderr)
    if len(summary.kept) > 20:
        print(f"... and {len(summary.kept) - 20} more files kept", file=sys.stderr)
    return summary


def _remove_stale_staging(state_dir: Path) -> None:
    for name in _listdir(state_dir):
        if not name.startswith(STAGING_PREFIX):
            continue
        pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(state_dir / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(config: Config, manifest: dict[str, Any], got: _Read) -> RestoreSummary:
    root = config.server.state_dir
    summary = RestoreSummary()
    touched: set[Path] = set()
    for rel in sorted(got.dirs, key=lambda r: r.count("/")):
        path = root / rel
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            touched.add(path.parent)
    present: dict[Path, set[str]] = {}

    def staged_of(member: _Member) -> Path:
        if member.link is not None:
            member = got.members[member.link]
        assert member.staged is not None
        return member.staged

    envelopes: list[_Member] = []
    passwords = {}
    for rel in sorted(got.members):
        member = got.members[rel]
        if rel.startswith("queue/env/"):
            envelopes.append(member)
            continue
        if rel in ("passwords.json", "passwords.key"):
            passwords[rel] = member
            continue
        dest = root / rel
        if _MAILDIR_MESSAGE.match(rel):
            box = dest.parent.parent
            seen = present.get(box)
            if seen is None:
                seen = {maildir_unique(n) for sub in ("new", "cur")
                        for n in _listdir(box / sub) if not n.startswith(".")}
                present[box] = seen
            unique = maildir_unique(dest.name)
            if unique in seen:
                summary.duplicates += 1
                continue
            seen.add(unique)
        _place(staged_of(member), dest, rel, summary, touched, got)
    _passwords(config, passwords, staged_of, summary, touched, got)
    for member in envelopes:  # bodies are in place: a queued message appears whole
        before = summary.restored
        _place(staged_of(member), root / member.path, member.path, summary, touched, got)
        summary.queued += summary.restored - before
    for folder in touched:
        with contextlib.suppress(OSError):
            fsync_dir(folder)
    if summary.queued:
        from pop3coexist.store.queue import FileQueue

        FileQueue(config.server.queue_dir, config.server.hostname).request_rescan()
    return summary


def _place(staged: Path, dest: Path, rel: str, summary: RestoreSummary, touched: set[Path],
           got: _Read) -> None:
    """Link ``staged`` to ``dest`` unless ``dest`` exists (same contents: unchanged; other
    contents: kept and reported)."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        try:
            os.link(staged, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_into(staged, dest)  # state_dir spans file systems (a mounted mailroot)
    except FileExistsError:
        if _same(staged, dest):
            summary.same += 1
        else:
            summary.kept.append(rel)
        return
    summary.restored += 1
    touched.add(dest.parent)


def _copy_into(staged: Path, dest: Path) -> None:
    """Copy ``staged`` to a temporary name beside ``dest`` (fsynced), then link it to ``dest``
    (FileExistsError when ``dest`` exists, as os.link)."""
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(staged, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 16)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        return _sha(a) == _sha(b)
    except OSError:
        return False


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _passwords(config: Config, members: dict[str, _Member], staged_of: Any,
               summary: RestoreSummary, touched: set[Path], got: _Read) -> None:
    """The password file and its key: put in place when the state has none; else merged
    address by address (an address already there keeps its password)."""
    if not members:
        return
    root = config.server.state_dir
    json_member, key_member = members.get("passwords.json"), members.get("passwords.key")
    target_json, target_key = config.server.password_file, config.server.key_file
    if not target_json.exists():
        if key_member is not None:
            _place(staged_of(key_member), target_key, "passwords.key", summary, touched, got)
        if json_member is not None:
            _place(staged_of(json_member), target_json, "passwords.json", summary, touched, got)
        return
    if json_member is None:
        if key_member is not None:
            _place(staged_of(key_member), target_key, "passwords.key", summary, touched, got)
        return
    from pop3coexist.identity.passwordfile import PasswordFile

    mine = PasswordFile(target_json, target_key, keep_secrets=True)
    staged_key = staged_of(key_member) if key_member is not None else root / ".no-such-key"
    theirs = PasswordFile(staged_of(json_member), staged_key, keep_secrets=True)
    if key_member is not None and not target_key.exists():
        _place(staged_key, target_key, "passwords.key", summary, touched, got)
    try:
        added, dropped = mine.merge_from(theirs)
    except StoreError as e:
        raise AdminError(f"cannot merge the password file: {e}")
    summary.accounts += added
    if dropped:
        print(f"{dropped} merged account(s) lost their APOP/CRAM-MD5 secret (the archive's "
              "passwords.key is not this server's): APOP works for them after `mailbox passwd`",
              file=sys.stderr)


def iter_manifest_paths(manifest: dict[str, Any]) -> Iterator[str]:
    """Every file path a manifest lists (tests and tools)."""
    for entry in manifest.get("files", []):
        yield entry["path"]
