"""``make cluster``: a 3-host pop3coexist test cluster on this machine, until Ctrl-C.

    python cluster/run.py [--nodes 3] [--work DIR] [--check]

Builds what the cluster integration test builds (tests/support/gluster.py): three GlusterFS
brick hosts in network namespaces on a bridge with link-local addresses, a replica-3 volume
with the options of README "Several servers", one FUSE mount per host, and ``--nodes``
pop3coexist nodes ``a``, ``b``, ``c`` (node i on host i's mount, one shared ``state_dir`` on the
volume, its own ``local_dir``), listening on loopback ports the OS picked. It adds the mailbox
``ted@pop.contoso.test`` (its password is written to ``<work>/ted.password``, mode 0600, never
printed), prints each node's ports and config file, and waits: try POP3 on one node and SMTP on
another, ``pop3coexist-admin -c <a node's config> stat`` on any, or take a brick host off the
network with ``ip link set <veth> down`` (the printed veth names). Ctrl-C (or SIGTERM) stops
the nodes, unmounts and removes every namespace, link and process it made (and the work
folder, unless ``--work`` named one). ``--check`` stops
after one message went in on node a and out on the last node (a smoke test).

Needs root, glusterfs-server, glusterfs-client (Debian), and the project installed (README).
"""

from __future__ import annotations

import argparse
import os
import poplib
import secrets
import shutil
import signal
import smtplib
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.gluster import ClusterNode, GlusterCluster, missing  # noqa: E402
from tests.support.server import HOSTNAME  # noqa: E402

USER = f"ted@{HOSTNAME}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--work", default="", help="folder for everything (default: a new temporary one)")
    ap.add_argument("--check", action="store_true", help="one message across nodes, then stop")
    args = ap.parse_args()
    why = missing()
    if why is not None:
        print(f"make cluster: {why}", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="p3c-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    secret = work / "ted.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = GlusterCluster(work / "gluster")
    nodes: list[ClusterNode] = []
    try:
        cluster.start()
        mounts = [cluster.mount(i, work / "gluster" / f"m{i}") for i in (1, 2, 3)]
        for i, name in enumerate("abc"[: args.nodes]):
            node = ClusterNode(work / "nodes" / name, mounts[i] / "state", name, tls=False,
                               extra_config='[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
            node.write_config()
            nodes.append(node)
        nodes[0].add_mailbox(USER, password)
        for node in nodes:
            node.start(timeout=120)
        for host in cluster.hosts:
            print(f"brick host {host.index}: {host.address} (netns {host.netns}, veth {host.veth})")
        for node in nodes:
            print(f"node {node.node_id}: POP3 {node.port('pop3')}, SMTP {node.port('smtp')}, "
                  f"/healthz http://127.0.0.1:{node.port('metrics')}/healthz, config "
                  f"{node.config_path}")
        print(f"mailbox {USER}, password in {secret}; shared state_dir {mounts[0] / 'state'}")
        if args.check:
            with smtplib.SMTP("127.0.0.1", nodes[0].port("smtp"), timeout=60) as s:
                s.sendmail("ann@example.org", [USER], b"Subject: make cluster\r\n\r\nhello\r\n")
            box = poplib.POP3("127.0.0.1", nodes[-1].port("pop3"), timeout=60)
            box.user(USER)
            box.pass_(password)
            count = box.stat()[0]
            box.quit()
            print(f"check: node a accepted, node {nodes[-1].node_id} lists {count} message(s)")
            return 0 if count == 1 else 1
        print("running; Ctrl-C stops and removes everything")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        for node in nodes:
            node.stop()
        cluster.stop()
        if not args.work:  # our own temporary folder: bricks, logs, the password file
            shutil.rmtree(work, ignore_errors=True)
        print("stopped; namespaces, bridge, mounts and the work folder removed")


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
