"""The IMAP section of the benchmark (bench/run.py ``--only imap``), issue 18.

- FETCH of whole messages: 10 mailboxes x 1,000 messages of 4 KB (the POP3 section's
  template); 10 concurrent clients (one process each, a lean socket client) log in, SELECT
  INBOX, then ``FETCH n BODY.PEEK[]`` every message one command at a time (as RETR does) and
  LOGOUT; against pop3coexist and Dovecot's imapd over identical copies of the same Maildir;
  messages/s from the first FETCH to the last LOGOUT's reply.
- Memory: 1,000 sessions logged in, INBOX selected and IDLE (10 mailboxes, 100 each); the
  server's RSS summed over all its processes, before and with them (issue 17's target: 2,000
  idle sessions under 150 MB).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while True:
        i = buf.find(marker)
        if i >= 0:
            return i + len(marker)
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _tagged(sock: socket.socket, buf: bytearray, tag: bytes) -> list[bytes]:
    """Read responses to the tagged reply of ``tag`` (skipping the literals they carry);
    return the untagged lines read. The tagged reply must be OK."""
    lines = []
    while True:
        end = _read_until(sock, buf, b"\r\n")
        line = bytes(buf[:end - 2])
        del buf[:end]
        if line.endswith(b"}") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1:-1])
            while len(buf) < size:
                chunk = sock.recv(262144)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buf += chunk
            del buf[:size]
            continue
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(f"IMAP error: {line[:200]!r}")
            return lines
        lines.append(line)


def imap_client(port: int, user: str, password: str, barrier: Any, result: Any) -> None:
    """One IMAP client process: log in, SELECT, wait for the others, FETCH every message
    whole (BODY.PEEK[]), LOGOUT."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    del buf[:_read_until(sock, buf, b"\r\n")]
    sock.sendall(f'a LOGIN {user} "{password}"\r\nb SELECT INBOX\r\n'.encode())
    _tagged(sock, buf, b"a")
    selected = _tagged(sock, buf, b"b")
    count = int(next(x for x in selected if x.endswith(b" EXISTS")).split()[1])
    barrier.wait()
    start = time.perf_counter()
    for i in range(1, count + 1):
        tag = b"f%d" % i
        sock.sendall(tag + b" FETCH %d BODY.PEEK[]\r\n" % i)
        _tagged(sock, buf, tag)
    sock.sendall(b"z LOGOUT\r\n")
    _tagged(sock, buf, b"z")
    sock.close()
    result.put((count, start, time.perf_counter()))


def imap_round(port: int, users: list[str], password: str) -> tuple[int, float]:
    """All clients at once; (messages fetched, seconds from the first FETCH to the last)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(users))
    result = ctx.Queue()
    procs = [ctx.Process(target=imap_client, args=(port, u, password, barrier, result)) for u in users]
    for p in procs:
        p.start()
    got = [result.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("an IMAP client failed")
    return sum(g[0] for g in got), max(g[2] for g in got) - min(g[1] for g in got)


def idle_sessions(port: int, users: list[str], password: str, count: int) -> list[socket.socket]:
    """``count`` sessions spread over ``users``, each logged in, INBOX selected and in IDLE
    (the three commands pipelined; each waits for its ``+`` continuation)."""
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=900)  # log-ins take turns
        s.sendall(f'a LOGIN {users[i % len(users)]} "{password}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        socks.append(s)
    for s in socks:
        buf = bytearray()
        _read_until(s, buf, b"\r\n+ ")
    return socks


def idle_memory(srv: Any, users: list[str], password: str, idle: int, proc_status: Any) -> dict:
    """``idle`` sessions opened at once (as clients reconnecting after a restart do), each
    logged in, INBOX selected and IDLE; the RSS summed over every serving process before and
    with them, and each process's RSS at the end (MB)."""
    record = json.loads((srv.state_dir / "run" / "listeners.json").read_text())
    pids = record.get("workers", [srv.proc.pid])
    out: dict = {"processes": len(pids)}
    out["rss_start_mb"] = sum(proc_status(p, "VmRSS") for p in pids) / 1024
    started = time.perf_counter()
    socks = idle_sessions(srv.port("imap"), users, password, idle)
    try:
        out["idle_setup_seconds"] = time.perf_counter() - started
        time.sleep(1.0)
        out["idle_sessions"] = len(socks)
        per = [proc_status(p, "VmRSS") / 1024 for p in pids]
        out["rss_idle_mb"] = sum(per)
        out["rss_idle_per_process_mb"] = [round(x, 1) for x in per]
    finally:
        for s in socks:
            s.close()
    return out


