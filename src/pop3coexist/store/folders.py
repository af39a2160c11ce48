"""IMAP folders over the Maildir store: implements ``interfaces.IFolderStore``,
``interfaces.IAccountFolders``, ``interfaces.IFolderView`` and ``interfaces.ICachedFolderView``
(the answers that never wait for the disk: ``fsutil.open_cached``).

On disk, inside one mailbox's Maildir (the folder POP3 serves; README "IMAP")::

    <mailbox>/{tmp,new,cur}                 INBOX (POP3's maildrop)
    <mailbox>/.Sent/{tmp,new,cur}           a Maildir++ subfolder, with a ``maildirfolder`` file
    <mailbox>/.a.b/                         folder "b" inside "a" (``.`` is the separator)
    <folder>/dovecot-uidlist                UIDVALIDITY, UIDNEXT and one UID per message
    <folder>/dovecot-keywords               keyword letters (``0 $Forwarded`` -> ``a``)
    <mailbox>/subscriptions                 subscribed folder names, one a line
    <mailbox>/.pop3coexist.imap.json        {"special": done} once Sent/Drafts/Trash/Junk exist

This is Dovecot's own Maildir++ layout: folder names on disk are the IMAP modified UTF-7 names
(RFC 3501 section 5.1.3), flags live in the file name's info (``:2,`` then sorted letters: D
draft, F flagged, R answered, S seen, T deleted, ``a``-``z`` keywords), and the uid list is
Dovecot's version 3 format (``3 V<uidvalidity> N<uidnext> G<guid>`` then ``<uid> :<file name
without its :2, info>``), so Dovecot pointed at the same Maildir sees the same UIDs and flags.

A message is known by the maildir(5) unique part of its name (``maildir.unique_part``), which
neither a new/ -> cur/ rename nor a flag change alters: so a UID (and POP3's UIDL, which is the
unique part too) survives both, and two sessions that rename the same file do not lose it.

POP3 and IMAP together (README "IMAP"): IMAP never takes POP3's maildrop lock
(``.pop3coexist.lock``); POP3 keeps it, so one POP3 session at a time beside any number of
IMAP sessions. Both find a file by its unique part and remove files by name, so a rename by
one (new/ -> cur/, flags, size fields) never makes the other lose or mistake a message; a file
POP3 deletes is gone from the next ``sync`` (the IMAP session reports EXPUNGE).

Crash safety of the uid list: it is rewritten only under Dovecot's lock, the file
``dovecot-uidlist.lock`` created with O_EXCL (a lock older than ``STALE_LOCK`` seconds is
taken over); the new content is written into the lock file, fsynced, and renamed over
``dovecot-uidlist`` (the rename releases the lock), then the folder is fsynced. A crash leaves
the old list or the new one, never half of either; a stale lock file is taken over later.

Everything here is blocking and knows nothing of sockets or IMAP sequence numbers (of Twisted
it uses only the modified UTF-7 codec ``imap4-utf-7`` that ``twisted.mail.imap4`` registers).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from zope.interface import implementer

from pop3coexist import errors
from pop3coexist.canonical import canonical_size
from pop3coexist.fsutil import fsync_dir, open_cached, open_cached_file, write_atomic
from pop3coexist.interfaces import IAccountFolders, ICachedFolderView, IFolderStore, IFolderView
from pop3coexist.store.maildir import MaildirStore, unique_part

__all__ = ["FolderError", "MaildirFolders", "Message", "SPECIAL_USE", "flags_from_info",
           "info_from_flags"]

UIDLIST = "dovecot-uidlist"
UIDLIST_LOCK = "dovecot-uidlist.lock"
KEYWORDS = "dovecot-keywords"
SUBSCRIPTIONS = "subscriptions"
IMAP_META = ".pop3coexist.imap.json"
STALE_LOCK = 120.0  # seconds: Dovecot's default for dovecot-uidlist.lock
LOCK_WAIT = 30.0  # seconds to wait for another writer's lock before failing
RACY_WINDOW = 2.0  # seconds: a folder changed this recently is always read again
SEPARATOR = "."
# RFC 6154: the folders every account gets at its first log-in, with their attribute
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}

SYSTEM_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                "T": "\\Deleted"}
_LETTER_OF = {v.lower(): k for k, v in SYSTEM_FLAGS.items()}
_FOLDER_NAME = re.compile(r"[\x20-\x7e]+\Z")
_KEYWORD = re.compile(r"[\x21-\x7e]+\Z")
_proc_lock = threading.Lock()
_path_locks: dict[str, threading.Lock] = {}


class FolderError(errors.StoreError):
    """A folder operation the client asked for cannot be done (no such folder, exists, bad
    name); the message is for the client. ``code``: an RFC 5530 response code or ""."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, eq=False)
class Message:
    """One message of a folder view: ``uid``, ``flags`` (system flags and keywords, as IMAP
    names), the file's ``sub`` folder ("new"/"cur") and ``name``, ``size`` (octets of the
    canonical CRLF form, RFC822.SIZE), ``internaldate`` (seconds since the epoch).

    The records of one ``sync`` are shared by every view of the folder in this process (see
    ``Snapshot``): ``flags`` and ``recent`` are what the folder held at that ``sync`` and are
    never changed afterwards; ``sub``/``name`` follow the file when it is found renamed."""

    uid: int
    unique: str
    sub: str
    name: str
    flags: frozenset[str]
    size: int | None
    internaldate: float
    recent: bool = False


