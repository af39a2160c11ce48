"""The benchmark (issue 7): pop3coexist side by side with Postfix and Dovecot, in one run.

    python bench/run.py [--runs 3] [--relay-runs 2] [--messages 10000] [--json FILE] [--only NAMES]
                        [--workers auto|N]

Everything runs on this machine, on loopback ports the OS picked, in a temporary folder that
is removed at the end; the peers are private instances (bench/peers.py), never system services.
Sections (``--only`` takes a comma list of these names):

- ``fsync``: the disk's own rate of "write 4 KB to a new file + fsync" (the physical bound a
  one-fsync-per-message server cannot pass) and of whole-file-system syncs (what group commit
  pays once per batch).
- ``smtp``: ``smtp-source -s 20 -m N -l 4096`` against pop3coexist (local Maildir delivery) and
  against Postfix (virtual transport to Maildir, default durability); messages/s for the
  acceptance (smtp-source's wall time) and for "all N messages in the Maildir". Runs alternate
  between the two servers.
- ``relay``: N messages for a foreign domain from a trusted client into pop3coexist, out
  through its smart host into ``smtp-sink``, and the same into Postfix with ``relayhost`` set
  to the same ``smtp-sink`` (durable on both sides: each fsyncs its queue file before the 250);
  runs alternate; messages/s accepted and fully relayed (queue empty).
- ``pop3``: 10 mailboxes x 1,000 messages of 4 KB; 10 concurrent clients (one process each, a
  lean socket client) log in, then RETR + DELE every message and QUIT; against pop3coexist and
  Dovecot over identical copies of the same Maildir; messages/s from the first RETR to the last
  QUIT's reply.
- ``stages``: ``smtp-source`` as in ``smtp`` against two servers of this build, runs
  alternating: without the optional stages, and with them configured but idle for this mail
  (``[sender_authentication]`` on, but the client is inside; a milter on the submission
  listener only; rules with no scripts); msg/s both ways and the ratio.
- ``milter``: the cost of content filtering: ``smtp-source`` as in ``smtp`` against
  pop3coexist without and with one milter on the MX listener (``--milter accept``: a trivial
  accept-everything milter, bench/milter_accept.py, which is sent every step; ``--milter
  clamav``: clamd + clamav-milter with a one-signature database, as the tests start them);
  msg/s both ways and the milliseconds each message costs (1/with - 1/without), runs
  alternating.
- ``cluster`` (only when named in ``--only``): bench/cluster.py, SMTP acceptance and POP3
  retrieval with one server on local disk and 1, 2, 3 nodes over a replica-3 GlusterFS volume.
- ``imap``: IMAP ``FETCH n BODY.PEEK[]`` of every message, 10 clients over the ``pop3``
  section's mailboxes, against pop3coexist and Dovecot's imapd; and RSS with 1,000 sessions in
  IDLE (bench/imap_fetch.py).
- ``imapidle`` (opt-in, ``--only imapidle``): the ``imap`` section's 1,000 IDLE sessions
  alone (no FETCH, no Dovecot): RSS summed over every process, and each process's.
- ``memory``: server RSS with 1,000 idle POP3 and 1,000 idle SMTP sessions; peak RSS growth
  while one 100 MB message goes in by SMTP and out by POP3; both summed over every process of
  the server.

pop3coexist runs with ``server.workers = "auto"`` (one process per CPU, as the embedded
default config has it) unless ``--workers`` says otherwise. Each figure is the median of the runs, with min and max. Prints a table, writes JSON
(default bench/results/latest.json). Needs root for the peers (as CI images and throw-away VMs
have); without them the pop3coexist figures are still measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import DovecotInstance, PostfixInstance, ensure_packages, free_port  # noqa: E402
from tests.support.server import HOSTNAME, ServerProcess  # noqa: E402

PASSWORD = "bench-Passw0rd"
# in this order: the sections that create many files (smtp, relay) before the one whose
# measured work deletes many (pop3's QUIT), see empty_folder
SECTIONS = ("fsync", "smtp", "relay", "pop3", "stages", "milter", "memory", "imap")
OPT_IN = ("cluster", "imapidle")  # only with --only: bench/cluster.py (GlusterFS in network
# namespaces); the IMAP section's 1,000 IDLE sessions alone (bench/imap_fetch.py)
MSG_SIZE = 4096


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 1) for v in values]}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status value in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in kB: Rss, Pss, Private_Clean, Private_Dirty, ... (Linux 4.14)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[name] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of ``pid`` to its current RSS (Linux >= 4.0, needs rights)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    fs, best = "unknown", ""
    try:
        tmpdir = os.path.realpath(tempfile.gettempdir())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind, options = line.split()[:4]
            if (tmpdir == mnt or tmpdir.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                fs, best = kind, mnt
                if kind == "ext4":  # both change what a create and an unlink cost (empty_folder)
                    name = os.path.basename(dev)
                    jbd2 = Path("/proc/fs/jbd2")
                    if Path("/proc/fs/ext4", name).exists() and not (
                            jbd2.is_dir() and any(e.name.startswith(f"{name}-")
                                                  for e in jbd2.iterdir())):
                        fs += " without a journal"
                    if "discard" in options.split(","):
                        fs += ", mounted with discard"
    except (OSError, ValueError):
        pass

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout.strip() or out.stderr.strip()).splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "kernel": platform.release(),
        "tmp_filesystem": fs, "python": platform.python_version(),
        "postfix": version(["postconf", "-d", "-h", "mail_version"]),
        "dovecot": version(["dovecot", "--version"]),
    }


# ---------------------------------------------------------------- the disk's bound


def bench_fsync(tmp: Path, seconds: float = 2.0) -> dict:
    d = tmp / "fsync"
    d.mkdir()
    data = b"x" * MSG_SIZE
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fd = os.open(d / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        n += 1
    fsync_rate = n / (time.perf_counter() - start)
    libc = ctypes.CDLL(None, use_errno=True)
    n = 0
    dfd = os.open(d, os.O_RDONLY)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fd = os.open(d / f"s{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        libc.syncfs(dfd)
        n += 1
    os.close(dfd)
    syncfs_rate = n / (time.perf_counter() - start)
    # the files stay until the benchmark's temporary folder is removed at the end: deleting
    # thousands here would make the next section's file creations walk them (empty_folder)
    return {"fsync_per_s": fsync_rate, "syncfs_per_s": syncfs_rate}


# ---------------------------------------------------------------- pop3coexist


WORKERS = "auto"  # server.workers of every pop3coexist run (--workers)


def make_server(root: Path, extra_config: str = "", imap_config: str = "") -> ServerProcess:
    limits = ("max_connections = 5000\nmax_connections_per_client = 5000\n")
    workers = WORKERS if WORKERS.isdigit() else f'"{WORKERS}"'
    srv = ServerProcess(
        root, tls=False, extra_config=extra_config, server_config=f"workers = {workers}",
        pop3_config=limits,
        smtp_config=limits + 'max_message_size = "200MB"\nmax_messages_per_connection = 1000\n',
        imap_config=imap_config,
    )
    srv.write_config()
    return srv


def smtp_source(port: int, messages: int, rcpt: str) -> float:
    """Run smtp-source; return its wall time in seconds."""
    start = time.perf_counter()
    r = subprocess.run(
        ["smtp-source", "-s", "20", "-m", str(messages), "-l", str(MSG_SIZE),
         "-f", "sender@example.test", "-t", rcpt, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=900,
    )
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {r.stderr.strip()[-500:]}")
    return elapsed


def count_files(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except FileNotFoundError:
        return 0


def wait_count(folder: Path, want: int, start: float, timeout: float = 300) -> float:
    while count_files(folder) < want:
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"only {count_files(folder)} of {want} messages in {folder}")
        time.sleep(0.02)
    return time.perf_counter() - start


def empty_folder(folder: Path) -> None:
    """Leave ``folder`` empty for the next run without deleting a file: the folder is renamed
    to a sibling with the same owner and mode (``new.1``, ``new.2``, ...: removed with the benchmark's temporary folder at
    the end) and made again.

    Deleting the last run's messages here charged the next run for the harness's work: on
    ext4 without a journal (as on the machine the README describes), every new inode's
    allocation scans the free inodes of its group deleted in the last 60 s (360 s while their
    inode table block is dirty; ``recently_deleted`` in ext4's ialloc.c) one by one, so 10,000
    deletions just before a run made each of its file creations walk thousands of them
    (perf: about a quarter of the server's CPU in that scan). Moving the files aside frees no
    inode, for pop3coexist and for the peer alike.
    """
    st = folder.stat()
    mode = st.st_mode & 0o7777
    n = 1
    while folder.with_name(f"{folder.name}.{n}").exists():
        n += 1
    folder.rename(folder.with_name(f"{folder.name}.{n}"))
    folder.mkdir(mode=mode)
    os.chmod(folder, mode)
    os.chown(folder, st.st_uid, st.st_gid)


def bench_smtp(tmp: Path, runs: int, messages: int, peers: dict) -> dict:
    srv = make_server(tmp / "p3c-smtp")
    srv.add_mailbox(f"bench@{HOSTNAME}", PASSWORD)
    ours_new = srv.state_dir / "mailroot" / HOSTNAME / "bench" / "new"
    ours_acc, ours_all, pf_acc, pf_all = [], [], [], []
    pf = None
    if peers.get("postfix"):
        pf_root = tmp / "postfix"
        pf_root.mkdir()
        os.chmod(tmp, 0o755)
        pf = PostfixInstance(pf_root, HOSTNAME, ["bench"])
    with srv:
        try:
            if pf is not None:
                pf.start()
            # one short warm-up each (imports, caches, process pools)
            smtp_source(srv.port("smtp"), 200, f"bench@{HOSTNAME}")
            if pf is not None:
                smtp_source(pf.port, 200, f"bench@{HOSTNAME}")
                wait_count(pf.maildir("bench") / "new", 200, time.perf_counter())
            for i in range(runs):
                empty_folder(ours_new)
                start = time.perf_counter()
                acc = smtp_source(srv.port("smtp"), messages, f"bench@{HOSTNAME}")
                total = wait_count(ours_new, messages, start)
                ours_acc.append(messages / acc)
                ours_all.append(messages / total)
                log(f"smtp run {i + 1}: pop3coexist {messages / acc:.0f} msg/s")
                if pf is not None:
                    new = pf.maildir("bench") / "new"
                    empty_folder(new)
                    start = time.perf_counter()
                    acc = smtp_source(pf.port, messages, f"bench@{HOSTNAME}")
                    total = wait_count(new, messages, start)
                    pf_acc.append(messages / acc)
                    pf_all.append(messages / total)
                    log(f"smtp run {i + 1}: postfix {messages / acc:.0f} msg/s accepted, "
                        f"{messages / total:.0f} msg/s in Maildir")
        finally:
            if pf is not None:
                pf.stop()
    out: dict = {"messages": messages, "pop3coexist_accept": stats(ours_acc),
                 "pop3coexist_maildir": stats(ours_all)}
    if pf_acc:
        out["postfix_accept"] = stats(pf_acc)
        out["postfix_maildir"] = stats(pf_all)
        out["ratio_accept"] = statistics.median(ours_acc) / statistics.median(pf_acc)
        out["ratio_maildir"] = statistics.median(ours_all) / statistics.median(pf_all)
    return out


# ---------------------------------------------------------------- milter


def start_milter(tmp: Path, kind: str) -> tuple[str, list]:
    """Start the benchmark's milter (``accept`` or ``clamav``); its socket and what to stop."""
    if kind == "clamav":
        if not (shutil.which("clamd") or Path("/usr/sbin/clamd").exists()):
            raise RuntimeError("clamd (Debian packages clamav-daemon, clamav-milter) is needed")
        from tests.support.scanners import ClamAV

        clam = ClamAV(tmp / "clamav").start()
        return clam.milter("Reject", max_file_size="25M"), [clam.stop]
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "milter_accept.py"), str(port)])
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the benchmark milter did not start")
        time.sleep(0.05)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return f"inet:127.0.0.1:{port}", [stop]


