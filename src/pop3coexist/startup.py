"""Start-up safety: one server per state folder, and a start that either completes or ends.

- ``StateLock``: an exclusive ``flock`` on ``<state_dir>/run/server.lock``, taken before the
  server touches anything in the state folder (spool cleaning, queue recovery, the shared
  ``run/*.table`` files, ``run/listeners.json``) and held for the life of the main process. A
  second server on the same state folder is refused with a message naming the holder's pid
  (written into the lock file). The kernel drops the lock when the holder ends, however it
  ends (``kill -9`` too), so a stale lock file never blocks the next start. The admin command
  does not take it: it must keep working while the server runs. With ``server.local_dir`` (several
  nodes over one shared ``state_dir``, README "Several servers") it is
  ``<local_dir>/run/server.lock``, and ``NodeLock`` adds the node's lock on the shared volume.
- ``NodeLock``: an exclusive ``flock`` on ``<state_dir>/nodes/<node_id>.lock`` on the shared
  volume, held for the life of the main process: a second node started with the same
  ``server.node_id`` is refused (claims and spool folders are named by node id). GlusterFS
  passes ``flock`` to the bricks, so it excludes across machines, and the lock ends with the
  holder's process (its FUSE client releases it) or, if the whole machine vanished, when the
  bricks drop its connection (``network.ping-timeout`` / TCP user timeout).
- ``StartupReport``: how a start that ends after twistd's own report tells twistd's waiting
  parent (daemon mode: the "status pipe" twistd opens when it forks, see
  ``twisted.scripts._twistd_unix.UnixApplicationRunner.daemonize``) and the exit status. The
  server holds the status pipe until every listener is bound and every worker process
  listens, then reports success, or one line naming what failed; a failed start ends the
  process with exit status 1 once twistd has cleaned up (pid file removed, log closed).
- ``StartupError``: a start-up failure whose text is the one line the administrator reads.
- ``limit_malloc_retention``: glibc's malloc fixed to serve blocks of 1 MiB and more by mmap,
  so the 16 MiB scrypt of each log-in (run in the thread pool) goes back to the system when
  freed instead of staying in a per-thread arena (about 160 MB per process otherwise).
- ``cache_log_time_stamps``, ``fast_log_text``, ``fast_log_lines``, ``fast_log_context``:
  twistd's text log, Twisted's ``Logger.emit`` and the reactor's log context per I/O event
  made cheaper, with the same lines (issue 17).

Nothing here touches sockets; service.py decides the order of start-up.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from pop3coexist.errors import ConfigError

MMAP_THRESHOLD = 1 << 20  # octets: malloc blocks this large or larger are mmapped
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def limit_malloc_retention() -> bool:
    """Fix glibc malloc's mmap threshold at MMAP_THRESHOLD (glibc otherwise raises it after
    the first large free, and later large blocks, a log-in's scrypt among them, stay in the
    arena of the thread that freed them). True when set; False elsewhere (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def cache_log_time_stamps(size: int = 64) -> bool:
    """Make the time stamps of twistd's text log cost one formatting per second, not one per
    line (issue 17: ``formatTime`` was 6 % of the main process's CPU per SMTP message: four
    lines a message, each building a time zone and a datetime and calling strftime).

    Twisted's text log observer (``twisted.logger._file``, which twistd's ``--logfile`` and
    standard output use) calls its module's ``formatTime(when, timeFormat)`` for each line;
    this puts a memo in front of it, keyed by the whole second and the format. A format with
    sub-second fields (``%f``) is passed through. The text is the same: the stamp of a time is
    that of its whole second (same seconds, same UTC offset). True when installed; False when
    Twisted's module no longer has that function (the log then formats as before)."""
    try:
        from twisted.logger import _file

        original = _file.formatTime
    except (ImportError, AttributeError):
        return False
    if original in _CACHED_TIME_FORMATTERS:
        return True
    memo: dict[tuple[int, str], str] = {}

    def formatTime(when: float | None, timeFormat: str | None = _file.timeFormatRFC3339,  # noqa: N802, N803 - Twisted's names
                   default: str = "-") -> str:
        if when is None or timeFormat is None or "%f" in timeFormat:
            return original(when, timeFormat, default)
        key = (int(when // 1), timeFormat)
        text = memo.get(key)
        if text is None:
            if len(memo) >= size:
                memo.clear()
            text = memo[key] = original(when, timeFormat, default)
        return text

    _CACHED_TIME_FORMATTERS.add(formatTime)
    _file.formatTime = formatTime
    return True


_CACHED_TIME_FORMATTERS: set[Any] = set()  # what cache_log_time_stamps installed


def fast_log_text() -> bool:
    """Render log events' text with ``str.format_map`` where that gives Twisted's text
    (issue 17: Twisted's ``formatWithCall`` runs ``string.Formatter`` in Python over a
    wrapper of every value; with four events a message, rendered in the worker and again by
    the main process's text log, it was about 5 % of the server's CPU per SMTP message).

    ``twisted.logger._format._formatEvent`` (used by ``eventAsText``, ``formatEvent`` and the
    text log observers) gets a front: a ``str`` ``log_format`` of an event that is not
    flattened is formatted by ``format_map`` over the event; anything that raises (a
    ``{call()}`` field, which Twisted calls and ``format_map`` reads as a missing key, a
    positional field, a bad value) goes to Twisted's own function, which formats it or
    describes the unformattable event as before. Same fields, conversions, attribute and
    index look-ups and format specs as PEP 3101, so the same text. True when installed;
    False when Twisted's module no longer has that function."""
    try:
        from twisted.logger import _format

        original = _format._formatEvent
    except (ImportError, AttributeError):
        return False
    if original in _FAST_TEXT_FORMATTERS:
        return True

    def _formatEvent(event: Any) -> str:  # noqa: N802 - Twisted's name
        fmt = event.get("log_format")
        if type(fmt) is str and "log_flattened" not in event:
            try:
                return fmt.format_map(event)
            except Exception:  # noqa: BLE001, S110 - Twisted's function decides
                pass
        return original(event)

    _FAST_TEXT_FORMATTERS.add(_formatEvent)
    _format._formatEvent = _formatEvent
    return True


_FAST_TEXT_FORMATTERS: set[Any] = set()  # what fast_log_text installed


def fast_log_lines() -> bool:
    """Render twistd's text log lines without Twisted's generic steps, and emit events
    without sorting the log levels each time (issue 17, fifth round: four events an SMTP
    message, each emitted in the process that served it and written by the main process).

    - ``twisted.logger._file.formatEventAsClassicLogText`` (what twistd's ``--logfile`` and
      standard output observers call per event) gets a front: an event with no failure and a
      ``str`` or missing ``log_system`` is written as ``TIME [SYSTEM] TEXT`` in one f-string
      (the text from ``_format._formatEvent``, ``fast_log_text``'s when installed); anything
      else goes to Twisted's function. The same line: Twisted's system is
      ``NAMESPACE#LEVEL`` (``-`` for a missing one) when ``log_system`` is missing, line
      breaks are followed by a tab, no line for an event with no text.
    - ``twisted.logger.Logger.emit`` checks the level against a set instead of sorting
      ``LogLevel``'s constants (``iterconstants``) for every event; an unknown level goes to
      Twisted's method, which logs it as before. The event is built as Twisted builds it.

    True when installed; False when Twisted's modules no longer have these names."""
    try:
        from time import time

        from twisted.logger import Logger, LogLevel, _file, _format

        original_line = _file.formatEventAsClassicLogText
        original_emit = Logger.emit
    except (ImportError, AttributeError):
        return False
    if original_line in _FAST_LINE_FORMATTERS:
        return True
    levels = frozenset(LogLevel.iterconstants())

    def formatEventAsClassicLogText(event: Any, formatTime: Any = _file.formatTime) -> str | None:  # noqa: N802, N803 - Twisted's names
        system = event.get("log_system", None)
        if "log_failure" in event or not (system is None or type(system) is str):
            return original_line(event, formatTime)
        text = _format._formatEvent(event)
        if not text:
            return None
        if system is None:
            level = event.get("log_level", None)
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{formatTime(event.get('log_time', None))} [{system}] {text}"
        return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"

    def emit(self: Any, level: Any, format: str | None = None, **kwargs: Any) -> None:  # noqa: A002 - Twisted's name
        if level not in levels:
            return original_emit(self, level, format, **kwargs)
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)
        return None

    _FAST_LINE_FORMATTERS.add(formatEventAsClassicLogText)
    _file.formatEventAsClassicLogText = formatEventAsClassicLogText
    Logger.emit = emit  # type: ignore[method-assign]
    return True


_FAST_LINE_FORMATTERS: set[Any] = set()  # what fast_log_lines installed


def fast_log_context() -> bool:
    """Give the reactor's wrapper of every I/O event its log context in one function
    (issue 17, fifth round: ``twisted.python.log.callWithLogger`` and the context calls under
    it were 5-6 % of each process's Python CPU, several I/O events an SMTP message).

    Twisted's epoll reactor calls ``log.callWithLogger(selectable, doReadOrWrite, ...)`` for
    each ready descriptor: it asks the selectable's ``logPrefix()``, copies the current log
    context with ``system`` set to it, pushes that onto the thread's context stack for the
    call (so a legacy ``log.msg`` / ``log.err`` inside names the connection, as in
    ``[SMTPServerFactory,3,127.0.0.1] Unhandled Error``) and logs, with that system, anything
    the call raises. This does the same with the thread's context stack directly instead of
    six nested calls (``callWithContext``, ``context.get``, ``context.call`` and the
    tracker's methods); a ``logPrefix`` that raises, or a context tracker other than
    Twisted's default, goes to Twisted's function. True when installed; False when Twisted's
    modules no longer have these names."""
    try:
        from twisted.python import context, log

        original = log.callWithLogger
        tracker = context.theContextTracker
        storage = tracker.storage
        log_context = log.ILogContext
        if not isinstance(tracker, context.ThreadedContextTracker):
            return False
    except (ImportError, AttributeError):
        return False
    if original in _FAST_CONTEXT_CALLS:
        return True

    def callWithLogger(logger: Any, func: Callable[..., Any], *args: Any, **kw: Any) -> Any:  # noqa: N802 - Twisted's name
        if context.theContextTracker is not tracker:
            return original(logger, func, *args, **kw)
        try:
            lp = logger.logPrefix()
        except BaseException:  # noqa: BLE001 - Twisted's function logs it, as before
            return original(logger, func, *args, **kw)
        try:
            contexts = storage.ct.contexts
        except AttributeError:  # this thread's first context: Twisted makes it
            contexts = tracker.currentContext().contexts
        for ctx in reversed(contexts):
            if log_context in ctx:
                system = {**ctx[log_context], "system": lp}
                break
        else:  # no log context at all (Twisted always sets one): Twisted's function
            return original(logger, func, *args, **kw)
        contexts.append({log_context: system})
        try:
            result = func(*args, **kw)
        except KeyboardInterrupt:
            contexts.pop()
            raise
        except BaseException:  # noqa: BLE001 - logged with the system, as Twisted does
            contexts.pop()
            log.err(system=lp)
            return None
        contexts.pop()
        return result

    _FAST_CONTEXT_CALLS.add(callWithLogger)
    log.callWithLogger = callWithLogger
    return True


_FAST_CONTEXT_CALLS: set[Any] = set()  # what fast_log_context installed


LOCK_NAME = "server.lock"


class StartupError(Exception):
    """The server cannot start; str() is one line naming what failed and why."""


class StateInUse(StartupError):
    """Another live server holds the state folder's lock."""


class StateLock:
    """An exclusive lock on a state folder, held while this object's descriptor is open.

    The descriptor survives twistd's daemonising forks (``flock`` locks belong to the open
    file, not to a process) and is not inherited by worker processes (it is opened
    close-on-exec), so the lock lasts exactly as long as the main server process.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path, key: str = "state_dir") -> StateLock:
        """Lock ``state_dir`` (creating it and its ``run/`` folder if missing); ``key`` names
        the setting the folder comes from (``local_dir`` for a node of several).

        Raises StateInUse, naming the holder's pid, when a live server holds the lock, and
        ConfigError when the folder or the lock file cannot be created.
        """
        path = Path(state_dir) / "run" / LOCK_NAME
        return cls._take(path, key, lambda who: (
            f"{key} {state_dir} is in use by another running pop3coexist server "
            f"({who}; lock file {path}); stop that server first, or give this one "
            f"its own {key}"))

    @classmethod
    def _take(cls, path: Path, key: str, in_use: Callable[[str], str]) -> StateLock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"[server.{key}] cannot create the lock file {path}: "
                              f"{e.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"[server.{key}] cannot lock {path}: {e.strerror}")
            raise StateInUse(in_use(f"pid {holder}" if holder else "pid not yet recorded"))
        lock = cls(path, fd)
        lock.record_pid()
        return lock

    def record_pid(self) -> None:
        """Write this process's pid into the lock file (again after twistd daemonises)."""
        if self.fd is None:
            return
        data = f"{os.getpid()}\n".encode("ascii")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could race with the next holder)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NodeLock(StateLock):
    """A node's lock on the shared volume (see the module docstring); ``release`` as StateLock."""

    @classmethod
    def acquire_node(cls, state_dir: Path, node: str) -> NodeLock:
        """Lock ``<state_dir>/nodes/<node>.lock``. StateInUse (naming the holder's pid and
        host) when a live node with the same id holds it; ConfigError when the volume cannot
        take the file (the message names ``server.node_id`` or the path)."""
        path = Path(state_dir) / "nodes" / f"{node}.lock"
        lock = cls._take(path, "node_id", lambda who: (
            f"node_id {node!r} is in use by another running node on state_dir {state_dir} "
            f"({who}; lock file {path}); give each node its own server.node_id"))
        assert isinstance(lock, NodeLock)
        return lock

    def record_pid(self) -> None:
        """Write this process's pid and the machine's name (the holder may be another machine)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {_host()}\n".encode("ascii", "replace"), 0)


def _host() -> str:
    import socket

    return socket.gethostname().replace(" ", "-")


# The folders under state_dir the server writes in, and the files it writes in run/
STATE_FOLDERS = ("", "run", "mailroot", "queue", "queue/msg", "queue/env", "queue/tmp")
RUN_FILES = (LOCK_NAME, "listeners.json", "connections-pop3.table", "connections-smtp.table",
             "auth-failures-pop3.table", "auth-failures-smtp.table")


def check_state_dir(state_dir: Path, local_dir: Path | None = None) -> None:
    """Check, without changing anything, that the server can write its state folder: each of
    STATE_FOLDERS is a folder it can write in, or can be created (its nearest existing parent
    is a folder that can be written), and none of RUN_FILES is a folder. With ``local_dir``
    (``server.local_dir``) ``run/`` is looked for there, and the rest in ``state_dir``.

    Raises ConfigError naming ``server.state_dir`` (or ``server.local_dir``) and the path: a
    file where a folder should be, a folder that cannot be written (a read-only file system,
    permissions).
    """
    state_dir = Path(state_dir)
    places = [(state_dir / rel if rel else state_dir, "state_dir") for rel in STATE_FOLDERS
              if not (local_dir is not None and rel == "run")]
    if local_dir is not None:
        places += [(Path(local_dir), "local_dir"), (Path(local_dir) / "run", "local_dir")]
    run_root = Path(local_dir) if local_dir is not None else state_dir
    for path, key in places:
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ConfigError(f"[server.{key}] {path} is a file where the server needs a "
                                  "folder; move it away")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"[server.{key}] the folder {path} cannot be written "
                                  f"({_why_not_writable(path)})")
            continue
        parent = path.parent
        while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"[server.{key}] cannot create the folder {path}: {parent} is a "
                              "file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"[server.{key}] cannot create the folder {path}: {parent} "
                              f"cannot be written ({_why_not_writable(parent)})")
    run_key = "local_dir" if local_dir is not None else "state_dir"
    for name in RUN_FILES:
        path = run_root / "run" / name
        if path.is_dir():
            raise ConfigError(f"[server.{run_key}] {path} is a folder where the server writes a "
                              "file; move it away")


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except OSError:
        pass
    return "permission denied"


def _read_holder(fd: int) -> str | None:
    """``pid N`` or ``pid N on HOST`` from a lock file, None when not recorded yet."""
    try:
        words = os.pread(fd, 128, 0).decode("ascii", "replace").split()
    except OSError:
        return None
    if not words or not words[0].isdigit():
        return None
    host = f" on {words[1]}" if len(words) > 1 else ""
    return f"{words[0]}{host}"


class StartupReport:
    """Reports the end of start-up to twistd's parent process and in the exit status.

    ``twistd_config`` is twistd's own options mapping (the plugin options' ``parent``), or None
    when the server is not run by twistd (tests). ``hold()`` takes the status pipe from twistd
    (twistd would report success as soon as the services' ``startService`` returns, before
    the worker processes listen); ``succeed()`` or ``fail(line)`` reports once.
    """

    def __init__(self, twistd_config: MutableMapping[str, Any] | None = None) -> None:
        self.twistd_config = twistd_config
        self.pipe: int | None = None
        self.outcome: str | None = None  # None (pending), "ok" or the failure line

    def install_exit_status(self) -> None:
        """Make a failed start end the process with exit status 1 (call it early, from the
        twistd plugin: the exit handler then runs after those registered later)."""
        atexit.register(self._exit_status)

    @property
    def failed(self) -> bool:
        return self.outcome not in (None, "ok")

    def hold(self) -> None:
        """Take twistd's status pipe (daemon mode only; a no-op otherwise)."""
        if self.twistd_config is None or self.pipe is not None:
            return
        with contextlib.suppress(KeyError, TypeError):
            pipe = self.twistd_config["statusPipe"]
            if isinstance(pipe, int):
                self.pipe = pipe
                self.twistd_config["statusPipe"] = None

    def succeed(self) -> None:
        """Start-up is complete: the parent exits 0."""
        if self.outcome is None:
            self.outcome = "ok"
            self._write(b"0")

    def fail(self, line: str) -> None:
        """Start-up failed: the parent prints ``line`` and exits 1, and so does this process
        when it ends. Under twistd the line also goes to the original stderr (seen with
        ``twistd -n --logfile FILE``)."""
        if self.outcome is not None:
            return
        self.outcome = line
        # twistd's parent reads at most 100 bytes: "1 " and the start of the line
        self._write(b"1 " + line.encode("ascii", "backslashreplace")[:98])
        with contextlib.suppress(Exception):
            stream = sys.__stderr__
            if self.twistd_config is not None and stream is not None and stream is not sys.stderr:
                stream.write(f"pop3coexist: cannot start: {line}\n")
                stream.flush()

    def _write(self, data: bytes) -> None:
        if self.pipe is None:
            return
        pipe, self.pipe = self.pipe, None
        with contextlib.suppress(OSError):
            os.write(pipe, data)
        with contextlib.suppress(OSError):
            os.close(pipe)

    def _exit_status(self) -> None:
        """At interpreter exit, after a failed start: exit status 1 (twistd itself would
        return 0 after a reactor stopped by us)."""
        if not self.failed:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)


