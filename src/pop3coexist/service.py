"""Wiring: a validated Config in, a running twisted MultiService out.

``preflight(config)`` checks everything that can be checked before a port is opened (mailroot
writable, password file and key readable, TLS files valid) and raises ConfigError with a clear
message, so a bad set-up refuses to start with nothing half-started. ``make_service(config)``
builds the store, the checker, the queue, the POP3 and ESMTP listeners and the delivery runner.
What can only fail once the server starts (a port taken, a shared table or ``listeners.json``
that cannot be written, a worker process that does not start) is handled by
``Pop3CoexistService``: every listener is bound before anything serves, and a failure stops
everything and ends the process non-zero (its docstring gives the order). Once start-up is
complete, the ports the listeners really got are written to ``<state_dir>/run/listeners.json``
(so tests and tools can use port 0). The state folder's lock (startup.StateLock) is taken by
tap.py before anything in the folder is touched.

``make_frontends`` builds the POP3 and SMTP factories; the worker processes of
``server.workers`` > 1 (worker.py, supervised by workers.py) build theirs with it too, so every
process serves alike; ``make_limiters`` and ``make_throttles`` give each process its view of
the tables they share (connection counts, failed log-ins); they live in policy/limiters.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import abstract, defer, endpoints, error, fdesc, tcp, unix
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from pop3coexist.config import Config, parse_endpoint
from pop3coexist.errors import ConfigError, StoreError
from pop3coexist.fsutil import refresh_mounts, write_atomic
from pop3coexist.interfaces import IClosable, ISelfCheck, ISharedConnectionLimiter, IStartStop
from pop3coexist.netutil import QuickCloseServer
from pop3coexist.policy.limiters import make_limiters, make_throttles
from pop3coexist.startup import StartupError, StartupReport, StateLock
from pop3coexist.tls import (
    ensure_self_signed,
    load_tls_files,
    reload_all,
    reloadable_server_options,
    server_options,
)

log = Logger()


class Components:
    """The long-lived parts built from one config (shared by the service and the admin tool)."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        from pop3coexist.identity.factory import make_checker
        from pop3coexist.store.maildir import MaildirStore

        self.config = config
        self.reactor = reactor
        # The reactor thread's "never waits for the disk" paths stay off on NFS or FUSE
        # (fsutil.refresh_mounts); SIGHUP reads the mount table again.
        if refresh_mounts(self.fs_roots(config)):
            log.info("state_dir, mailroot or queue is on a network or FUSE file system: "
                     "its files are opened and looked up off the reactor thread")
        self.store = MaildirStore(config.server.mailroot, quota_grace=config.domains.quota_grace,
                                  node=config.server.spool_node)
        self.checker = make_checker(config, self.store, reactor)

    @staticmethod
    def fs_roots(config: Config) -> list[Path]:
        """The folders whose files the processes open: state_dir, mailroot, queue, and this
        node's local folder."""
        server = config.server
        return [server.state_dir, server.mailroot, server.queue_dir, server.local_root]

    def make_queue(self):
        from pop3coexist.store.queue import FileQueue

        return FileQueue(self.config.server.queue_dir, self.config.server.hostname,
                         lease=self.config.queue.claim_lease, shared=self.config.server.shared,
                         recycle=self.config.queue.recycle)


def prepare_state(config: Config) -> None:
    """Create the state folders, the configured local domains and the postmaster (and abuse)
    mailbox there when missing; raise ConfigError if the state cannot be written."""
    from pop3coexist.store.maildir import MaildirStore

    state = config.server.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        config.server.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"[server.state_dir] cannot create {state}: {e.strerror}")
    store = MaildirStore(config.server.mailroot, node=config.server.spool_node)
    try:
        store.check_writable()
        for domain in config.domains.local:
            store.add_domain(domain)
        # RFC 5321 4.5.1: the postmaster (and abuse) mailbox must be able to receive
        from pop3coexist.policy.relay import role_mailboxes

        for domain, mailbox in role_mailboxes(config, config.domains.local):
            if store.add_mailbox(domain, mailbox):
                log.info("created the mailbox {box}@{domain} for role mail (domains.postmaster, "
                         "domains.abuse)", box=mailbox, domain=domain)
        # a crash can leave half-received messages in the spool; none had a 250
        from pop3coexist.smtp.incoming import clean_spool

        removed = clean_spool(store.spool_dir())
        if removed:
            log.info("removed {n} unfinished incoming message(s) left by a crash", n=removed)
    except (StoreError, OSError) as e:
        raise ConfigError(f"[server.state_dir] mailroot {config.server.mailroot} is not usable: {e}")


