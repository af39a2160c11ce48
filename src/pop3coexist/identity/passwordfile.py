"""The encrypted password file (``auth.method = "passwordfile"``) and its account checker.

``PasswordFile`` is the on-disk database ``mailbox@domain -> credentials`` kept at
``<state_dir>/passwords.json`` (README "On disk"). For each address it holds:

- an scrypt hash of the password (``hashlib.scrypt``, n=2**14, r=8, p=1 by default, a 16-byte
  random salt, a 32-byte result), stored with its parameters so they can be raised later;
- when ``keep_secrets`` is true (``auth.apop = true``), the password itself encrypted with
  AES-256-GCM under a 32-byte key kept in a separate key file (``<state_dir>/passwords.key``),
  the address being the associated data (a secret cannot be moved to another address). APOP
  and CRAM-MD5 need that shared secret;
- SCRAM-SHA-256 keys (RFC 5802 section 3: salt, iteration count, StoredKey, ServerKey; never
  the password, ``identity.scram``), made whenever a password is set, after a good clear-text
  log-in of an account that has none yet, and by ``keys_from_secrets`` (the admin verb
  ``mailbox scram-keys``) from the stored secrets. Files written before they existed keep
  working: an entry without them simply has none.

The file is JSON, mode 0600, with a format name and version::

    {"format": "pop3coexist-passwords", "version": 1, "key_id": "<hex>" | null,
     "users": {"ted@pop.contoso.test": {
        "hash": {"alg": "scrypt", "n": 16384, "r": 8, "p": 1, "salt": "<b64>", "dk": "<b64>"},
        "secret": {"alg": "AES-256-GCM", "nonce": "<b64>", "data": "<b64>"},   # optional
        "scram": {"alg": "SCRAM-SHA-256", "i": 4096, "salt": "<b64>",          # optional
                  "stored_key": "<b64>", "server_key": "<b64>"},
        "changed": 1700000000}}}

``key_id`` names the key the secrets were encrypted with, so a wrong key file is reported at
start-up instead of failing every APOP log-in. The key file holds one line: the key in base64.
It is created on first use with mode 0600 (never overwritten), and a key file that the group
or others can read is refused.

Every change is a whole-file rewrite (temp file, fsync, rename, fsync of the folder) made
under an exclusive ``fcntl`` lock on ``passwords.json.lock``, after re-reading the file under
that lock: two admin commands at once lose nothing. Readers never lock: they see the old or
the new file. A reader re-reads the file when its (inode, mtime_ns, ctime_ns, size) changed,
so the running server sees ``pop3coexist-admin`` changes without a restart. On a shared volume
``stat`` can describe the old file for a while after another node renamed a new one over it
(NFS keeps attributes up to ``acregmax``, 60 s; GlusterFS's FUSE client its attribute and entry
timeouts) while ``open`` already reaches the new one (close-to-open consistency): so a name not
found, or a password that does not match, is looked up once more in a fresh read of the file,
at most once per ``RECHECK_INTERVAL`` seconds per process (a stranger guessing names cannot
make every attempt a file read).

A password that scrypt has just verified is remembered for ``verified_ttl`` seconds
(``auth.login_cache``, default 5 minutes; 0 turns it off), per process, as an HMAC-SHA-256
of the stored hash and the password under a random key made at start (never written
anywhere): the next log-in with the same password (a mail client polling every few minutes,
POP3 and SMTP AUTH alike) costs a hash instead of 16 MB and ~80 ms of scrypt. Only successes
are remembered; a wrong password, or a password changed since (the stored hash differs), still
runs scrypt, so a guess costs what it cost before, and a password change or removal is seen at
the next log-in. At most ``VERIFIED_MAX`` addresses are remembered (then the memory starts
afresh). The same idea as Dovecot's ``auth_cache`` and saslauthd's ``-c``; the price is that a
dump of the server's memory holds fast-to-test digests of recently used passwords for the TTL.

``PasswordFileChecker`` implements ``interfaces.IAccountChecker`` over a ``PasswordFile``.

Nothing here logs, raises or ``repr``s a password, a secret, a hash or the key.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist.address import AddressError, login_to_address
from pop3coexist.errors import AdminError, AuthUnavailable, StoreError
from pop3coexist.fsutil import fsync_dir as _fsync_dir
from pop3coexist.fsutil import retry_stale, stat_cached, write_atomic
from pop3coexist.identity.logins import map_login
from pop3coexist.identity.scram import MAX_ITERATIONS, ScramKeys, derive_keys
from pop3coexist.identity.stamps import stamp_of
from pop3coexist.interfaces import (
    IAccountChecker,
    IBlockingRecipientLookup,
    ICachedRecipientLookup,
    ICredentialStamp,
    IScramCredentials,
    IScramKeyStore,
    ISelfCheck,
)

__all__ = ["BadPassword", "PasswordFile", "PasswordFileChecker", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "pop3coexist-passwords"
FORMAT_VERSION = 1

KEY_BYTES = 32
SALT_BYTES = 16
HASH_BYTES = 32
NONCE_BYTES = 12
MAX_PASSWORD_CHARS = 1024
VERIFIED_MAX = 100_000  # addresses whose verified password a process remembers at most
# seconds: a name not found or a password refused is looked up again in a fresh read of the
# file at most this often per process (module docstring: stale attributes on shared volumes)
RECHECK_INTERVAL = 1.0
# Bounds for parameters read from the file: a corrupt or hostile entry must not make a log-in
# allocate gigabytes or loop for minutes.
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16

_log = Logger()


class BadPassword(AdminError, ValueError):
    """``set_password`` refuses the password (empty, too long, NUL/CR/LF); str() is one line
    that never repeats the password. An ``AdminError`` so the admin command reports it."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64")


