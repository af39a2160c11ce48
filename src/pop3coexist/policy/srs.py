"""The Sender Rewriting Scheme (SRS) for forwarded mail (no I/O).

A message a Sieve ``redirect`` forwards leaves with a new envelope sender, so that the
receiver's SPF check (RFC 7208) looks at the forwarding domain, which authorises this server,
instead of the original sender's, which does not; and a bounce of the forwarded copy comes
back here, where it is turned back into the original sender and relayed to it.

The forms are those of libsrs2 / postsrsd (Shevek's paper "Sender Rewriting Scheme"), so mail
administrators recognise them:

- ``SRS0=HHHHHH=TT=orig.domain=orig-local@forward.domain`` for an ordinary sender;
- ``SRS1=HHHHHH=first.forwarder==HHHH=TT=orig.domain=orig-local@forward.domain`` for a
  sender that is already an SRS0 address of another forwarder (the chain stays short).

``TT`` is the day number (days since the epoch, mod 1024) in two base32 characters; ``HHHHHH``
is six base32 characters of HMAC-SHA256 under the secret key over the rest (lower-cased: a
relay may change the case of a local part). ``reverse`` accepts an address whose hash
matches and whose day is at most ``max_age`` days old, and refuses everything else, so the
server is never an open relay through forged SRS addresses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LENGTH = 6


class SRSError(ValueError):
    """An SRS address that is malformed, forged, or older than the maximum age."""


def is_srs(local: str) -> bool:
    """True when a local part has the SRS0 or SRS1 form (any case)."""
    head = local[:5].upper()
    return head in ("SRS0=", "SRS1=", "SRS0+", "SRS1+", "SRS0-", "SRS1-")


class SRS:
    """Forward (``forward``) and reverse (``reverse``) with one secret key (bytes)."""

    def __init__(self, secret: bytes, max_age_days: int = 21, clock=time.time) -> None:
        if not secret:
            raise ValueError("SRS needs a secret key")
        self.secret = secret
        self.max_age = max_age_days
        self.clock = clock

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "".join(parts).lower().encode("utf-8"), hashlib.sha256)
        return base64.b32encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def _today(self) -> int:
        return int(self.clock() // 86400)

    def _stamp(self) -> str:
        day = self._today() % 1024
        return _B32[day >> 5] + _B32[day & 31]

    def forward(self, sender: str, domain: str) -> str:
        """The envelope sender for a copy of mail from ``sender`` forwarded by ``domain``:
        ``""`` stays ``""`` (bounces are not rewritten), an address of ``domain`` itself stays
        as it is, others get the SRS0 (or SRS1) form."""
        if not sender:
            return ""
        local, _, sdomain = sender.rpartition("@")
        if not local or sdomain.lower() == domain.lower():
            return sender
        if local[:5].upper() == "SRS0=":
            rest = local[4:]  # "=HHHH=TT=domain=local"
            h = self._hash(sdomain, rest)
            return f"SRS1={h}={sdomain}={rest}@{domain}"
        if local[:5].upper() == "SRS1=":
            try:
                _, _, first, rest = local.split("=", 3)
            except ValueError:
                first, rest = sdomain, "=" + local[5:]
            h = self._hash(first, rest)
            return f"SRS1={h}={first}={rest}@{domain}"
        stamp = self._stamp()
        h = self._hash(stamp, sdomain, local)
        return f"SRS0={h}={stamp}={sdomain}={local}@{domain}"

    def reverse(self, local: str) -> str:
        """The address an SRS local part stands for (a bounce goes back there); SRSError when
        it is malformed, its hash is wrong or it is too old."""
        kind = local[:4].upper()
        body = local[5:]
        if kind == "SRS1":
            try:
                h, first, rest = body.split("=", 2)
            except ValueError:
                raise SRSError("malformed SRS1 address") from None
            if not hmac.compare_digest(h.upper(), self._hash(first, rest)):
                raise SRSError("SRS1 hash does not match")
            return f"SRS0{rest}@{first}"
        if kind != "SRS0":
            raise SRSError("not an SRS address")
        try:
            h, stamp, domain, orig = body.split("=", 3)
        except ValueError:
            raise SRSError("malformed SRS0 address") from None
        if not hmac.compare_digest(h.upper(), self._hash(stamp, domain, orig)):
            raise SRSError("SRS0 hash does not match")
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in _B32 for c in stamp):
            raise SRSError("malformed SRS0 time stamp")
        day = (_B32.index(stamp[0]) << 5) | _B32.index(stamp[1])
        age = (self._today() - day) % 1024
        if age > self.max_age:
            raise SRSError(f"SRS0 address is {age} days old (at most {self.max_age})")
        if not orig or not domain:
            raise SRSError("malformed SRS0 address")
        return f"{orig}@{domain}"
