"""The mail log: one line per mail event (``pop3coexist.events``), joined by the queue id.

``MailLogObserver`` is a Twisted log observer of the main process (a worker's events reach
the main log through workers.py, so every process's events are written here, by one writer).
``[log] mail_log`` says where the lines go: ``""`` leaves the events in the server's own
log (twistd's ``--logfile`` or standard output, with each event's own text), ``"-"`` writes
the lines to standard output, a path appends them to that file (reopened at SIGHUP, for
logrotate). ``[log] format`` is ``"text"`` (Postfix-like, ``events.format_text``) or
``"json"`` (one object per line, ``events.format_json``).

A ``stored`` event (the message is in its local mailboxes) is written as one ``delivered``
line per mailbox right after the ``accepted`` line of the same queue id (``stored`` happens
first: the 250 is sent once the message is durable), so a message reads in order.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from pop3coexist import events

MAX_HELD = 10_000  # stored events waiting for their accepted line; past it, written at once


class MailLogObserver:
    """Writes the mail log (see the module docstring); ``destination`` is ``"-"`` or a path,
    ``fmt`` ``"text"`` or ``"json"``."""

    def __init__(self, destination: str | Path, fmt: str = "text") -> None:
        self.destination = destination
        self.format = events.format_json if fmt == "json" else events.format_text
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self.open()

    def open(self) -> None:
        """(Re)open the destination: after logrotate moved the file away (SIGHUP)."""
        with self._lock:
            old = self._file
            if str(self.destination) == "-":
                self._file = sys.stdout
            else:
                path = Path(self.destination)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
            if old is not None and old is not sys.stdout:
                old.close()

    def close(self) -> None:
        with self._lock:
            self._flush_held()
            if self._file is not None and self._file is not sys.stdout:
                self._file.close()
            self._file = None

    def __call__(self, event: Mapping[str, Any]) -> None:
        name = events.name_of(event)
        if name is None:
            return
        try:
            with self._lock:
                self._handle(name, event)
        except Exception:  # noqa: BLE001 - never raise into the log system
            pass

    def _handle(self, name: str, event: Mapping[str, Any]) -> None:
        qid = event.get("queue_id")
        if name == events.STORED and qid:
            self._held[str(qid)] = event
            while len(self._held) > MAX_HELD:
                _, old = self._held.popitem(last=False)
                self._write(old)
            return
        self._write(event)
        if name in (events.ACCEPTED, events.REFUSED) and qid:
            held = self._held.pop(str(qid), None)
            if held is not None:
                self._write(held)

    def _flush_held(self) -> None:
        while self._held:
            _, old = self._held.popitem(last=False)
            self._write(old)

    def _write(self, event: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        when = events.event_time(event)
        pid = event.get("worker_pid") or os.getpid()  # workers.py marks a worker's events
        lines = [self.format(name, fields, when, pid) for name, fields in events.expand(event)]
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