def bench_milter(tmp: Path, runs: int, messages: int, kind: str) -> dict:
    socket_, stops = start_milter(tmp, kind)
    try:
        plain = make_server(tmp / "p3c-nomilter")
        milter = make_server(tmp / "p3c-milter", extra_config=(
            f'[[milter]]\nname = "{kind}"\nsocket = "{socket_}"\nlisteners = ["smtp"]\n'))
        rates: dict[str, list[float]] = {"without": [], "with": []}
        servers = {"without": plain, "with": milter}
        for srv in servers.values():
            srv.add_mailbox(f"bench@{HOSTNAME}", PASSWORD)
            srv.start()
        try:
            for srv in servers.values():  # warm-up
                smtp_source(srv.port("smtp"), 200, f"bench@{HOSTNAME}")
            for i in range(runs):
                for name, srv in servers.items():
                    new = srv.state_dir / "mailroot" / HOSTNAME / "bench" / "new"
                    empty_folder(new)
                    acc = smtp_source(srv.port("smtp"), messages, f"bench@{HOSTNAME}")
                    rates[name].append(messages / acc)
                    log(f"milter run {i + 1}: {name} {kind} milter {messages / acc:.0f} msg/s")
        finally:
            for srv in servers.values():
                srv.stop()
    finally:
        for stop in stops:
            stop()
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    return {"milter": kind, "messages": messages, "without": stats(rates["without"]),
            "with": stats(rates["with"]), "cost_ms": 1000 * (1 / with_ - 1 / without)}


