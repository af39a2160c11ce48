"""DKIM signing (RFC 6376) of mail that leaves through the outbound queue (``[[dkim]]``).

``DkimSigner`` signs with dkimpy: ``a=rsa-sha256``, ``c=relaxed/relaxed``, the signing domain
(``d=``) and selector of the ``[[dkim]]`` entry whose domain is the From: domain or the nearest
parent of it (so ``d=`` is aligned for DMARC, RFC 7489 section 3.1.1). The signed header
fields are those of ``headers`` (default ``DEFAULT_HEADERS``: From, To, Cc, Subject, Date,
Message-ID, Reply-To, MIME-Version, Content-Type, Content-Transfer-Encoding, In-Reply-To,
References, the List-* fields) present in the message, each as often as it occurs, plus From
once more: an oversigned From means no From can be added after signing (RFC 6376 section
8.15). A key file is read again when it changes (a new key after ``dkim keygen``).

``SigningQueue`` wraps an ``IOutboundQueue``: what the ESMTP server queues is signed once, at
enqueue, and only when the envelope says the message comes from inside (``"inside"``: a
logged-in client or ``relay.networks``, policy/stages.py ``from_inside``): mail from outside
relayed onward is never signed with our keys. Why at enqueue, not at each transmission:

- the queued body never changes after enqueue, so one signature holds for every attempt and
  every next hop (a retry or a fall-back host costs no RSA operation);
- masquerading (policy/masquerade.py) rewrites at enqueue too: the signing queue sits inside
  the masquerading one (``wrap_queue(dkim_queue(queue))``) and signs the rewritten From;
- the "inside" decision exists only at enqueue (the queue's JSON envelope does not keep it),
  and nothing is added to the message on the way out (smtp/client.py sends the queued bytes).

A message that must be signed but cannot be (the key file unreadable) is not queued: the
commit fails and the client gets ``451 4.3.0`` and tries again (nothing is lost, nothing
leaves unsigned). The signed copy is written and fsynced beside the source before it is
queued, as masquerading does, so a 250 is only given for a durable signed message.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist import headers
from pop3coexist.config import Config, DkimConfig
from pop3coexist.interfaces import IOutboundQueue

log = Logger(namespace="pop3coexist.dkim")

DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "content-transfer-encoding", "in-reply-to", "references",
    "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
    "list-archive", "list-unsubscribe-post",
)
FIELD = "DKIM-Signature"


class SigningError(Exception):
    """A message that must be signed cannot be (key file unreadable or unusable)."""


class DkimSigner:
    """The ``[[dkim]]`` keys of one config; ``sign`` is blocking (reads the key file)."""

    def __init__(self, keys: tuple[DkimConfig, ...] | list[DkimConfig]) -> None:
        self.keys = {k.domain.lower(): k for k in keys}
        self._cache: dict[Path, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def key_for(self, domain: str) -> DkimConfig | None:
        """The entry for ``domain`` or its nearest parent domain that has one."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            entry = self.keys.get(".".join(labels[i:]))
            if entry is not None:
                return entry
        return None

    def private_key(self, entry: DkimConfig) -> bytes:
        """The PEM key of ``entry``, read again when the file changed; SigningError."""
        path = entry.key_file
        try:
            mtime = path.stat().st_mtime
            with self._lock:
                cached = self._cache.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            data = path.read_bytes()
        except OSError as e:
            raise SigningError(f"cannot read the DKIM key of {entry.domain} ({path}): "
                               f"{e.strerror or e}") from None
        with self._lock:
            self._cache[path] = (mtime, data)
        return data

    def check(self) -> None:
        """Blocking: every key file can be read and signs (start-up, check-config);
        SigningError names the first that cannot."""
        for entry in self.keys.values():
            self._signature(entry, b"From: check@" + entry.domain.encode() + b"\n\ncheck\n")

    def sign(self, message: bytes) -> bytes | None:
        """``message`` (LF or CRLF line ends) with a DKIM-Signature field on top, or None
        when its From: domain has no key (one From address is needed). SigningError when the
        key cannot be used."""
        from email.utils import getaddresses

        values = headers.values(message, "From")
        addresses = [a for _n, a in getaddresses(values) if "@" in a]
        if len(values) != 1 or len(addresses) != 1:
            return None
        entry = self.key_for(addresses[0].rpartition("@")[2])
        if entry is None:
            return None
        value = self._signature(entry, message)
        return headers.prepend_header(message, FIELD, value)

    def _signature(self, entry: DkimConfig, message: bytes) -> str:
        """The value of the DKIM-Signature field for ``message`` (folded with LF)."""
        import dkim

        crlf = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        present = [headers.field_name(f) for f in headers.split(crlf)[0]]
        wanted = entry.headers or DEFAULT_HEADERS
        include = [n for n in present if n in wanted]
        include.append("from")  # oversigned: no From can be added (RFC 6376 section 8.15)
        try:
            line = dkim.sign(crlf, entry.selector.encode(), entry.domain.encode(),
                             self.private_key(entry), canonicalize=(b"relaxed", b"relaxed"),
                             include_headers=[n.encode() for n in include])
        except dkim.DKIMException as e:
            raise SigningError(f"cannot sign with the DKIM key of {entry.domain} "
                               f"({entry.key_file}): {e}") from None
        text = line.decode("ascii").replace("\r\n", "\n").rstrip("\n")
        name, _, value = text.partition(":")
        assert name.lower() == FIELD.lower()
        return value.lstrip(" ")


@implementer(IOutboundQueue)
class SigningQueue:
    """See IOutboundQueue: signs what comes from inside (module docstring), then hands it to
    the wrapped queue. The envelope's ``"inside"`` is read here and not passed on."""

    def __init__(self, queue: Any, signer: DkimSigner) -> None:
        self.queue = queue
        self.signer = signer

    def enqueue(self, source: object, envelope: dict) -> str:
        env = dict(envelope)
        inside = bool(env.pop("inside", False))
        if not inside:
            return self.queue.enqueue(source, env)
        path = Path(str(source))
        signed = self.signer.sign(path.read_bytes())
        if signed is None:
            return self.queue.enqueue(source, env)
        copy = path.with_name(path.name + ".dkim")
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(signed)
                out.flush()
                os.fsync(out.fileno())
            return self.queue.enqueue(copy, env)
        finally:
            copy.unlink(missing_ok=True)

    def wake(self) -> None:
        self.queue.wake()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def dkim_queue(queue: Any, config: Config) -> Any:
    """The queue the ESMTP server should hand mail to before masquerading wraps it:
    ``queue`` itself, or a SigningQueue when ``[[dkim]]`` names keys."""
    if not config.dkim:
        return queue
    return SigningQueue(queue, DkimSigner(config.dkim))
