"""Administrator accounts and admin API tokens: separate from mail accounts (README "Admin
console").

``AdminAccounts`` (``[admin_web] accounts_file``, default ``<state_dir>/admin/accounts.json``)::

    {"version": 1, "accounts": {"alice": {"scrypt": "16384$8$1$<salt b64>$<key b64>",
                                          "created": unix time}}}

Passwords are kept as scrypt keys (RFC 7914; N=2^14, r=8, p=1: about 16 MiB and tens of
milliseconds per check, ``hashlib.scrypt``), a fresh 16-byte salt each. A check of an unknown
name still runs scrypt over a fixed key, so the time does not tell which names exist.

``AdminTokens`` (``[admin_web] tokens_file``, default ``<state_dir>/admin/tokens.json``)::

    {"version": 1, "tokens": {"<id>": {"admin": "alice", "sha256": "<hex>",
                                       "created": unix time}}}

A token is ``p3ca_<id>_<secret>`` (id: 8 hex digits; secret: 32 random bytes, URL-safe base64),
shown once when made; only its SHA-256 is kept (a 256-bit random secret needs no slow hash:
nobody can guess it, and the stored hash does not give it back). Compared in constant time.

Both files: mode 0600, every change a whole-file rewrite (temporary file, fsync, rename, fsync
of the folder) under an ``flock`` of a lock file beside it, re-read on every use (a change by
``pop3coexist-admin`` applies to the running server at once). Blocking.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pop3coexist.errors import AdminError
from pop3coexist.fsutil import write_atomic

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_N, _R, _P = 2 ** 14, 8, 1
_MAXMEM = 64 * 1024 * 1024
_TOKEN = re.compile(r"^p3ca_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


def check_name(name: str) -> str:
    """``name`` if it is a valid administrator name (1-64 of letters, digits, ``._-``, not
    starting with a punctuation mark), else AdminError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise AdminError(f"{name!r}: an administrator name is 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def _scrypt(password: str, salt: bytes, n: int = _N, r: int = _R, p: int = _P) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM,
                          dklen=32)


def hash_password(password: str) -> str:
    """``"N$r$p$salt$key"`` for ``password`` (module docstring)."""
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt)
    return "$".join((str(_N), str(_R), str(_P), base64.b64encode(salt).decode(),
                     base64.b64encode(key).decode()))


def verify_password(stored: str | None, password: str) -> bool:
    """True if ``password`` matches ``stored`` (``hash_password``); with ``stored`` None a
    dummy check of the same cost runs and False is returned."""
    try:
        if stored is None:
            raise ValueError
        n, r, p, salt64, key64 = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        if not (2 <= n_ <= 2 ** 20 and 1 <= r_ <= 32 and 1 <= p_ <= 16):
            raise ValueError
        salt, key = base64.b64decode(salt64, validate=True), base64.b64decode(key64,
                                                                                validate=True)
    except (ValueError, binascii.Error):
        _scrypt(password, b"\0" * 16)
        return False
    return hmac.compare_digest(_scrypt(password, salt, n_, r_, p_), key)


class _JsonFile:
    """One small JSON document, changed under a lock and replaced atomically."""

    section = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as e:
            raise AdminError(f"{self.path}: not valid JSON ({e})") from None
        entries = data.get(self.section) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise AdminError(f"{self.path}: no {self.section!r} table")
        return entries

    @contextmanager
    def changing(self) -> Iterator[dict[str, Any]]:
        """The entries to change in place; written back when the block ends without error."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(self.path.with_name(self.path.name + ".lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.read()
            yield entries
            text = json.dumps({"version": 1, self.section: entries}, indent=1, sort_keys=True)
            write_atomic(self.path, text.encode() + b"\n")
        finally:
            os.close(lock)


class AdminAccounts(_JsonFile):
    """The administrators who may log in to the console (module docstring)."""

    section = "accounts"

    def names(self) -> list[str]:
        return sorted(self.read())

    def set_password(self, name: str, password: str, *, create: bool = True) -> bool:
        """Set ``name``'s password (a new account when ``create``); True if it is new.
        AdminError for a bad name, an empty password, or (``create`` False) no such
        account."""
        check_name(name)
        if not password:
            raise AdminError("empty passwords are not allowed")
        hashed = hash_password(password)
        with self.changing() as accounts:
            new = name not in accounts
            if new and not create:
                raise AdminError(f"no administrator {name}")
            accounts[name] = {"scrypt": hashed,
                              "created": accounts.get(name, {}).get("created", time.time())}
        return new

    def remove(self, name: str) -> None:
        """Remove ``name`` (AdminError if there is none)."""
        with self.changing() as accounts:
            if accounts.pop(name, None) is None:
                raise AdminError(f"no administrator {name}")

    def check(self, name: str, password: str) -> bool:
        """True if ``name`` exists and ``password`` is its password (constant cost)."""
        entry = self.read().get(name) if isinstance(name, str) else None
        stored = entry.get("scrypt") if isinstance(entry, dict) else None
        return verify_password(stored, password) and stored is not None


class AdminTokens(_JsonFile):
    """The admin API's bearer tokens (module docstring)."""

    section = "tokens"

    def add(self, admin: str) -> tuple[str, str]:
        """A new token for ``admin``: ``(id, token)``; the token is never stored."""
        check_name(admin)
        with self.changing() as tokens:
            ident = secrets.token_hex(4)
            while ident in tokens:
                ident = secrets.token_hex(4)
            token = f"p3ca_{ident}_{secrets.token_urlsafe(32)}"
            tokens[ident] = {"admin": admin, "created": time.time(),
                             "sha256": hashlib.sha256(token.encode()).hexdigest()}
        return ident, token

    def remove(self, which: str) -> list[str]:
        """Remove the token with id ``which``, or every token of administrator ``which``;
        the ids removed (AdminError if none)."""
        with self.changing() as tokens:
            gone = [i for i, t in tokens.items() if i == which or t.get("admin") == which]
            if not gone:
                raise AdminError(f"no token or administrator {which}")
            for ident in gone:
                del tokens[ident]
        return gone

    def entries(self) -> list[dict[str, Any]]:
        """``[{"id", "admin", "created"}]``, by administrator then id."""
        return sorted(({"id": i, "admin": t.get("admin", "?"), "created": t.get("created")}
                       for i, t in self.read().items()), key=lambda e: (e["admin"], e["id"]))

    def admin_for(self, token: str) -> str | None:
        """The administrator ``token`` belongs to, or None (malformed, unknown, wrong)."""
        match = _TOKEN.match(token) if isinstance(token, str) else None
        if match is None:
            return None
        entry = self.read().get(match.group(1))
        if not isinstance(entry, dict):
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        if hmac.compare_digest(digest, str(entry.get("sha256", ""))):
            return str(entry.get("admin"))
        return None