# ---------------------------------------------------------------- stages configured, idle


def bench_stages(tmp: Path, runs: int, messages: int) -> dict:
    """``smtp-source`` against two servers of this build, runs alternating: one without the
    optional stages, one with them configured but with nothing to do for this mail: sender
    authentication on (the client is inside, so no check runs), a milter on the submission
    listener only (the MX listener has none), rules (Sieve) with no scripts."""
    socket_, stops = start_milter(tmp, "accept")
    try:
        plain = make_server(tmp / "p3c-nostages")
        staged = make_server(tmp / "p3c-stages", extra_config=(
            "[sender_authentication]\n"
            f'[[milter]]\nname = "idle"\nsocket = "{socket_}"\nlisteners = ["submission"]\n'))
        rates: dict[str, list[float]] = {"without": [], "with": []}
        servers = {"without": plain, "with": staged}
        for srv in servers.values():
            srv.add_mailbox(f"bench@{HOSTNAME}", PASSWORD)
            srv.start()
        try:
            for srv in servers.values():  # warm-up
                smtp_source(srv.port("smtp"), 200, f"bench@{HOSTNAME}")
            for i in range(runs):
                for name, srv in servers.items():
                    new = srv.state_dir / "mailroot" / HOSTNAME / "bench" / "new"
                    empty_folder(new)
                    acc = smtp_source(srv.port("smtp"), messages, f"bench@{HOSTNAME}")
                    rates[name].append(messages / acc)
                    log(f"stages run {i + 1}: {name} stages {messages / acc:.0f} msg/s")
        finally:
            for srv in servers.values():
                srv.stop()
    finally:
        for stop in stops:
            stop()
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    return {"messages": messages, "without": stats(rates["without"]),
            "with": stats(rates["with"]), "ratio": with_ / without}