def bench_imap_idle(tmp: Path, *, make_server: Any, fill_template: Any, copy_boxes: Any,
                    proc_status: Any, hostname: str, password: str, boxes: int = 10,
                    per_box: int = 1000, idle: int = 1000) -> dict:
    """Only the memory half of the section (``--only imapidle``): fresh copies of the
    mailboxes, then ``idle_memory``."""
    mailboxes = [f"imap{i}" for i in range(boxes)]
    template = tmp / "imapidle-template"
    fill_template(template, mailboxes, per_box)
    srv = make_server(tmp / "p3c-imapidle",
                      imap_config="max_connections = 5000\nmax_connections_per_client = 5000\n")
    for box in mailboxes:
        srv.add_mailbox(f"{box}@{hostname}", password)
    with srv:
        copy_boxes(template, srv.state_dir / "mailroot" / hostname, mailboxes)
        return idle_memory(srv, [f"{b}@{hostname}" for b in mailboxes], password, idle,
                           proc_status)


def bench_imap(tmp: Path, runs: int, peers: dict, *, make_server: Any, fill_template: Any,
               copy_boxes: Any, proc_status: Any, log: Any, hostname: str, password: str,
               boxes: int = 10, per_box: int = 1000, idle: int = 1000) -> dict:
    """The section; see the module docstring. The helpers come from bench/run.py."""
    from bench.peers import DovecotInstance

    mailboxes = [f"imap{i}" for i in range(boxes)]
    template = tmp / "imap-template"
    fill_template(template, mailboxes, per_box)
    limits = "max_connections = 5000\nmax_connections_per_client = 5000\n"
    srv = make_server(tmp / "p3c-imap", imap_config=limits)
    for box in mailboxes:
        srv.add_mailbox(f"{box}@{hostname}", password)
    ours_root = srv.state_dir / "mailroot" / hostname
    users = [f"{b}@{hostname}" for b in mailboxes]
    ours, dove = [], []
    dv = None
    if peers.get("dovecot-imap"):
        dv_root = tmp / "dovecot-imap"
        dv_root.mkdir()
        os.chmod(tmp, 0o755)
        dv_mail = dv_root / "mail"
        copy_boxes(template, dv_mail / hostname, mailboxes)
        dv = DovecotInstance(dv_root, dv_mail, hostname, mailboxes, password, imap=True)
    out: dict = {"mailboxes": boxes, "messages_per_box": per_box}
    with srv:
        try:
            if dv is not None:
                dv.start()
            for i in range(runs):
                copy_boxes(template, ours_root, mailboxes)
                n, elapsed = imap_round(srv.port("imap"), users, password)
                if n != boxes * per_box:
                    raise RuntimeError(f"pop3coexist showed {n} messages, not {boxes * per_box}")
                ours.append(n / elapsed)
                log(f"imap run {i + 1}: pop3coexist {n / elapsed:.0f} msg/s")
                if dv is not None:
                    copy_boxes(template, dv.maildir_root / hostname, mailboxes)
                    subprocess.run(["chown", "-R", "nobody:nogroup", str(dv.maildir_root)], check=True)
                    n, elapsed = imap_round(dv.ports["imap"], users, password)
                    if n != boxes * per_box:
                        raise RuntimeError(f"dovecot showed {n} messages, not {boxes * per_box}")
                    dove.append(n / elapsed)
                    log(f"imap run {i + 1}: dovecot {n / elapsed:.0f} msg/s")
        finally:
            if dv is not None:
                dv.stop()
        out.update(idle_memory(srv, users, password, idle, proc_status))
    out["pop3coexist"] = {"median": statistics.median(ours), "min": min(ours), "max": max(ours),
                          "runs": [round(v, 1) for v in ours]}
    if dove:
        out["dovecot"] = {"median": statistics.median(dove), "min": min(dove), "max": max(dove),
                          "runs": [round(v, 1) for v in dove]}
        out["ratio"] = statistics.median(ours) / statistics.median(dove)
    return out
