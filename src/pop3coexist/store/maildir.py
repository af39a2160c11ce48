"""The Maildir mail store: implements ``interfaces.IMailStore`` and ``interfaces.IMaildrop``.

On disk (README "On disk")::

    <root>/<domain>/<mailbox>/{tmp,new,cur}     plain Maildir, readable by any Maildir tool
    <root>/<domain>/.pop3coexist.json           domain metadata   {"locked": bool}
    <root>/<domain>/.pop3coexist.aliases.json   aliases and lists (store/aliases.py)
    <root>/<domain>/<mailbox>/.pop3coexist.json mailbox metadata  {"locked": bool, "quota": int|null}
    <root>/<domain>/<mailbox>/.pop3coexist.lock POP3 session lock (flock, exclusive)
    <root>/<domain>/<mailbox>/.pop3coexist.quota.lock  quota check + delivery (flock; only
                                                when the mailbox has a quota)
    <root>/.spool/                              where writers build a message before delivery
    <root>/.spool/<node>/                       the same, for node ``<node>`` of several sharing
                                                the mail root (``server.local_dir``): each node
                                                cleans only its own at start

Messages get maildir(5) unique names ``<sec>.M<usec>P<pid>Q<n>R<hex>.<host>`` plus the
Dovecot-style ``,S=<bytes>,W=<POP3 bytes>`` fields, so neither quota nor POP3 sizes need to
read the files. The POP3 size is that of the message's canonical form (``crlf_size``: CRLF
line ends, a final CRLF added when missing), the form RETR and TOP send whatever line ends a
Maildir writer left in the file. A delivery is written to ``tmp/``, fsynced, renamed into
``new/`` and ``new/`` is fsynced before any method returns; ``deliver_file`` and
``deliver_within_quota`` hard-link one fsynced spool file into every recipient's ``new/``
(single-instance storage). A quota is a byte limit with a grace (``quota_refuses``: the last
message may go past it by the grace; a mailbox at or over it takes nothing more), checked and
written under a per-mailbox flock. Metadata files are replaced atomically
(temp file, fsync, rename, fsync folder) under an ``fcntl.flock`` so two admin processes can
change them at once; nothing is cached, so a running server sees a change at its next call.

Everything here is blocking and knows nothing of Twisted or sockets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from zope.interface import implementer

from pop3coexist import errors
from pop3coexist.address import is_valid_mailbox_name, normalise_domain
from pop3coexist.canonical import canonical_size
from pop3coexist.config import QuotaGrace
from pop3coexist.fsutil import (
    current_pid,
    missing_cached,
    open_cached_file,
    read_cached,
    retry_stale,
    stat_cached,
)
from pop3coexist.fsutil import fsync_dir as _fsync_dir
from pop3coexist.interfaces import (
    Distribution,
    IAliasTable,
    IBatchDelivery,
    ICachedDomainList,
    ICachedMailboxCheck,
    ICachedMessageOpen,
    ICachedMessageRead,
    IMaildrop,
    IMailStore,
    IQuotaCheck,
)

__all__ = ["MaildirStore", "Maildrop", "crlf_size", "unique_part", "uidl_for_name"]

META_NAME = ".pop3coexist.json"
META_LOCK_NAME = ".pop3coexist.json.lock"
SESSION_LOCK_NAME = ".pop3coexist.lock"
QUOTA_LOCK_NAME = ".pop3coexist.quota.lock"  # held while a delivery checks the quota and links
SPOOL_NAME = ".spool"
SPOOL_CHECK_INTERVAL = 1.0  # seconds between spool_dir's checks on disk
ROOT_RACY_WINDOW = 0.1  # seconds: a domain listing this close to the root's last change is not kept
SUBDIRS = ("tmp", "new", "cur")
TMP_MAX_AGE = 36 * 3600  # maildir(5): files in tmp/ untouched for 36 hours are garbage

_CHUNK = 1 << 16
_SIZE_FIELD_RE = re.compile(r",([SW])=(\d+)(?=,|\Z)")
_UNIQUE_SPLIT_RE = re.compile(r",[SW]=")
_TIME_RE = re.compile(r"(\d+)(?:\.M(\d+))?")
_UIDL_OK_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")

_counter = itertools.count(1)
_counter_lock = threading.Lock()

# Quota usage, kept per new/ or cur/ folder (README "IMAP", quota): the folder's path ->
# _FolderUsage. Adding, removing or renaming a file in a folder changes its mtime, whichever
# process does it (a delivery, POP3, an IMAP session, Dovecot), so an entry whose key still
# matches is still right; a changed folder is listed again and only the names that came or
# went are sized. A folder changed within USAGE_RACY_WINDOW seconds of its listing gets no
# key (a second change in the same clock tick would leave the same mtime): it is listed again
# at the next check. Per process, in memory: no shared file to lock.
USAGE_RACY_WINDOW = 2.0  # seconds (as Dovecot's maildir "dirty" window; NFS clocks differ)
USAGE_CACHE_NAMES = 50_000  # file names kept over all folders (about 175 bytes each: ~9 MB)
_usage_cache: dict[str, _FolderUsage] = {}
_usage_names = [0]  # names held by _usage_cache
_usage_lock = threading.Lock()
_SIZE_S_RE = re.compile(r",S=(\d+)(?=,|\Z)")


@dataclass(frozen=True, slots=True)
class _FolderUsage:
    """One new/ or cur/ folder's usage: ``key`` (st_dev, st_ino, st_mtime_ns) of the folder
    when listed, or None (changed too recently to trust); ``sizes``: message file name ->
    bytes (``,S=`` or the file's size); ``total``: their sum."""

    key: tuple[int, int, int] | None
    sizes: dict[str, int]
    total: int


# -- helpers for callers ----------------------------------------------------------------------


def crlf_size(path_or_file: str | os.PathLike[str] | IO[bytes]) -> int:
    """The size in octets of a message as POP3 sends it (LIST, STAT, RETR's ``+OK n octets``).

    That is the size of the message's canonical form (``pop3coexist.canonical``), which
    ``pop3.stream.DotStuffer`` sends from the same bytes: every line end (CRLF, a bare LF, a
    bare CR, CR CR LF) is one CRLF, a last line with no line end gets a CRLF, and every other
    byte (NUL included) is itself. Dot-stuffing is not counted: the client removes it (RFC
    1939 section 3), so a client that reads exactly this many octets of unstuffed lines stays
    in step. An empty file is 0.

    Takes a path or a binary file object; a seekable file is read from its start and its
    position is restored afterwards. The file is read once, in chunks. Raises OSError.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return _crlf_size_of(f)
    f = path_or_file
    try:
        position = f.tell()
        f.seek(0)
    except (AttributeError, OSError):
        return _crlf_size_of(f)
    try:
        return _crlf_size_of(f)
    finally:
        f.seek(position)


def _read_whole(path: str) -> bytes:
    """The contents of the file ``path``, read with os-level calls (open, read until the end,
    close): no buffered reader, so none of its isatty ioctl and lseek (issue 17). OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _sizes_of(path: str) -> tuple[int, int]:
    """``(size in octets, crlf_size)`` of the file ``path``: one open, one fstat, the reads;
    the same figures as ``os.stat(path).st_size`` and ``crlf_size(path)`` without the
    buffered reader's isatty ioctl and lseek (issue 17). OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size, canonical_size(iter(lambda: os.read(fd, _CHUNK), b""))
    finally:
        os.close(fd)


def _crlf_size_of(f: IO[bytes]) -> int:
    return canonical_size(iter(lambda: f.read(_CHUNK), b""))


def _crlf_size_of_bytes(data: bytes) -> int:
    return canonical_size((data,))


def unique_part(name: str) -> str:
    """The maildir(5) unique part of a file name: before the ``:`` info and the size fields."""
    base = name.split(":", 1)[0]
    return _UNIQUE_SPLIT_RE.split(base, maxsplit=1)[0]


def uidl_for_name(name: str) -> str:
    """The POP3 UIDL of a Maildir file name (RFC 1939: 1-70 characters in 0x21-0x7E).

    The unique part when it qualifies, else a hex digest of it; the same before and after
    the file moves from ``new/`` to ``cur/`` and gains flags.
    """
    unique = unique_part(name)
    if _UIDL_OK_RE.match(unique):
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()


def _size_fields(name: str) -> dict[str, int]:
    base = name.split(":", 1)[0]
    return {key: int(value) for key, value in _SIZE_FIELD_RE.findall(base)}


def _sanitise_host(host: str) -> str:
    # maildir(5) / Dovecot: '/' and ':' (and ',' for the size fields) must not appear.
    out = []
    for ch in host or "localhost":
        if ch == "/":
            out.append("\\057")
        elif ch == ":":
            out.append("\\072")
        elif ch == ",":
            out.append("\\054")
        elif 0x21 <= ord(ch) <= 0x7E:
            out.append(ch)
        else:
            out.append(f"\\{ord(ch) & 0xFF:03o}")
    return "".join(out)


def _is_message_entry(entry: os.DirEntry[str]) -> bool:
    """A message file in new/ or cur/: no dot-files, no symlinks, no folders."""
    if entry.name.startswith("."):
        return False
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _scan(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if _is_message_entry(entry):
                    yield entry
    except FileNotFoundError:
        return


def _delivery_key(name: str, mtime: float) -> tuple[int, int, str]:
    match = _TIME_RE.match(name)
    if match:
        return int(match.group(1)), int(match.group(2) or 0), name
    return int(mtime), 0, name


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Turn an OSError into a StoreError that says what failed, where and why."""
    try:
        yield
    except errors.StoreError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise errors.StoreError(f"{what}: {exc.strerror or exc}{where}") from exc


@contextlib.contextmanager
def _flocked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _file_size(folder: str, name: str) -> int | None:
    """The bytes a message file counts for the quota: its name's ``,S=`` (maildir(5) as
    Dovecot writes it; such a name is taken to be a file), else its size when it is a
    regular file; None for a dot-file, a folder, a symlink or a file gone meanwhile."""
    if name.startswith("."):
        return None
    m = _SIZE_S_RE.search(name.partition(":")[0])
    if m:
        return int(m.group(1))
    try:
        st = os.lstat(f"{folder}/{name}")
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _folder_usage(folder: str, now: float) -> tuple[int, int] | None:
    """(messages, bytes) in one new/ or cur/ folder (see ``_file_size``); None when it is
    not a folder. From ``_usage_cache`` while the folder's (device, inode, mtime) is what it
    was when last listed; else listed again (its mtime read first, so a change during or
    after the listing shows as a new mtime) and only the names not in the last listing are
    sized. The key is kept only when that mtime is USAGE_RACY_WINDOW seconds old or more."""
    try:
        st = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    entry = _usage_cache.get(folder)
    if entry is not None and entry.key == key:
        return len(entry.sizes), entry.total
    try:
        listing = set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if entry is None:
        sizes: dict[str, int] = {}
        total = 0
        added = listing
    else:
        sizes = dict(entry.sizes)
        total = entry.total
        for name in sizes.keys() - listing:
            total -= sizes.pop(name)
        added = listing - sizes.keys()
    for name in added:
        size = _file_size(folder, name)
        if size is not None:
            sizes[name] = size
            total += size
    fresh = _FolderUsage(key if now - st.st_mtime >= USAGE_RACY_WINDOW else None, sizes, total)
    with _usage_lock:
        old = _usage_cache.pop(folder, None)
        _usage_names[0] -= len(old.sizes) if old is not None else 0
        while _usage_cache and _usage_names[0] + len(sizes) > USAGE_CACHE_NAMES:
            _usage_names[0] -= len(_usage_cache.pop(next(iter(_usage_cache))).sizes)
        if len(sizes) <= USAGE_CACHE_NAMES:
            _usage_cache[folder] = fresh  # the most recent last: evicted last
            _usage_names[0] += len(sizes)
    return len(sizes), total


# -- the store ---------------------------------------------------------------------------------


@implementer(IMailStore, IQuotaCheck, IBatchDelivery, ICachedMailboxCheck, IAliasTable,
             ICachedDomainList)
class MaildirStore:
    """Mail domains and Maildir mailboxes under ``root``. See ``IMailStore``.

    ``hostname`` goes into new file names (default: this host's name).
    """

    def __init__(
        self, root: Path | str, *, hostname: str | None = None, quota_grace: QuotaGrace | None = None,
        node: str = "",
    ) -> None:
        self.root = Path(root)
        self._root_str = str(self.root)
        self.node = node
        self._spool = self.root / SPOOL_NAME / node if node else self.root / SPOOL_NAME  # "" alone; a node id when several servers share the mail root
        self._host = _sanitise_host(hostname if hostname is not None else socket.gethostname())
        self.quota_grace = quota_grace or QuotaGrace()  # none unless the config gives one
        self._spool_checked = -SPOOL_CHECK_INTERVAL  # time.monotonic() of spool_dir's last check
        self._domains_cache: tuple[tuple[int, int, int, int], tuple[str, ...]] | None = None
        from pop3coexist.store.aliases import AliasFiles

        self.aliases = AliasFiles(self.root)

    def __repr__(self) -> str:
        return f"<MaildirStore root={str(self.root)!r}>"

    # -- names and paths

    @staticmethod
    def _domain_name(domain: str) -> str:
        if not isinstance(domain, str):
            raise ValueError("domain name must be text")
        return normalise_domain(domain)  # AddressError is a ValueError

    @staticmethod
    def _mailbox_name(mailbox: str) -> str:
        if not isinstance(mailbox, str):
            raise ValueError("mailbox name must be text")
        name = mailbox.lower()
        if not is_valid_mailbox_name(name):
            raise ValueError(
                f"invalid mailbox name {mailbox!r}: 1-64 characters of letters, digits and "
                "!#$%&'*+=?^_`{|}~.- without a leading, trailing or double dot"
            )
        return name

    def _domain_path(self, domain: str) -> tuple[str, Path]:
        name = self._domain_name(domain)
        return name, self.root / name

    def _existing_domain(self, domain: str) -> tuple[str, Path]:
        name, path = self._domain_path(domain)
        if not _is_folder(path):
            raise errors.NoSuchMailbox(f"no such domain: {name}")
        return name, path

    def _mailbox_path(self, domain: str, mailbox: str) -> tuple[str, str, Path]:
        dname, dpath = self._domain_path(domain)
        mname = self._mailbox_name(mailbox)
        return dname, mname, dpath / mname

    def _existing_mailbox(self, domain: str, mailbox: str) -> tuple[str, str, Path]:
        dname, mname, path = self._mailbox_path(domain, mailbox)
        if not self._is_maildir(path):
            if not _is_folder(path.parent):
                raise errors.NoSuchMailbox(f"no such domain: {dname}")
            raise errors.NoSuchMailbox(f"no such mailbox: {mname}@{dname}")
        return dname, mname, path

    @staticmethod
    def _is_maildir(path: Path) -> bool:
        return _is_folder(path / "new") and _is_folder(path / "cur")

    def _unique_name(self) -> str:
        ns = time.time_ns()
        with _counter_lock:
            n = next(_counter)
        return (
            f"{ns // 1_000_000_000}.M{(ns // 1000) % 1_000_000}P{current_pid()}Q{n}"
            f"R{secrets.token_hex(8)}.{self._host}"
        )

    def _ensure_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                _fsync_dir(self.root.parent)

    def check_writable(self) -> None:
        """See ``IMailStore.check_writable``."""
        try:
            self._ensure_root()
            self.spool_dir()
            for leftover in self.root.glob(".removed.*"):  # a removal a crash interrupted
                shutil.rmtree(leftover, ignore_errors=True)
            probe = self.root / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(probe)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise errors.StoreError(f"mail root {self.root} is not writable: {reason}") from exc

    # -- metadata

    def _read_meta(self, folder: Path | str) -> dict[str, Any]:
        path = f"{os.fspath(folder)}/{META_NAME}"
        try:
            raw = retry_stale(lambda: _read_whole(path))  # another node may rename a new one over it
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise errors.StoreError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise errors.StoreError(f"damaged metadata file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise errors.StoreError(f"damaged metadata file {path}: not a JSON object")
        locked = data.get("locked", False)
        quota = data.get("quota")
        if not isinstance(locked, bool) or not (
            quota is None or (isinstance(quota, int) and not isinstance(quota, bool) and quota >= 0)
        ):
            raise errors.StoreError(f"damaged metadata file {path}: bad 'locked' or 'quota'")
        return data

    def _update_meta(self, folder: Path, **changes: Any) -> None:
        """Read-modify-write one metadata file under its flock, replaced atomically."""
        with _flocked(folder / META_LOCK_NAME):
            data = self._read_meta(folder)
            data.update(changes)
            tmp = folder / f"{META_NAME}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.write(fd, json.dumps(data, sort_keys=True).encode() + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, folder / META_NAME)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(folder)

    # -- aliases and lists

    def distribution(self, address: str) -> Distribution | None:
        """See ``IAliasTable.distribution`` (store/aliases.py)."""
        return self.aliases.distribution(address)

    # -- domains

    def list_domains(self) -> list[str]:
        """See ``IMailStore.list_domains``. Every RCPT asks (through the checkers), so the
        answer is kept while the mail root's own status (inode, mtime, ctime, link count:
        a domain folder added, removed or renamed changes them) stays the same; a listing
        made within ROOT_RACY_WINDOW seconds of the last change is not kept (a second change
        in the same clock tick would not show in the mtime)."""
        with _io_errors("cannot list the domains"):
            try:
                st = os.stat(self.root)
            except FileNotFoundError:
                return []
            signature = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
            cached = self._domains_cache
            if cached is not None and cached[0] == signature:
                return list(cached[1])
            try:
                entries = list(os.scandir(self.root))
            except FileNotFoundError:
                return []
            names = []
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
                    continue
                try:
                    if normalise_domain(entry.name) == entry.name:
                        names.append(entry.name)
                except ValueError:
                    continue
            names.sort()
            settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > ROOT_RACY_WINDOW * 1e9
            self._domains_cache = (signature, tuple(names)) if settled else None
            return names

    def domain_exists(self, domain: str) -> bool:
        """See ``IMailStore.domain_exists``."""
        _, path = self._domain_path(domain)
        return _is_folder(path)

    def add_domain(self, domain: str) -> bool:
        """See ``IMailStore.add_domain``."""
        with _io_errors(f"cannot add domain {domain}"):
            _, path = self._domain_path(domain)
            self._ensure_root()
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                if not path.is_dir():
                    raise errors.StoreError(f"{path} exists and is not a folder")
                return False
            _fsync_dir(self.root)
            return True

    def remove_domain(self, domain: str) -> None:
        """See ``IMailStore.remove_domain``."""
        with _io_errors(f"cannot remove domain {domain}"):
            _, path = self._existing_domain(domain)
            self._remove_tree(path)

    def _remove_tree(self, path: Path) -> None:
        # Rename first, so the domain or mailbox vanishes at once; then delete at leisure.
        # A crash in between leaves a dot-folder that listings ignore.
        graveyard = self.root / f".removed.{self._unique_name()}"
        try:
            os.rename(path, graveyard)
        except FileNotFoundError:
            raise errors.NoSuchMailbox(f"{path} no longer exists")
        _fsync_dir(path.parent)
        shutil.rmtree(graveyard, ignore_errors=True)

    def set_domain_locked(self, domain: str, locked: bool) -> None:
        """See ``IMailStore.set_domain_locked``."""
        with _io_errors(f"cannot change the lock of domain {domain}"):
            _, path = self._existing_domain(domain)
            self._update_meta(path, locked=bool(locked))

    def is_domain_locked(self, domain: str) -> bool:
        """See ``IMailStore.is_domain_locked``."""
        with _io_errors(f"cannot read the lock of domain {domain}"):
            _, path = self._existing_domain(domain)
            return bool(self._read_meta(path).get("locked", False))

    # -- mailboxes

    def list_mailboxes(self, domain: str) -> list[str]:
        """See ``IMailStore.list_mailboxes``."""
        with _io_errors(f"cannot list the mailboxes of {domain}"):
            _, path = self._existing_domain(domain)
            names = []
            with os.scandir(path) as it:
                for entry in it:
                    if entry.name.startswith(".") or not is_valid_mailbox_name(entry.name):
                        continue
                    if entry.is_dir() and self._is_maildir(Path(entry.path)):
                        names.append(entry.name)
            return sorted(names)

    def mailbox_folder(self, domain: str, mailbox: str) -> Path:
        """The folder of an existing mailbox (where ``store.sievestore`` keeps its scripts);
        ``errors.NoSuchMailbox`` when it does not exist, ValueError for a bad name."""
        return self._existing_mailbox(domain, mailbox)[2]

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        """See ``IMailStore.mailbox_exists``."""
        _, _, path = self._mailbox_path(domain, mailbox)
        return self._is_maildir(path)

    def add_mailbox(self, domain: str, mailbox: str) -> bool:
        """See ``IMailStore.add_mailbox``. The Maildir appears complete or not at all."""
        with _io_errors(f"cannot add mailbox {mailbox}@{domain}"):
            dname, mname, path = self._mailbox_path(domain, mailbox)
            dpath = path.parent
            if not dpath.is_dir():
                raise errors.NoSuchMailbox(f"no such domain: {dname}")
            if self._is_maildir(path):
                return False
            if path.is_dir():  # a half-made folder (by hand, or an old crash): complete it
                for sub in SUBDIRS:
                    (path / sub).mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(path)
                return True
            building = dpath / f".new.{self._unique_name()}"
            building.mkdir(mode=0o700)
            try:
                for sub in SUBDIRS:
                    (building / sub).mkdir(mode=0o700)
                _fsync_dir(building)
                try:
                    os.rename(building, path)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                        return False  # someone else made it just now
                    raise
            finally:
                if building.exists():
                    shutil.rmtree(building, ignore_errors=True)
            _fsync_dir(dpath)
            return True

    def remove_mailbox(self, domain: str, mailbox: str) -> None:
        """See ``IMailStore.remove_mailbox``."""
        with _io_errors(f"cannot remove mailbox {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            self._remove_tree(path)

    def set_mailbox_locked(self, domain: str, mailbox: str, locked: bool) -> None:
        """See ``IMailStore.set_mailbox_locked``."""
        with _io_errors(f"cannot change the lock of {mailbox}@{domain}"):
            dname, mname, path = self._existing_mailbox(domain, mailbox)
            if not locked and self._read_meta(path.parent).get("locked", False):
                raise errors.AdminError(
                    f"cannot unlock mailbox {mname}@{dname}: domain {dname} is locked "
                    "(unlock the domain first)"
                )
            self._update_meta(path, locked=bool(locked))

    def is_mailbox_locked(self, domain: str, mailbox: str) -> bool:
        """See ``IMailStore.is_mailbox_locked``."""
        with _io_errors(f"cannot read the lock of {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            if self._read_meta(path.parent).get("locked", False):
                return True
            return bool(self._read_meta(path).get("locked", False))

    def set_quota(self, domain: str, mailbox: str, limit: int | None) -> None:
        """See ``IMailStore.set_quota``. ``limit`` is a whole number of bytes >= 0, or None."""
        with _io_errors(f"cannot set the quota of {mailbox}@{domain}"):
            if limit is not None and (
                not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
            ):
                raise ValueError("quota must be a whole number of bytes (0 or more) or None")
            _, _, path = self._existing_mailbox(domain, mailbox)
            self._update_meta(path, quota=limit)

    def get_quota(self, domain: str, mailbox: str) -> int | None:
        """See ``IMailStore.get_quota``."""
        with _io_errors(f"cannot read the quota of {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            return self._read_meta(path).get("quota")

    def usage(self, domain: str, mailbox: str) -> tuple[int, int]:
        """See ``IMailStore.usage``: sizes from ``,S=`` in names, ``stat`` otherwise."""
        with _io_errors(f"cannot count the mail of {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            return self._usage(path)

    @staticmethod
    def _usage(path: Path) -> tuple[int, int]:
        """(messages, bytes) in the mailbox: INBOX and its IMAP folders (the Maildir++
        subfolders ``.Name`` with a ``cur/``, README "IMAP"), as the quota counts them. Each
        folder's new/ and cur/ are scanned only when changed since this process last did
        (``_folder_usage``): a quota check costs a listing of the mailbox and two stat calls
        a folder, plus a scan of what changed."""
        count = 0
        total = 0
        now = time.time()
        folders = [str(path)]
        with contextlib.suppress(OSError), os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith(".") and not entry.name.startswith("..") and \
                        entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
        for folder in folders:
            cur = _folder_usage(f"{folder}/cur", now)
            if cur is None:
                continue  # no cur/: not a folder
            new = _folder_usage(f"{folder}/new", now) or (0, 0)
            count += cur[0] + new[0]
            total += cur[1] + new[1]
        return count, total

    def would_exceed_quota(self, domain: str, mailbox: str, size: int) -> bool:
        """True when a message of ``size`` bytes would be refused by the mailbox's quota (RCPT
        check, ``quota_refuses``): at or over its quota, or past quota + grace with it."""
        with _io_errors(f"cannot check the quota of {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            return self._would_exceed(path, size)

    def list_domains_cached(self) -> list[str] | None:
        """See ``ICachedDomainList``: the list ``list_domains`` kept, while the mail root's
        status from the kernel's cache (``stat_cached``) has the signature it was kept for."""
        cached = self._domains_cache
        if cached is None:
            return None
        st = stat_cached(self._root_str)
        if st is None or (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink) != cached[0]:
            return None
        return list(cached[1])

    def mailbox_fits_cached(self, domain: str, mailbox: str) -> bool:
        """See ``ICachedMailboxCheck``: ``new/`` and ``cur/`` are folders and the metadata file
        (where a quota is kept) is known to be absent, all from the kernel's cache (no
        metadata file: no quota, as ``_would_exceed`` reads it)."""
        try:
            # str paths: RCPT asks this for every recipient (issue 17)
            path = f"{self._root_str}/{self._domain_name(domain)}/{self._mailbox_name(mailbox)}"
        except ValueError:
            return False
        for sub in ("/new", "/cur"):
            st = stat_cached(path + sub)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return False
        return missing_cached(f"{path}/{META_NAME}")

    def _would_exceed(self, path: Path, size: int) -> bool:
        quota = self._read_meta(path).get("quota")
        if quota is None:
            return False
        return self.quota_refuses(self._usage(path)[1], size, quota)

    @contextlib.contextmanager
    def quota_locked(self, domain: str, mailbox: str) -> Iterator[int | None]:
        """Hold the mailbox's quota lock (the flock ``deliver_within_quota`` takes, across
        processes) while a caller checks the quota and writes (IMAP APPEND); yields the
        quota in bytes, or None (no quota: no lock is taken). StoreError on an I/O error."""
        with _io_errors(f"cannot check the quota of {mailbox}@{domain}"):
            _, _, path = self._existing_mailbox(domain, mailbox)
            quota = self._read_meta(path).get("quota")
            lock = _flocked(path / QUOTA_LOCK_NAME) if quota is not None else \
                contextlib.nullcontext()
        with lock:
            yield quota

    def quota_refuses(self, usage: int, size: int, quota: int | None) -> bool:
        """The quota rule, in bytes: a message of ``size`` fits when ``usage + size <= quota``;
        past the quota it still fits while the mailbox is under its quota and the excess stays
        within the grace (``domains.quota_grace``, as Dovecot's ``quota_grace``); a mailbox at
        or over its quota takes nothing more, whatever the size (so RCPT without ``SIZE=``,
        which asks with size 0, is refused for a mailbox exactly at its quota). ``quota`` None:
        no limit."""
        if quota is None:
            return False
        if usage >= quota:
            return True
        size = max(int(size), 0)
        if usage + size <= quota:
            return False
        return usage + size > quota + self.quota_grace.allowance(quota)

    # -- delivery

    def spool_dir(self) -> Path:
        """See ``IMailStore.spool_dir``: ``<root>/.spool`` (``<root>/.spool/<node>`` for a node of
        several: on the shared volume, so single-instance links still work), created when missing. Checked on
        disk at most once per SPOOL_CHECK_INTERVAL seconds (every message asks; a folder
        removed meanwhile is made again by the next spool file: ``smtp.incoming.SpoolWriter``)."""
        now = time.monotonic()
        if 0 <= now - self._spool_checked < SPOOL_CHECK_INTERVAL:
            return self._spool  # made once: the same Path (and its str) for every message
        spool = self._spool
        with _io_errors(f"cannot create the spool folder under {self.root}"):
            if not spool.is_dir():
                self._ensure_root()
                spool.mkdir(mode=0o700, parents=True, exist_ok=True)
                _fsync_dir(spool.parent)
        self._spool_checked = now
        return spool

    def clean_spool(self, max_age: float = TMP_MAX_AGE, now: float | None = None) -> int:
        """Remove spool files older than ``max_age`` seconds (left by a crash); return how many."""
        with _io_errors(f"cannot clean the spool folder under {self.root}"):
            return self._clean_folder(self.root / SPOOL_NAME, max_age, now)

    @staticmethod
    def _clean_folder(folder: Path, max_age: float, now: float | None) -> int:
        now = time.time() if now is None else now
        removed = 0
        for entry in _scan(folder):
            try:
                st = entry.stat(follow_symlinks=False)
                if now - max(st.st_mtime, st.st_ctime, st.st_atime) > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def deliver_file(
        self,
        source: Path | str,
        recipients: list[tuple[str, str]],
        *,
        enforce_quota: bool = True,
        sync: bool = True,
    ) -> list[Path]:
        """See ``IMailStore.deliver_file``.

        ``sync=False`` skips the fsync of the ``new/`` folders: the caller makes the returned
        paths' folders durable itself (the SMTP group commit syncs a whole batch at once).

        All recipients are checked (names, existence, quota) before anything is written; if a
        link fails part-way, the links already made are removed again and ``StoreError`` is
        raised, so a delivery happens everywhere or nowhere. ``QuotaExceeded`` carries the
        ``(domain, mailbox)`` that is full as ``.recipient``.
        """
        source = Path(source)
        targets = [self._existing_mailbox(d, m) for d, m in recipients]
        try:
            size = os.stat(source).st_size
            wsize = crlf_size(source)
        except OSError as exc:
            raise errors.StoreError(f"cannot read spooled message {source}: {exc.strerror}") from exc
        if enforce_quota:
            for dname, mname, path in targets:
                with _io_errors(f"cannot check the quota of {mname}@{dname}"):
                    full = self._would_exceed(path, size)
                if full:
                    exc = errors.QuotaExceeded(f"mailbox {mname}@{dname} is over its quota")
                    exc.recipient = (dname, mname)  # type: ignore[attr-defined]
                    raise exc
        written: list[Path] = []
        folders: list[Path] = []
        try:
            for _dname, _mname, path in targets:
                new = path / "new"
                written.append(Path(self._link_into(source, new, size, wsize)))
                if new not in folders:
                    folders.append(new)
            for folder in folders if sync else ():
                _fsync_dir(folder)
        except OSError as exc:
            for done in written:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            raise errors.StoreError(f"delivery failed: {exc.strerror or exc}") from exc
        return written

    def deliver_within_quota(
        self,
        source: Path | str,
        recipients: list[tuple[str, str]],
        *,
        sync: bool = True,
        prefix: bytes = b"",
    ) -> tuple[list[Path], list[tuple[str, str]]]:
        """See ``IMailStore.deliver_within_quota``: deliver the fsynced file ``source`` to each
        ``(domain, mailbox)`` that has room for it (``quota_refuses``) and return
        ``(paths written, recipients refused for their quota)``.

        Each mailbox with a quota is checked and written under its quota lock (an flock, so
        two messages that end at once in any processes cannot both slip under one limit).
        Without ``prefix`` the file is hard-linked (single-instance storage); with it (the
        ``Return-Path`` line of a local delivery from the queue) each mailbox gets a copy that
        starts with ``prefix``. ``sync=False`` skips the fsync of the ``new/`` folders (the
        caller syncs them) and returns the paths written as str. ``NoSuchMailbox`` for an unknown recipient is raised before
        anything is written; an I/O error removes what was written and raises ``StoreError``.
        """
        # str paths throughout (issue 17: per accepted message, pathlib's joins and str()
        # cost more than the system calls); the paths written are returned as Path, or
        # with sync=False (IBatchDelivery: the SMTP group commit) as str
        source = os.fspath(source)
        targets = [self._existing_mailbox_str(d, m) for d, m in recipients]
        try:
            size, wsize = _sizes_of(source)
        except OSError as exc:
            raise errors.StoreError(f"cannot read spooled message {source}: {exc.strerror}") from exc
        size += len(prefix)
        wsize += _crlf_size_of_bytes(prefix)
        written: list[str | Path] = []
        refused: list[tuple[str, str]] = []
        folders: list[str] = []
        try:
            for recipient, (dname, mname, path) in zip(recipients, targets, strict=True):
                with _io_errors(f"cannot check the quota of {mname}@{dname}"):
                    quota = self._read_meta(path).get("quota")
                lock = _flocked(f"{path}/{QUOTA_LOCK_NAME}") if quota is not None else \
                    contextlib.nullcontext()
                new = f"{path}/new"
                with lock:
                    if quota is not None and self.quota_refuses(self._usage(path)[1], size, quota):
                        refused.append(recipient)
                        continue
                    if prefix:
                        with open(source, "rb") as f:
                            written.append(self._write_message(Path(path), _Prefixed(prefix, f),
                                                               size, wsize, fsync_new=False))
                    else:
                        written.append(self._link_into(source, new, size, wsize))
                if new not in folders:
                    folders.append(new)
            for folder in folders if sync else ():
                _fsync_dir(folder)
        except (OSError, errors.StoreError) as exc:
            for done in written:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            if isinstance(exc, errors.StoreError):
                raise
            raise errors.StoreError(f"delivery failed: {exc.strerror or exc}") from exc
        if not sync:  # the group commit: it only syncs the folders (and may unlink the files)
            return written, refused
        return [Path(p) for p in written], refused

    def _existing_mailbox_str(self, domain: str, mailbox: str) -> tuple[str, str, str]:
        """``_existing_mailbox`` with the mailbox's path as a str (the delivery's hot path)."""
        dname = self._domain_name(domain)
        mname = self._mailbox_name(mailbox)
        path = f"{self._root_str}/{dname}/{mname}"
        if not (_is_folder(f"{path}/new") and _is_folder(f"{path}/cur")):
            if not _is_folder(f"{self._root_str}/{dname}"):
                raise errors.NoSuchMailbox(f"no such domain: {dname}")
            raise errors.NoSuchMailbox(f"no such mailbox: {mname}@{dname}")
        return dname, mname, path

    def _link_into(self, source: Path | str, new: Path | str, size: int, wsize: int) -> Path | str:
        for _attempt in range(10):
            target = f"{os.fspath(new)}/{self._unique_name()},S={size},W={wsize}"
            try:
                os.link(source, target)
                return target
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOSPC):
                    raise
                # Not linkable (other file system, link limit: EMLINK, or ENOSPC from a
                # GlusterFS brick past storage.max-hardlinks): copy through tmp/ instead. A
                # disk that is really full fails the copy too, with ENOSPC (452 / 4.3.1).
                with open(source, "rb") as f:
                    return self._write_message(Path(new).parent, f, size, wsize,
                                               fsync_new=False)
        raise OSError(errno.EEXIST, "could not find a free unique file name")

    def deliver_bytes(
        self, domain: str, mailbox: str, data: bytes, *, enforce_quota: bool = False
    ) -> Path:
        """See ``IMailStore.deliver_bytes``. With ``enforce_quota`` a full mailbox raises
        ``QuotaExceeded`` and nothing is written."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("message data must be bytes")
        data = bytes(data)
        dname, mname, path = self._existing_mailbox(domain, mailbox)
        with _io_errors(f"cannot check the quota of {mname}@{dname}"):
            full = enforce_quota and self._would_exceed(path, len(data))
        if full:
            exc = errors.QuotaExceeded(f"mailbox {mname}@{dname} is over its quota")
            exc.recipient = (dname, mname)  # type: ignore[attr-defined]
            raise exc
        try:
            return self._write_message(path, data, len(data), _crlf_size_of_bytes(data))
        except OSError as exc:
            raise errors.StoreError(f"delivery to {mname}@{dname} failed: {exc.strerror or exc}") from exc

    def import_message(self, domain: str, mailbox: str, unique: str, data: bytes,
                       mtime: float | None = None, *, check: bool = True,
                       sync: bool = True) -> Path | None:
        """Deliver ``data`` under the maildir unique part ``unique`` (an importer's name, which
        orders the mailbox: it starts ``<seconds>.M<microseconds>``), with the usual size
        fields, through ``tmp/`` (fsync, rename, fsync ``new/``); the file's time becomes
        ``mtime``. No quota. Returns None, writing nothing, when a message with that unique
        part is already in ``new/`` or ``cur/`` (``check=False``: the caller has looked, once
        for many messages; ``sync=False``: the caller fsyncs ``new/`` once for a batch).
        ``StoreError`` on an I/O error (nothing left behind)."""
        dname, mname, path = self._existing_mailbox(domain, mailbox)
        if "/" in unique or ":" in unique or "," in unique or unique.startswith("."):
            raise ValueError(f"bad maildir unique part {unique!r}")
        for sub in ("new", "cur") if check else ():
            for entry in _scan(path / sub):
                if unique_part(entry.name) == unique:
                    return None
        size, wsize = len(data), _crlf_size_of_bytes(data)
        tmp = path / "tmp" / unique
        final = path / "new" / f"{unique},S={size},W={wsize}"
        try:
            (path / "tmp").mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
            os.rename(tmp, final)
            if sync:
                _fsync_dir(path / "new")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise errors.StoreError(f"import into {mname}@{dname} failed: {exc.strerror or exc}") from exc
        return final

    def _write_message(
        self, maildir: Path, data: bytes | BinaryIO, size: int, wsize: int, fsync_new: bool = True
    ) -> Path:
        """tmp/ -> write, fsync -> rename into new/ -> fsync new/ (maildir(5) delivery)."""
        tmpdir = maildir / "tmp"
        tmpdir.mkdir(mode=0o700, exist_ok=True)  # foreign Maildirs sometimes lack tmp/
        unique = self._unique_name()
        tmp = tmpdir / unique
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    if isinstance(data, bytes):
                        out.write(data)
                    else:
                        shutil.copyfileobj(data, out, _CHUNK)
                os.fsync(fd)
            finally:
                os.close(fd)
            final = maildir / "new" / f"{unique},S={size},W={wsize}"
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if fsync_new:
            _fsync_dir(maildir / "new")
        return final

    # -- POP3

    def open_maildrop(self, domain: str, mailbox: str) -> Maildrop:
        """See ``IMailStore.open_maildrop``."""
        dname, mname, path = self._existing_mailbox(domain, mailbox)
        try:
            fd = os.open(path / SESSION_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            lock = os.fdopen(fd, "r+b")  # held until commit or close
        except OSError as exc:
            raise errors.StoreError(f"cannot open the lock of {mname}@{dname}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise errors.MailboxInUse(f"mailbox {mname}@{dname} is in use by another session")
        except OSError as exc:
            lock.close()
            raise errors.StoreError(f"cannot lock {mname}@{dname}: {exc.strerror}") from exc
        try:
            with contextlib.suppress(OSError):
                self._clean_folder(path / "tmp", TMP_MAX_AGE, None)
            with _io_errors(f"cannot read mailbox {mname}@{dname}"):
                return Maildrop(path, lock, f"{mname}@{dname}")
        except BaseException:
            lock.close()
            raise


def _is_folder(path: Path) -> bool:
    """True when ``path`` is a folder, False when nothing (or something else) is there;
    ``errors.StoreError`` when the file system cannot say now (EIO, ENOTCONN, EACCES, ... on a
    shared volume; ESTALE is asked again, ``fsutil.retry_stale``). ``Path.is_dir()`` reads every
    such error as "no folder", so a passing fault of the volume became "no such mailbox": a
    POP3 ``-ERR [AUTH]`` for the right password, an SMTP recipient refused for good, where a
    temporary failure (``[SYS/TEMP]``, 4xx) is the truth."""
    try:
        st = retry_stale(lambda: os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise errors.StoreError(f"cannot look at {path}: {e.strerror}") from e
    return stat.S_ISDIR(st.st_mode)

class _Prefixed:
    """A binary reader: ``prefix``, then the rest of ``f`` (for ``shutil.copyfileobj``)."""

    def __init__(self, prefix: bytes, f: BinaryIO) -> None:
        self._prefix = prefix
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix, b""
            return head
        return self._f.read(n)


class _Message:
    __slots__ = ("folder", "name", "unique", "uidl", "size", "wsize", "named")

    def __init__(self, folder: str, name: str, size: int | None, wsize: int | None) -> None:
        self.folder = folder  # "new" or "cur"
        self.name = name
        self.unique = unique_part(name)
        self.uidl = uidl_for_name(name)
        self.size = size  # octets of the file
        self.wsize = wsize  # POP3 octets (canonical form), None until known
        self.named = False  # the name holds the right ,S= and ,W= fields


@implementer(IMaildrop, ICachedMessageOpen, ICachedMessageRead)
class Maildrop:
    """One POP3 session's snapshot of one Maildir, holding its session lock. See ``IMaildrop``.

    Made by ``MaildirStore.open_maildrop``; ``lock`` is the open, flocked lock file.
    """

    def __init__(self, path: Path, lock: BinaryIO, label: str = "") -> None:
        self.path = Path(path)
        self._base = str(self.path)
        self._lock: BinaryIO | None = lock
        self._label = label or str(path)
        self._messages = self._snapshot()
        self._where: dict[str, tuple[str, str]] | None = None

    def __repr__(self) -> str:
        state = "open" if self._lock is not None else "released"
        return f"<Maildrop {self._label} messages={len(self._messages)} {state}>"

    def _snapshot(self) -> list[_Message]:
        found: list[tuple[tuple[int, int, str], _Message]] = []
        seen: set[str] = set()
        for folder in ("new", "cur"):
            for entry in _scan(self.path / folder):
                fields = _size_fields(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                # The name's ,W= is trusted only beside an ,S= that matches the file's real
                # size: a name copied from another file, or written by a tool with another
                # rule, must not make LIST disagree with RETR (the file is read instead).
                # And only a W= that the canonical form of S octets can have, as text this
                # server or a Maildir MTA writes it: S <= W <= 2 S + 2 (each line end gains
                # a CR at most, a last line without one gains CRLF). A W= outside, or one
                # under S (only a file the canonical rule shortens: a Ctrl-Z end, an mbox
                # From_ line, CR CR LF, rare), is read instead.
                size_hint = fields.get("S")
                wsize_hint = fields.get("W")
                trusted = size_hint == st.st_size and (
                    wsize_hint is None or st.st_size <= wsize_hint <= 2 * st.st_size + 2)
                msg = _Message(folder, entry.name, st.st_size,
                               fields.get("W") if trusted else None)
                msg.named = trusted and "W" in fields
                if msg.uidl in seen:  # the same unique name twice: keep UIDLs unique
                    msg.uidl = hashlib.sha256(
                        f"{folder}/{entry.name}".encode("utf-8", "surrogateescape")
                    ).hexdigest()
                seen.add(msg.uidl)
                found.append((_delivery_key(entry.name, st.st_mtime), msg))
        found.sort(key=lambda pair: pair[0])
        return [msg for _, msg in found]

    def _message(self, index: int) -> _Message:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError("message index must be an int")
        if not 0 <= index < len(self._messages):
            raise IndexError(f"no message with index {index}")
        return self._messages[index]

    def _locate(self, msg: _Message) -> Path | None:
        """The message's current path; another Maildir client may have moved it to cur/."""
        path = self.path / msg.folder / msg.name
        if os.path.lexists(path):
            return path
        if self._where is None:
            self._where = {}
            for folder in ("cur", "new"):
                for entry in _scan(self.path / folder):
                    self._where.setdefault(unique_part(entry.name), (folder, entry.name))
        hit = self._where.get(msg.unique)
        if hit is None:
            return None
        msg.folder, msg.name = hit
        return self.path / hit[0] / hit[1]

    def __len__(self) -> int:
        return len(self._messages)

    def size(self, index: int) -> int:
        """See ``IMaildrop.size``: ``,W=`` from the name, else the file is scanned once."""
        msg = self._message(index)
        if msg.wsize is None:
            path = self._locate(msg)
            if path is None:
                raise errors.StoreError(f"message {index + 1} is no longer in the mailbox")
            try:
                msg.wsize = crlf_size(path)
            except OSError as exc:
                raise errors.StoreError(f"cannot read message {index + 1}: {exc.strerror}") from exc
        return msg.wsize

    def uidl(self, index: int) -> str:
        """See ``IMaildrop.uidl``."""
        return self._message(index).uidl

    def open_message(self, index: int) -> BinaryIO:
        """See ``IMaildrop.open_message``."""
        msg = self._message(index)
        path = self._locate(msg)
        if path is not None:
            try:
                return open(path, "rb")  # noqa: SIM115 - the caller closes it
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise errors.StoreError(f"cannot read message {index + 1}: {exc.strerror}") from exc
        raise errors.StoreError(f"message {index + 1} is no longer in the mailbox")

    def open_message_cached(self, index: int) -> BinaryIO | None:
        """See ``ICachedMessageOpen.open_message_cached``: the file if the kernel can open it without
        waiting for the disk (fsutil.open_cached), else None."""
        msgs = self._messages
        # the common case without _message's checks (a bad index still gets its error)
        msg = msgs[index] if type(index) is int and 0 <= index < len(msgs) else self._message(index)
        return open_cached_file(f"{self._base}/{msg.folder}/{msg.name}")

    def read_message_cached(self, index: int, limit: int) -> bytes | None:
        """See ``ICachedMessageRead.read_message_cached``: ``fsutil.read_cached`` of the path
        where the session saw the message, with the size the snapshot saw."""
        msgs = self._messages
        msg = msgs[index] if type(index) is int and 0 <= index < len(msgs) else self._message(index)
        size = msg.size
        if size is None or size > limit:
            return None
        return read_cached(f"{self._base}/{msg.folder}/{msg.name}", size)

    def commit(self, deleted: set[int]) -> None:
        """See ``IMaildrop.commit``.

        Deleted messages are unlinked (one already gone is fine); the others still in ``new/``
        move to ``cur/`` with ``:2,`` (their UIDLs do not change); each folder this changed is
        fsynced (one it did not change has nothing of this session's to sync: issue 17) and
        the lock is released. A message that could not be removed raises ``StoreError`` after
        the lock is released. A second call does nothing.
        """
        if self._lock is None:
            return
        doomed = {self._message(i).uidl for i in deleted}  # bad indexes: error, nothing done
        failures: list[str] = []
        folders: dict[str, int] = {}  # new/, cur/ -> an open descriptor (unlinks, fsync)
        changed: set[str] = set()  # the folders to fsync
        try:
            base = str(self.path)
            for index in sorted(deleted):
                msg = self._messages[index]
                try:
                    # where the session saw it (the common case: one syscall per message,
                    # relative to its folder's descriptor: no walk of the whole path, issue 17)
                    fd = folders.get(msg.folder)
                    if fd is None:
                        fd = folders[msg.folder] = os.open(
                            f"{base}/{msg.folder}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    os.unlink(msg.name, dir_fd=fd)
                    changed.add(msg.folder)
                    continue
                except FileNotFoundError:
                    pass  # moved meanwhile by another Maildir client: look for it
                except OSError as exc:
                    failures.append(f"message {index + 1}: {exc.strerror}")
                    continue
                path = self._locate(msg)
                if path is None:
                    continue
                try:
                    os.unlink(path)
                    changed.add(msg.folder)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failures.append(f"message {index + 1}: {exc.strerror}")
            for msg in self._messages:
                if msg.uidl in doomed:
                    continue
                if msg.folder == "new":
                    if self._move_to_cur(msg):
                        changed.update(("new", "cur"))
                elif not msg.named and msg.wsize is not None:
                    if self._rename_in_cur(msg):
                        changed.add("cur")
            for folder in ("new", "cur"):
                if folder not in changed:
                    continue
                with contextlib.suppress(OSError):
                    if folder in folders:
                        os.fsync(folders[folder])
                    else:
                        _fsync_dir(self.path / folder)
        finally:
            for fd in folders.values():
                os.close(fd)
            self.close()
        if failures:
            raise errors.StoreError(
                f"some deleted messages not removed from {self._label}: " + "; ".join(failures)
            )

    def _move_to_cur(self, msg: _Message) -> bool:
        """Move ``msg`` from new/ to cur/ (``:2,``); True when it was renamed."""
        base = msg.name.split(":", 1)[0]
        source = self.path / "new" / msg.name
        if not msg.named and msg.size is not None:
            base = self._sized_base(msg, source, base)
        target = self.path / "cur" / f"{base}:2,"
        if os.path.lexists(target):
            return False
        try:
            os.rename(source, target)
        except OSError:
            return False  # gone or moved by another client: it stays where it is, nothing is lost
        msg.folder, msg.name = "cur", target.name
        return True

    def _rename_in_cur(self, msg: _Message) -> bool:
        """A message in cur/ whose size this session had to read: its name gets the right
        size fields (its ``:2,`` flags are kept), so the next session need not read it. True
        when it was renamed."""
        base, colon, info = msg.name.partition(":")
        source = self.path / "cur" / msg.name
        sized = self._sized_base(msg, source, base)
        if sized == base:
            return False
        target = self.path / "cur" / f"{sized}{colon}{info}"
        if os.path.lexists(target):
            return False
        try:
            os.rename(source, target)
        except OSError:
            return False  # gone or renamed by another client: nothing is lost
        msg.name = target.name
        return True

    @staticmethod
    def _sized_base(msg: _Message, source: Path, base: str) -> str:
        """``base`` (a name without its ``:`` info) with the right ``,S=`` and ``,W=`` fields:
        a foreign message, or one whose fields were wrong, gets them once, so later sessions
        and the quota need not read it. Wrong fields are replaced. The unique part (what comes
        before the first size field), hence the UIDL, does not change."""
        try:
            if msg.wsize is None:
                msg.wsize = crlf_size(source)
        except OSError:
            return base
        unique = unique_part(base)
        rest = _SIZE_FIELD_RE.sub("", base[len(unique):])
        sized = f"{unique},S={msg.size},W={msg.wsize}{rest}"
        return sized if unique_part(sized) == unique else base

    def close(self) -> None:
        """See ``IMaildrop.close``."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the descriptor releases the flock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