# ---------------------------------------------------------------- POP3


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    """Receive until ``marker`` is in ``buf``; return the index just after it."""
    while True:
        i = buf.find(marker)
        if i >= 0:
            return i + len(marker)
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _line(sock: socket.socket, buf: bytearray) -> bytes:
    end = _read_until(sock, buf, b"\r\n")
    line = bytes(buf[:end])
    del buf[:end]
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"POP3 error: {line[:200]!r}")
    return line


def pop3_client(port: int, user: str, password: str, barrier, result) -> None:
    """One POP3 client process: log in, wait for the others, RETR + DELE all, QUIT."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    _line(sock, buf)
    sock.sendall(f"USER {user}\r\n".encode())
    _line(sock, buf)
    sock.sendall(f"PASS {password}\r\n".encode())
    _line(sock, buf)
    sock.sendall(b"STAT\r\n")
    count = int(_line(sock, buf).split()[1])
    barrier.wait()
    start = time.perf_counter()
    for i in range(1, count + 1):
        sock.sendall(b"RETR %d\r\n" % i)
        _line(sock, buf)
        end = _read_until(sock, buf, b"\r\n.\r\n")
        del buf[:end]
        sock.sendall(b"DELE %d\r\n" % i)
        _line(sock, buf)
    sock.sendall(b"QUIT\r\n")
    _line(sock, buf)
    sock.close()
    result.put((count, start, time.perf_counter()))


def pop3_round(port: int, users: list[str]) -> tuple[int, float]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(users))
    result = ctx.Queue()
    procs = [ctx.Process(target=pop3_client, args=(port, u, PASSWORD, barrier, result)) for u in users]
    for p in procs:
        p.start()
    got = [result.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a POP3 client failed")
    total = sum(g[0] for g in got)
    return total, max(g[2] for g in got) - min(g[1] for g in got)


def fill_template(folder: Path, mailboxes: list[str], per_box: int) -> None:
    line = b"x" * 70 + b"\n"
    for box in mailboxes:
        new = folder / box / "new"
        for sub in ("new", "cur", "tmp"):
            (folder / box / sub).mkdir(parents=True, exist_ok=True)
        for i in range(per_box):
            header = (f"From: sender@example.test\nTo: {box}@{HOSTNAME}\nSubject: bench {i}\n"
                      f"Message-ID: <{box}.{i}@bench>\n\n").encode()
            body = (line * (MSG_SIZE // len(line) + 1))[: MSG_SIZE - len(header) - 1] + b"\n"
            data = header + body
            wsize = len(data) + data.count(b"\n")
            (new / f"{1700000000 + i}.M{i}P1.bench,S={len(data)},W={wsize}").write_bytes(data)


def copy_boxes(template: Path, dest: Path, mailboxes: list[str]) -> None:
    for box in mailboxes:
        target = dest / box
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(template / box, target)


def bench_pop3(tmp: Path, runs: int, peers: dict, boxes: int = 10, per_box: int = 1000) -> dict:
    mailboxes = [f"pop{i}" for i in range(boxes)]
    template = tmp / "pop3-template"
    fill_template(template, mailboxes, per_box)
    srv = make_server(tmp / "p3c-pop3")
    for box in mailboxes:
        srv.add_mailbox(f"{box}@{HOSTNAME}", PASSWORD)
    ours_root = srv.state_dir / "mailroot" / HOSTNAME
    users = [f"{b}@{HOSTNAME}" for b in mailboxes]
    ours, dove = [], []
    dv = None
    if peers.get("dovecot"):
        dv_root = tmp / "dovecot"
        dv_root.mkdir()
        os.chmod(tmp, 0o755)
        dv_mail = dv_root / "mail"
        copy_boxes(template, dv_mail / HOSTNAME, mailboxes)
        dv = DovecotInstance(dv_root, dv_mail, HOSTNAME, mailboxes, PASSWORD)
    with srv:
        try:
            if dv is not None:
                dv.start()
            for i in range(runs):
                copy_boxes(template, ours_root, mailboxes)
                n, elapsed = pop3_round(srv.port("pop3"), users)
                if n != boxes * per_box:
                    raise RuntimeError(f"pop3coexist listed {n} messages, not {boxes * per_box}")
                ours.append(n / elapsed)
                log(f"pop3 run {i + 1}: pop3coexist {n / elapsed:.0f} msg/s")
                if dv is not None:
                    # Dovecot keeps its uid lists and indexes apart (INDEX=/CONTROL= under
                    # root/index): drop them with the boxes, or the next run's copies of the
                    # same file names are taken for messages already expunged
                    for box in mailboxes:
                        shutil.rmtree(dv.root / "index" / HOSTNAME / box, ignore_errors=True)
                    copy_boxes(template, dv.maildir_root / HOSTNAME, mailboxes)
                    subprocess.run(["chown", "-R", "nobody:nogroup", str(dv.maildir_root)], check=True)
                    n, elapsed = pop3_round(dv.port, users)
                    if n != boxes * per_box:
                        raise RuntimeError(f"dovecot listed {n} messages, not {boxes * per_box}")
                    dove.append(n / elapsed)
                    log(f"pop3 run {i + 1}: dovecot {n / elapsed:.0f} msg/s")
        finally:
            if dv is not None:
                dv.stop()
    out: dict = {"mailboxes": boxes, "messages_per_box": per_box, "pop3coexist": stats(ours)}
    if dove:
        out["dovecot"] = stats(dove)
        out["ratio"] = statistics.median(ours) / statistics.median(dove)
    return out


# ---------------------------------------------------------------- relay


def queue_left(queue_dir: Path) -> int:
    """Messages still in pop3coexist's queue: unclaimed (env/) and claimed (claimed/*/)."""
    folders = [queue_dir / "env"]
    if (queue_dir / "claimed").is_dir():
        folders += [e.path for e in os.scandir(queue_dir / "claimed") if e.is_dir()]
    n = 0
    for folder in folders:
        try:
            n += sum(1 for e in os.scandir(folder) if e.name.endswith(".json"))
        except FileNotFoundError:
            continue
    return n


