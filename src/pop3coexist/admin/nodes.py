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

from typing import TextIO

from pop3coexist.config import Config
from pop3coexist.ops.nodes import node_rows

__all__ = ["node_rows", "run_nodes", "format_nodes"]


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
    format_nodes(node_rows(config.server.state_dir), out)


def format_nodes(rows: list[dict], out: TextIO) -> None:
    """Print ``rows`` (ops/nodes.py ``node_rows``) as the node table."""
    if not rows:
        print("no nodes: server.local_dir is not set anywhere (one server alone)", file=out)
        return
    width = max(len(r["node"]) for r in rows)
    for r in rows:
        state = "running" if r["running"] else "stopped"
        print(f"{r['node']:<{width}}  {state:<7}  {r['holder']:<24}  probe {_age(r['probe_age']):<9}"
              f"  claims {r['claims']}".rstrip(), file=out)