# -- handing the state to the mail user (twistd --uid) -----------------------------------------


def switch_ids(twistd_config: MutableMapping[str, Any] | None) -> tuple[int, int] | None:
    """The (uid, gid) twistd will switch to after binding the listeners (``--uid``, ``--gid``;
    the gid defaults to the user's own group, as twistd does), or None when it will not switch
    (no ``--uid``, ``--euid`` only, or not started as root)."""
    if twistd_config is None or os.getuid() != 0:
        return None
    uid, gid = twistd_config.get("uid"), twistd_config.get("gid")
    if uid is None or uid == 0 or twistd_config.get("euid"):
        return None
    if gid is None:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    return int(uid), int(gid)


def hand_over(state_dir: Path, uid: int, gid: int, extra: tuple[Path, ...] = ()) -> int:
    """Give ``state_dir`` (and everything in it) and the files ``extra`` to ``uid``:``gid``.

    ``twistd --uid`` builds the service as root, so the folders and files made before the
    switch (``run/``, ``mailroot/``, the queue folders, the configured domains, a self-signed
    certificate, and anything an earlier run as root or a root ``pop3coexist-admin`` left)
    would belong to root, and the server could not write them once it runs as the mail user.
    Called after ``preflight`` and before the switch: every entry not owned by ``uid`` gets
    ``lchown`` (symbolic links are not followed). One ``lstat`` per file: run as root with
    ``--uid`` only. Returns how many entries changed owner; ConfigError when one cannot.
    """
    changed = 0

    def give(path: str) -> None:
        nonlocal changed
        try:
            st = os.lstat(path)
            if st.st_uid != uid or (st.st_gid != gid and st.st_gid == 0):
                os.lchown(path, uid, gid)
                changed += 1
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"[server.state_dir] cannot give {path} to uid {uid}: {e.strerror}")

    give(str(state_dir))
    for dirpath, dirnames, filenames in os.walk(state_dir):
        for name in (*dirnames, *filenames):
            give(os.path.join(dirpath, name))
    for path in extra:
        give(str(path))
    return changed