def wait_empty(left, start: float, what: str, timeout: float = 600) -> float:
    while True:
        n = left()
        if n == 0:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"relay: {n} messages still queued in {what}")
        time.sleep(0.05)


def bench_relay(tmp: Path, runs: int, messages: int, peers: dict) -> dict:
    """N messages for a foreign domain in by SMTP, out to one ``smtp-sink`` through the smart
    host (pop3coexist) or ``relayhost`` (Postfix); runs alternate between the two."""
    sink_port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    extra = f'[smarthost]\nhost = "[127.0.0.1]:{sink_port}"\ntls = "none"\n'
    srv = make_server(tmp / "p3c-relay", extra_config=extra)
    queue_dir = srv.state_dir / "queue"
    pf = None
    if peers.get("postfix"):
        pf_root = tmp / "postfix-relay"
        pf_root.mkdir()
        pf = PostfixInstance(pf_root, HOSTNAME, ["bench"], relayhost=f"[127.0.0.1]:{sink_port}")
    rates: dict[str, list[float]] = {"accept": [], "relayed": [], "pf_accept": [], "pf_relayed": []}
    try:
        with srv:
            if pf is not None:
                pf.start()
            smtp_source(srv.port("smtp"), 200, "someone@relay.example")  # warm-up
            wait_empty(lambda: queue_left(queue_dir), time.perf_counter(), "pop3coexist")
            if pf is not None:
                smtp_source(pf.port, 200, "someone@relay.example")
                wait_empty(pf.queued, time.perf_counter(), "postfix")
            for i in range(runs):
                start = time.perf_counter()
                acc = smtp_source(srv.port("smtp"), messages, "someone@relay.example")
                total = wait_empty(lambda: queue_left(queue_dir), start, "pop3coexist")
                rates["accept"].append(messages / acc)
                rates["relayed"].append(messages / total)
                log(f"relay run {i + 1}: pop3coexist {messages / acc:.0f} msg/s accepted, "
                    f"{messages / total:.0f} msg/s relayed")
                if pf is not None:
                    start = time.perf_counter()
                    acc = smtp_source(pf.port, messages, "someone@relay.example")
                    total = wait_empty(pf.queued, start, "postfix")
                    rates["pf_accept"].append(messages / acc)
                    rates["pf_relayed"].append(messages / total)
                    log(f"relay run {i + 1}: postfix {messages / acc:.0f} msg/s accepted, "
                        f"{messages / total:.0f} msg/s relayed")
    finally:
        if pf is not None:
            pf.stop()
        sink.terminate()
        sink.wait(10)
    out: dict = {"messages": messages, "accept": stats(rates["accept"]),
                 "relayed": stats(rates["relayed"])}
    if rates["pf_accept"]:
        out["postfix_accept"] = stats(rates["pf_accept"])
        out["postfix_relayed"] = stats(rates["pf_relayed"])
        out["ratio_relayed"] = (statistics.median(rates["relayed"])
                                / statistics.median(rates["pf_relayed"]))
    return out


