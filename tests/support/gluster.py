"""A GlusterFS test cluster on one machine: N hosts in network namespaces, one replicated volume.

``GlusterCluster`` builds, as root and only from what it creates itself:

- a bridge with a link-local /24 (169.254.X.0/24, X picked free) and, per host, a network
  namespace joined to it by a veth pair (the namespace side is ``eth0`` with 169.254.X.i):
  GlusterFS bricks refuse loopback addresses, and every host needs its own address;
- per host a ``glusterd -N`` in its own mount namespace (``unshare -m``) with private
  ``/var/lib/glusterd``, ``/run`` and ``/var/log/glusterfs`` (bind mounts of folders under the
  work folder), so several glusterd on one machine do not share their state. The geo-replication
  helper ``gsyncd`` is replaced in that namespace by a stub that answers its version check at
  once (glusterd otherwise spends about 30 s starting Python for its geo-replication set-up);
- a trusted pool (``peer probe``), a replica-N volume with one brick per host and the volume
  options of README "Several servers" (``VOLUME_OPTIONS``);
- FUSE mounts, each made by a client that lives in one host's network namespace
  (``nsenter --net``) but is mounted in the caller's mount namespace, so the test's processes
  use it as host i's view of the volume.

``cut(i)`` takes host i's link down on the bridge (the host vanishes silently: no FIN, no
RST), ``restore(i)`` brings it back. ``stop()`` unmounts, ends every process in the hosts'
namespaces (by pid: all were started here) and removes the namespaces and the bridge.

``ClusterNode`` is a real pop3coexist (``ServerProcess``) whose ``state_dir`` is on the volume
and whose ``local_dir`` is its own. Used by tests/integration/test_cluster.py, bench/cluster.py
and ``make cluster``
(cluster/run.py). Needs root, ``ip``, ``unshare``, ``nsenter``, ``glusterd``, ``gluster``,
``mount.glusterfs`` and /dev/fuse (``missing()`` names what is not there).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.server import ServerProcess

# The volume options that matter for mail (README "Several servers"): a silently vanished brick
# host stalls writes for network.ping-timeout (42 s by default) unless the TCP user timeout and
# keepalives end the connection sooner; client quorum keeps a cut-off minority from writing;
# strict locks: a client whose locks the bricks dropped (a partition) gets errors on those
# descriptors instead of carrying on as if it still held them.
VOLUME_OPTIONS: tuple[tuple[str, str], ...] = (
    ("network.ping-timeout", "5"),
    ("client.tcp-user-timeout", "5"),
    ("server.tcp-user-timeout", "5"),
    ("client.keepalive-time", "2"),
    ("client.keepalive-interval", "1"),
    ("client.keepalive-count", "3"),
    ("server.keepalive-time", "2"),
    ("server.keepalive-interval", "1"),
    ("server.keepalive-count", "3"),
    ("cluster.quorum-type", "auto"),
    ("storage.max-hardlinks", "100"),
    ("client.strict-locks", "on"),
)

PROGRAMS = ("ip", "unshare", "nsenter", "glusterd", "gluster", "mount.glusterfs", "umount")


def missing() -> str | None:
    """What this machine lacks to build a cluster (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, FUSE mounts)"
    for program in PROGRAMS:
        if shutil.which(program) is None and not os.access(f"/sbin/{program}", os.X_OK):
            return f"outside program {program!r} is not installed (glusterfs-server, glusterfs-client)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (FUSE)"
    return None


