"""Masquerading (``[masquerade]``): local users leave under the gateway's shared domain.

The "reply address" step of Microsoft's coexistence guide (every POP3 client sets
``ted@northwindtraders.test`` as its reply address) done once on the server: mail that leaves this server for another one has its
envelope sender rewritten from a local POP3 domain to the shared domain, so replies and
delivery reports come back through the gateway; with ``header_from = true`` the addresses in
the ``From:`` header are rewritten the same way. Mail delivered to local mailboxes is not
touched. Only the domain changes; the local part stays (the gateway's recipient policy gives
each POP3 user that shared address as a secondary proxy address).

``Masquerader`` holds the rule (pure). ``MasqueradingQueue`` wraps an ``IOutboundQueue``: the
ESMTP server hands it what it would hand the queue, and it rewrites the envelope (and, when
asked, a rewritten copy of the message: fsynced before it is queued, so nothing that got a
250 can be lost) before passing it on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from zope.interface import implementer

from pop3coexist.config import Config, MasqueradeConfig
from pop3coexist.interfaces import IOutboundQueue

_HEADER_LIMIT = 1024 * 1024  # headers longer than this are not rewritten
_ADDR_RE = re.compile(rb"(?<=@)([A-Za-z0-9.-]+)(?=[\s>,;)\"]|$)")


class Masquerader:
    """The rewrite rule of one ``[masquerade]`` section."""

    def __init__(self, cfg: MasqueradeConfig) -> None:
        self.domain = cfg.domain.lower()
        self.from_domains = {d.lower() for d in cfg.from_domains}
        self.header_from = cfg.header_from

    def rewrite_sender(self, sender: str) -> str:
        """``ted@pop.northwindtraders.test`` -> ``ted@northwindtraders.test``; others as they are
        (the null sender ``""`` too)."""
        local, at, domain = sender.rpartition("@")
        if at and domain.lower() in self.from_domains:
            return f"{local}@{self.domain}"
        return sender

    def rewrite_from_header(self, header: bytes) -> bytes:
        """Rewrite the address domains of the ``From:`` field(s) in a message header block."""
        lines = header.split(b"\n")
        out: list[bytes] = []
        in_from = False
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                pass  # a continuation keeps the field it belongs to
            else:
                in_from = line[:5].lower() == b"from:"
            if in_from:
                line = _ADDR_RE.sub(self._domain_sub, line)
            out.append(line)
        return b"\n".join(out)

    def _domain_sub(self, m: re.Match) -> bytes:
        if m.group(1).decode("ascii").lower() in self.from_domains:
            return self.domain.encode("ascii")
        return m.group(1)

    def rewrite_file(self, source: Path) -> Path | None:
        """Blocking. A fsynced copy of ``source`` with its From: rewritten, or None when
        nothing changes. The caller removes the copy."""
        with open(source, "rb") as f:
            head = f.read(_HEADER_LIMIT)
            end = _header_end(head)
            if end is None:
                return None
            new_head = self.rewrite_from_header(head[:end])
            if new_head == head[:end]:
                return None
            copy = source.with_name(source.name + ".masq")
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(new_head)
                    out.write(head[end:])
                    while True:
                        chunk = f.read(1024 * 1024)
                        if not chunk:
                            break
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                copy.unlink(missing_ok=True)
                raise
            return copy


def _header_end(data: bytes) -> int | None:
    """Offset of the blank line that ends the header (the header block excludes it)."""
    best = None
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


@implementer(IOutboundQueue)
class MasqueradingQueue:
    """See IOutboundQueue: rewrites, then hands everything to the wrapped queue."""

    def __init__(self, queue: Any, masquerader: Masquerader) -> None:
        self.queue = queue
        self.masquerader = masquerader

    def enqueue(self, source: object, envelope: dict) -> str:
        env = dict(envelope)
        sender = env.get("sender") or ""
        new_sender = self.masquerader.rewrite_sender(sender)
        env["sender"] = new_sender
        if new_sender == sender or not self.masquerader.header_from:
            return self.queue.enqueue(source, env)
        copy = self.masquerader.rewrite_file(Path(str(source)))
        if copy is None:
            return self.queue.enqueue(source, env)
        try:
            return self.queue.enqueue(copy, env)
        finally:
            copy.unlink(missing_ok=True)

    def wake(self) -> None:
        self.queue.wake()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def wrap_queue(queue: Any, config: Config) -> Any:
    """The queue the ESMTP server should use: ``queue`` itself, or a MasqueradingQueue when
    ``[masquerade]`` is set."""
    if not config.masquerade.enabled:
        return queue
    return MasqueradingQueue(queue, Masquerader(config.masquerade))