def preflight(config: Config) -> None:
    """Check everything that can fail at start-up; raise ConfigError naming what is wrong.

    Logs the config's warnings (``Config.warnings``, an expired certificate) once.
    """
    from pop3coexist.startup import check_state_dir

    check_state_dir(config.server.state_dir, config.server.local_dir)
    prepare_state(config)
    try:
        from pop3coexist.store.queue import FileQueue

        FileQueue(config.server.queue_dir, config.server.hostname).ensure_dirs()
    except OSError as e:
        raise ConfigError(f"[server.state_dir] the queue {config.server.queue_dir} is not usable: "
                          f"{e.strerror or e}") from None
    try:
        ensure_self_signed(config.tls, config.server.hostname)
    except OSError as e:
        raise ConfigError(f"[tls] cannot create the self-signed certificate: {e.strerror}")
    loaded = load_tls_files(config.tls)
    server_options(config.tls)
    check_systemd_listeners(config)
    check_dkim_keys(config)
    for warning in (*config.warnings, *(loaded.warnings if loaded else ())):
        log.warn("configuration warning: {warning}", warning=warning)
    if config.auth.method == "passwordfile":
        from pop3coexist.identity.factory import make_password_file

        try:
            make_password_file(config).check()
        except (StoreError, OSError) as e:
            raise ConfigError(f"[auth] password file {config.server.password_file}: {e}")
    elif config.auth.method == "directory":
        from pop3coexist.config import read_secret

        assert config.auth.directory.bind_password_file is not None
        try:
            if not read_secret(config.auth.directory.bind_password_file):
                raise ConfigError("[auth.directory.bind_password_file] the file is empty")
        except OSError as e:
            raise ConfigError(f"[auth.directory.bind_password_file] cannot read: {e.strerror}")
    elif config.auth.method == "local":
        try:
            import pam  # noqa: F401
        except ImportError:
            raise ConfigError("[auth.method] \"local\" needs the python-pam package")
    from pop3coexist.identity.factory import make_checker
    from pop3coexist.store.maildir import MaildirStore

    checker = make_checker(config, MaildirStore(config.server.mailroot))
    if ISelfCheck.providedBy(checker):
        try:
            checker.check()
        except (StoreError, OSError, ValueError) as e:
            raise ConfigError(f"[auth] {config.auth.method}: {e}")
    if IClosable.providedBy(checker):
        checker.close()


def check_dkim_keys(config: Config) -> None:
    """Every ``[[dkim]]`` key file can be read and signs; ConfigError naming it when not."""
    if not config.dkim:
        return
    from pop3coexist.policy.dkimsign import DkimSigner, SigningError

    try:
        DkimSigner(config.dkim).check()
    except SigningError as e:
        raise ConfigError(f"[dkim.key_file] {e}") from None


class SystemdSockets:
    """The listening sockets a service manager passed to this process (sd_listen_fds(3)).

    systemd (a socket unit) and ``systemd-socket-activate`` set ``LISTEN_PID`` (this process),
    ``LISTEN_FDS`` (how many, from descriptor 3 on) and, from systemd 227 and with
    ``--fdname``, ``LISTEN_FDNAMES`` (colon-separated names; "unknown" when unset). Read once,
    in the process that starts the server, before twistd forks into the background.
    """

    START = 3

    def __init__(self, environ: Any = None, pid: int | None = None) -> None:
        environ = self.start_environment() if environ is None else environ
        pid = os.getpid() if pid is None else pid
        self.fds: list[int] = []
        self.names: list[str] = []
        self.why_none = "LISTEN_PID and LISTEN_FDS are not set for this process"
        if environ.get("LISTEN_PID") == str(pid):
            try:
                count = int(environ.get("LISTEN_FDS", "0"))
            except ValueError:
                count = 0
            self.fds = list(range(self.START, self.START + max(count, 0)))
            names = environ.get("LISTEN_FDNAMES", "")
            self.names = names.split(":") if names else ["unknown"] * len(self.fds)
            self.why_none = "LISTEN_FDS is 0"
        elif "LISTEN_PID" in environ:
            self.why_none = f"LISTEN_PID is {environ['LISTEN_PID']}, not this process"

    @staticmethod
    def start_environment() -> dict[str, str]:
        """The environment this process was started with. Twisted's endpoints module removes
        LISTEN_PID and LISTEN_FDS from ``os.environ`` when it is imported (and ignores the
        sockets when LISTEN_FDNAMES is missing, as with systemd-socket-activate without
        --fdname); Linux's /proc/self/environ still holds them."""
        env = dict(os.environ)
        try:
            raw = Path("/proc/self/environ").read_bytes()
        except OSError:
            return env
        for item in raw.split(b"\0"):
            name, eq, value = item.partition(b"=")
            if eq and name.startswith(b"LISTEN_"):
                env[name.decode("ascii", "replace")] = value.decode("utf-8", "replace")
        return env

    def lookup(self, description: str) -> tuple[int, socket.AddressFamily]:
        """(descriptor, address family) of a ``systemd:`` description, checked: it exists, is
        a listening stream socket, and has the family of ``domain=``. Raises ValueError."""
        _, _, kw = parse_endpoint(description)
        if not self.fds:
            raise ValueError(
                f"{description!r}: no socket was passed by systemd ({self.why_none}); start the "
                "server from a systemd socket unit or with systemd-socket-activate")
        if "index" in kw:
            index = int(kw["index"])
            if index >= len(self.fds):
                raise ValueError(f"{description!r}: systemd passed {len(self.fds)} socket(s) "
                                 f"(index 0 to {len(self.fds) - 1})")
        else:
            if kw["name"] not in self.names:
                raise ValueError(f"{description!r}: systemd passed no socket named {kw['name']!r} "
                                 f"(names: {', '.join(self.names)})")
            index = self.names.index(kw["name"])
        fd = self.fds[index]
        family = getattr(socket, "AF_" + kw["domain"])
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError as e:
            raise ValueError(f"{description!r}: descriptor {fd} is not a socket ({e.strerror})")
        with probe:
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if probe.family != family or probe.type != socket.SOCK_STREAM or not listening:
                kind = {socket.AF_INET: "INET", socket.AF_INET6: "INET6",
                        socket.AF_UNIX: "UNIX"}.get(probe.family, str(probe.family))
                raise ValueError(
                    f"{description!r}: socket {index} (descriptor {fd}) is a "
                    f"{'listening ' if listening else ''}{kind} "
                    f"{'stream' if probe.type == socket.SOCK_STREAM else 'datagram'} socket, "
                    f"not a listening {kw['domain']} stream socket")
        return fd, family


_systemd: SystemdSockets | None = None


def systemd_sockets() -> SystemdSockets:
    """The sockets passed to this process, read on first use (before twistd forks)."""
    global _systemd
    if _systemd is None:
        _systemd = SystemdSockets()
    return _systemd


