"""Sieve scripts and out-of-office records beside each mailbox: implements
``interfaces.ISieveScripts``.

On disk (README "On disk")::

    <mailbox>/sieve/<name>.sieve          one script per file (UTF-8, as uploaded)
    <mailbox>/.pop3coexist.sieve          symlink -> sieve/<name>.sieve: the active script
                                          (none: no rules run, every message is kept)
    <mailbox>/sieve/.vacation/<sha256>    one file per (vacation handle, sender) that got an
                                          out-of-office reply: the unix time it went
    <mailroot>/.pop3coexist.sieve-changes its modification time changes whenever any
                                          mailbox's active script is set or unset
                                          (``changes``: the rules stage's no-script cache)

``<mailbox>`` is the Maildir folder (``<state_dir>/mailroot/<domain>/<local part>``), so
removing a mailbox removes its rules, and Maildir tools ignore the extra entries (neither
starts a Maildir++ folder name). The symlink is Dovecot's ``.dovecot.sieve`` pattern: it is
replaced atomically (a new link renamed over the old), so a delivery reads the old or the new
active script, never none. Scripts are written to a temporary file, fsynced and renamed.

Script names (RFC 5804 section 1.6): 1 to 128 characters, no control characters, no ``/``,
not starting with ``.``. Every method is blocking; unknown mailboxes raise
``errors.NoSuchMailbox``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import time
import unicodedata
from pathlib import Path
from typing import Any

from zope.interface import implementer

from pop3coexist.fsutil import fsync_dir, write_atomic
from pop3coexist.interfaces import ISieveScripts

SCRIPTS = "sieve"
ACTIVE_LINK = ".pop3coexist.sieve"
CHANGES = ".pop3coexist.sieve-changes"
SUFFIX = ".sieve"
VACATION = ".vacation"
MAX_NAME = 128


class ScriptError(Exception):
    """A script request that cannot be carried out; ``code`` is the ManageSieve response
    code (RFC 5804 section 1.3) that says why."""

    code = ""


class NoSuchScript(ScriptError):
    code = "NONEXISTENT"


class ScriptExists(ScriptError):
    code = "ALREADYEXISTS"


class ScriptActive(ScriptError):
    code = "ACTIVE"


class BadScriptName(ScriptError, ValueError):
    code = ""


def check_name(name: str) -> str:
    """The script name if the store can keep it, else BadScriptName (one line why)."""
    if not name or len(name) > MAX_NAME:
        raise BadScriptName(f"a script name has 1 to {MAX_NAME} characters")
    if name.startswith(".") or "/" in name:
        raise BadScriptName("a script name neither starts with '.' nor holds '/'")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise BadScriptName("a script name has no control characters (RFC 5804 section 1.6)")
    return unicodedata.normalize("NFC", name)


@implementer(ISieveScripts)
class SieveScripts:
    """See ISieveScripts. ``store`` is the MaildirStore whose mailboxes hold the scripts."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._changes = os.path.join(os.fspath(store.root), CHANGES)

    def changes(self) -> int:
        """See ISieveScripts: the change marker's modification time in nanoseconds (0: never
        changed). One ``stat``; raises OSError other than a missing marker."""
        try:
            return os.stat(self._changes).st_mtime_ns
        except FileNotFoundError:
            return 0

    def _changed(self) -> None:
        """Move the change marker on (made when missing): a later time than it had, even
        within one clock tick, so every reader's cached "no script" ends."""
        fd = os.open(self._changes, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            before = os.fstat(fd).st_mtime_ns
            now = max(time.time_ns(), before + 1000)
            os.utime(fd, ns=(now, now))
        finally:
            os.close(fd)

    def _folder(self, domain: str, mailbox: str) -> Path:
        return Path(self.store.mailbox_folder(domain, mailbox))

    def _script(self, folder: Path, name: str) -> Path:
        return folder / SCRIPTS / (check_name(name) + SUFFIX)

    # -- reading
    def list_scripts(self, domain: str, mailbox: str) -> list[tuple[str, bool, int]]:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        active = self._active_name(folder)
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder / SCRIPTS):
                if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    name = entry.name[: -len(SUFFIX)]
                    out.append((name, name == active, entry.stat().st_size))
        return sorted(out)

    def _active_name(self, folder: Path) -> str | None:
        try:
            target = os.readlink(folder / ACTIVE_LINK)
        except (FileNotFoundError, OSError):
            return None
        name = os.path.basename(target)
        return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else None

    def get_script(self, domain: str, mailbox: str, name: str) -> str:
        """See ISieveScripts."""
        path = self._script(self._folder(domain, mailbox), name)
        try:
            return path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise NoSuchScript(f"there is no script {name!r}") from None

    def active_script(self, domain: str, mailbox: str) -> tuple[str, str, tuple] | None:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        link = folder / ACTIVE_LINK
        try:
            with open(link, "rb") as f:
                st = os.fstat(f.fileno())
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:  # no active script, or a dangling link
            return None
        name = self._active_name(folder) or ""
        return name, text, (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- writing
    def put_script(self, domain: str, mailbox: str, name: str, text: str) -> None:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        path = self._script(folder, name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))

    def set_active(self, domain: str, mailbox: str, name: str) -> None:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        link = folder / ACTIVE_LINK
        if not name:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            fsync_dir(folder)
            self._changed()
            return
        path = self._script(folder, name)
        if not path.is_file():
            raise NoSuchScript(f"there is no script {name!r}")
        tmp = folder / f".pop3coexist.sieve.{os.getpid()}.{time.monotonic_ns()}"
        os.symlink(f"{SCRIPTS}/{path.name}", tmp)
        os.replace(tmp, link)
        fsync_dir(folder)
        self._changed()  # after the link: a reader that sees the new time finds the script

    def delete_script(self, domain: str, mailbox: str, name: str) -> None:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        path = self._script(folder, name)
        if self._active_name(folder) == check_name(name):
            raise ScriptActive(f"{name!r} is the active script; deactivate it first")
        try:
            path.unlink()
        except FileNotFoundError:
            raise NoSuchScript(f"there is no script {name!r}") from None
        fsync_dir(path.parent)

    def rename_script(self, domain: str, mailbox: str, old: str, new: str) -> None:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox)
        source, target = self._script(folder, old), self._script(folder, new)
        if not source.is_file():
            raise NoSuchScript(f"there is no script {old!r}")
        if target.exists():
            raise ScriptExists(f"a script {new!r} exists already")
        was_active = self._active_name(folder) == check_name(old)
        os.link(source, target)  # fails if the target appeared meanwhile
        if was_active:
            self.set_active(domain, mailbox, new)
        source.unlink()
        fsync_dir(source.parent)

    # -- out-of-office records
    def vacation_due(self, domain: str, mailbox: str, key: str, period: float,
                     now: float | None = None) -> bool:
        """See ISieveScripts."""
        folder = self._folder(domain, mailbox) / SCRIPTS / VACATION
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        record = folder / hashlib.sha256(key.encode("utf-8")).hexdigest()
        now = time.time() if now is None else now
        fd = os.open(record, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two deliveries at once: one reply
            try:
                last = float(os.pread(fd, 64, 0).decode("ascii") or "nan")
            except ValueError:
                last = float("nan")
            if 0 <= now - last < period:
                return False
            data = f"{now:.3f}".encode("ascii")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
        return True


def load_srs_key(path: Path) -> bytes:
    """Blocking: the SRS secret in ``path`` (the secret alone, a trailing newline ignored);
    when the file does not exist, a new random one is written there first (mode 0600), so
    every process of the server and every restart uses the same key."""
    path = Path(path)
    if not path.exists():  # write it whole, then link it in: a reader never sees it half made
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # another process may have made it first: theirs counts
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
    key = path.read_bytes().rstrip(b"\r\n")
    if not key:
        raise ValueError(f"{path} is empty: an SRS key is needed")
    return key
