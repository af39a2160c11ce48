"""The quarantine: messages a content filter held, under ``<state_dir>/quarantine/``
(``interfaces.IQuarantine``).

One entry is two files named by its id (the queue id the client was told): ``ID.eml``, the
message as received (LF line ends, no Return-Path), and ``ID.json``, its record::

    {"id": "...", "time": unix time, "size": octets,
     "envelope": {the IOutboundQueue.enqueue envelope: sender, recipients, ret, envid, ...},
     "info": {"queue_id", "milter", "reason", "virus", "client"}}

Both are written to temporary names, fsynced, then renamed, the record last, and the folder is
fsynced: an entry whose record exists is complete, and it survives kill -9 once ``put`` has
returned (the client gets 250 only after that). A message file without a record is the rest of
an interrupted ``put`` and is ignored (and removed by the next ``put`` of that id). Release
hands the message to the outbound queue (which delivers local recipients into their mailboxes
and relays the others), then removes the entry.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from zope.interface import implementer

from pop3coexist.fsutil import fsync_dir, write_atomic
from pop3coexist.interfaces import IOutboundQueue, IQuarantine

_ID = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


@implementer(IQuarantine)
class Quarantine:
    """See IQuarantine; ``root`` is ``<state_dir>/quarantine`` (made on first use, mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _paths(self, entry_id: str) -> tuple[Path, Path]:
        if not _ID.match(entry_id):
            raise KeyError(entry_id)
        return self.root / f"{entry_id}.eml", self.root / f"{entry_id}.json"

    def put(self, data: bytes, envelope: dict, info: dict) -> str:
        """See IQuarantine."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry_id = str(info.get("queue_id") or f"q{time.time_ns():x}")
        eml, record = self._paths(entry_id)
        if record.exists():  # the same queue id twice (a release and a new hold): a new name
            entry_id = f"{entry_id}.{time.time_ns():x}"
            eml, record = self._paths(entry_id)
        meta = {"id": entry_id, "time": time.time(), "size": len(data), "envelope": envelope,
                "info": info}
        for path, content in ((eml, data), (record, json.dumps(meta, indent=1).encode())):
            write_atomic(path, content, sync_dir=False)
        fsync_dir(self.root)
        return entry_id

    def list(self) -> list[dict]:
        """See IQuarantine."""
        out = []
        if not self.root.is_dir():
            return out
        for record in self.root.glob("*.json"):
            try:
                out.append(json.loads(record.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda m: (m.get("time", 0), m.get("id", "")))

    def get(self, entry_id: str) -> tuple[dict, Path]:
        """(the record, the message file) of one entry; KeyError when there is none."""
        eml, record = self._paths(entry_id)
        try:
            meta = json.loads(record.read_text())
        except FileNotFoundError:
            raise KeyError(entry_id) from None
        return meta, eml

    def release(self, entry_id: str, queue: IOutboundQueue) -> str:
        """See IQuarantine."""
        meta, eml = self.get(entry_id)
        queue_id = queue.enqueue(eml, meta["envelope"])
        self.delete(entry_id)
        return queue_id

    def delete(self, entry_id: str) -> None:
        """See IQuarantine."""
        eml, record = self._paths(entry_id)
        if not record.exists():
            raise KeyError(entry_id)
        record.unlink()
        eml.unlink(missing_ok=True)
        fsync_dir(self.root)