def listener_keys(config: Config) -> list[tuple[str, str]]:
    """(config key, endpoint description) of every listener, in config order."""
    out: list[tuple[str, str]] = []
    for key, descs in (("pop3.listen", config.pop3.listen), ("pop3.tls_listen", config.pop3.tls_listen),
                       ("smtp.listen", config.smtp.listen),
                       ("smtp.submission_listen", config.smtp.submission_listen),
                       ("smtp.tls_listen", config.smtp.tls_listen),
                       ("managesieve.listen", config.managesieve.listen),
                       ("imap.listen", config.imap.listen),
                       ("imap.tls_listen", config.imap.tls_listen),
                       ("web.listen", config.web.listen),
                       ("web.tls_listen", config.web.tls_listen)):
        out.extend((key, d) for d in descs)
    return out


def check_systemd_listeners(config: Config) -> None:
    """Raise ConfigError naming the key when a ``systemd:`` listener has no socket to adopt."""
    for key, desc in listener_keys(config):
        if desc.startswith("systemd:"):
            try:
                systemd_sockets().lookup(desc)
            except ValueError as e:
                raise ConfigError(f"[{key}] {e}") from None


class ListenerService(service.Service):
    """Listens on one endpoint description with one factory; remembers the port it got.

    ``tcp:``, ``tcp6:`` and ``unix:`` descriptions go to Twisted's ``serverFromString``; a
    ``systemd:`` one adopts the socket systemd passed (looked up when the service is built,
    before twistd forks; see SystemdSockets).

    The socket is bound in ``privilegedStartService`` (before twistd drops privileges) and
    left paused: it accepts no connection until the server's start-up is complete
    (``resume``, called by Pop3CoexistService), so a server that then refuses to start has
    served nobody.
    """

    def __init__(self, description: str, factory: Any, role: str, reactor: Any = None) -> None:
        self.description = description
        self.factory = factory
        self.role = role
        self.reactor = reactor
        self.port: Any = None
        self._listening: defer.Deferred | None = None
        self._adopt: tuple[int, socket.AddressFamily] | None = None
        if description.startswith("systemd:"):
            try:
                self._adopt = systemd_sockets().lookup(description)
            except ValueError as e:
                raise ConfigError(f"[{role}] {e}") from None

    def privilegedStartService(self) -> None:
        from twisted.internet import reactor as default_reactor

        reactor = self.reactor or default_reactor
        try:
            if self._adopt is not None:
                fd, family = self._adopt
                fdesc.setNonBlocking(fd)
                port = adopt_stream_port(reactor, fd, family, self.factory)
                os.close(fd)  # the port holds its own copy
                self._listening = defer.succeed(port)
            else:
                check_unix_folder(self.description)
                remove_stale_unix_socket(self.description)
                endpoint = endpoints.serverFromString(reactor, with_backlog(self.description))
                self._listening = endpoint.listen(self.factory)
        except Exception:  # a description the endpoint parser refuses: a failed listener
            self._listening = defer.fail()

        def got(port: Any) -> Any:
            self.port = port
            self.pause()
            return port

        self._listening.addCallback(got)
        service.Service.privilegedStartService(self)

    def pause(self) -> None:
        """Accept no new connection (the socket stays bound)."""
        if isinstance(self.port, abstract.FileDescriptor):
            self.port.stopReading()

    def resume(self) -> None:
        """Accept connections again."""
        if isinstance(self.port, abstract.FileDescriptor) and self.port.connected:
            self.port.startReading()

    def stopService(self) -> defer.Deferred | None:
        service.Service.stopService(self)
        if self.port is not None:
            return defer.maybeDeferred(self.port.stopListening)
        return None

    def bound_port(self) -> int | None:
        """The TCP port listened on; None before listening and for a UNIX socket."""
        if self.port is None:
            return None
        return getattr(self.port.getHost(), "port", None)


class AdoptedUnixPort(unix.Port):
    """A listening UNIX socket adopted from another process: a worker's inherited socket, or
    one systemd passed. Its file belongs to whoever bound it: Twisted's own port would chmod
    it to 0666 when adopting it (undoing ``unix:PATH:mode=`` and systemd's ``SocketMode=``),
    and when it stops listening would shut the shared socket down (for every process) and
    unlink its file (so a worker that ended would take the socket away from the server). This
    one leaves the socket, the file's mode and its existence alone, as Twisted does for an
    adopted TCP socket."""

    _shouldShutdown = False  # the socket is shared: closing our copy must not end theirs

    def startListening(self) -> None:  # noqa: N802 (Twisted's name)
        skt, self._preexistingSocket = self._preexistingSocket, None
        if skt is None:
            raise error.CannotListenError(None, self._bindPath, "no socket to adopt")
        tcp._reservedFD.reserve()
        self.factory.doStart()
        skt.listen(self.backlog)
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        tcp.Port.connectionLost(self, reason)  # the socket file stays


def adopt_stream_port(reactor: Any, fd: int, family: socket.AddressFamily,
                      factory: Any) -> Any:
    """Listen with ``factory`` on the listening socket ``fd`` (a non-blocking descriptor this
    process inherited; the caller closes it afterwards). A UNIX socket's file is left as it is
    (AdoptedUnixPort); a TCP socket goes to ``reactor.adoptStreamPort``."""
    if family == socket.AF_UNIX:
        port = AdoptedUnixPort._fromListeningDescriptor(reactor, fd, factory)
        port.startListening()
        return port
    return reactor.adoptStreamPort(fd, family, factory)