def _key_id(key: bytes) -> str:
    """A short public fingerprint of the key (not the key, not reversible)."""
    return hashlib.sha256(b"pop3coexist password key id\0" + key).hexdigest()[:16]


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=128 * r * (n + p + 2) + 2**20
    )


def _mode_text(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    dk: bytes


@dataclass(frozen=True)
class _Entry:
    hash: _Hash
    secret_nonce: bytes | None
    secret_data: bytes | None
    changed: int
    scram: ScramKeys | None = None

    @property
    def has_secret(self) -> bool:
        return self.secret_data is not None


def _parse_entry(address: str, raw: Any) -> _Entry:
    """One user's entry, checked; ValueError names what is wrong (never the value)."""
    if not isinstance(raw, dict):
        raise ValueError(f"entry for {address} is not an object")
    h = raw.get("hash")
    if not isinstance(h, dict) or h.get("alg") != "scrypt":
        raise ValueError(f"entry for {address} has no scrypt hash")
    n, r, p = h.get("n"), h.get("r"), h.get("p")
    for name, value, top in (("n", n, _MAX_SCRYPT_N), ("r", r, _MAX_SCRYPT_R), ("p", p, _MAX_SCRYPT_P)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"entry for {address} has an invalid scrypt parameter {name}")
    if n < 2 or n & (n - 1):
        raise ValueError(f"entry for {address}: scrypt n must be a power of two")
    salt = _unb64(h.get("salt"), f"salt of {address}")
    dk = _unb64(h.get("dk"), f"hash of {address}")
    if len(salt) < 8 or not 16 <= len(dk) <= 64:
        raise ValueError(f"entry for {address} has a salt or hash of the wrong length")
    nonce = data = None
    s = raw.get("secret")
    if s is not None:
        if not isinstance(s, dict) or s.get("alg") != "AES-256-GCM":
            raise ValueError(f"entry for {address} has an unknown secret format")
        nonce = _unb64(s.get("nonce"), f"secret nonce of {address}")
        data = _unb64(s.get("data"), f"secret of {address}")
        if len(nonce) != NONCE_BYTES or len(data) < 16:
            raise ValueError(f"entry for {address} has a secret of the wrong length")
    changed = raw.get("changed", 0)
    if isinstance(changed, bool) or not isinstance(changed, int):
        raise ValueError(f"entry for {address} has an invalid 'changed' time")
    return _Entry(_Hash(n, r, p, salt, dk), nonce, data, changed, _parse_scram(address, raw.get("scram")))


def _parse_scram(address: str, raw: Any) -> ScramKeys | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("alg") != "SCRAM-SHA-256":
        raise ValueError(f"entry for {address} has an unknown SCRAM key format")
    i = raw.get("i")
    if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= MAX_ITERATIONS:
        raise ValueError(f"entry for {address} has an invalid SCRAM iteration count")
    salt = _unb64(raw.get("salt"), f"SCRAM salt of {address}")
    stored = _unb64(raw.get("stored_key"), f"SCRAM StoredKey of {address}")
    server = _unb64(raw.get("server_key"), f"SCRAM ServerKey of {address}")
    if not salt or len(stored) != 32 or len(server) != 32:
        raise ValueError(f"entry for {address} has SCRAM keys of the wrong length")
    return ScramKeys(salt, i, stored, server)


def _dump_entry(entry: _Entry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hash": {
            "alg": "scrypt",
            "n": entry.hash.n,
            "r": entry.hash.r,
            "p": entry.hash.p,
            "salt": _b64(entry.hash.salt),
            "dk": _b64(entry.hash.dk),
        },
        "changed": entry.changed,
    }
    if entry.secret_data is not None and entry.secret_nonce is not None:
        out["secret"] = {
            "alg": "AES-256-GCM",
            "nonce": _b64(entry.secret_nonce),
            "data": _b64(entry.secret_data),
        }
    if entry.scram is not None:
        out["scram"] = {
            "alg": "SCRAM-SHA-256",
            "i": entry.scram.iterations,
            "salt": _b64(entry.scram.salt),
            "stored_key": _b64(entry.scram.stored_key),
            "server_key": _b64(entry.scram.server_key),
        }
    return out


def _scram_or_none(password: str) -> ScramKeys | None:
    """SCRAM keys for ``password``, or None when SASLprep refuses it (RFC 4013 prohibited
    characters): such an account cannot use SCRAM, as no client could either."""
    try:
        return derive_keys(password)
    except Exception:  # scramp's SASLprep error; never shows the password
        return None


@dataclass
class _Snapshot:
    """The parsed file and the stat signature it was read at."""

    signature: tuple[int, int, int, int] | None  # None: the file does not exist
    key_id: str | None
    users: dict[str, _Entry]