def _run(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _free_subnet() -> int:
    """A third octet X such that 169.254.X.0/24 is on no interface of this machine."""
    used = _run("ip", "-o", "-4", "addr", "show").stdout
    for _ in range(200):
        x = 16 + secrets.randbelow(230)
        if f"169.254.{x}." not in used:
            return x
    raise RuntimeError("no free 169.254.X.0/24 for the test cluster")


@dataclass
class GlusterHost:
    """One brick host: its namespace, address, glusterd and brick folder."""

    index: int
    netns: str
    veth: str
    address: str
    root: Path
    glusterd: subprocess.Popen | None = None

    @property
    def brick(self) -> Path:
        return self.root / "brick" / "b"


@dataclass
class GlusterCluster:
    """See the module docstring. ``work``: a folder for every file of the cluster."""

    work: Path
    hosts_count: int = 3
    volume: str = "mail"
    options: tuple[tuple[str, str], ...] = VOLUME_OPTIONS
    hosts: list[GlusterHost] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    bridge: str = ""
    subnet: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ start

    def start(self, timeout: float = 90.0) -> GlusterCluster:
        """Network, glusterd on every host, the pool, the volume (started). RuntimeError, with
        everything made so far removed, when a step fails or ``timeout`` passes."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._network()
            for host in self.hosts:
                self._start_glusterd(host)
            first = self.hosts[0]
            self._until(deadline, "glusterd answers on every host",
                        lambda: all(self._cli_ok(h, "pool", "list") for h in self.hosts))
            self.timings["glusterd"] = time.monotonic() - started
            for host in self.hosts[1:]:
                self.gluster(first, "peer", "probe", host.address)
            self._until(deadline, "every peer connected", lambda: self._peers_connected())
            bricks = [f"{h.address}:{h.brick}" for h in self.hosts]
            for host in self.hosts:
                host.brick.parent.mkdir(parents=True, exist_ok=True)
            replica = ("replica", str(self.hosts_count)) if self.hosts_count > 1 else ()
            self.gluster(first, "volume", "create", self.volume, *replica, *bricks, "force")
            for name, value in self.options:
                self.gluster(first, "volume", "set", self.volume, name, value)
            self.gluster(first, "volume", "start", self.volume)
            self._until(deadline, "every brick online", self._bricks_online)
            self.timings["volume"] = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        tag = secrets.token_hex(2)
        self.subnet = _free_subnet()
        self.bridge = f"p3c{tag}br"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        _run("ip", "addr", "add", f"169.254.{self.subnet}.254/24", "dev", self.bridge)
        for i in range(1, self.hosts_count + 1):
            host = GlusterHost(i, f"p3c{tag}h{i}", f"p3c{tag}v{i}", f"169.254.{self.subnet}.{i}",
                               self.work / f"host{i}")
            self.hosts.append(host)
            _run("ip", "netns", "add", host.netns)
            _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                 "netns", host.netns)
            _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")

    def _start_glusterd(self, host: GlusterHost) -> None:
        for sub in ("lib", "run", "log"):
            (host.root / sub).mkdir(parents=True, exist_ok=True)
        binds = [f"mount --bind {host.root / 'lib'} /var/lib/glusterd",
                 f"mount --bind {host.root / 'run'} /run",
                 f"mount --bind {host.root / 'log'} /var/log/glusterfs"]
        stub = self.work / "gsyncd-stub"
        if not stub.exists():
            stub.write_text("#!/bin/sh\necho gsyncd 10\n")
            stub.chmod(0o755)
        for gsyncd in glob.glob("/usr/lib/*/glusterfs/gsyncd") + glob.glob("/usr/libexec/glusterfs/gsyncd"):
            binds.append(f"mount --bind {stub} {gsyncd}")
        script = " && ".join([*binds, "exec glusterd -N"])
        log = open(host.root / "glusterd.out", "wb")  # noqa: SIM115 - the child keeps it
        host.glusterd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private",
             "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def gluster(self, host: GlusterHost, *args: str, timeout: float = 60.0) -> str:
        """Run the gluster command line in ``host``'s namespaces (its glusterd's socket is in
        its private /run); its output, or RuntimeError."""
        assert host.glusterd is not None
        return _run("nsenter", "-t", str(host.glusterd.pid), "-m", "-n",
                    "gluster", "--mode=script", *args, timeout=timeout).stdout

    def _cli_ok(self, host: GlusterHost, *args: str) -> bool:
        if host.glusterd is None or host.glusterd.poll() is not None:
            raise RuntimeError(f"glusterd on host {host.index} ended: "
                               f"{(host.root / 'glusterd.out').read_text(errors='replace')[-500:]}")
        try:
            self.gluster(host, *args, timeout=10)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def _peers_connected(self) -> bool:
        """Every host sees every other one "Peer in Cluster (Connected)" (``pool list`` says
        Connected before the probe's handshake has ended)."""
        want = self.hosts_count - 1
        return all(self.gluster(h, "peer", "status").count("Peer in Cluster (Connected)") == want
                   for h in self.hosts)

    def _bricks_online(self) -> bool:
        out = self.gluster(self.hosts[0], "volume", "status", self.volume, "detail")
        return out.count("Online               : Y") >= self.hosts_count

    @staticmethod
    def _until(deadline: float, what: str, predicate) -> None:  # noqa: ANN001
        while True:
            if predicate():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"GlusterFS test cluster: no {what} in time")
            time.sleep(0.1)

    # ------------------------------------------------------------------ mounts

    def mount(self, index: int, mountpoint: Path) -> Path:
        """Mount the volume at ``mountpoint`` with a FUSE client in host ``index``'s network
        (1-based): that client talks to the bricks from host ``index``'s address."""
        host = self.hosts[index - 1]
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run("nsenter", f"--net=/run/netns/{host.netns}", "mount", "-t", "glusterfs",
             "-o", f"log-file={host.root / 'client.log'},log-level=WARNING",
             f"{host.address}:/{self.volume}", str(mountpoint))
        self.mounts.append(mountpoint)
        return mountpoint

    # ------------------------------------------------------------------ faults

    def cut(self, index: int) -> None:
        """Host ``index`` vanishes from the network without a word (its link goes down)."""
        _run("ip", "link", "set", self.hosts[index - 1].veth, "down")

    def restore(self, index: int) -> None:
        """Host ``index`` is back on the network."""
        _run("ip", "link", "set", self.hosts[index - 1].veth, "up")

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Unmount, end every process in the hosts' namespaces, remove namespaces and bridge.
        Safe to call twice and after a failed start."""
        for mountpoint in reversed(self.mounts):
            _run("umount", "-l", str(mountpoint), check=False)
        self.mounts.clear()
        for host in self.hosts:
            pids = _run("ip", "netns", "pids", host.netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            if host.glusterd is not None:
                with contextlib.suppress(ProcessLookupError):
                    host.glusterd.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.glusterd.wait(10)
                host.glusterd = None
            _run("ip", "netns", "del", host.netns, check=False)
        self.hosts.clear()
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
            self.bridge = ""

    def __enter__(self) -> GlusterCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClusterNode(ServerProcess):
    """A pop3coexist node of several: ``state_dir`` is ``shared`` (a folder on the volume,
    through this node's mount), ``local_dir`` is ``<root>/local`` on local disk, and
    ``node_id`` its name. Other arguments as ``ServerProcess``."""

    def __init__(self, root: Path, shared: Path, node_id: str, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.shared = shared
        self.node_id = node_id

    @property
    def run_root(self) -> Path:
        return self.root / "local"

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        text = text.replace('state_dir = "../var"',
                            f'state_dir = "{self.shared}"\nlocal_dir = "../local"\n'
                            f'node_id = "{self.node_id}"', 1)
        self.config_path.write_text(text)

    def health(self) -> tuple[int, dict]:
        """GET /healthz of the node's ``[metrics]`` listener: (status, JSON body)."""
        url = f"http://127.0.0.1:{self.port('metrics')}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
