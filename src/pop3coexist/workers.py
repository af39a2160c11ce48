"""The main process's side of ``server.workers`` > 1: starting, watching and stopping workers.

With ``workers = N`` the main twistd process opens every listener, starts its outbound queue
runner, and spawns N - 1 worker processes (``python -m pop3coexist.worker``, see worker.py)
that inherit the listening sockets and serve POP3 and SMTP exactly as the main process does.
Every process accepts from the same sockets; the shared connection limits live in
policy/sharedlimit.py, mailbox locks are flock()s, so they hold across processes already.

Each worker's file descriptors:

- 0 (its stdin): from the main process: the line ``serve`` lets the worker accept connections
  (it listens, paused, until start-up is complete in every process: ``WorkerSupervisor.serve``);
  end of file means the main process is gone, and the worker stops (so a ``kill -9`` of the
  main process leaves no orphan serving connections);
- 1 (its stdout): its log, one event per line (``encode_worker_event``: the text rendered in
  the worker, plus the fields of a mail event when this process writes a mail log),
  re-published here into the main log with ``log_system`` set to ``worker N``;
- 2 (its stderr): anything printed outside the log (a crash at import), logged as errors;
- 3: control lines to the main process: ``ready`` once it listens (paused), ``serving`` once
  it accepts after ``serve``: the main process writes ``run/listeners.json`` only when every
  worker said ``serving`` (a client that reads the file may connect at once, and may find the
  main process stopped: the workers must be accepting). (Each worker delivers the messages it
  queued itself, by the queue's claims: store/queue.py.)
- 4 and up: the listening sockets, in the order of ``--listener role:fd`` arguments.

A worker that exits while the server runs is logged and replaced (after 1 s, doubling up to
30 s while it keeps dying young); its connection counts and its unfinished spool files are
removed first, and the messages it had claimed from the outbound queue are taken back and
run here at once. Stopping the server sends SIGTERM to every worker and waits for them (SIGKILL
after ``stop_grace`` seconds).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel, eventAsText, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from pop3coexist import events
from pop3coexist.config import Config
from pop3coexist.monitor.metrics import process_dead

log = Logger()

FIRST_LISTENER_FD = 4
START_TIMEOUT = 60.0
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER = 60.0  # a worker that lived this long starts the restart delays afresh


# --- a worker's log events on its way to the main log (issue 17) ----------------------------
#
# Twisted's eventAsJSON / eventFromJSON carried every field of every event (flattened format
# fields, logger, source, failure state): 7 % of the server's CPU per SMTP message went into
# encoding and decoding them. A worker now renders the event's text itself and sends only
# what the main process's observers read: the time, level, namespace, the text (with the
# traceback of a failure), and the fields of a mail event (events.py, for the mail log).
# One line per event, one write: nothing is buffered, so a kill -9 loses no line.
#
# Two forms of line (issue 17, fifth round: JSON was 6.7 % of the worker's Python CPU, its
# decoding a third of the main process's cost per worker line):
# - lean: ``\x1e`` TIME ``\x1f`` LEVEL ``\x1f`` NAMESPACE ``\x1f`` TEXT, for every event whose
#   fields no observer of the main process reads: any event that is not a mail event, and
#   every mail event when the main process writes no mail log (``[log] mail_log = ""``: its
#   metrics skip a worker's events, the worker counted them). A text with a line break or a
#   backslash (a traceback), a namespace with a separator, or no time takes the JSON form;
# - JSON (``{"w":1,...}``): the mail events the mail log reads, and the cases above.

_LINE_MARK = b'{"w":'
_LEAN_MARK = b"\x1e"
_SEP = "\x1f"
_LEVELS = frozenset(LogLevel.iterconstants())
# made once: json.dumps with these arguments builds a new encoder at each call (issue 17:
# 7.4 -> 5.4 us per log event of a worker); the same text
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
_LEVEL_NAMES = {level.name: level for level in _LEVELS}


def encode_worker_event(event: Mapping[str, Any], fields: bool = True) -> bytes | None:
    """One log event of a worker as one line (UTF-8, ending in LF) for the main process;
    None when the event has nothing to write (no text and no mail event). ``fields``: the
    main process reads a mail event's fields (it writes a mail log), so a mail event goes as
    JSON with them; otherwise the lean form where it can (see above)."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    mail = events.name_of(event) is not None
    if not text and not mail:
        return None
    level = event.get("log_level")
    when = event.get("log_time")
    namespace = event.get("log_namespace")
    if not (mail and fields) and type(when) is float and type(namespace) is str \
            and "\n" not in text and "\\" not in text and _SEP not in namespace:
        if not text:
            return None  # a mail event with no text, and no mail log: nothing to write
        return (f"\x1e{when!r}{_SEP}{level.name if level in _LEVELS else ''}{_SEP}"
                f"{namespace}{_SEP}{text}\n").encode("utf-8", "backslashreplace")
    record: dict[str, Any] = {"w": 1, "t": when, "l": level.name if level in _LEVELS else None,
                              "n": namespace, "x": text}
    if mail:
        record["m"] = {k: event[k] for k in events.EVENT_FIELDS if k in event}
    return _ENCODER.encode(record).encode("utf-8") + b"\n"


