"""A worker process (``python -m pop3coexist.worker``), started by the main process's
WorkerSupervisor (workers.py) when ``server.workers`` > 1; not meant to be run by hand.

It reads the same config file, builds the same POP3 and SMTP factories as the main process
(service.make_frontends), adopts the listening sockets it inherited (paused: it accepts nothing
until the main process writes ``serve`` on its stdin, once start-up is complete in every
process), and serves until it gets SIGTERM or its stdin ends (the main process is gone). It does no start-up work of the main
process (no spool cleaning, no queue recovery, no outbound delivery): messages for remote
recipients go into the shared queue and their ids are passed to the main process's runner on
the control descriptor. Its log goes to stdout, one event a line (workers.encode_worker_event:
lean text, or JSON with a mail event's fields when the main process writes a mail log),
which the main process writes into the server's log. The file descriptors are described in workers.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

CONTROL_FD = 3


class LogWriter:
    """This worker's log observer: each event as one line on ``fd`` (its stdout, a pipe to the
    main process), written at once with one ``write`` (no buffer: a kill -9 loses no line).
    ``fields``: whether the main process reads mail events' fields (it writes a mail log,
    ``[log] mail_log``); until the config is read, they are sent."""

    def __init__(self, fd: int = 1, fields: bool = True) -> None:
        from pop3coexist.workers import encode_worker_event

        self.fd = fd
        self.fields = fields
        self.encode = encode_worker_event

    def __call__(self, event: Any) -> None:
        try:
            line = self.encode(event, self.fields)
        except Exception:  # noqa: BLE001 - never raise into the log system
            return
        if line is None:
            return
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            pass  # the main process is gone; the worker stops when its stdin ends


class Control:
    """Writes control lines to the main process (any thread may call)."""

    def __init__(self, fd: int = CONTROL_FD) -> None:
        self.fd = fd
        self.lost = False

    def send(self, line: str) -> bool:
        if self.lost:
            return False
        try:
            os.write(self.fd, (line + "\n").encode("ascii"))
            return True
        except OSError:
            self.lost = True
            return False


def watch_parent(reactor: Any, fd: int = 0,
                 on_line: Callable[[str], None] | None = None) -> threading.Thread:
    """Read the pipe from the main process (``fd``): each whole line is passed to ``on_line``
    in the reactor thread; at end of file the reactor stops."""

    def run() -> None:
        buf = b""
        while True:
            try:
                data = os.read(fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                reactor.callFromThread(_stop, reactor)
                return
            *lines, buf = (buf + data).split(b"\n")
            buf = buf[-4096:]
            for line in lines:
                if on_line is not None:
                    reactor.callFromThread(on_line, line.decode("ascii", "replace").strip())

    t = threading.Thread(target=run, name="parent-watch", daemon=True)
    t.start()
    return t


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pop3coexist.worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[],
                        help="role:fd of an inherited listening socket, in config order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pop3coexist.startup import (
        fast_log_context,
        fast_log_lines,
        fast_log_text,
        limit_malloc_retention,
    )

    limit_malloc_retention()
    fast_log_text()
    fast_log_lines()
    fast_log_context()
    from twisted.internet import reactor
    from twisted.logger import Logger, globalLogBeginner

    writer = LogWriter(1)
    globalLogBeginner.beginLoggingTo([writer], redirectStandardIO=False)
    log = Logger(namespace="pop3coexist.worker")
    # Until the TLS settings exist a SIGHUP (the main process passes each one on) is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from twisted.application import service

    from pop3coexist.config import load_config
    from pop3coexist.errors import ConfigError
    from pop3coexist.service import (
        Components,
        _CheckerCloser,
        adopt_stream_port,
        make_frontends,
        make_outbound,
        share_accepts,
    )

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"pop3coexist worker {args.worker}: configuration error: {e}", file=sys.stderr)
        return 1
    # the main process reads a mail event's fields only to write the mail log (the same config)
    writer.fields = bool(config.log.mail_log)
    control = Control()
    parts = Components(config, reactor)
    queue = parts.make_queue()
    from pop3coexist.tls import reload_all, reloadable_server_options

    tls = reloadable_server_options(config.tls)
    frontends = make_frontends(config, parts, queue, reactor, worker=args.worker, tls_options=tls)
    from pop3coexist.fsutil import refresh_mounts

    def on_hup() -> None:
        refresh_mounts()  # a volume mounted since the start: no cached opens there
        if tls is not None:
            reload_all()  # the certificate and key again

    # SIGHUP from the main process
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(on_hup))
    listeners = [item.rsplit(":", 1) for item in args.listener]
    if [role for role, _ in listeners] != [role for role, _, _ in frontends]:
        print(f"pop3coexist worker {args.worker}: the listeners passed "
              f"({', '.join(r for r, _ in listeners)}) differ from the config's "
              f"({', '.join(r for r, _, _ in frontends)}); was the config changed?",
              file=sys.stderr)
        return 1
    top = service.MultiService()
    from pop3coexist.monitor.wiring import ObserverService, process_observers

    ObserverService(process_observers(config, main=False)[1]).setServiceParent(top)
    _CheckerCloser(parts.checker).setServiceParent(top)
    # this process delivers what it queued, and claims its share of the rest (store/queue.py)
    make_outbound(config, parts, queue, reactor, worker=args.worker).setServiceParent(top)
    ports = []
    for (_role, fd_text), (_, _desc, factory) in zip(listeners, frontends, strict=True):
        fd = int(fd_text)
        probe = socket.socket(fileno=os.dup(fd))
        family = probe.family
        probe.close()
        port = adopt_stream_port(reactor, fd, family, factory)
        port.stopReading()  # accept nothing until the main process says "serve"
        os.close(fd)
        share_accepts(port)
        ports.append(port)

    def command(line: str) -> None:
        if line == "serve":
            for port in ports:
                if port.connected:
                    port.startReading()
            control.send("serving")  # the main process announces the ports after this

    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    watch_parent(reactor, on_line=command)
    log.info("worker {n} (pid {pid}) serving", n=args.worker, pid=os.getpid())
    reactor.callWhenRunning(control.send, "ready")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
