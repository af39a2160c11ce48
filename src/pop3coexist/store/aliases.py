"""Aliases and distribution lists kept beside the mailboxes: implements ``interfaces.IAliasTable``
(for ``store.maildir.MaildirStore``) and the changes ``pop3coexist-admin alias`` / ``list`` make.

On disk, one file per domain, beside the domain metadata (README "On disk")::

    <root>/<domain>/.pop3coexist.aliases.json
        {"aliases": {"sales": ["ted@pop.contoso.test", "bob@example.org"]},
         "lists": {"team": {"members": ["ted@pop.contoso.test", "kim@pop.contoso.test"],
                            "senders": "anyone", "owner": null}}}

Keys are local parts (lower case); targets and members are full addresses as given (lower
case). The file is replaced atomically (temp file, fsync, rename, fsync folder) under an
``fcntl.flock`` so two admin processes can change it at once; readers cache it only as long as
a ``stat`` shows the same file (inode, size, mtime), so a running server sees a change at its
next look-up. Everything here is blocking.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from pop3coexist import errors
from pop3coexist.address import AddressError, is_valid_mailbox_name, normalise_domain, parse_address
from pop3coexist.fsutil import fsync_dir, retry_stale
from pop3coexist.interfaces import SENDERS_CHOICES, Distribution

ALIASES_NAME = ".pop3coexist.aliases.json"
ALIASES_LOCK_NAME = ".pop3coexist.aliases.json.lock"
OWNER_PREFIX = "owner-"  # owner-LIST@DOMAIN: the list's envelope sender (RFC 5321 section 3.9)


def split(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain), lower case; ValueError with a clear message."""
    if not isinstance(address, str) or "@" not in address:
        raise ValueError(f"{address!r} is not NAME@DOMAIN")
    local, _, domain = address.strip().rpartition("@")
    try:
        domain = normalise_domain(domain)
    except AddressError as e:
        raise ValueError(f"{address!r}: {e}") from None
    local = local.lower()
    if not is_valid_mailbox_name(local):
        raise ValueError(f"{address!r}: names are 1-64 characters of letters, digits and "
                         ".!#$%&'*+=?^_`{|}~- without a leading, trailing or double dot")
    return local, domain


def normalise_target(text: str) -> str:
    """A target or member address, lower case; ValueError when it is not a plain address."""
    try:
        parsed = parse_address(text.strip().strip("<>"))
    except AddressError as e:
        raise ValueError(f"{text!r} is not a mail address: {e}") from None
    if parsed.quoted or parsed.literal is not None:
        raise ValueError(f"{text!r}: use a plain address (no quoted local part, no [literal])")
    return parsed.key.lower()


class AliasFiles:
    """The alias files under the mailroot ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- reading

    def _path(self, domain: str) -> Path:
        return self.root / domain / ALIASES_NAME

    def read(self, domain: str) -> dict[str, Any]:
        """The table of ``domain`` ({"aliases": {...}, "lists": {...}}); empty when none.
        StoreError when the file cannot be read or is damaged."""
        path = self._path(domain)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return {"aliases": {}, "lists": {}}
        except OSError as e:
            raise errors.StoreError(f"cannot read {path}: {e.strerror}") from e
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(domain)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        try:
            data = json.loads(retry_stale(path.read_bytes))
        except OSError as e:
            raise errors.StoreError(f"cannot read {path}: {e.strerror}") from e
        except ValueError as e:
            raise errors.StoreError(f"damaged alias file {path}: {e}") from e
        data = _checked(data, path)
        with self._lock:
            self._cache[domain] = (stamp, data)
        return data

    def distribution(self, address: str) -> Distribution | None:
        """See ``IAliasTable.distribution``."""
        try:
            local, domain = split(address)
        except ValueError:
            return None
        if not (self.root / domain).is_dir():
            return None
        data = self.read(domain)
        key = f"{local}@{domain}"
        if local in data["aliases"]:
            return Distribution("alias", key, tuple(data["aliases"][local]))
        entry = data["lists"].get(local)
        if entry is not None:
            return Distribution("list", key, tuple(entry["members"]), entry["senders"],
                                entry["owner"])
        return None

    # -- changing (the admin command)

    @contextlib.contextmanager
    def changing(self, domain: str):
        """Read-modify-write the table of ``domain`` under its flock; yields the dict to change,
        which is written back atomically when the block ends without an exception."""
        folder = self.root / domain
        if not folder.is_dir():
            raise errors.NoSuchMailbox(f"no such domain: {domain}")
        fd = os.open(folder / ALIASES_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read(domain)
            data = {"aliases": {k: list(v) for k, v in current["aliases"].items()},
                    "lists": {k: {**v, "members": list(v["members"])}
                              for k, v in current["lists"].items()}}
            yield data
            self._write(folder, data)
        finally:
            os.close(fd)

    def _write(self, folder: Path, data: dict[str, Any]) -> None:
        tmp = folder / f"{ALIASES_NAME}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
        text = json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / ALIASES_NAME)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(folder)


def _checked(data: Any, path: Path) -> dict[str, Any]:
    """The table read from ``path``, with its shape checked (StoreError when damaged)."""
    bad = errors.StoreError(f"damaged alias file {path}: unexpected shape")
    if not isinstance(data, dict):
        raise bad
    aliases = data.get("aliases", {})
    lists = data.get("lists", {})
    if not isinstance(aliases, dict) or not isinstance(lists, dict):
        raise bad
    for targets in aliases.values():
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise bad
    out_lists: dict[str, dict[str, Any]] = {}
    for name, entry in lists.items():
        if not isinstance(entry, dict):
            raise bad
        members = entry.get("members", [])
        senders = entry.get("senders", "anyone")
        owner = entry.get("owner")
        if (not isinstance(members, list) or not all(isinstance(m, str) for m in members)
                or senders not in SENDERS_CHOICES or not (owner is None or isinstance(owner, str))):
            raise bad
        out_lists[name] = {"members": members, "senders": senders, "owner": owner}
    return {"aliases": dict(aliases), "lists": out_lists}