def decode_worker_event(line: bytes) -> dict[str, Any] | None:
    """The event of an ``encode_worker_event`` line (its text as ``log_text``), or None for a
    line in another form (Twisted's JSON events, or text). Raises ValueError on bad JSON or
    a lean line that is cut short."""
    if line[:1] == _LEAN_MARK:
        when, level, namespace, text = line[1:].decode("utf-8", "replace").split(_SEP, 3)
        event = {"log_time": float(when), "log_namespace": namespace,
                 "log_format": "{log_text}", "log_text": text}
        found = _LEVEL_NAMES.get(level)
        if found is not None:
            event["log_level"] = found
        return event
    if not line.startswith(_LINE_MARK):
        return None
    record = json.loads(line)
    event = dict(record.get("m") or ())
    level = record.get("l")
    event.update(log_time=record.get("t"), log_namespace=record.get("n"),
                 log_format="{log_text}", log_text=record.get("x") or "")
    if type(level) is str and level in _LEVEL_NAMES:  # else keep the event, with no level
        event["log_level"] = _LEVEL_NAMES[level]
    return event


class WorkerStartError(Exception):
    """A worker process ended before it listened."""


def _why(reason: Any) -> str:
    """How a process ended, from processEnded's reason: "exit status N" or "signal N"."""
    status = reason.value
    if isinstance(status, error.ProcessTerminated):
        return (f"exit status {status.exitCode}" if status.exitCode is not None
                else f"signal {status.signal}")
    return "exit status 0"