# ---------------------------------------------------------------- memory


def _greeting(sock: socket.socket) -> None:
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        buf += chunk


def bench_memory(tmp: Path, idle: int = 1000, big_mb: int = 100) -> dict:
    srv = make_server(tmp / "p3c-memory")
    srv.add_mailbox(f"big@{HOSTNAME}", PASSWORD)
    out: dict = {}
    with srv:
        assert srv.proc is not None
        # every serving process (server.workers): the figures are sums over all of them
        record = json.loads((srv.state_dir / "run" / "listeners.json").read_text())
        pids = record.get("workers", [srv.proc.pid])
        out["processes"] = len(pids)

        def total(field: str) -> float:
            return sum(proc_status(p, field) for p in pids)

        time.sleep(0.5)
        out["rss_start_mb"] = total("VmRSS") / 1024
        # what each process costs: RSS, PSS (shared pages split between their users) and USS
        # (its private pages: what one more worker adds)
        per = []
        for p in pids:
            r = smaps_rollup(p)
            per.append({"pid": p, "rss_mb": r.get("Rss", 0) / 1024, "pss_mb": r.get("Pss", 0) / 1024,
                        "uss_mb": (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024})
        out["per_process_start"] = per
        if len(per) > 1:
            out["worker_uss_mb"] = statistics.median(x["uss_mb"] for x in per[1:])
            out["worker_rss_mb"] = statistics.median(x["rss_mb"] for x in per[1:])
        out["pss_start_mb"] = sum(x["pss_mb"] for x in per)
        socks = []
        try:
            for role in ("pop3", "smtp"):
                for _ in range(idle):
                    s = socket.create_connection(("127.0.0.1", srv.port(role)), timeout=60)
                    socks.append(s)
                for s in socks[-idle:]:
                    _greeting(s)
            time.sleep(0.5)
            out["idle_sessions"] = len(socks)
            out["rss_idle_mb"] = total("VmRSS") / 1024
            out["pss_idle_mb"] = sum(smaps_rollup(p).get("Pss", 0) for p in pids) / 1024
        finally:
            for s in socks:
                s.close()
        time.sleep(1.0)
        reset = all([reset_hwm(p) for p in pids])
        before = total("VmHWM")
        out["peak_before_big_mb"] = before / 1024
        # one big message in by SMTP (streamed, CRLF lines of 76 octets) ...
        size = big_mb * 1000 * 1000
        s = socket.create_connection(("127.0.0.1", srv.port("smtp")), timeout=300)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO bench.test\r\n")
        while True:
            line = f.readline()
            if line[3:4] == b" ":
                break
        s.sendall(f"MAIL FROM:<sender@example.test> SIZE={size}\r\nRCPT TO:<big@{HOSTNAME}>\r\nDATA\r\n"
                  .encode())
        for _ in range(3):
            reply = f.readline()
            if not reply.startswith((b"250", b"354")):
                raise RuntimeError(f"big message refused: {reply!r}")
        chunk = (b"y" * 76 + b"\r\n") * 10000
        start = time.perf_counter()
        s.sendall(b"Subject: big\r\n\r\n")
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b".\r\n")
        reply = f.readline()
        out["big_smtp_seconds"] = time.perf_counter() - start
        if not reply.startswith(b"250"):
            raise RuntimeError(f"big message not accepted: {reply!r}")
        s.sendall(b"QUIT\r\n")
        s.close()
        # ... and out by POP3
        s = socket.create_connection(("127.0.0.1", srv.port("pop3")), timeout=300)
        buf = bytearray()
        _line(s, buf)
        s.sendall(f"USER big@{HOSTNAME}\r\nPASS {PASSWORD}\r\n".encode())
        _line(s, buf)
        _line(s, buf)
        start = time.perf_counter()
        s.sendall(b"RETR 1\r\n")
        _line(s, buf)
        got = len(buf)
        tail = bytes(buf[-5:])
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed during RETR")
            got += len(chunk)
            tail = (tail + chunk)[-5:]
        out["big_pop3_seconds"] = time.perf_counter() - start
        s.sendall(b"QUIT\r\n")
        s.close()
        after = total("VmHWM")
        out["big_message_mb"] = got / 1e6
        out["peak_after_big_mb"] = after / 1024
        out["peak_growth_mb"] = (after - before) / 1024
        out["peak_reset"] = reset
    return out