_FLAGSETS: dict[frozenset[str], frozenset[str]] = {}


def _intern_flags(flags: frozenset[str]) -> frozenset[str]:
    """One object per distinct flag set in the process (a folder has few distinct sets)."""
    if len(_FLAGSETS) > 4096:
        _FLAGSETS.clear()
    return _FLAGSETS.setdefault(flags, flags)


class Snapshot(list):
    """The messages of one ``sync`` (a list of ``Message``, ascending UID), shared by every
    ``FolderView`` of the folder in this process while the folder's stat signature (new/, cur/
    and the uid list, ``FolderView._state``) is unchanged: 1,000 sessions IDLE on one folder
    hold one list, not 1,000. Treat it as immutable (the views never change it)."""

    __slots__ = ("__weakref__",)


# folder path -> (stat signature, the snapshot read under it); the snapshot is weakly held, so
# it lives as long as a session still uses it. Guarded by _SHARED_LOCK (threads sync).
_SNAPSHOTS: dict[str, tuple[tuple, weakref.ref]] = {}
# folder path -> the last snapshot any view of it read (weakly held), shared or not: a sync
# whose stat signature cannot be trusted (a folder changed within RACY_WINDOW) reads the
# folder again but takes each unchanged message's record from it, so that the many sessions
# that SELECT a just-changed folder hold a list of the same records, not a copy each (1,000
# records of a 1,000-message folder are about 400 KB; a burst of SELECTs made that much per
# session and left the allocator's arenas fragmented once they were dropped).
_LAST_READ: dict[str, weakref.ref] = {}
# folder path -> (stat signature, the snapshot read under it) for a folder changed within
# RACY_WINDOW: its signature cannot prove that nothing changed since (a change in the same
# clock tick would not show), so it is never published in _SNAPSHOTS; but the views of this
# process that see the same signature meanwhile take that read (provisionally) instead of
# reading the folder again each: a burst of 500 SELECTs just after the first one moved the
# mail out of new/ made 500 reads (CPU, and transient records that left pymalloc's arenas
# fragmented). Once the window has passed, a view that took a provisional read reads the
# folder again (the trusted read, shared through _SNAPSHOTS): a change the provisional read
# missed shows then, RACY_WINDOW seconds late at most. A change made through a FolderView of
# this process drops the folder's entry (``_drop_racy``), so a session sees its own changes
# (and the other sessions of its process see them) at once, as before.
_RACY: dict[str, tuple[tuple, weakref.ref]] = {}
_UIDLISTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _uid_of(msg: Message) -> int:
    return msg.uid


def _shared_snapshot(path: str, state: tuple | None) -> Snapshot | None:
    if state is None:
        return None
    with _SHARED_LOCK:
        entry = _SNAPSHOTS.get(path)
        if entry is None or entry[0] != state:
            return None
        return entry[1]()


def _share_snapshot(path: str, state: tuple | None, snap: Snapshot) -> Snapshot:
    """Publish ``snap`` (read under ``state``) or return the one already published for it."""
    if state is None:
        return snap
    with _SHARED_LOCK:
        entry = _SNAPSHOTS.get(path)
        if entry is not None and entry[0] == state:
            have = entry[1]()
            if have is not None:
                return have
        _SNAPSHOTS[path] = (state, weakref.ref(snap))
        if len(_SNAPSHOTS) > 256:
            for key in [k for k, (_, ref) in _SNAPSHOTS.items() if ref() is None]:
                del _SNAPSHOTS[key]
    return snap


def _racy_read(path: str, key: tuple) -> tuple[tuple, Snapshot] | None:
    """The provisional read of ``path`` under ``key`` (see ``_RACY``): (entry, snapshot)."""
    with _SHARED_LOCK:
        entry = _RACY.get(path)
    if entry is None or entry[0] != key:
        return None
    snap = entry[1]()
    return None if snap is None else (entry, snap)


def _keep_racy(path: str, key: tuple, snap: Snapshot) -> tuple:
    entry = (key, weakref.ref(snap))
    with _SHARED_LOCK:
        _RACY[path] = entry
        if len(_RACY) > 256:
            for k in [k for k, (_, ref) in _RACY.items() if ref() is None]:
                del _RACY[k]
    return entry


def _drop_racy(path: str) -> None:
    """This process changed the folder: no view may take its provisional read any more."""
    with _SHARED_LOCK:
        _RACY.pop(path, None)


def flags_from_info(info: str, keywords: list[str]) -> frozenset[str]:
    """IMAP flags of a Maildir ``:2,`` info string (without the ``2,``)."""
    out = set()
    for ch in info:
        if ch in SYSTEM_FLAGS:
            out.add(SYSTEM_FLAGS[ch])
        elif "a" <= ch <= "z" and ord(ch) - 97 < len(keywords):
            out.add(keywords[ord(ch) - 97])
    return _intern_flags(frozenset(out))


def info_from_flags(flags: Iterable[str], keywords: list[str], keep: str = "") -> str:
    """The sorted letters for ``flags`` (Dovecot order: ASCII); ``keep``: letters of the old
    info this server does not manage (``P``, unknown keywords), kept as they are."""
    letters = set(ch for ch in keep if ch not in SYSTEM_FLAGS and not ("a" <= ch <= "z"
                                                                        and ord(ch) - 97 < len(keywords)))
    lower = {k.lower(): i for i, k in enumerate(keywords)}
    for f in flags:
        if f.lower() in _LETTER_OF:
            letters.add(_LETTER_OF[f.lower()])
        elif f.lower() in lower:
            letters.add(chr(97 + lower[f.lower()]))
    return "".join(sorted(letters))