class _WorkerProtocol(protocol.ProcessProtocol):
    """One worker process: its log lines and control lines, and its end."""

    def __init__(self, supervisor: WorkerSupervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.pid: int | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.serving: defer.Deferred[None] = defer.Deferred()  # it accepts (after ``serve``)
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b"", 3: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buf = self._buffers.get(childFD, b"") + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > 1_000_000:  # a line that never ends: do not grow without bound
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            if childFD == 1:
                self._log_event(line)
            elif childFD == 2:
                if line.strip():
                    log.error("worker {number}: {line}", number=self.number,
                              line=line.decode("utf-8", "replace"))
            elif childFD == 3:
                self._control(line.decode("ascii", "replace").split())

    def _log_event(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            event = decode_worker_event(line)
            if event is None:
                event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            log.info("worker {number}: {line}", number=self.number,
                     line=line.decode("utf-8", "replace"))
            return
        level = event.get("log_level")
        event.update(worker_event=self.number, worker_pid=self.pid)  # counted by the worker
        event["log_system"] = (f"worker {self.number}: {event.get('log_namespace', '-')}"
                               f"#{getattr(level, 'name', 'info')}")
        globalLogPublisher(event)

    def _control(self, words: list[str]) -> None:
        if not words:
            return
        if words[0] == "ready":
            if not self.ready.called:
                self.ready.callback(None)
            if self.supervisor.serving:  # a replacement worker, once the server serves
                self.serve()
        elif words[0] == "serving":
            if not self.serving.called:
                self.serving.callback(None)

    def serve(self) -> None:
        """Let this worker accept connections."""
        if self.ready.called and not self.ended.called and self.transport is not None:
            try:
                self.transport.writeToChild(0, b"serve\n")
            except (OSError, error.ProcessExitedAlready):
                pass  # its end is handled by processEnded

    def processEnded(self, reason: Any) -> None:
        for fd in (1, 2):
            if self._buffers.get(fd):
                self.childDataReceived(fd, b"\n")
        if not self.ready.called:
            self.ready.errback(WorkerStartError(
                f"worker {self.number} (pid {self.pid}) ended with {_why(reason)} before "
                "it listened"))
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


def _fire_once(result: Any, target: defer.Deferred[None]) -> Any:
    """Fire ``target`` (once) when the first of several Deferreds fires; pass ``result`` on."""
    if not target.called:
        target.callback(None)
    return result


class WorkerSupervisor(service.Service):
    """Spawns, watches, replaces and stops the worker processes of the main process."""

    name = "workers"

    def __init__(self, config: Config, outbound: Any = None, reactor: Any = None,
                 python: str | None = None, stop_grace: float = 10.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.outbound = outbound
        self.reactor = reactor
        self.python = python or sys.executable
        self.stop_grace = stop_grace
        self.count = max(0, config.server.workers - 1)
        self.workers: dict[int, _WorkerProtocol] = {}
        self._listeners: list[tuple[str, int]] = []
        self._started_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self.serving = False
        # called when the live workers change while the server serves (one ended, a new one
        # listens): service.py writes run/listeners.json again
        self.on_change: Callable[[], None] | None = None

    def pids(self) -> list[int]:
        """The live worker processes' pids (numbers 1..N-1), in order: a worker that ended is
        left out until its replacement runs."""
        return [w.pid for _, w in sorted(self.workers.items())
                if w.pid is not None and not w.ended.called]

    def _changed(self) -> None:
        """Tell ``on_change`` that the live workers changed; its failure is logged."""
        if self.on_change is None or not self.running:
            return
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a run file that cannot be written must not stop us
            log.failure("cannot record the worker processes")

    # ------------------------------------------------------------------ start

    def start_workers(self, ports: list[tuple[str, Any]]) -> defer.Deferred[None]:
        """Spawn the workers on the listening ``ports`` ((role, IListeningPort) pairs); the
        result fires when every worker listens, or fails if one of them died first."""
        self._listeners = [(role, port.fileno()) for role, port in ports]
        waits = [self._spawn(n).ready for n in range(1, self.count + 1)]
        d = defer.gatherResults(waits, consumeErrors=True)
        timer = self.reactor.callLater(START_TIMEOUT, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                failure = result.value.subFailure if isinstance(
                    result.value, defer.FirstError) else result
                return failure
            log.info("{n} worker process(es) started: pids {pids}", n=self.count,
                     pids=" ".join(str(p) for p in self.pids()))
            return None

        d.addBoth(done)
        return d

    def serve(self) -> defer.Deferred[None]:
        """Start-up is complete: every worker accepts connections from now on (and each
        replacement as soon as it listens). The result fires once every live worker said
        ``serving`` (or ended meanwhile: ``ended`` handles that one), so that what is
        announced next (``run/listeners.json``) is true of every process; the caller may
        cancel it (a time limit)."""
        self.serving = True
        waits = []
        for proto in list(self.workers.values()):
            if proto.ended.called:
                continue
            proto.serve()
            either = defer.Deferred()
            for d in (proto.serving, proto.ended):
                d.addBoth(_fire_once, either)
            waits.append(either)
        return defer.DeferredList(waits).addCallback(lambda _: None)

    def _spawn(self, number: int) -> _WorkerProtocol:
        proto = _WorkerProtocol(self, number)
        args = [self.python, "-m", "pop3coexist.worker", "--config",
                str(self.config.path.resolve() if self.config.path else ""),
                "--worker", str(number)]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", 3: "r"}
        for i, (role, fd) in enumerate(self._listeners):
            child_fds[FIRST_LISTENER_FD + i] = fd
            args += ["--listener", f"{role}:{FIRST_LISTENER_FD + i}"]
        self.reactor.spawnProcess(proto, self.python, args, env=dict(os.environ),
                                  childFDs=child_fds)
        self.workers[number] = proto
        self._started_at[number] = self.reactor.seconds()
        return proto

    # ------------------------------------------------------------------ running

    def ended(self, proto: _WorkerProtocol, reason: Any) -> None:
        number = proto.number
        if self.workers.get(number) is not proto:
            return
        why = _why(reason)
        self._cleanup(proto)
        if not self.running:
            return
        if not self.serving:  # during start-up: the server does not start (service.py)
            log.error("worker {number} (pid {pid}) ended during start-up ({why})",
                      number=number, pid=proto.pid, why=why)
            return
        lived = self.reactor.seconds() - self._started_at.get(number, 0.0)
        failures = 0 if lived >= STABLE_AFTER else self._failures.get(number, 0) + 1
        self._failures[number] = failures
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)] if failures else 0.0
        delay = max(delay, RESTART_DELAYS[0])
        log.warn("worker {number} (pid {pid}) ended ({why}); starting a new one in {delay:.0f} s",
                 number=number, pid=proto.pid, why=why, delay=delay,
                 mail_event=events.WORKER_RESTART, worker=number)
        self._restarts[number] = self.reactor.callLater(delay, self._respawn, number)
        self._changed()

    def _respawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        if not self.running:
            return
        proto = self._spawn(number)

        def started(_: Any) -> None:
            self._changed()
            log.info("worker {number} started again (pid {pid})", number=number, pid=proto.pid)

        # recorded (listeners.json) once it accepts, as at start-up (``serve``)
        proto.serving.addCallbacks(
            started,
            lambda f: None,  # its end is logged (and handled) by ended()
        )

    def _cleanup(self, proto: _WorkerProtocol) -> None:
        """Forget a dead worker's connection counts and unfinished incoming messages."""
        from pop3coexist.policy.limiters import limiter_table
        from pop3coexist.smtp.incoming import clean_spool
        from pop3coexist.store.maildir import MaildirStore

        for name in ("pop3", "smtp", "imap"):
            try:
                from pop3coexist.policy.sharedlimit import reset_worker

                reset_worker(limiter_table(self.config, name), proto.number)
            except (OSError, ValueError) as e:
                log.error("cannot reset worker {number}'s {name} connection counts: {e}",
                          number=proto.number, name=name, e=e)
        if self.outbound is not None:  # its claims on the queue: back to env/ and run now
            self.outbound.worker_ended(proto.number)
        if proto.pid is not None:
            process_dead(proto.pid)  # its open sessions are gone from the metrics
            try:
                clean_spool(MaildirStore(self.config.server.mailroot,
                                         node=self.config.server.spool_node).spool_dir(), pid=proto.pid)
            except OSError as e:
                log.error("cannot clean the spool after worker {number}: {e}",
                          number=proto.number, e=e)

    # ------------------------------------------------------------------ stop

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        live = [w for w in self.workers.values() if not w.ended.called]
        for w in live:
            self._signal(w, "TERM")
        if not live:
            return defer.succeed(None)
        waits = defer.DeferredList([w.ended for w in live], consumeErrors=True)

        def kill() -> None:
            for w in live:
                if not w.ended.called:
                    log.warn("worker {number} (pid {pid}) did not stop in {grace:.0f} s: killed",
                             number=w.number, pid=w.pid, grace=self.stop_grace)
                    self._signal(w, "KILL")

        timer = self.reactor.callLater(self.stop_grace, kill)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()

        waits.addCallback(done)
        return waits

    @staticmethod
    def _signal(w: _WorkerProtocol, sig: str) -> None:
        try:
            w.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError, AttributeError):
            pass