def _address_key(address: str) -> str | None:
    """``mailbox@domain`` in lower case, or None when ``address`` is not one we store."""
    if not isinstance(address, str) or "@" not in address:
        return None
    mapped = login_to_address(address, ())
    if mapped is None:
        return None
    return f"{mapped[0]}@{mapped[1]}"


class PasswordFile:
    """The password database at ``path``, with the secrets' key at ``key_path``.

    Every method is blocking (file I/O, and scrypt takes tens of milliseconds): the server
    calls them off the reactor thread. Bad arguments raise ``ValueError`` (an
    ``address.AddressError`` for a bad address); a corrupt or unsafe file, a missing or wrong
    key raise ``errors.StoreError`` with a message an administrator can act on.

    ``scrypt_n`` (a power of two) is the cost for new hashes; tests pass a small one to stay
    fast. Existing hashes are verified with the parameters stored with them.
    """

    def __init__(
        self,
        path: Path,
        key_path: Path,
        keep_secrets: bool,
        *,
        scrypt_n: int = 2**14,
        scrypt_r: int = 8,
        scrypt_p: int = 1,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        verified_ttl: float = 0.0,
    ) -> None:
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > _MAX_SCRYPT_N:
            raise ValueError("scrypt_n must be a power of two between 2 and 2**20")
        self.path = Path(path)
        self.key_path = Path(key_path)
        self.keep_secrets = bool(keep_secrets)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._n, self._r, self._p = scrypt_n, scrypt_r, scrypt_p
        self._clock = clock
        self._monotonic = monotonic
        self._snapshot: _Snapshot | None = None
        self._read_at: float | None = None  # monotonic time of the last read of the file
        self._seen_signature: tuple[int, int, int, int] | None = None  # stat's, at that read
        self._key: bytes | None = None
        # The hash an unknown user is checked against, so a miss costs what a hit costs.
        self._dummy = _Hash(scrypt_n, scrypt_r, scrypt_p, secrets.token_bytes(SALT_BYTES), b"\0" * HASH_BYTES)
        # passwords scrypt verified lately (module docstring): address -> (tag, expiry)
        self.verified_ttl = float(verified_ttl)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._verified_key = secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"<PasswordFile {str(self.path)!r} keep_secrets={self.keep_secrets}>"

    # ------------------------------------------------------------------ reading

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"password file {self.path}: cannot read it: {e.strerror}")
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _read_raw(self) -> tuple[os.stat_result, bytes] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            with os.fdopen(fd, "rb", closefd=False) as f:
                return st, f.read()
        finally:
            os.close(fd)

    def _read(self) -> _Snapshot:
        """Parse the file as it is now (no cache); read again on ESTALE (another node renamed
        a new version over it: ``fsutil.retry_stale``)."""
        try:
            raw = retry_stale(self._read_raw)
        except OSError as e:
            raise StoreError(f"password file {self.path}: cannot read it: {e.strerror}")
        if raw is None:
            return _Snapshot(None, None, {})
        st, data = raw
        signature = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            # The decoder's message gives a position, never the content.
            where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            raise StoreError(f"password file {self.path} is corrupt: not valid JSON{where}")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise StoreError(f"password file {self.path} is corrupt: not a pop3coexist password file")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise StoreError(f"password file {self.path} is corrupt: no format version")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"password file {self.path} has format version {version}, written by a newer "
                f"pop3coexist (this one reads version {FORMAT_VERSION})"
            )
        if version < 1:
            raise StoreError(f"password file {self.path} is corrupt: bad format version {version}")
        key_id = doc.get("key_id")
        if key_id is not None and not isinstance(key_id, str):
            raise StoreError(f"password file {self.path} is corrupt: bad key_id")
        raw_users = doc.get("users")
        if not isinstance(raw_users, dict):
            raise StoreError(f"password file {self.path} is corrupt: no users table")
        users: dict[str, _Entry] = {}
        for address, raw in raw_users.items():
            key = _address_key(address)
            if key is None or key != address:
                raise StoreError(f"password file {self.path} is corrupt: bad address {address!r}")
            try:
                users[key] = _parse_entry(key, raw)
            except ValueError as e:
                raise StoreError(f"password file {self.path} is corrupt: {e}")
        return _Snapshot(signature, key_id, users)

    def _current(self) -> _Snapshot:
        """The cached snapshot, re-read when the file changed on disk."""
        signature = self._signature()
        snap = self._snapshot
        if snap is None or self._seen_signature != signature:
            snap = self._read()
            self._snapshot = snap
            self._seen_signature = signature
            self._read_at = self._monotonic()
        return snap

    def _recheck(self, key: str | None, seen: _Entry | None) -> tuple[bool, _Entry | None]:
        """``(changed, entry)``: ``key``'s entry in a fresh read of the file (its ``stat``
        not trusted, see the module docstring) and whether it differs from ``seen``; no read
        (``False, seen``) when ``key`` is None or the file was read less than
        RECHECK_INTERVAL seconds ago."""
        now = self._monotonic()
        if key is None or (self._read_at is not None and now - self._read_at < RECHECK_INTERVAL):
            return False, seen
        snap = self._read()
        self._snapshot = snap
        # what stat says now (maybe still the old version): _current reads again when it changes
        self._seen_signature = self._signature()
        self._read_at = now
        entry = snap.users.get(key)
        return entry != seen, entry

    # ------------------------------------------------------------------ the key

    def _check_key_mode(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"key file {self.key_path} is not a regular file")
        if st.st_mode & 0o077:
            raise StoreError(
                f"key file {self.key_path} is readable by group or others (mode "
                f"{_mode_text(st.st_mode)}); run: chmod 600 {self.key_path}"
            )

    def _load_key(self) -> bytes | None:
        """The key from the key file, or None when there is no key file."""
        try:
            fd = os.open(self.key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"key file {self.key_path}: cannot read it: {e.strerror}")
        try:
            self._check_key_mode(os.fstat(fd))
            with os.fdopen(fd, "rb", closefd=False) as f:
                text = f.read(4096)
        finally:
            os.close(fd)
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise StoreError(f"key file {self.key_path} is corrupt: it must hold a {KEY_BYTES}-byte key in base64")
        return key

    def _key_or_none(self) -> bytes | None:
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _create_key(self) -> bytes:
        """Load the key, creating the key file (mode 0600, never overwriting) when missing.

        Called with the write lock held. The key is written to a temporary file, fsynced, then
        hard-linked into place, so the key file either does not exist or is complete.
        """
        existing = self._key_or_none()
        if existing is not None:
            return existing
        key = secrets.token_bytes(KEY_BYTES)
        folder = self.key_path.parent
        tmp = folder / f".{self.key_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, _b64(key).encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.key_path)
            except FileExistsError:
                # Somebody else made one first: use theirs.
                self._key = None
                loaded = self._key_or_none()
                if loaded is None:
                    raise StoreError(f"key file {self.key_path} vanished while it was being created")
                return loaded
            _fsync_dir(folder)
        except OSError as e:
            raise StoreError(f"key file {self.key_path}: cannot create it: {e.strerror}")
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._key = key
        return key

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _locked(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"password file lock {self.lock_path}: cannot open it: {e.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, key_id: str | None, users: dict[str, _Entry]) -> None:
        """Atomically replace the file (called with the lock held)."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "key_id": key_id,
            "users": {a: _dump_entry(users[a]) for a in sorted(users)},
        }
        data = (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode("utf-8")
        try:
            write_atomic(self.path, data)
        except OSError as e:
            raise StoreError(f"password file {self.path}: cannot write it: {e.strerror}")
        self._snapshot = None  # re-read (and re-stat) on next use

    def _hash(self, password: bytes) -> _Hash:
        salt = secrets.token_bytes(SALT_BYTES)
        dk = _scrypt(password, salt, self._n, self._r, self._p, HASH_BYTES)
        return _Hash(self._n, self._r, self._p, salt, dk)

    # ------------------------------------------------------------------ public API

    def set_password(self, address: str, password: str) -> bool:
        """Set (or replace) the password of ``address``; True when the address is new.

        ``address`` is ``mailbox@domain`` (any case; stored in lower case). The password is a
        non-empty str of at most 1024 characters without NUL, CR or LF (those could never be
        typed into a log-in). With ``keep_secrets`` the secret is stored encrypted too, and the
        key file is created if missing; without it any old secret is dropped.
        """
        key = _address_key(address)
        if key is None:
            raise AddressError(f"{address!r} is not a mailbox address (mailbox@domain)")
        _check_password(password)
        encoded = password.encode("utf-8")
        new_hash = self._hash(encoded)  # slow: outside the lock
        scram = _scram_or_none(password)
        with self._locked():
            snap = self._read()
            others_with_secret = sum(1 for a, e in snap.users.items() if a != key and e.has_secret)
            key_id = snap.key_id if others_with_secret else None
            nonce = data = None
            if self.keep_secrets:
                self._key = None  # re-read the key file under the lock
                aes_key = self._key_or_none()
                if aes_key is None:
                    if others_with_secret:
                        raise StoreError(
                            f"key file {self.key_path} is missing but the password file holds "
                            f"{others_with_secret} secret(s): restore the key file (or drop the "
                            "secrets and set every password again)"
                        )
                    aes_key = self._create_key()
                if key_id is not None and key_id != _key_id(aes_key):
                    raise StoreError(
                        f"key file {self.key_path} is not the key the password file's secrets "
                        "were encrypted with: restore the right key file"
                    )
                key_id = _key_id(aes_key)
                nonce = secrets.token_bytes(NONCE_BYTES)
                data = AESGCM(aes_key).encrypt(nonce, encoded, key.encode("ascii"))
            users = dict(snap.users)
            is_new = key not in users
            # 'changed' grows with every change, even two in one second: it is what
            # credential_stamp compares (a web session of the old password ends)
            changed = int(self._clock())
            if not is_new:
                changed = max(changed, users[key].changed + 1)
            users[key] = _Entry(new_hash, nonce, data, changed, scram)
            self._write(key_id, users)
        return is_new

    def remove(self, address: str) -> bool:
        """Remove ``address``; True when it was there."""
        key = _address_key(address)
        if key is None:
            raise AddressError(f"{address!r} is not a mailbox address (mailbox@domain)")
        with self._locked():
            snap = self._read()
            if key not in snap.users:
                return False
            users = dict(snap.users)
            del users[key]
            self._write(snap.key_id, users)
        return True

    def remove_domain(self, domain: str) -> int:
        """Remove every address in ``domain`` (for ``domain remove``); returns how many."""
        suffix = "@" + domain.lower()
        with self._locked():
            snap = self._read()
            users = {a: e for a, e in snap.users.items() if not a.endswith(suffix)}
            removed = len(snap.users) - len(users)
            if removed:
                self._write(snap.key_id, users)
        return removed

    def drop_secrets(self) -> int:
        """Delete every stored secret (after ``auth.apop`` was turned off); returns how many."""
        with self._locked():
            snap = self._read()
            count = sum(1 for e in snap.users.values() if e.has_secret)
            if count:
                users = {a: _Entry(e.hash, None, None, e.changed, e.scram) for a, e in snap.users.items()}
                self._write(None, users)
        return count

    def merge_from(self, other: PasswordFile) -> tuple[int, int]:
        """Add the addresses of ``other`` (another password file, e.g. one a backup holds)
        that this file lacks (``restore`` into a running server); an address already here
        keeps its password. A secret (APOP / CRAM-MD5) comes along only when both files use
        the same key; otherwise the entry comes without it (its owner's APOP works again after
        the next ``mailbox passwd``). Returns ``(added, secrets dropped)``; StoreError for a
        corrupt file or key."""
        theirs = other._read()
        other_key = other._key_or_none() if any(e.has_secret for e in theirs.users.values()) else None
        with self._locked():
            snap = self._read()
            self._key = None
            mine = self._key_or_none()
            same_key = other_key is not None and mine is not None and other_key == mine
            users = dict(snap.users)
            added = dropped = 0
            for address, entry in theirs.users.items():
                if address in users:
                    continue
                if entry.has_secret and not same_key:
                    entry = _Entry(entry.hash, None, None, entry.changed)
                    dropped += 1
                users[address] = entry
                added += 1
            if added:
                has_secret = any(e.has_secret for e in users.values())
                key_id = (snap.key_id or (theirs.key_id if same_key else None)) if has_secret else None
                self._write(key_id, users)
        return added, dropped

    def exists(self, address: str) -> bool:
        """True when ``address`` (any case) has a password."""
        key = _address_key(address)
        if key is None:
            return False
        if key in self._current().users:
            return True
        return self._recheck(key, None)[1] is not None

    def changed_at(self, address: str) -> int | None:
        """When the password of ``address`` was last set (seconds since the epoch, growing
        with every change), or None when it has none. Reads the file when it changed, and
        once more (``_recheck``) before saying None."""
        key = _address_key(address)
        if key is None:
            return None
        entry = self._current().users.get(key)
        if entry is None:
            entry = self._recheck(key, None)[1]
        return entry.changed if entry is not None else None

    def exists_cached(self, key: str) -> bool:
        """Never blocks on the disk: True when the snapshot in memory has ``key`` (an address
        key, lower case) and the file's status, from the kernel's cache, is the one that
        snapshot was read at (what ``exists`` would then answer without a read); False when
        only ``exists`` can say."""
        snap = self._snapshot
        if snap is None or key not in snap.users:
            return False
        st = stat_cached(self.path)
        return st is not None and self._seen_signature == (
            st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def addresses(self) -> list[str]:
        """Every address with a password, sorted, lower case."""
        return sorted(self._current().users)

    def verify(self, address: str, password: str | bytes) -> bool:
        """True when ``password`` is the password of ``address``.

        An unknown address, an empty password, one holding a NUL or one that is not UTF-8
        costs the same scrypt time as a real check, and the final compare is constant-time.
        """
        key = _address_key(address)
        entry = self._current().users.get(key) if key is not None else None
        if isinstance(password, str):
            try:
                candidate = password.encode("utf-8")
            except UnicodeEncodeError:
                candidate = b""
        elif isinstance(password, (bytes, bytearray)):
            candidate = bytes(password)
        else:
            candidate = b""
        # No stored password holds a NUL (set_password refuses them), and HMAC (inside scrypt)
        # pads short keys with zero bytes, so "pw" and "pw\0" would hash alike: refuse NULs.
        usable = candidate != b"" and b"\0" not in candidate
        if entry is not None and usable and self._verified_lately(key, entry.hash, candidate):
            return True
        h = entry.hash if entry is not None else self._dummy
        got = _scrypt(candidate, h.salt, h.n, h.r, h.p, len(h.dk))
        if hmac.compare_digest(got, h.dk) and entry is not None and usable:
            self._remember_verified(key, h, candidate)
            return True
        changed, entry = self._recheck(key, entry)
        if not changed or entry is None or not usable:
            return False
        h = entry.hash  # added or changed on another node since the last read
        if hmac.compare_digest(_scrypt(candidate, h.salt, h.n, h.r, h.p, len(h.dk)), h.dk):
            self._remember_verified(key, h, candidate)
            return True
        return False

    def _verified_tag(self, h: _Hash, candidate: bytes) -> bytes:
        """What is remembered of a verified password: an HMAC over the stored hash (so a
        changed password never matches) and the password, under this process's random key."""
        return hmac.new(self._verified_key, h.dk + h.salt + b"\0" + candidate, "sha256").digest()

    def _verified_lately(self, key: str | None, h: _Hash, candidate: bytes) -> bool:
        """True when scrypt verified this very password against this very hash less than
        ``verified_ttl`` seconds ago (in this process)."""
        if key is None or self.verified_ttl <= 0:
            return False
        hit = self._verified.get(key)
        if hit is None:
            return False
        tag, until = hit
        if until <= self._monotonic():
            self._verified.pop(key, None)
            return False
        return hmac.compare_digest(tag, self._verified_tag(h, candidate))

    def _remember_verified(self, key: str | None, h: _Hash, candidate: bytes) -> None:
        if key is None or self.verified_ttl <= 0:
            return
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()  # bounded memory; the next log-ins run scrypt again
        self._verified[key] = (self._verified_tag(h, candidate), self._monotonic() + self.verified_ttl)

    def needs_rehash(self, address: str) -> bool:
        """True when the stored hash of ``address`` was made with other scrypt parameters
        than this object's (after the cost was raised)."""
        key = _address_key(address)
        entry = self._current().users.get(key) if key is not None else None
        if entry is None:
            return False
        return (entry.hash.n, entry.hash.r, entry.hash.p) != (self._n, self._r, self._p)

    def rehash(self, address: str, password: str) -> bool:
        """Re-hash ``address``'s password with the current parameters, right after ``password``
        was verified (at log-in). Compare-and-set: nothing is written when the password was
        changed meanwhile or the parameters already match; the secret is kept as it is.
        Returns True when the file was rewritten."""
        key = _address_key(address)
        seen = self._current().users.get(key) if key is not None else None
        if key is None or seen is None or not password or "\0" in password:
            return False
        if (seen.hash.n, seen.hash.r, seen.hash.p) == (self._n, self._r, self._p):
            return False
        encoded = password.encode("utf-8")
        h = seen.hash
        if not hmac.compare_digest(_scrypt(encoded, h.salt, h.n, h.r, h.p, len(h.dk)), h.dk):
            return False  # checked against the very entry compared below
        new_hash = self._hash(encoded)
        with self._locked():
            snap = self._read()
            entry = snap.users.get(key)
            if entry is None or entry.hash != seen.hash:
                return False  # changed by somebody else since we verified
            users = dict(snap.users)
            users[key] = _Entry(new_hash, entry.secret_nonce, entry.secret_data, entry.changed,
                                entry.scram)
            self._write(snap.key_id, users)
        return True

    def scram_keys(self, address: str) -> ScramKeys | None:
        """The SCRAM-SHA-256 keys of ``address``, or None (unknown address, no keys yet)."""
        key = _address_key(address)
        entry = self._current().users.get(key) if key is not None else None
        if entry is None or entry.scram is None:
            entry = self._recheck(key, entry)[1]
        return entry.scram if entry is not None else None

    def all_have_scram(self, fresh: bool = True) -> bool:
        """True when every account has SCRAM keys (an empty file too). ``fresh=False`` reads
        the snapshot last loaded (refreshed by every log-in and recipient look-up), touching
        the disk only when this object has read nothing yet; an unreadable file says False."""
        snap = self._snapshot if not fresh else None
        if snap is None:  # fresh, or nothing read yet in this process (a one-off small read)
            try:
                snap = self._current()
            except (StoreError, OSError):
                return False
        return all(e.scram is not None for e in snap.users.values())

    def add_scram_keys(self, address: str, password: str) -> bool:
        """Give ``address`` SCRAM keys made from ``password``, right after ``password`` was
        verified (a clear-text log-in) or decrypted from the stored secret. Compare-and-set:
        nothing is written when the entry changed meanwhile or already has keys. Returns True
        when the file was rewritten."""
        key = _address_key(address)
        seen = self._current().users.get(key) if key is not None else None
        if key is None or seen is None or seen.scram is not None or not password:
            return False
        scram = _scram_or_none(password)
        if scram is None:
            return False
        with self._locked():
            snap = self._read()
            entry = snap.users.get(key)
            if entry is None or entry != seen:
                return False
            users = dict(snap.users)
            users[key] = _Entry(entry.hash, entry.secret_nonce, entry.secret_data, entry.changed, scram)
            self._write(snap.key_id, users)
        return True

    def keys_from_secrets(self, address: str | None = None) -> tuple[list[str], list[str]]:
        """Make SCRAM keys from the stored secrets (``auth.apop = true`` keeps them) for
        ``address``, or for every account without keys. Returns (given keys, still without
        keys: no secret stored, so their password must be set again or used once in a
        clear-text log-in)."""
        addresses = [address] if address is not None else self.addresses()
        made: list[str] = []
        missing: list[str] = []
        for a in addresses:
            key = _address_key(a)
            entry = self._current().users.get(key) if key is not None else None
            if entry is None:
                raise AddressError(f"{a} has no password in {self.path}")
            if entry.scram is not None:
                continue
            secret = self.secret(a) if entry.has_secret else None
            if secret is not None and self.add_scram_keys(a, secret):
                made.append(key)
            elif self.scram_keys(a) is None:
                missing.append(key)
        return made, missing

    def secret(self, address: str) -> str | None:
        """The clear password of ``address`` for APOP / CRAM-MD5, or None (``keep_secrets``
        false, unknown address, or no secret stored). A key that does not decrypt it raises
        ``errors.StoreError``."""
        if not self.keep_secrets:
            return None
        key = _address_key(address)
        entry = self._current().users.get(key) if key is not None else None
        if entry is None or entry.secret_data is None:
            entry = self._recheck(key, entry)[1]
        if entry is None or entry.secret_data is None or entry.secret_nonce is None:
            return None
        plain = None
        for attempt in range(2):
            if attempt:
                self._key = None  # the key file may have been restored since it was read
            aes_key = self._key_or_none()
            if aes_key is None:
                raise StoreError(f"key file {self.key_path} is missing but the password file holds secrets")
            try:
                plain = AESGCM(aes_key).decrypt(entry.secret_nonce, entry.secret_data, key.encode("ascii"))
                break
            except InvalidTag:
                continue
        if plain is None:
            raise StoreError(
                f"the secret of {key} cannot be decrypted with key file {self.key_path} "
                "(wrong key file, or the entry was altered)"
            )
        return plain.decode("utf-8")

    def has_secret(self, address: str) -> bool:
        """True when a secret is stored for ``address`` (whatever ``keep_secrets`` says)."""
        key = _address_key(address)
        entry = self._current().users.get(key) if key is not None else None
        return entry is not None and entry.has_secret

    def check(self) -> None:
        """Start-up check: raise ``errors.StoreError`` when the file is corrupt or unsafe, or
        the key is missing, unsafe or wrong while secrets exist. A missing file is an empty
        database and passes."""
        self._snapshot = None
        self._key = None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise StoreError(f"password file {self.path}: cannot read it: {e.strerror}")
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"password file {self.path} is not a regular file")
            if st.st_mode & 0o077:
                raise StoreError(
                    f"password file {self.path} is readable by group or others (mode "
                    f"{_mode_text(st.st_mode)}); run: chmod 600 {self.path}"
                )
        snap = self._current()
        with_secret = [a for a, e in snap.users.items() if e.has_secret]
        key = self._key_or_none()  # raises on an unsafe or corrupt key file
        if not with_secret:
            return
        if key is None:
            if self.keep_secrets:
                raise StoreError(
                    f"key file {self.key_path} is missing but the password file holds "
                    f"{len(with_secret)} secret(s): restore the key file, or set every password again"
                )
            return  # secrets are not used; nothing to decrypt
        if self.keep_secrets and snap.key_id is not None and snap.key_id != _key_id(key):
            raise StoreError(
                f"key file {self.key_path} is not the key the password file's secrets were "
                "encrypted with: restore the right key file"
            )
        if self.keep_secrets:
            # One real decryption proves the key and the data agree.
            self.secret(with_secret[0])