def _split(name: str) -> tuple[str, str]:
    """(base, info) of a Maildir file name: info is what follows ``:2,``."""
    base, sep, info = name.partition(":")
    return base, info[2:] if sep and info.startswith("2,") else ""


def _scan(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    try:
                        if entry.is_file(follow_symlinks=False):
                            yield entry
                    except OSError:
                        continue
    except FileNotFoundError:
        return


_TIME_RE = re.compile(r"(\d+)(?:\.M(\d+))?")
_SIZE_W = re.compile(r",W=(\d+)(?=,|:|\Z)")
_SIZE_S = re.compile(r",S=(\d+)(?=,|:|\Z)")


def _order(name: str, mtime: float) -> tuple[int, int, str]:
    m = _TIME_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0), name) if m else (int(mtime), 0, name)


def _path_lock(path: Path) -> threading.Lock:
    with _proc_lock:
        return _path_locks.setdefault(str(path), threading.Lock())


@contextlib.contextmanager
def _dotlock(folder: Path, name: str = UIDLIST) -> Iterator[int]:
    """Dovecot's lock of the shared file ``folder/name``: ``<name>.lock`` made with O_EXCL
    (``dovecot-uidlist.lock``, ``dovecot-keywords.lock``, ``subscriptions.lock``: the locks
    Dovecot itself takes on these files, so it and every process of this server exclude each
    other); yields its descriptor (the uid list's writer writes the new list into it and
    renames it; the others replace their file with ``fsutil.write_atomic`` and leave the lock
    to be removed here). A lock older than STALE_LOCK seconds is someone's crash: taken over.
    Raises StoreError after LOCK_WAIT."""
    lock = folder / f"{name}.lock"
    deadline = time.monotonic() + LOCK_WAIT
    delay = 0.005
    with _path_lock(lock):
        while True:
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - lock.stat().st_mtime > STALE_LOCK:
                        os.unlink(lock)
                        continue
                if time.monotonic() > deadline:
                    raise errors.StoreError(f"{lock} is held by another writer") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        mine = os.fstat(fd)
        try:
            yield fd
        finally:
            # still there: the caller did not rename it (an error). Once renamed, the name
            # may already be another writer's lock (another process): never unlink that one.
            # Compared while fd is open: a closed, replaced file's inode number can be given
            # to the next writer's lock at once (seen with four processes appending)
            try:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(lock)
                    if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                        os.unlink(lock)
            finally:
                os.close(fd)


@dataclass
class _UidList:
    validity: int
    next_uid: int
    guid: str
    uids: dict[str, int] = field(default_factory=dict)  # unique part -> uid
    names: dict[str, str] = field(default_factory=dict)  # unique part -> base name


