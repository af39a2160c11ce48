"""Credential stamps: the opaque values ``interfaces.ICredentialStamp`` gives.

A stamp is an HMAC-SHA-256 under a random key made when this process starts, over what
describes an account's credentials at one moment (when its password was last set, its
directory entry's password-change time and disabled flags, its shadow entry): equal inputs
give equal stamps within one process, and a stamp held in memory says nothing that could be
checked against a guessed password elsewhere. Stamps are compared only within the process
that made them (web sessions live in one process, see ``web.sessions``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_KEY = secrets.token_bytes(32)


def stamp_of(*parts: bytes | str) -> bytes:
    """The stamp of ``parts`` (each str is taken as UTF-8; the parts are length-prefixed, so
    ``("ab", "c")`` and ``("a", "bc")`` differ): 32 bytes."""
    mac = hmac.new(_KEY, digestmod=hashlib.sha256)
    for part in parts:
        raw = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else bytes(part)
        mac.update(len(raw).to_bytes(8, "big"))
        mac.update(raw)
    return mac.digest()
