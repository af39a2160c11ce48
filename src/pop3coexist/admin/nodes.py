"""``pop3coexist-admin nodes``: the nodes that share this ``state_dir`` (README "Several servers").

One line per node that ever ran over the state folder (a ``nodes/<node_id>.lock`` on the
volume): whether it runs now, who holds it, when its health probe last wrote the volume, and
how many queued messages its delivery runners hold claimed::

    mail1  running  pid 4242 on mx1  probe 3s ago   claims 2
    mail2  stopped                   probe 2h ago   claims 0

"running" means its lock is held: the check takes a shared ``flock`` without waiting on a
separate descriptor and lets it go at once, so it never disturbs a node. A node without
``[metrics]`` has no probe ("probe -"). Nothing is written. Works on any node, and on a
single server (no ``nodes/`` folder: "no nodes: server.local_dir is not set anywhere").
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import TextIO

from pop3coexist.config import Config


def node_rows(state_dir: Path, now: float | None = None) -> list[dict]:
    """Each node of ``state_dir``: ``{"node", "running", "holder", "probe_age", "claims"}``
    (``probe_age`` in seconds or None; ``holder`` "pid N on HOST" or ""). Blocking."""
    now = time.time() if now is None else now
    folder = Path(state_dir) / "nodes"
    try:
        names = sorted(n[: -len(".lock")] for n in os.listdir(folder) if n.endswith(".lock"))
    except FileNotFoundError:
        return []
    claimed = Path(state_dir) / "queue" / "claimed"
    try:
        owners = [d for d in os.listdir(claimed) if not d.startswith(".")]
    except FileNotFoundError:
        owners = []
    rows = []
    for name in names:
        running, holder = _held(folder / f"{name}.lock")
        try:
            probe_age: float | None = now - (folder / f"{name}.alive").stat().st_mtime
        except FileNotFoundError:
            probe_age = None
        claims = 0
        for owner in owners:
            if owner.split(".", 1)[0] == name:
                try:
                    claims += sum(1 for e in os.listdir(claimed / owner) if e.endswith(".json"))
                except FileNotFoundError:
                    pass
        rows.append({"node": name, "running": running, "holder": holder if running else "",
                     "probe_age": probe_age, "claims": claims})
    return rows


def _held(path: Path) -> tuple[bool, str]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            words = os.pread(fd, 128, 0).decode("ascii", "replace").split()
            holder = f"pid {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "") if words else ""
            return True, holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, ""
    finally:
        os.close(fd)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def run_nodes(config: Config, out: TextIO) -> None:
    """Print the node table (see the module docstring)."""
    rows = node_rows(config.server.state_dir)
    if not rows:
        print("no nodes: server.local_dir is not set anywhere (one server alone)", file=out)
        return
    width = max(len(r["node"]) for r in rows)
    for r in rows:
        state = "running" if r["running"] else "stopped"
        print(f"{r['node']:<{width}}  {state:<7}  {r['holder']:<24}  probe {_age(r['probe_age']):<9}"
              f"  claims {r['claims']}".rstrip(), file=out)
