"""The cluster section of the benchmark (issue 20): 1, 2 and 3 pop3coexist nodes over one
replica-3 GlusterFS volume, beside one server on local disk.

    python bench/cluster.py [--messages 2000] [--pop3-per-box 200] [--json FILE]
    python bench/run.py --only cluster      (the same, as a section of the benchmark)

Everything runs on this machine: three GlusterFS brick hosts in network namespaces on a bridge
with link-local addresses, the volume mounted once per host (tests/support/gluster.py), and
``n`` nodes (``server.workers = 1`` each, node i on host i's mount) sharing one ``state_dir`` on
the volume. Per row:

- **SMTP acceptance**: ``smtp-source -l 4096`` into a local mailbox, 20 sessions in all, split
  evenly over the n nodes (one smtp-source per node, run at once); msg/s from the start to the
  last 250 (durable on the volume: every brick host has it).
- **POP3 retrieval**: 10 mailboxes of ``--pop3-per-box`` 4 KB messages on the volume; 10
  clients (one process each, the lean client of bench/run.py), client i on node i mod n,
  RETR + DELE everything, QUIT; msg/s from the first RETR to the last QUIT's reply.

On one machine every brick and every node share the same CPUs and disk: the rows show that
the nodes work together over the volume and what the volume costs against local disk, not a
speed-up from more nodes. Needs root, glusterfs-server, glusterfs-client and smtp-source
(postfix).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    MSG_SIZE,
    PASSWORD,
    copy_boxes,
    fill_template,
    log,
    pop3_client,
)
from tests.support.gluster import ClusterNode, GlusterCluster, missing  # noqa: E402
from tests.support.server import HOSTNAME, ServerProcess  # noqa: E402

SESSIONS = 20
BOXES = 10


def _config(node: ServerProcess) -> ServerProcess:
    limits = "max_connections = 5000\nmax_connections_per_client = 5000\n"
    node.pop3_config = limits
    node.smtp_config = limits + "max_messages_per_connection = 1000\n"
    node.server_config = "workers = 1"
    node.write_config()
    return node


def smtp_sources(ports: list[int], messages: int, rcpt: str) -> float:
    """One smtp-source per port at once, ``messages`` and SESSIONS split evenly; wall time."""
    per = messages // len(ports)
    sessions = max(1, SESSIONS // len(ports))
    start = time.perf_counter()
    procs = [subprocess.Popen(["smtp-source", "-s", str(sessions), "-m", str(per), "-l",
                               str(MSG_SIZE), "-f", "sender@example.test", "-t", rcpt,
                               f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for port in ports]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.strip()[-400:]}")
    return time.perf_counter() - start


def pop3_spread(ports: list[int], users: list[str]) -> tuple[int, float]:
    """The 10-client POP3 round of bench/run.py, client i on ``ports[i % len(ports)]``."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(users))
    result = ctx.Queue()
    procs = [ctx.Process(target=pop3_client,
                         args=(ports[i % len(ports)], u, PASSWORD, barrier, result))
             for i, u in enumerate(users)]
    for p in procs:
        p.start()
    got = [result.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a POP3 client failed")
    return sum(g[0] for g in got), max(g[2] for g in got) - min(g[1] for g in got)


def one_row(nodes: list[ServerProcess], mailroot: Path, template: Path, messages: int,
            per_box: int) -> dict:
    """Start ``nodes``, measure SMTP then POP3, stop them."""
    mailboxes = [f"pop{i}" for i in range(BOXES)]
    nodes[0].add_mailbox(f"bench@{HOSTNAME}", PASSWORD)
    for box in mailboxes:
        nodes[0].add_mailbox(f"{box}@{HOSTNAME}", PASSWORD)
    for node in nodes:
        node.start(timeout=120)
    try:
        ports = [n.port("smtp") for n in nodes]
        smtp_sources(ports, 100, f"bench@{HOSTNAME}")  # warm-up
        elapsed = smtp_sources(ports, messages, f"bench@{HOSTNAME}")
        accepted = (messages // len(ports)) * len(ports)
        copy_boxes(template, mailroot / HOSTNAME, mailboxes)
        n, pop_elapsed = pop3_spread([nd.port("pop3") for nd in nodes],
                                     [f"{b}@{HOSTNAME}" for b in mailboxes])
        if n != BOXES * per_box:
            raise RuntimeError(f"POP3 listed {n} messages, not {BOXES * per_box}")
    finally:
        for node in nodes:
            node.stop()
    return {"nodes": len(nodes), "smtp_msg_s": accepted / elapsed, "smtp_messages": accepted,
            "pop3_msg_s": n / pop_elapsed, "pop3_messages": n}


def bench_cluster(tmp: Path, messages: int = 2000, per_box: int = 200) -> dict:
    """The rows: local disk, then 1, 2, 3 nodes over the volume."""
    why = missing()
    if why is not None:
        raise RuntimeError(f"the cluster section {why}")
    if not shutil.which("smtp-source"):
        raise RuntimeError("smtp-source (Debian package postfix) is needed")
    template = tmp / "pop3-template"
    fill_template(template, [f"pop{i}" for i in range(BOXES)], per_box)
    rows = []
    local = _config(ServerProcess(tmp / "local-disk", tls=False))
    log("cluster: one server on local disk ...")
    rows.append({"where": "local disk", **one_row([local], local.state_dir / "mailroot",
                                                   template, messages, per_box)})
    started = time.perf_counter()
    with GlusterCluster(tmp / "gluster") as cluster:
        mounts = [cluster.mount(i, tmp / "gluster" / f"m{i}") for i in (1, 2, 3)]
        log(f"cluster: volume up in {time.perf_counter() - started:.0f} s")
        for count in (1, 2, 3):
            log(f"cluster: {count} node(s) over the volume ...")
            shared = f"state{count}"
            nodes = [_config(ClusterNode(tmp / f"n{count}" / f"node{i}", mounts[i] / shared,
                                         f"n{i}", tls=False)) for i in range(count)]
            rows.append({"where": "GlusterFS replica 3",
                         **one_row(nodes, mounts[0] / shared / "mailroot", template, messages,
                                   per_box)})
            log(f"cluster: {rows[-1]}")
    return {"rows": rows, "message_size": MSG_SIZE, "sessions": SESSIONS,
            "pop3_clients": BOXES}


def table(result: dict) -> str:
    lines = ["| store | nodes | SMTP accepted, msg/s | POP3 RETR+DELE, msg/s |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['where']} | {r['nodes']} | {r['smtp_msg_s']:.0f} "
                     f"({r['smtp_messages']}, {SESSIONS} sessions) | {r['pop3_msg_s']:.0f} "
                     f"({r['pop3_messages']}, {BOXES} clients) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--pop3-per-box", type=int, default=200)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="p3c-bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        result = bench_cluster(tmp, args.messages, args.pop3_per_box)
    text = table(result)
    print(text)
    result["table"] = text
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    main()
