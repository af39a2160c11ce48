"""twistd options and service maker for ``twistd pop3coexist --config FILE``.

The config is loaded and checked in ``makeService``, so any error (unknown key, bad value,
unwritable mailroot, corrupt password file, bad TLS files) is reported by twistd as one clear
line and the server does not start: nothing is half-started. Before anything in the state
folder is touched, its lock is taken (startup.StateLock): a second server on the same
``state_dir`` is refused, naming the pid of the one running. Failures once the server starts
(a port taken, a worker that does not start) are handled by service.Pop3CoexistService.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.python import usage

from pop3coexist.errors import ConfigError

DEFAULT_CONFIG = "etc/pop3coexist.toml"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the pop3coexist mail server (POP3, ESMTP, outbound delivery). "
        f"Without --config, {DEFAULT_CONFIG} in the current folder is used."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file (default: etc/pop3coexist.toml)."],
    ]

    def postOptions(self) -> None:
        path = self["config"] or DEFAULT_CONFIG
        if not Path(path).is_file():
            raise usage.UsageError(f"config file not found: {path}")
        self["config"] = path


def makeService(options: Options) -> Any:
    """Load the config, lock the state folder, check the set-up, then build the service; a
    config error or a state folder in use is one line on stderr and exit status 1, before
    anything listens (and, daemonised, before twistd forks)."""
    from pop3coexist.config import load_config, locate
    from pop3coexist.service import make_service, preflight
    from pop3coexist.startup import (
        NodeLock,
        StartupReport,
        StateInUse,
        StateLock,
        cache_log_time_stamps,
        check_state_dir,
        fast_log_context,
        fast_log_lines,
        fast_log_text,
        hand_over,
        limit_malloc_retention,
        switch_ids,
    )

    limit_malloc_retention()
    cache_log_time_stamps()
    fast_log_text()
    fast_log_lines()
    fast_log_context()

    try:
        config = load_config(options["config"])
        server = config.server
        check_state_dir(server.state_dir, server.local_dir)
        lock = StateLock.acquire(server.local_root, "local_dir" if server.shared else "state_dir")
        # several nodes over one state_dir: no two with one node id (README "Several servers")
        node_lock = NodeLock.acquire_node(server.state_dir, server.node) if server.shared else None
        preflight(config)
        ids = switch_ids(options.parent)
        if ids is not None:  # twistd --uid: what was made as root goes to the mail user
            tls = config.tls
            own = (tls.certificate, tls.private_key) if tls.self_signed else ()
            hand_over(config.server.state_dir, *ids, extra=tuple(p for p in own if p))
            if server.shared:
                hand_over(server.local_root, *ids)
        report = StartupReport(options.parent)  # twistd's own options: its status pipe
        report.install_exit_status()
        top = make_service(config, report=report)
    except StateInUse as e:
        raise SystemExit(f"pop3coexist: cannot start: {e}")
    except ConfigError as e:
        raise SystemExit(f"pop3coexist: configuration error: {locate(options['config'], str(e))}")
    top.state_lock = lock
    top.node_lock = node_lock
    return top