def _read_uidlist(folder: Path) -> _UidList | None:
    try:
        text = (folder / UIDLIST).read_text("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    if not lines:
        return None
    head = lines[0].split()
    if not head or head[0] != "3":
        return None  # another version: rebuilt (UIDVALIDITY changes, as Dovecot does)
    fields = {h[0]: h[1:] for h in head[1:] if h}
    try:
        out = _UidList(int(fields["V"]), int(fields["N"]), fields.get("G", ""))
    except (KeyError, ValueError):
        return None
    for line in lines[1:]:
        uid_text, _, rest = line.partition(" ")
        name = rest.partition(":")[2] if ":" in rest else ""
        try:
            uid = int(uid_text)
        except ValueError:
            continue
        if name:
            u = unique_part(name)
            out.uids[u] = uid
            out.names[u] = name
            out.next_uid = max(out.next_uid, uid + 1)
    return out


def _write_uidlist(folder: Path, fd: int, ul: _UidList) -> None:
    lines = [f"3 V{ul.validity} N{ul.next_uid} G{ul.guid}"]
    for unique, uid in sorted(ul.uids.items(), key=lambda kv: kv[1]):
        lines.append(f"{uid} :{ul.names.get(unique, unique)}")
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    os.write(fd, data)
    os.fsync(fd)
    os.rename(folder / UIDLIST_LOCK, folder / UIDLIST)
    fsync_dir(folder)


def _new_validity(folder: Path) -> int:
    # distinct per folder and never reused after a folder is deleted and made again
    return max(int(time.time()), 1) ^ (secrets.randbits(8) << 23) & 0x7FFFFFFF or 1


def _read_keywords(folder: Path) -> list[str]:
    try:
        text = (folder / KEYWORDS).read_text("utf-8", "surrogateescape")
    except FileNotFoundError:
        return []
    out: list[str] = []
    for line in text.splitlines():
        idx, _, name = line.partition(" ")
        if idx.isdigit() and int(idx) == len(out) and name:
            out.append(name)
    return out[:26]


def _write_keywords(folder: Path, keywords: list[str]) -> None:
    """Replace ``dovecot-keywords`` (the caller holds its ``_dotlock``)."""
    data = "".join(f"{i} {k}\n" for i, k in enumerate(keywords))
    write_atomic(folder / KEYWORDS, data.encode("utf-8", "surrogateescape"), mode=0o644)


# Canonical sizes this process has read from files whose names lack W=, by (folder, unique
# part of the name): a Maildir message never changes in place, so its size holds for as long
# as the name does, whatever views, sessions or web requests ask (each folder read makes new
# records; without this a web mail listing read a 50 MB message whole at every page). Bounded
# (about 200 bytes an entry); the oldest go first.
_SIZES: dict[tuple[str, str], int] = {}
_SIZES_MAX = 50_000


def _canonical_size_of(path: Path) -> int:
    """Octets of the file's canonical CRLF form (RFC822.SIZE, POP3's sizes), read once per
    process per message. OSError propagates."""
    key = (str(path.parent.parent), unique_part(path.name))
    size = _SIZES.get(key)
    if size is None:
        with open(path, "rb") as f:
            size = canonical_size(iter(lambda: f.read(1 << 16), b""))
        if len(_SIZES) >= _SIZES_MAX:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del _SIZES[next(iter(_SIZES))]
        _SIZES[key] = size
    return size


@implementer(IFolderStore)
class MaildirFolders:
    """See ``IFolderStore``: the folders of every mailbox of a ``MaildirStore``."""

    def __init__(self, store: MaildirStore) -> None:
        self.store = store

    def open_account(self, domain: str, mailbox: str) -> AccountFolders:
        """See ``IFolderStore.open_account``. Raises NoSuchMailbox."""
        return AccountFolders(self.store, self.store.mailbox_folder(domain, mailbox),
                              domain, mailbox)


def validate_name(name: str) -> str:
    """The on-disk form of an IMAP folder name (modified UTF-7 as received, RFC 3501 section
    5.1.3); raises FolderError for a name Maildir++ cannot hold."""
    if name.upper() == "INBOX":
        return "INBOX"
    if not _FOLDER_NAME.match(name) or "/" in name or name.startswith(SEPARATOR) or \
            name.endswith(SEPARATOR) or ".." in name or name.upper().startswith("INBOX."):
        raise FolderError(f"invalid folder name {name[:60]!r}", "CANNOT")
    import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

    try:
        name.encode("ascii").decode("imap4-utf-7")
    except (UnicodeError, LookupError):
        raise FolderError(f"invalid modified UTF-7 in folder name {name[:60]!r}",
                          "CANNOT") from None
    return name


def to_folder_name(text: str) -> str:
    """A Sieve folder name (UTF-8, RFC 5228 section 4.1; ``/`` taken as a separator too, as
    Dovecot's Pigeonhole does) as an IMAP folder name (modified UTF-7, ``.`` separator)."""
    import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

    parts = [p for p in text.replace("/", SEPARATOR).split(SEPARATOR) if p]
    name = SEPARATOR.join(p.encode("imap4-utf-7").decode("ascii") for p in parts)
    return validate_name(name)


@implementer(IAccountFolders)
class AccountFolders:
    """See ``IAccountFolders``: one account's folders; made by ``MaildirFolders``."""

    def __init__(self, store: MaildirStore, root: Path, domain: str, mailbox: str) -> None:
        self.store = store
        self.root = Path(root)
        self.domain = domain
        self.mailbox = mailbox

    def path(self, name: str) -> Path:
        """The Maildir of folder ``name`` (INBOX: the mailbox itself)."""
        name = validate_name(name)
        return self.root if name == "INBOX" else self.root / (SEPARATOR + name)

    def exists(self, name: str) -> bool:
        """True when folder ``name`` exists."""
        try:
            p = self.path(name)
        except FolderError:
            return False
        return (p / "cur").is_dir()

    def list_folders(self) -> list[str]:
        """Every folder's name, INBOX first, then sorted."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as it:
            for e in it:
                # "..name": a folder DELETE is removing (the quota skips it too)
                if e.name.startswith(".") and len(e.name) > 1 and not e.name.startswith("..") \
                        and e.is_dir(follow_symlinks=False) and (Path(e.path) / "cur").is_dir():
                    out.append(e.name[1:])
        return ["INBOX", *sorted(out)]

    def special_use(self, name: str) -> str | None:
        """The RFC 6154 attribute of a folder name, or None."""
        return SPECIAL_USE.get(name)

    def ensure_special_folders(self) -> None:
        """Create Sent, Drafts, Trash and Junk (subscribed) at the first log-in; idempotent.
        Done once: a user who deletes Junk later does not get it back."""
        meta = self.root / IMAP_META
        if meta.exists():
            return
        # two first log-ins of one account (any processes) run this one at a time
        with _dotlock(self.root, IMAP_META):
            if meta.exists():
                return
            for name in SPECIAL_USE:
                if not self.exists(name):
                    with contextlib.suppress(FolderError):
                        self.create(name)
            self._change_subscriptions(lambda subs: [*subs, *SPECIAL_USE])
            write_atomic(meta, json.dumps({"special": True}).encode("ascii"), mode=0o644)

    def create(self, name: str) -> None:
        """Create folder ``name`` (and the parents its name implies, RFC 3501 section 6.3.3).
        Raises FolderError ALREADYEXISTS when it exists."""
        name = validate_name(name.rstrip(SEPARATOR)) if name.endswith(SEPARATOR) else \
            validate_name(name)
        if name == "INBOX" or self.exists(name):
            raise FolderError(f"folder {name} already exists", "ALREADYEXISTS")
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts) + 1):
            sub = SEPARATOR.join(parts[:i])
            if not self._make_folder(self.path(sub)) and i == len(parts):
                raise FolderError(f"folder {name} already exists", "ALREADYEXISTS")
        fsync_dir(self.root)

    def _make_folder(self, p: Path) -> bool:
        """Make the Maildir++ folder ``p`` whole or not at all: ``tmp``, ``new``, ``cur`` and
        ``maildirfolder`` are made in a staging folder under the mailbox's ``tmp/`` and renamed
        to ``p`` (another process or Dovecot never sees half a folder; of two processes
        creating it at once one wins). False when ``p`` exists already (as a folder; a
        non-folder directory of that name is completed in place)."""
        if (p / "cur").is_dir():
            return False
        stage = self.root / "tmp" / f".folder.{os.getpid()}.{secrets.token_hex(6)}"
        try:
            for d in ("tmp", "new", "cur"):
                (stage / d).mkdir(parents=True)
            (stage / "maildirfolder").touch()
            fsync_dir(stage)
            try:
                os.rename(stage, p)  # fails on a non-empty p: the folder exists
                return True
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if (p / "cur").is_dir():
            return False
        for d in ("tmp", "new", "cur"):
            (p / d).mkdir(exist_ok=True)
        (p / "maildirfolder").touch()
        return True

    def delete(self, name: str) -> None:
        """Delete folder ``name`` and its messages. INBOX cannot be deleted; a folder with
        subfolders neither (RFC 3501 section 6.3.4 allows keeping it \\Noselect; we refuse)."""
        name = validate_name(name)
        if name == "INBOX":
            raise FolderError("INBOX cannot be deleted", "CANNOT")
        if not self.exists(name):
            raise FolderError(f"no folder {name}", "NONEXISTENT")
        if any(f.startswith(name + SEPARATOR) for f in self.list_folders()):
            raise FolderError(f"folder {name} has subfolders: delete them first", "INUSE")
        p = self.path(name)
        trash = self.root / f"..deleted.{name}.{secrets.token_hex(4)}"  # Dovecot's way: rename first
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.root)
        self.subscribe(name, False)

    def rename(self, old: str, new: str) -> None:
        """Rename a folder and its subfolders (RFC 3501 section 6.3.5). Renaming INBOX moves
        its messages into the new folder and leaves INBOX empty."""
        old, new = validate_name(old), validate_name(new)
        if not self.exists(old):
            raise FolderError(f"no folder {old}", "NONEXISTENT")
        if new == "INBOX" or self.exists(new):
            raise FolderError(f"folder {new} already exists", "ALREADYEXISTS")
        if old == "INBOX":
            self.create(new)
            src, dst = self.path("INBOX"), self.path(new)
            for sub in ("new", "cur"):
                for e in _scan(src / sub):
                    os.rename(e.path, dst / sub / e.name)
            return
        if new.startswith(old + SEPARATOR):
            raise FolderError("a folder cannot move inside itself", "CANNOT")
        parent = new.rpartition(SEPARATOR)[0]
        if parent and not self.exists(parent):
            self.create(parent)
        moves = [f for f in self.list_folders() if f == old or f.startswith(old + SEPARATOR)]
        for f in moves:
            try:
                os.rename(self.path(f), self.path(new + f[len(old):]))
            except OSError as exc:  # made by another session meanwhile
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise FolderError(f"folder {new + f[len(old):]} already exists",
                                  "ALREADYEXISTS") from None
        fsync_dir(self.root)
        self._change_subscriptions(
            lambda subs: [new if s == old else s for s in subs] if old in subs else subs)

    def subscriptions(self) -> list[str]:
        """Subscribed names (Dovecot's ``subscriptions`` file)."""
        try:
            text = (self.root / SUBSCRIPTIONS).read_text("utf-8", "surrogateescape")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line and not line.startswith("V\t")]

    def subscribe(self, name: str, on: bool) -> None:
        """Add or remove ``name`` in the subscriptions (it need not exist: RFC 3501 6.3.6)."""
        self._change_subscriptions(
            lambda subs: [*(s for s in subs if s != name), *([name] if on else [])])

    def _change_subscriptions(self, change: Callable[[list[str]], list[str]]) -> None:
        """Read-modify-write the ``subscriptions`` file: under its lock (``_dotlock``,
        ``subscriptions.lock``: held across processes, and by Dovecot), read again, ``change``
        the list, replace the file atomically (``fsutil.write_atomic``; not written when
        unchanged). Names are kept once each, in their order."""
        with _dotlock(self.root, SUBSCRIPTIONS):
            before = self.subscriptions()
            after = list(dict.fromkeys(change(before)))
            if after != before:
                data = "".join(s + "\n" for s in after).encode("utf-8", "surrogateescape")
                write_atomic(self.root / SUBSCRIPTIONS, data, mode=0o644)

    def open_folder(self, name: str) -> FolderView:
        """A view of folder ``name``; raises FolderError NONEXISTENT."""
        if not self.exists(name):
            raise FolderError(f"no folder {name}", "NONEXISTENT")
        return FolderView(self.path(name), validate_name(name))

    def quota(self) -> tuple[int, int | None]:
        """(bytes used over all folders, limit in bytes or None): RFC 2087's STORAGE. The
        store's count (``MaildirStore.usage``: each folder scanned again only when changed,
        by any process, since this process last did)."""
        _, used = self.store.usage(self.domain, self.mailbox)
        return used, self.store.get_quota(self.domain, self.mailbox)

    def append(self, name: str, data: bytes, flags: Iterable[str], internaldate: float | None
               ) -> tuple[int, int]:
        """Store ``data`` in folder ``name`` with ``flags`` (RFC 3501 section 6.3.11); returns
        (uidvalidity, uid) for UIDPLUS's APPENDUID. The file is fsynced before its rename into
        cur/ and cur/ after it. Raises FolderError TRYCREATE when the folder does not exist,
        OVERQUOTA when the account's quota refuses it."""
        if not self.exists(name):
            raise FolderError(f"no folder {name}", "TRYCREATE")
        # check and write under the quota lock, as a delivery does: two writers at once (any
        # processes, SMTP or IMAP) cannot both slip under the limit
        with self.store.quota_locked(self.domain, self.mailbox) as limit:
            if limit is not None and self.store.quota_refuses(
                    self.store.usage(self.domain, self.mailbox)[1], len(data), limit):
                raise FolderError("over quota", "OVERQUOTA")
            view = FolderView(self.path(name), validate_name(name))
            return view.add(data, flags, internaldate)

    def copy_within_quota(self, view: FolderView, messages: list[Message], dest: FolderView
                          ) -> list[tuple[int, int]]:
        """See ``IAccountFolders.copy_within_quota``: the messages' stored octets (``,S=``
        of their names, else their files' sizes) against ``quota_refuses``, under the quota
        lock; then ``view.copy_to``. Raises FolderError OVERQUOTA."""
        with self.store.quota_locked(self.domain, self.mailbox) as limit:
            if limit is not None and messages:
                size = 0
                for msg in messages:
                    m = _SIZE_S.search(msg.name.split(":", 1)[0])
                    if m:
                        size += int(m.group(1))
                        continue
                    p = view.locate(msg)  # None: gone meanwhile, copy_to skips it
                    with contextlib.suppress(FileNotFoundError):
                        size += p.stat().st_size if p is not None else 0
                used = self.store.usage(self.domain, self.mailbox)[1]
                if self.store.quota_refuses(used, size, limit):
                    raise FolderError("over quota", "OVERQUOTA")
            return view.copy_to(messages, dest)


@implementer(IFolderView, ICachedFolderView)
class FolderView:
    """See ``IFolderView``: one folder's messages by UID, read fresh by ``sync``."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name
        self._cache_key: tuple[int, int, int] | None = None
        self._uidlist: _UidList | None = None
        self._last_state: tuple | None = None
        self._racy_entry: tuple | None = None  # the _RACY entry the last sync took or made
        self.keywords: list[str] = _read_keywords(self.path)

    # -- the uid list
    def _load(self) -> _UidList | None:
        try:
            st = os.stat(self.path / UIDLIST)
        except FileNotFoundError:
            self._cache_key, self._uidlist = None, None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._cache_key:
            # one parsed list per folder and signature in the process, whatever the views
            shared_key = (str(self.path), *key)
            ul = _UIDLISTS.get(shared_key)
            if ul is None:
                ul = _read_uidlist(self.path)
                if ul is not None:
                    _UIDLISTS[shared_key] = ul
            self._uidlist = ul
            self._cache_key = key
        return self._uidlist

    @property
    def uidvalidity(self) -> int:
        ul = self._load()
        if ul is None:
            self.sync()
            ul = self._load()
        assert ul is not None
        return ul.validity

    @property
    def uidnext(self) -> int:
        ul = self._load()
        if ul is None:
            self.sync()
            ul = self._load()
        assert ul is not None
        return ul.next_uid

    def _scan_files(self) -> dict[str, tuple[str, str, float]]:
        found: dict[str, tuple[str, str, float]] = {}
        for sub in ("new", "cur"):  # new/ first: a file moving to cur/ meanwhile is seen there
            for e in _scan(self.path / sub):
                try:
                    mtime = e.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                found.setdefault(unique_part(e.name), (sub, e.name, mtime))
        return found

    def _state(self) -> tuple | None:
        """What changes when the folder does: new/, cur/ and the uid list's identity and
        times. None when one of them changed within RACY_WINDOW seconds (a change in the
        same clock tick would not show): then the folder must be read."""
        key, racy = self._signature()
        return None if racy else key

    def _signature(self) -> tuple[tuple, bool]:
        """(``_state``'s key, racy): racy when one of them changed within RACY_WINDOW."""
        key = []
        now = time.time()
        racy = False
        for name in ("new", "cur", UIDLIST):
            try:
                st = os.stat(self.path / name)
            except FileNotFoundError:
                key.append(None)
                continue
            racy = racy or now - st.st_mtime < RACY_WINDOW
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(key), racy

    def unchanged_cached(self) -> bool | None:
        """See ``ICachedFolderView.unchanged_cached``: ``_state`` through descriptors opened
        only when the kernel has the path cached (``fsutil.open_cached``), compared with the
        last ``sync``'s; None when a path is not cached, is missing, or changed within
        RACY_WINDOW (then ``sync_if_changed`` decides, off the reactor)."""
        last = self._last_state
        if last is None or self._racy_entry is not None:
            return None  # never read, or read provisionally (sync_if_changed decides)
        key = []
        now = time.time()
        base = str(self.path)
        for name in ("new", "cur", UIDLIST):
            fd = open_cached(f"{base}/{name}")
            if fd is None:
                return None
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if now - st.st_mtime < RACY_WINDOW:
                return None
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(key) == last

    def open_cached(self, msg: Message) -> BinaryIO | None:
        """See ``ICachedFolderView.open_cached``: the file at its last known name, if the
        kernel can open it without waiting for the disk (a renamed file: None); an unbuffered
        ``io.FileIO``, as POP3's RETR reads (``fsutil.open_cached_file``)."""
        return open_cached_file(f"{self.path}/{msg.sub}/{msg.name}")

    def sync_if_changed(self) -> list[Message] | None:
        """``sync()``, or None when nothing in the folder changed since the last ``sync`` of
        this view (three stat calls: what IDLE polls and every command cost when idle)."""
        key, racy = self._signature()
        if key == self._last_state:
            entry = self._racy_entry
            if entry is None and not racy:
                return None  # a trusted read under the same signature
            if entry is not None and racy:
                with _SHARED_LOCK:
                    if _RACY.get(str(self.path)) is entry:
                        return None  # still the provisional read this view took
        return self.sync()

    def sync(self) -> list[Message]:
        """The folder's messages now, by ascending UID; unknown files get new UIDs (under the
        lock, written before this returns). See the module docstring. The list (a
        ``Snapshot``) is the one every view of this folder in the process shares while the
        folder's stat signature stays the same (within RACY_WINDOW of a change, provisionally:
        ``_RACY``): do not change it or its records."""
        key, racy = self._signature()
        path = str(self.path)
        state = None if racy else key
        self._last_state, self._racy_entry = state, None
        if racy:
            taken = _racy_read(path, key)
            if taken is not None:
                self._load()
                self._last_state, self._racy_entry = key, taken[0]
                return taken[1]
        shared = _shared_snapshot(path, state)
        if shared is not None:
            self._load()
            return shared
        files = self._scan_files()
        ul = self._load()
        if ul is not None and any(u not in files for u in ul.uids):
            files.update(self._scan_files())  # a flag rename raced the scan: look again
        if ul is None or any(u not in ul.uids for u in files) or \
                len(ul.uids) > len(files) + 64:
            ul = self._assign(files)
        self.keywords = _read_keywords(self.path)
        with _SHARED_LOCK:
            ref = _LAST_READ.get(path)
            last = ref() if ref is not None else None
        known = {m.uid: m for m in last} if last else {}
        out = []
        for unique, (sub, name, mtime) in files.items():
            uid = ul.uids.get(unique)
            if uid is None:
                continue  # arrived after the lock's scan: the next sync sees it
            base, info = _split(name)
            flags = flags_from_info(info, self.keywords)
            old = known.get(uid)
            if old is not None and old.name == name and old.sub == sub and \
                    old.unique == unique and old.flags is flags and \
                    old.internaldate == mtime and old.recent == (sub == "new"):
                out.append(old)  # unchanged: the record the last read made
                continue
            m = _SIZE_W.search(base)
            out.append(Message(uid, unique, sub, name, flags,
                               int(m.group(1)) if m and _SIZE_S.search(base) else None, mtime,
                               sub == "new"))
        out.sort(key=_uid_of)
        snap = _share_snapshot(path, state, Snapshot(out))
        if racy:
            self._last_state, self._racy_entry = key, _keep_racy(path, key, snap)
        with _SHARED_LOCK:
            _LAST_READ[path] = weakref.ref(snap)
            if len(_LAST_READ) > 256:
                for key in [k for k, r in _LAST_READ.items() if r() is None]:
                    del _LAST_READ[key]
        return snap

    def _assign(self, files: dict[str, tuple[str, str, float]]) -> _UidList:
        with _dotlock(self.path) as fd:
            ul = _read_uidlist(self.path)
            files = {**files, **self._scan_files()}
            if ul is None:
                ul = _UidList(_new_validity(self.path), 1, secrets.token_hex(16))
            fresh = sorted((u for u in files if u not in ul.uids),
                           key=lambda u: _order(files[u][1], files[u][2]))
            for u in fresh:
                ul.uids[u] = ul.next_uid
                ul.next_uid += 1
            ul.uids = {u: uid for u, uid in ul.uids.items() if u in files}
            ul.names = {u: files[u][1].split(":", 1)[0] for u in ul.uids}
            _write_uidlist(self.path, fd, ul)
        self._cache_key = None
        self._uidlist = None
        return self._load() or ul

    # -- messages
    def locate(self, msg: Message) -> Path | None:
        """The message's path now (another client may have renamed it), or None when gone."""
        p = self.path / msg.sub / msg.name
        if os.path.lexists(p):
            return p
        for sub in ("cur", "new"):
            for e in _scan(self.path / sub):
                if unique_part(e.name) == msg.unique:
                    msg.sub, msg.name = sub, e.name
                    return Path(e.path)
        return None

    def open(self, msg: Message) -> BinaryIO:
        """The message file, opened for reading; raises StoreError when it is gone."""
        p = self.locate(msg)
        if p is not None:
            with contextlib.suppress(FileNotFoundError):
                return open(p, "rb")  # noqa: SIM115 - the caller closes it
        raise errors.StoreError(f"message UID {msg.uid} is no longer in the folder")

    def size(self, msg: Message) -> int:
        """RFC822.SIZE: octets of the canonical CRLF form (read once when the name lacks W=)."""
        if msg.size is None:
            p = self.locate(msg)
            if p is None:
                raise errors.StoreError(f"message UID {msg.uid} is no longer in the folder")
            msg.size = _canonical_size_of(p)
        return msg.size

    def _keyword_letters(self, flags: Iterable[str]) -> None:
        wanted = [f for f in flags if not f.startswith("\\") and _KEYWORD.match(f)]
        have = {k.lower() for k in self.keywords}
        missing = [f for f in wanted if f.lower() not in have]
        if missing:  # read-modify-write under the file's lock: letters are never reused
            with _dotlock(self.path, KEYWORDS):
                self.keywords = _read_keywords(self.path)
                have = {k.lower() for k in self.keywords}
                added = False
                for f in missing:
                    if f.lower() not in have and len(self.keywords) < 26:
                        self.keywords.append(f)
                        have.add(f.lower())
                        added = True
                if added:
                    _write_keywords(self.path, self.keywords)

    def set_flags(self, msg: Message, flags: Iterable[str]) -> frozenset[str]:
        """Give the message exactly ``flags`` (\\Recent is not stored): the file is renamed
        into cur/ with the new ``:2,`` info. Returns the flags now on disk; a message gone
        meanwhile raises StoreError."""
        flags = [f for f in flags if f.lower() != "\\recent"]
        self._keyword_letters(flags)
        for _ in range(5):
            p = self.locate(msg)
            if p is None:
                raise errors.StoreError(f"message UID {msg.uid} is no longer in the folder")
            base, info = _split(msg.name)
            new_info = info_from_flags(flags, self.keywords, info)
            target = self.path / "cur" / f"{base}:2,{new_info}"
            if target == p:
                break
            try:
                os.rename(p, target)
            except FileNotFoundError:
                continue  # renamed by someone else meanwhile: look again
            msg.sub, msg.name = "cur", target.name
            _drop_racy(str(self.path))
            break
        # msg.flags stays what the folder held at its sync (other sessions share the record)
        return flags_from_info(_split(msg.name)[1], self.keywords)

    def claim_recent(self, messages: list[Message]) -> list[int]:
        """Move the messages still in new/ to cur/ (``:2,`` + their flags): this session saw
        them first, so they are \\Recent to it alone (RFC 3501 section 2.3.2). Returns the
        UIDs this call moved (another session or POP3 that moved one first has it)."""
        moved: list[int] = []
        for msg in messages:
            if msg.sub != "new":
                continue
            base, info = _split(msg.name)
            try:
                os.rename(self.path / "new" / msg.name, self.path / "cur" / f"{base}:2,{info}")
            except OSError:
                continue  # another session or POP3 moved it: not recent for us
            msg.sub, msg.name = "cur", f"{base}:2,{info}"
            moved.append(msg.uid)
        if moved:
            _drop_racy(str(self.path))
            with contextlib.suppress(OSError):
                fsync_dir(self.path / "cur")
                fsync_dir(self.path / "new")
        return moved

    def expunge(self, messages: list[Message]) -> list[int]:
        """Unlink the messages (one already gone counts as expunged); returns their UIDs."""
        done = []
        for msg in messages:
            p = self.locate(msg)
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            done.append(msg.uid)
        _drop_racy(str(self.path))
        with contextlib.suppress(OSError):
            fsync_dir(self.path / "cur")
        return done

    def add(self, data: bytes, flags: Iterable[str], internaldate: float | None,
            unique: str | None = None) -> tuple[int, int]:
        """Write a new message into cur/ with ``flags``; returns (uidvalidity, uid)."""
        flags = [f for f in flags if f.lower() != "\\recent"]
        self._keyword_letters(flags)
        size = len(data)
        wsize = canonical_size((data,))
        if unique is None:
            unique = _unique_name()
        base = f"{unique},S={size},W={wsize}"
        tmp = self.path / "tmp" / base
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if internaldate is not None:
            os.utime(tmp, (internaldate, internaldate))
        target = self.path / "cur" / f"{base}:2,{info_from_flags(flags, self.keywords)}"
        os.rename(tmp, target)
        _drop_racy(str(self.path))
        fsync_dir(self.path / "cur")
        with _dotlock(self.path) as fd:
            ul = _read_uidlist(self.path) or _UidList(_new_validity(self.path), 1,
                                                      secrets.token_hex(16))
            uid = ul.uids.get(unique)
            if uid is None:
                uid = ul.next_uid
                ul.uids[unique] = uid
                ul.names[unique] = base
                ul.next_uid += 1
            _write_uidlist(self.path, fd, ul)
        self._cache_key = None
        return ul.validity, uid

    def copy_to(self, messages: list[Message], dest: FolderView) -> list[tuple[int, int]]:
        """Copy the messages (their flags too) into ``dest``; returns (source uid, new uid)
        pairs (UIDPLUS's COPYUID). A hard link where possible (same file system), else a copy.
        A message gone meanwhile is skipped."""
        pairs: list[tuple[int, int]] = []
        for msg in messages:
            p = self.locate(msg)
            if p is None:
                continue
            try:
                data = p.read_bytes()
            except FileNotFoundError:
                continue
            _, uid = dest.add(data, msg.flags, msg.internaldate)
            pairs.append((msg.uid, uid))
        return pairs


_counter = [0]
_counter_lock = threading.Lock()


def _unique_name() -> str:
    """A maildir(5) unique name, as ``MaildirStore`` makes them."""
    import socket

    with _counter_lock:
        _counter[0] += 1
        n = _counter[0]
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{n}R{secrets.token_hex(8)}.{host}"