def _check_password(password: Any) -> None:
    if not isinstance(password, str):
        raise TypeError("a password must be a str")
    if password == "":
        raise BadPassword("the password is empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise BadPassword(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    if any(c in password for c in "\0\r\n"):
        raise BadPassword("the password contains a NUL, CR or LF character")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPassword("the password is not valid Unicode text")


# ---------------------------------------------------------------------- the account checker

_FAILED = "login failed"


def _text(value: Any) -> str | None:
    """A credential field as str, or None when it is not UTF-8 text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """A ``run_blocking`` that runs in the calling thread (tests, or admin tools)."""
    return defer.maybeDeferred(f, *args, **kwargs)


@implementer(IAccountChecker, IBlockingRecipientLookup, ICachedRecipientLookup, ISelfCheck,
             IScramKeyStore, ICredentialStamp)
class PasswordFileChecker:
    """``IAccountChecker`` over a ``PasswordFile``. See IAccountChecker.

    ``domains`` returns the local domains (the store's ``list_domains``; it is called off the
    reactor thread, with every check). A log-in name maps to an address with
    ``identity.logins.map_login`` (which logs why a bare name was refused); the address's
    domain must be a local domain. The avatar id is that address, whether or not its Maildir
    exists (SMTP AUTH needs the account only; POP3's realm needs the mailbox). All work
    (domains, scrypt, decryption) runs through ``run_blocking(f, *args)``, which returns a
    Deferred (``deferToThread`` by default).

    Every refusal is the same ``UnauthorizedLogin("login failed")``; a password file that
    cannot be read is ``errors.AuthUnavailable`` (logged with the reason, no secret). With
    ``upgrade_hashes`` (the default) a hash made with another scrypt cost than the file's is
    re-made after a good clear-text log-in (compare-and-set, see ``PasswordFile.rehash``),
    and an account without SCRAM keys gets them then. ``IScramKeyStore``: SCRAM-SHA-256 is
    offered while every account has its keys (``offers_scram``, from the snapshot last read).
    """

    def __init__(
        self,
        pwfile: PasswordFile,
        domains: Callable[[], list[str]],
        run_blocking: Callable[..., defer.Deferred] = deferToThread,
        *,
        upgrade_hashes: bool = True,
    ) -> None:
        self.pwfile = pwfile
        self.upgrade_hashes = upgrade_hashes
        self._domains = domains
        self._run = run_blocking
        self.offers_secrets = pwfile.keep_secrets
        if self.offers_secrets:
            self.credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword, IScramCredentials)
        else:
            self.credentialInterfaces = (IUsernamePassword, IScramCredentials)

    @property
    def offers_scram(self) -> bool:
        """See IScramKeyStore (no disk access: the password file as last read)."""
        return self.pwfile.all_have_scram(fresh=False)

    def _scram_keys(self, login: str) -> ScramKeys | None:
        try:
            address = self._address(login)
            return self.pwfile.scram_keys(address) if address is not None else None
        except (StoreError, OSError) as e:
            _log.error("password file unavailable: {reason}", reason=str(e))
            raise AuthUnavailable("the password file cannot be read now")

    def scram_keys(self, login: str) -> defer.Deferred:
        """See IScramKeyStore."""
        return self._run(self._scram_keys, login)

    def __repr__(self) -> str:
        return f"<PasswordFileChecker {self.pwfile!r}>"

    def check(self) -> None:
        """Blocking start-up check of the password file (see ``PasswordFile.check``)."""
        self.pwfile.check()

    def _address(self, login: Any) -> str | None:
        name = _text(login)
        if name is None:
            return None
        domains = [d.lower() for d in self._domains()]
        mapped = map_login(name, domains)
        if mapped is None:
            return None
        mailbox, domain = mapped
        if domain not in domains:
            return None
        return f"{mailbox}@{domain}"

    def _check(self, credentials: Any) -> str:
        """Blocking: the address, or raise UnauthorizedLogin / AuthUnavailable."""
        try:
            address = self._address(getattr(credentials, "username", None))
            if IUsernamePassword.providedBy(credentials):
                password = _text(credentials.password)
                ok = self.pwfile.verify(address or "", password or "")
                if ok and address is not None and password:
                    self._maybe_upgrade(address, password)
                    return address
            elif IScramCredentials.providedBy(credentials):
                keys = self.pwfile.scram_keys(address) if address is not None else None
                if credentials.matches(keys):
                    return address
            elif self.offers_secrets and IUsernameHashedPassword.providedBy(credentials):
                secret = self.pwfile.secret(address) if address is not None else None
                if secret is not None and credentials.checkPassword(secret):
                    return address
        except (StoreError, OSError) as e:
            _log.error("password file unavailable: {reason}", reason=str(e))
            raise AuthUnavailable("the password file cannot be read now")
        raise UnauthorizedLogin(_FAILED)

    def _maybe_upgrade(self, address: str, password: str) -> None:
        """After a good log-in, re-hash with the current scrypt cost if it was raised. A
        failure here is logged and does not spoil the log-in."""
        if not self.upgrade_hashes:
            return
        try:
            if self.pwfile.needs_rehash(address) and self.pwfile.rehash(address, password):
                _log.info("password hash of {address} upgraded to the current scrypt cost", address=address)
            if self.pwfile.scram_keys(address) is None and self.pwfile.add_scram_keys(address, password):
                _log.info("SCRAM-SHA-256 keys made for {address} at log-in", address=address)
        except (StoreError, OSError) as e:
            _log.warn("could not upgrade the password hash of {address}: {reason}", address=address, reason=str(e))

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        """See ICredentialsChecker: a Deferred firing with ``"mailbox@domain"``."""
        return self._run(self._check, credentials)

    def _resolve(self, address: str) -> str | None:
        key = _address_key(address)
        if key is None or key.rpartition("@")[2] not in {d.lower() for d in self._domains()}:
            return None
        try:
            return key if self.pwfile.exists(key) else None
        except (StoreError, OSError) as e:
            _log.error("password file unavailable: {reason}", reason=str(e))
            raise AuthUnavailable("the password file cannot be read now")

    def resolve_recipient(self, address: str) -> defer.Deferred:
        """See IAccountChecker: the lower-case address when it has a password, else None."""
        return self._run(self._resolve, address)

    def sender_owner(self, address: str) -> defer.Deferred:
        """See IAccountChecker: an address with a password is its own account's only
        address, so this is ``resolve_recipient``."""
        return self._run(self._resolve, address)

    def _stamp(self, account: str) -> bytes | None:
        try:
            changed = self.pwfile.changed_at(account)
        except (StoreError, OSError) as e:
            _log.error("password file unavailable: {reason}", reason=str(e))
            raise AuthUnavailable("the password file cannot be read now")
        return None if changed is None else stamp_of(b"pwfile", account, str(changed))

    def credential_stamp(self, account: str) -> defer.Deferred:
        """See ICredentialStamp: from the time the account's password was last set (a
        re-hash at a higher scrypt cost keeps it); None once the account is removed."""
        return self._run(self._stamp, account)

    def resolve_recipient_cached(self, address: str, domains: list[str]) -> str | None:
        """See ICachedRecipientLookup: an address with a password in the snapshot in memory,
        while the password file is unchanged (``PasswordFile.exists_cached``)."""
        key = _address_key(address)
        if key is None or key.rpartition("@")[2] not in domains:
            return None
        return key if self.pwfile.exists_cached(key) else None

    def resolve_recipient_blocking(self, address: str) -> str | None:
        """Blocking form of resolve_recipient, for callers already off the reactor thread
        (the ESMTP server folds it into the same thread hop as the mailbox check)."""
        return self._resolve(address)