# ---------------------------------------------------------------- report


def fmt(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def table(result: dict) -> str:
    rows = [("figure", "pop3coexist", "peer", "ratio")]
    if "fsync" in result:
        f = result["fsync"]
        rows.append(("disk: write 4 KB + fsync, per s", f"{f['fsync_per_s']:.0f}", "", ""))
        rows.append(("disk: write 4 KB + syncfs, per s", f"{f['syncfs_per_s']:.0f}", "", ""))
    if "smtp" in result:
        s = result["smtp"]
        rows.append((f"SMTP accepted, durable, msg/s ({s['messages']}, -s 20)", fmt(s["pop3coexist_accept"]),
                     "Postfix " + fmt(s.get("postfix_accept")),
                     f"{s['ratio_accept']:.2f}x" if "ratio_accept" in s else "-"))
        rows.append(("SMTP all in Maildir, msg/s", fmt(s["pop3coexist_maildir"]),
                     "Postfix " + fmt(s.get("postfix_maildir")),
                     f"{s['ratio_maildir']:.2f}x" if "ratio_maildir" in s else "-"))
    if "pop3" in result:
        p = result["pop3"]
        rows.append(("POP3 RETR+DELE, 10 clients, msg/s", fmt(p["pop3coexist"]),
                     "Dovecot " + fmt(p.get("dovecot")), f"{p['ratio']:.2f}x" if "ratio" in p else "-"))
    if "relay" in result:
        r = result["relay"]
        rows.append((f"relay to smtp-sink accepted, msg/s ({r['messages']})", fmt(r["accept"]),
                     "Postfix " + fmt(r.get("postfix_accept")), ""))
        rows.append(("relay all delivered, msg/s", fmt(r["relayed"]),
                     "Postfix " + fmt(r.get("postfix_relayed")),
                     f"{r['ratio_relayed']:.2f}x" if "ratio_relayed" in r else "-"))
    if "stages" in result:
        f = result["stages"]
        rows.append((f"SMTP accepted, stages configured but idle, msg/s ({f['messages']})",
                     fmt(f["with"]), "without them " + fmt(f["without"]),
                     f"{f['ratio']:.2f}x"))
    if "milter" in result:
        f = result["milter"]
        rows.append((f"SMTP accepted with a {f['milter']} milter, msg/s ({f['messages']})",
                     fmt(f["with"]), "no milter " + fmt(f["without"]),
                     f"{f['cost_ms']:.2f} ms/msg"))
    if "memory" in result:
        m = result["memory"]
        procs = m.get("processes", 1)
        rows.append((f"RSS with {m['idle_sessions']} idle sessions, MB, {procs} process(es)",
                     f"{m['rss_idle_mb']:.0f}",
                     f"(at start {m['rss_start_mb']:.0f})", ""))
        if "worker_uss_mb" in m:
            rows.append(("one worker process at start, MB: RSS / private (USS)",
                         f"{m['worker_rss_mb']:.0f} / {m['worker_uss_mb']:.0f}",
                         f"(PSS all processes {m['pss_start_mb']:.0f})", ""))
        rows.append(("peak RSS growth, 100 MB in by SMTP + out by POP3, MB", f"{m['peak_growth_mb']:.0f}",
                     f"(peak {m['peak_after_big_mb']:.0f})", ""))
    for r in result.get("cluster", {}).get("rows", ()):
        rows.append((f"{r['where']}, {r['nodes']} node(s): SMTP accepted / POP3 RETR+DELE, msg/s",
                     f"{r['smtp_msg_s']:.0f} / {r['pop3_msg_s']:.0f}", "", ""))
    if "imap" in result:
        m = result["imap"]
        rows.append(("IMAP FETCH whole messages, 10 clients, msg/s", fmt(m["pop3coexist"]),
                     "Dovecot " + fmt(m.get("dovecot")), f"{m['ratio']:.2f}x" if "ratio" in m else "-"))
        rows.append((f"RSS with {m['idle_sessions']} idle IMAP IDLE sessions, MB, "
                     f"{m['processes']} process(es)", f"{m['rss_idle_mb']:.0f}",
                     f"(at start {m['rss_start_mb']:.0f})", ""))
    if "imapidle" in result:
        m = result["imapidle"]
        rows.append((f"RSS with {m['idle_sessions']} IMAP IDLE sessions opened at once, MB, "
                     f"{m['processes']} process(es) (target 150)", f"{m['rss_idle_mb']:.0f}",
                     f"(at start {m['rss_start_mb']:.0f}; per process "
                     f"{' + '.join(f'{x:.0f}' for x in m['rss_idle_per_process_mb'])})", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--relay-runs", type=int, default=2)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--milter", choices=("accept", "clamav"), default="accept",
                    help="the milter of the milter section: a trivial accept-everything one "
                         "(default) or clamd + clamav-milter")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds to wait after a sync before the first section (default 60): "
                         "files deleted just before the benchmark (a test run's clean-up) make "
                         "new files slow to create on ext4 without a journal (empty_folder)")
    ap.add_argument("--workers", default="auto",
                    help='server.workers for pop3coexist: a number or "auto" (default)')
    args = ap.parse_args()
    global WORKERS
    WORKERS = args.workers
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS) - set(OPT_IN)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    try:
        import pop3coexist  # noqa: F401
    except ImportError:
        sys.exit(f"pop3coexist is not installed for {sys.executable}: see README 'Set-up on a fresh "
                 "machine' (python3 -m venv .venv && .venv/bin/pip install .), then make bench")
    raise_nofile()
    started = time.perf_counter()
    peers = ensure_packages() if {"smtp", "pop3", "relay", "imap"} & set(only) else {}
    if not shutil.which("smtp-source") and {"smtp", "relay", "milter"} & set(only):
        sys.exit("smtp-source (Debian package postfix) is needed for the SMTP figures")
    result: dict = {"machine": machine(), "peers": peers, "workers": args.workers,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with tempfile.TemporaryDirectory(prefix="p3c-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        if args.settle > 0:
            log(f"sync, then {args.settle:.0f} s for earlier deletions to age (--settle)")
            os.sync()
            time.sleep(args.settle)
        for section in (*SECTIONS, *OPT_IN):
            if section not in only:
                continue
            log(f"{section} ...")
            t = time.perf_counter()
            if section == "fsync":
                result["fsync"] = bench_fsync(tmp)
            elif section == "smtp":
                result["smtp"] = bench_smtp(tmp, args.runs, args.messages, peers)
            elif section == "pop3":
                result["pop3"] = bench_pop3(tmp, args.runs, peers)
            elif section == "relay":
                result["relay"] = bench_relay(tmp, args.relay_runs, args.messages, peers)
            elif section == "stages":
                result["stages"] = bench_stages(tmp, args.runs, args.messages)
            elif section == "milter":
                result["milter"] = bench_milter(tmp, args.relay_runs, args.messages, args.milter)
            elif section == "memory":
                result["memory"] = bench_memory(tmp)
            elif section == "cluster":
                from bench.cluster import bench_cluster

                result["cluster"] = bench_cluster(tmp)
            elif section == "imapidle":
                from bench.imap_fetch import bench_imap_idle

                result["imapidle"] = bench_imap_idle(
                    tmp, make_server=make_server, fill_template=fill_template,
                    copy_boxes=copy_boxes, proc_status=proc_status, hostname=HOSTNAME,
                    password=PASSWORD)
            elif section == "imap":
                from bench.imap_fetch import bench_imap

                result["imap"] = bench_imap(tmp, args.runs, peers, make_server=make_server,
                                            fill_template=fill_template, copy_boxes=copy_boxes,
                                            proc_status=proc_status, log=log, hostname=HOSTNAME,
                                            password=PASSWORD)
            log(f"{section} done in {time.perf_counter() - t:.0f}s")
    result["seconds"] = time.perf_counter() - started
    text = table(result)
    print(text)
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB, Linux {m['kernel']}, "
          f"{m['tmp_filesystem']}; Python {m['python']}; Postfix {m['postfix']}; Dovecot {m['dovecot']}; "
          f"{result['seconds']:.0f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["table"] = text
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    main()
