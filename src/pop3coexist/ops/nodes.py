"""The nodes that share this ``state_dir`` (README "Several servers"): which runs, who holds
it, when its health probe last wrote the volume, how many queued messages it holds claimed.

"running" means its lock is held: the check takes a shared ``flock`` without waiting on a
separate descriptor and lets it go at once, so it never disturbs a node. Nothing is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from pop3coexist.ops.context import Context


def nodes(ctx: Context) -> dict:
    """``{"nodes": node_rows(state_dir)}``."""
    return {"nodes": node_rows(ctx.config.server.state_dir)}


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