def check_unix_folder(description: str) -> None:
    """Raise OSError naming the folder when a ``unix:`` listener's folder does not exist (the
    bind would fail with a bare "No such file or directory" about the lock file)."""
    try:
        kind, args, _ = parse_endpoint(description)
    except ValueError:
        return
    folder = os.path.dirname(args[0]) if kind == "unix" else ""
    if folder and not os.path.isdir(folder):
        raise OSError(f"the folder {folder} does not exist (create it first, or name another)")


def remove_stale_unix_socket(description: str) -> bool:
    """For a ``unix:...:lockfile=0`` listener, remove a socket file that nobody listens on any
    more (left by a server that was killed); True when one was removed. With the default
    ``lockfile=1`` Twisted does this itself (by the pid in ``PATH.lock``). A socket something
    still listens on, and anything that is not a socket, stay: the bind then fails."""
    import stat

    try:
        kind, args, kwargs = parse_endpoint(description)
    except ValueError:
        return False
    if kind != "unix" or kwargs.get("lockfile", "1") != "0":
        return False
    path = args[0]
    if not os.path.isdir(os.path.dirname(path) or "."):
        return False
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # a socket file with no listener behind it
        try:
            os.unlink(path)
        except OSError:
            return False
        log.info("removed the stale socket {path} (nothing listened on it)", path=path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


YIELD_DELAY = 0.003  # seconds a busier process leaves a new connection to the others


_UNSET: Any = object()


class _SharedAcceptPort(tcp.Port):
    """A listening port shared by several processes (see ``share_accepts``)."""

    _yielded = False
    _shared_limiter: Any = _UNSET  # the factory's ISharedConnectionLimiter, or None (asked once)
    _log_prefix = ""  # Twisted's logPrefix, made once (it is asked at each wake-up)
    _local_address: Any = None  # the bound address, unless a wildcard (QuickCloseServer)
    transport = QuickCloseServer

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return self._log_prefix or tcp.Port.logPrefix(self)

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        limiter = self._shared_limiter
        if limiter is _UNSET:  # asked at the first wake-up, not at each (issue 17)
            limiter = self._shared_limiter = _shared_limiter(self.factory)
        if not self._yielded and limiter is not None and limiter.busier_than_others():
            # another process holds fewer connections: let it take this one; if it has not
            # after YIELD_DELAY (busy, or just died), take it here
            self._yielded = True
            self.stopReading()
            self.reactor.callLater(YIELD_DELAY, self._take_turn)
            return
        self._yielded = False
        self._accept_one()

    def _accept_one(self) -> None:
        """Accept one connection, as Twisted's ``Port.doRead`` does with ``numberAccepts``
        1, without its per-wake-up log buffer, generator and accept-count bookkeeping
        (issue 17). Any accept error (none waiting, EMFILE, ...) is left to Twisted's
        ``doRead``, which tries once more and handles it its way (EMFILE's reserved
        descriptor, the "Could not accept" log line)."""
        try:
            skt, addr = self.socket.accept()
        except OSError:
            tcp.Port.doRead(self)
            return
        try:
            if len(addr) == 4:  # IPv6: keep the scope id, as Twisted does
                host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                addr = (host[0], *addr[1:])
            protocol = self.factory.buildProtocol(self._buildAddr(addr))
            if protocol is None:
                skt.close()
                return
            s = self.sessionno
            self.sessionno = s + 1
            transport = self.transport(skt, protocol, addr, self, s, self.reactor)
            transport.local_address = self._local_address
            protocol.makeConnection(transport)
        except BaseException:
            log.failure("accepting a connection failed")

    def _take_turn(self) -> None:
        if self.connected and not self.disconnecting:
            self.startReading()


def _shared_limiter(factory: Any) -> Any:
    """The factory's connection limiter when it is shared with the other processes, else None."""
    inner = factory.wrappedFactory if isinstance(factory, WrappingFactory) else factory
    limiter = inner.limiter  # the POP3 and the ESMTP factory both have one
    return limiter if ISharedConnectionLimiter.providedBy(limiter) else None


def share_accepts(port: Any) -> None:
    """Make a TCP port that several processes listen on spread its connections fairly.

    Twisted accepts up to ``numberAccepts`` connections in a row (growing under load), so the
    first process to wake would take a whole burst. A shared port accepts one connection per
    wake-up, and a process that holds more connections than another (the shared connection
    table says) first leaves the new one to the others for a moment, so long sessions such as
    POP3 downloads end up evenly spread over the processes. Its connections close sooner
    after a QUIT (``netutil.QuickCloseServer``).
    """
    if type(port) is tcp.Port:
        port.__class__ = _SharedAcceptPort
        # Twisted's doRead reads ``self._logger`` twice per wake-up, and that class attribute
        # (a Logger descriptor) builds a new Logger at each read: keep one (issue 17)
        port._logger = tcp.Port._logger.__get__(port, _SharedAcceptPort)
        port._log_prefix = tcp.Port.logPrefix(port)
        try:
            host = port.getHost()
        except OSError:  # not listening (yet): getHost asks each connection's socket
            return
        if host.host not in ("0.0.0.0", "::"):  # bound to one address: every connection's
            port._local_address = host


class Pop3CoexistService(service.MultiService):
    """The whole server: listeners, delivery runner, worker processes, listeners.json.

    Start-up runs in one order, and a failure at any step stops everything started so far,
    logs one line naming what failed, reports it to twistd (startup.StartupReport) and ends
    the process with a non-zero exit status:

    1. ``privilegedStartService``: bind every listener (paused: nothing is accepted yet);
    2. ``startService``: check that every listener is bound; create the tables shared with
       the worker processes; start the delivery runner; spawn the worker processes and wait
       until each listens (they too accept nothing yet);
    3. let every process accept, write ``run/listeners.json``, report success.
    """

    def __init__(self, config: Config, reactor: Any = None,
                 report: StartupReport | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.report = report if report is not None else StartupReport()
        self.state_lock: StateLock | None = None  # held for the life of the process (tap.py)
        self.node_lock: StateLock | None = None  # the node's lock on a shared state_dir (tap.py)
        self.listeners: list[ListenerService] = []
        # listeners of the main process alone (the monitoring HTTP): not given to workers
        self.side_listeners: list[ListenerService] = []
        self.supervisor: Any = None  # workers.WorkerSupervisor when server.workers > 1
        self.outbound: Any = None  # the delivery runner; start-up waits for its queue scan
        self.limiters: dict[str, Any] = {}
        self.throttles: dict[str, Any] = {}
        self.starting: defer.Deferred[None] | None = None
        self._children_started = False

    def add_listener(self, listener: ListenerService) -> None:
        self.listeners.append(listener)
        listener.setServiceParent(self)

    def add_side_listener(self, listener: ListenerService) -> None:
        """A listener of this process only (``[metrics] listen``): bound, checked, resumed
        and written to listeners.json as the others, never shared with the workers."""
        self.side_listeners.append(listener)
        listener.setServiceParent(self)

    def serving_state(self) -> tuple[bool, str]:
        """For /healthz: (every listener bound and accepting, and every worker alive; what
        is wrong or how many)."""
        wrong = [f"{ls.role} {ls.description} not listening"
                 for ls in [*self.listeners, *self.side_listeners]
                 if ls.port is None or not getattr(ls.port, "connected", True)]
        workers = 1
        if self.supervisor is not None:
            alive = [w for w in self.supervisor.workers.values() if not w.ended.called]
            workers += len(alive)
            if len(alive) < self.supervisor.count:
                wrong.append(f"{self.supervisor.count - len(alive)} worker process(es) down "
                             "(being replaced)")
        if wrong:
            return False, "; ".join(wrong)
        return True, f"{len(self.listeners)} listener(s), {workers} serving process(es)"

    def _reactor(self) -> Any:
        if self.reactor is not None:
            return self.reactor
        from twisted.internet import reactor as default_reactor

        return default_reactor

    def privilegedStartService(self) -> None:
        if self.state_lock is not None:
            self.state_lock.record_pid()  # twistd may have forked (daemonised) since tap.py
        super().privilegedStartService()  # binds every listener

    def startService(self) -> None:
        # the children start in _start, once every listener is known to be bound
        service.Service.startService(self)
        self.report.hold()
        self.starting = defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            await self._check_listeners()
            self._start_tables()
            self._children_started = True
            for child in list(self):
                child.startService()
            await self._outbound_started()
            if self.supervisor is not None:
                await self._start_workers()
            for ls in [*self.listeners, *self.side_listeners]:
                ls.resume()
            self.write_listeners()
        except StartupError as e:
            self._abort(str(e))
            return
        except Exception as e:  # a bug, not a set-up mistake: still nothing half-started
            log.failure("start-up failed")
            self._abort(f"unexpected error: {e!r}")
            return
        for ls in [*self.listeners, *self.side_listeners]:
            log.info("{role} listening on {desc} (port {port})", role=ls.role,
                     desc=ls.description, port=ls.bound_port())
        self.report.succeed()

    async def _check_listeners(self) -> None:
        every = [*self.listeners, *self.side_listeners]
        for ls in every:
            if ls._listening is None:  # started without privilegedStartService
                ls.privilegedStartService()
        waits = [ls._listening for ls in every if ls._listening is not None]
        results = await defer.DeferredList(waits, consumeErrors=True)
        failed = [f"cannot listen on {ls.description} ({ls.role}): {_listen_error(r[1])}"
                  for ls, r in zip(every, results, strict=True) if not r[0]]
        if failed:
            raise StartupError("; ".join(failed))

    async def _outbound_started(self) -> None:
        if self.outbound is None:  # no delivery runner in this process
            return
        started = self.outbound.started  # OutboundService: a Deferred that fires once scanned
        try:
            await started
        except Exception as e:
            raise StartupError(f"the outbound queue {self.config.server.queue_dir} cannot start: "
                               f"{getattr(e, 'strerror', None) or e}") from None

    def _start_tables(self) -> None:
        for table in [*self.limiters.values(), *self.throttles.values()]:
            if IStartStop.providedBy(table):  # shared tables: made now, after any --uid switch
                try:
                    table.start()
                except (OSError, ValueError) as e:
                    raise StartupError(f"cannot create a table shared with the worker "
                                       f"processes: {e}")

    async def _start_workers(self) -> None:
        # every process accepts from the same sockets, one connection per wake-up, so the
        # least busy process takes the next client
        for ls in self.listeners:
            share_accepts(ls.port)
        try:
            await self.supervisor.start_workers([(ls.role, ls.port) for ls in self.listeners])
        except defer.CancelledError:
            from pop3coexist.workers import START_TIMEOUT

            raise StartupError(f"the worker processes did not start: not all of them were "
                               f"listening after {START_TIMEOUT:.0f} s")
        except Exception as e:
            raise StartupError(f"the worker processes did not start: {e or repr(e)}")
        # listeners.json (next) says every process accepts: wait until the workers do
        from pop3coexist.workers import START_TIMEOUT

        serving = self.supervisor.serve()
        timer = self._reactor().callLater(START_TIMEOUT, serving.cancel)
        try:
            await serving
        except defer.CancelledError:
            raise StartupError(f"the worker processes did not start: not all of them were "
                               f"accepting connections {START_TIMEOUT:.0f} s after being "
                               "told to") from None
        finally:
            if timer.active():
                timer.cancel()

    def _abort(self, line: str) -> None:
        """Start-up failed: accept nothing, report, and stop (twistd then stops every service
        started, removes its pid file and ends; the exit status is 1)."""
        log.error("cannot start: {line}", line=line)
        for ls in [*self.listeners, *self.side_listeners]:
            ls.pause()
        self.report.fail(line)
        reactor = self._reactor()
        reactor.callWhenRunning(_stop_reactor, reactor)

    def write_listeners(self) -> None:
        run = self.config.server.run_dir
        data: dict[str, list[int]] = {}
        for ls in [*self.listeners, *self.side_listeners]:
            port = ls.bound_port()
            if port is not None:
                data.setdefault(ls.role, []).append(port)
        record: dict[str, Any] = {"pid": os.getpid(), "listeners": data}
        if self.supervisor is not None:
            record["workers"] = [os.getpid(), *self.supervisor.pids()]
        try:
            run.mkdir(parents=True, exist_ok=True)
            # not durable: rewritten at every start, gone at every stop
            write_atomic(run / "listeners.json", json.dumps(record, indent=1).encode(),
                         mode=0o644, durable=False)
        except OSError as e:
            raise StartupError(f"cannot write {run / 'listeners.json'}: {e.strerror or e}")

    def stopService(self) -> Any:
        try:
            (self.config.server.run_dir / "listeners.json").unlink()
        except OSError:
            pass
        if not self._children_started:  # start-up ended before anything but the listeners
            service.Service.stopService(self)
            return defer.DeferredList([defer.maybeDeferred(ls.stopService)
                                       for ls in [*self.listeners, *self.side_listeners]])
        return super().stopService()


def _listen_error(failure: Any) -> str:
    """The reason a listener could not bind, shortest first ("Address already in use")."""
    err = failure.value
    if isinstance(err, error.CannotListenError) and isinstance(err.socketError, OSError):
        return err.socketError.strerror or str(err.socketError)
    return failure.getErrorMessage()


def _stop_reactor(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def make_frontends(config: Config, parts: Components, queue: Any, reactor: Any,
                   worker: int = 0, limiters: dict[str, Any] | None = None,
                   throttles: dict[str, Any] | None = None,
                   tls_options: Any = None,
                   ) -> list[tuple[str, str, Any]]:
    """(role, endpoint description, factory) for every configured listener; a TLS-on-connect
    listener's factory is already wrapped in TLS. Shared by the main process and the worker
    processes (pop3coexist.worker), so every process serves the same way. ``tls_options`` is
    the process's ``tls.ReloadableServerOptions`` (made here when not given), which SIGHUP
    reloads."""
    from pop3coexist.policy.masquerade import wrap_queue
    from pop3coexist.pop3.factory import POP3ServerFactory
    from pop3coexist.smtp.server import SMTPServerFactory

    if tls_options is None:
        tls_options = reloadable_server_options(config.tls)
    if limiters is None:
        limiters = make_limiters(config, worker)
    if throttles is None:
        throttles = make_throttles(config, reactor, worker)
    out: list[tuple[str, str, Any]] = []
    pop3_throttle, smtp_throttle = throttles["pop3"], throttles["smtp"]

    def pop3_factory(implicit_tls: bool) -> Any:
        return POP3ServerFactory(
            config, parts.store, parts.checker, tls_options=tls_options,
            implicit_tls=implicit_tls, reactor=reactor, throttle=pop3_throttle,
            limiter=limiters["pop3"],
        )

    for desc in config.pop3.listen:
        out.append(("pop3", desc, pop3_factory(False)))
    for desc in config.pop3.tls_listen:
        out.append(("pop3s", desc, TLSMemoryBIOFactory(tls_options, False, pop3_factory(True))))

    # [masquerade]: rewrite senders of mail that leaves; [[dkim]]: then sign it (dkimsign.py)
    from pop3coexist.policy.dkimsign import dkim_queue

    smtp_queue = wrap_queue(dkim_queue(queue, config), config)
    verifier = make_sender_verifier(config, reactor)  # [sender_authentication]
    rules, srs = make_rules(config, parts, smtp_queue, reactor)
    quarantine = make_quarantine(config)

    def smtp_factory(mode: str) -> Any:
        return SMTPServerFactory(
            config, parts.store, parts.checker, smtp_queue, tls_options=tls_options, mode=mode,
            reactor=reactor, throttle=smtp_throttle, limiter=limiters["smtp"],
            verifier=verifier,
            rules=rules, srs=srs,
            content_filters=make_milters(config, mode, reactor), quarantine=quarantine,
        )

    for desc in config.smtp.listen:
        out.append(("smtp", desc, smtp_factory("mx")))
    for desc in config.smtp.submission_listen:
        out.append(("submission", desc, smtp_factory("submission")))
    for desc in config.smtp.tls_listen:
        out.append(("smtps", desc, TLSMemoryBIOFactory(tls_options, False, smtp_factory("smtps"))))
    if config.managesieve.listen:
        from pop3coexist.managesieve.server import ManageSieveFactory
        from pop3coexist.store.sievestore import SieveScripts

        sieve_factory = ManageSieveFactory(config, parts.store, parts.checker,
                                           SieveScripts(parts.store), pop3_throttle,
                                           tls_options=tls_options, reactor=reactor)
        for desc in config.managesieve.listen:
            out.append(("managesieve", desc, sieve_factory))
    if config.imap.listen or config.imap.tls_listen:  # [imap] (issue 18)
        from pop3coexist.imap.factory import IMAPServerFactory

        def imap_factory(implicit_tls: bool) -> Any:
            return IMAPServerFactory(
                config, parts.store, parts.checker, tls_options=tls_options,
                implicit_tls=implicit_tls, reactor=reactor, throttle=throttles["imap"],
                limiter=limiters["imap"],
            )

        for desc in config.imap.listen:
            out.append(("imap", desc, imap_factory(False)))
        for desc in config.imap.tls_listen:
            out.append(("imaps", desc, TLSMemoryBIOFactory(tls_options, False, imap_factory(True))))
    return out


def make_webmail(config: Config, parts: Components, queue: Any, reactor: Any,
                 throttles: dict[str, Any], tls_options: Any) -> list[tuple[str, str, Any]]:
    """(role, description, site) of the ``[web]`` listeners (roles ``web`` and ``web_tls``):
    web mail over the store and checker, with POP3's failed-log-in throttle (a failure on the
    web delays POP3 from that address and the other way round), and an in-process
    ``smtp.submit.Submitter`` over an SMTP factory of mode "submission" built like the
    submission listener's (masquerading and DKIM around the queue, the Sieve rules, the
    submission milters, the quarantine). Sessions live in memory, so only the main process
    serves these listeners (side listeners, never given to the workers). Sender
    authentication (SPF, DKIM, DMARC) never applies to logged-in mail, so no verifier."""
    from pop3coexist.policy.connlimit import ConnectionLimiter
    from pop3coexist.policy.dkimsign import dkim_queue
    from pop3coexist.policy.masquerade import wrap_queue
    from pop3coexist.smtp.server import SMTPServerFactory
    from pop3coexist.smtp.submit import Submitter
    from pop3coexist.web.app import make_site
    from pop3coexist.web.listen import listeners
    from pop3coexist.web.sessions import SessionStore
    from pop3coexist.web.webmail import WebMail

    smtp_queue = wrap_queue(dkim_queue(queue, config), config)
    rules, srs = make_rules(config, parts, smtp_queue, reactor)
    factory = SMTPServerFactory(
        config, parts.store, parts.checker, smtp_queue, tls_options=tls_options,
        mode="submission", reactor=reactor, throttle=throttles["smtp"], rules=rules, srs=srs,
        content_filters=make_milters(config, "submission", reactor),
        quarantine=make_quarantine(config))
    web = config.web
    sessions = SessionStore(reactor, idle_timeout=web.session_idle_timeout,
                            max_age=web.session_max_age, max_sessions=web.max_sessions,
                            cookie_name="pop3coexist_mail")
    app = WebMail(config, parts.store, parts.checker, throttles["pop3"], Submitter(factory),
                  sessions, reactor)
    site = make_site(app, web.max_upload, web.trusted_proxies)
    return listeners("web", "web", web.listen, web.tls_listen, site,
                     tls_options if config.tls.enabled else None,
                     ConnectionLimiter(web.max_connections, web.max_connections_per_client),
                     web.trusted_proxies)


VERIFY_THREADS = 20  # SPF, DKIM and DMARC checks at once (each mostly waits for DNS)


def make_sender_verifier(config: Config, reactor: Any) -> Any:
    """The ISenderVerifier of ``[sender_authentication]`` (mailauth/verify.py: SPF, DKIM and
    DMARC with the ``[dns]`` resolvers), or None when it is off. The checks run in a thread
    pool of their own, started with the reactor: a slow DNS server never holds the threads
    that the store and the queue need."""
    if not config.sender_authentication.enabled:
        return None
    from twisted.internet import threads
    from twisted.python.threadpool import ThreadPool

    from pop3coexist.mailauth.verify import make_verifier

    pool = ThreadPool(0, VERIFY_THREADS, "pop3coexist-mailauth")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run_blocking(f: Any, *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, pool, f, *args)

    return make_verifier(config, run_blocking)
def make_rules(config: Config, parts: Components, queue: Any, reactor: Any) -> tuple[Any, Any]:
    """The per-recipient rules stage's Sieve rules (policy/rules.py) over the store's scripts,
    and the SRS of forwarded mail (None unless ``[sieve] srs``); the SRS key file is made
    on first use (``store.sievestore.load_srs_key``)."""
    from twisted.internet import threads

    from pop3coexist.policy.rules import RulesSettings, SieveRules
    from pop3coexist.policy.srs import SRS
    from pop3coexist.store.sievestore import SieveScripts, load_srs_key

    srs = None
    if config.sieve.srs:
        key_file = config.sieve.srs_secret_file or config.server.state_dir / "srs.key"
        srs = SRS(load_srs_key(key_file), max_age_days=int(config.sieve.srs_max_age // 86400))

    def run_blocking(f: Any, *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    rules = SieveRules(RulesSettings.from_config(config), SieveScripts(parts.store), queue,
                       parts.store, run_blocking, srs=srs)
    return rules, srs
def make_milters(config: Config, mode: str, reactor: Any) -> Any:
    """The ``IContentFilterFactory`` of the ``[[milter]]`` entries that scan an SMTP listener
    of ``mode`` (mx: "smtp", "submission", "smtps"), or None when none does."""
    from pop3coexist.milter.conversation import MilterSet

    kind = "smtp" if mode == "mx" else mode
    milters = [m for m in config.milter if kind in m.listeners]
    if not milters:
        return None
    return MilterSet(milters, reactor, config.server.hostname, kind)


def make_quarantine(config: Config) -> Any:
    """The quarantine of content-filtered messages (``<state_dir>/quarantine``)."""
    from pop3coexist.store.quarantine import Quarantine

    return Quarantine(config.server.state_dir / "quarantine")


def make_outbound(config: Config, parts: Components, queue: Any, reactor: Any,
                  worker: int = 0) -> Any:
    """The delivery runner of one serving process (smtp/outbound.py ``OutboundService``):
    every process runs one, claiming messages from the shared queue (store/queue.py), with
    its share of the smart host connection limits."""
    from pop3coexist.mailauth.resolver import twisted_resolver
    from pop3coexist.smtp.hops import HopResolver
    from pop3coexist.smtp.outbound import OutboundService

    # MX and address look-ups of the queue ask the [dns] resolvers (mailauth/resolver.py)
    return OutboundService(config, queue, store=parts.store, reactor=reactor,
                           resolver=HopResolver(twisted_resolver(config.dns, reactor)),
                           checker=parts.checker, worker=worker,
                           processes=max(1, config.server.workers),
                           # claims are named by node (README "Several servers"); expired
                           # leases are looked for at least twice per lease
                           node=config.server.node,
                           scan_interval=min(30.0, config.queue.claim_lease / 2))


def make_service(config: Config, reactor: Any = None,
                 report: StartupReport | None = None) -> Pop3CoexistService:
    """Build the whole server from a validated config (call ``preflight`` first); ``report``
    tells twistd how start-up ended (startup.StartupReport)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    top = Pop3CoexistService(config, reactor, report)
    if config.metrics.enabled:  # before prometheus_client is imported; workers inherit it
        from pop3coexist.monitor.metrics import enable_multiprocess

        enable_multiprocess(config.server.run_dir / "metrics")
    from pop3coexist.monitor.wiring import ObserverService, metrics_site, process_observers

    metrics, observers = process_observers(config, main=True)
    watcher = ObserverService(observers)  # the first child: it observes everything after it
    watcher.setServiceParent(top)
    parts = Components(config, reactor)
    queue = parts.make_queue()
    top.limiters = make_limiters(config, 0)
    top.throttles = make_throttles(config, reactor, 0)
    tls = reloadable_server_options(config.tls)
    for role, desc, factory in make_frontends(config, parts, queue, reactor, limiters=top.limiters,
                                              throttles=top.throttles, tls_options=tls):
        top.add_listener(ListenerService(desc, factory, role, reactor=reactor))

    outbound = make_outbound(config, parts, queue, reactor, worker=0)
    outbound.setServiceParent(top)
    top.outbound = outbound
    _CheckerCloser(parts.checker).setServiceParent(top)
    if config.server.workers > 1:
        from pop3coexist.workers import WorkerSupervisor

        top.supervisor = WorkerSupervisor(config, outbound, reactor=reactor)
        top.supervisor.on_change = top.write_listeners  # a replaced worker: its new pid
        top.supervisor.setServiceParent(top)
    if config.web.listen or config.web.tls_listen:  # [web] (issue 19): the main process only
        for role, desc, site in make_webmail(config, parts, queue, reactor, top.throttles, tls):
            top.add_side_listener(ListenerService(desc, site, role, reactor=reactor))
    for desc in config.metrics.listen:
        site = metrics_site(config, metrics, parts.store, parts.checker, top.serving_state,
                            reactor)
        top.add_side_listener(ListenerService(desc, site, "metrics", reactor=reactor))
    # [admin_web]: the admin API and console, main process only (adminweb/site.py)
    from pop3coexist.adminweb.site import admin_listeners

    for role, desc, factory in admin_listeners(config, parts.store, parts.checker, reactor,
                                               flush=outbound.flush, metrics=metrics):
        top.add_side_listener(ListenerService(desc, factory, role, reactor=reactor))

    def on_hup(signum: int, frame: Any) -> None:
        # State files are re-read on every use; SIGHUP also asks the queue to run now,
        # reopens the mail log, reloads the TLS certificate and key, and passes the signal
        # on to the workers.
        reactor.callFromThread(_reload, queue, watcher, tls, top.supervisor)

    try:
        signal.signal(signal.SIGHUP, on_hup)
    except ValueError:  # not the main thread (tests)
        pass
    return top


class _CheckerCloser(service.Service):
    """Closes the checker's connections (directory) when the server stops."""

    def __init__(self, checker: Any) -> None:
        self.checker = checker

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if IClosable.providedBy(self.checker):
            return defer.maybeDeferred(self.checker.close)
        return None


def _reload(queue: Any, watcher: Any = None, tls: Any = None, supervisor: Any = None) -> None:
    log.info("SIGHUP: state is re-read on every use; running the queue now")
    refresh_mounts()  # a volume mounted since the start (fsutil.refresh_mounts)
    if watcher is not None:
        try:
            watcher.reopen()  # the mail log file, after logrotate
        except OSError as e:
            log.error("SIGHUP: cannot reopen the mail log: {e}", e=e)
    if tls is not None:
        reload_all()  # the listeners' certificate, and the admin API's with its client CA
    if supervisor is not None:
        for pid in supervisor.pids():
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError:  # a worker that just ended; its replacement loads the new files
                pass
    try:
        queue.wake()
    except Exception:
        log.failure("queue wake failed")


# Twisted's default listen backlog is 50: a burst of more connections than that (a guessing
# run, a mail client restarting everywhere at 9:00) overflows the accept queue and every
# connection past it waits for the client's SYN retry, a whole second or more (issue 16 item 4).
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=DEFAULT_BACKLOG`` added to a tcp, tcp6 or unix listener
    that names none (the kernel caps it at net.core.somaxconn)."""
    try:
        kind, _args, kwargs = parse_endpoint(description)
    except ValueError:
        return description  # the endpoint parser reports it
    if kind in ("tcp", "tcp6", "unix") and "backlog" not in kwargs:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def read_listeners(state_dir: Path) -> dict[str, list[int]]:
    """The ports a running server bound, by role (pop3, pop3s, smtp, submission, smtps, imap,
    imaps); ``state_dir`` is the folder that holds ``run/``: ``server.local_dir`` when set."""
    data = json.loads((state_dir / "run" / "listeners.json").read_text())
    return data["listeners"]
