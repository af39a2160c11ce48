"""Server CPU per message, A/B: two builds of pop3coexist side by side, runs alternating.

    python bench/cpu_ab.py --a /path/to/venv-A/bin/twistd [--b twistd-B] [--mode local|relay|pop3]
                           [--runs 3] [--messages 3000] [--workers 2] [--together]
                           [--py-spy OUT [--gil]]

The measure is CPU time, not throughput (a shared machine makes wall-clock rates noise):
utime + stime from /proc/<pid>/stat summed over every serving process of the server (the main
process and its workers, all their threads), read before and after one ``smtp-source -s 20
-m N -l 4096`` run, until every message is in the Maildir (``local``) or the queue is empty
after relaying to an ``smtp-sink`` (``relay``); or read around one POP3 round of bench/run.py
(``pop3``: 10 mailboxes x ``--messages / 10`` messages of 4 KB, fresh copies each run, 10
clients doing RETR + DELE of every message and QUIT; the CPU is read after every client has
logged in and listed the messages, and after the last QUIT reply: the window bench/run.py
times, without the log-ins' scrypt, which lands on either process). Prints ms per message per
run and the medians. ``--b`` defaults to the twistd beside the Python running this script.
``--together`` runs A and B at the same time in each round (two ``smtp-source`` at once, or
A's and B's POP3 clients in one window), so both meet the same load from the rest of a shared
machine; the pairs' ratios B/A are printed with their median. ``--py-spy OUT`` records B's
processes during B's first timed run (raw folded stacks, ``OUT.0`` the main process, ``OUT.1``
the first worker, ...; ``--gil``: only the thread holding the GIL, i.e. Python's CPU). Each run
prints the CPU split into reactor and pool threads, user and kernel (stime).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import run as bench  # noqa: E402
import tests.support.server as support  # noqa: E402

TCK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` (all its threads) in seconds: Python and the kernel."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) / TCK, int(f[12]) / TCK


def split(pid: int) -> tuple[float, float, float, float]:
    """CPU seconds of ``pid`` as (reactor thread, other threads, user, system): the reactor is
    the thread whose id is the process id; the others are the thread pool's."""
    reactor = other = user = system = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile: its time is in no sum
            continue
        u, s = int(f[11]), int(f[12])
        user += u
        system += s
        if int(tid) == pid:
            reactor += u + s
        else:
            other += u + s
    return reactor / TCK, other / TCK, user / TCK, system / TCK


def pop3_client(port: int, user: str, ready: Any, go: Any, result: Any) -> None:
    """One POP3 client process (as bench/run.py's): log in and STAT, wait for ``go``, RETR
    + DELE every message, QUIT; put the message count."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    bench._line(sock, buf)
    for command in (f"USER {user}", f"PASS {bench.PASSWORD}"):
        sock.sendall(command.encode() + b"\r\n")
        bench._line(sock, buf)
    sock.sendall(b"STAT\r\n")
    count = int(bench._line(sock, buf).split()[1])
    ready.wait()
    go.wait()
    for i in range(1, count + 1):
        sock.sendall(b"RETR %d\r\n" % i)
        bench._line(sock, buf)
        end = bench._read_until(sock, buf, b"\r\n.\r\n")
        del buf[:end]
        sock.sendall(b"DELE %d\r\n" % i)
        bench._line(sock, buf)
    sock.sendall(b"QUIT\r\n")
    bench._line(sock, buf)
    sock.close()
    result.put(count)


def pop3_window(port: int | list[int], users: list[str], probe: Any) -> tuple[int, float, Any, Any]:
    """One POP3 round; returns (messages, seconds, ``probe()`` at the start, ``probe()`` at the
    end) of the window from the moment all clients are logged in to the last QUIT reply. With a
    list of ports, ``users`` log in to each, all at once (``--together``)."""
    ports = port if isinstance(port, list) else [port]
    ctx = multiprocessing.get_context("fork")
    parties = len(users) * len(ports) + 1
    ready, go = ctx.Barrier(parties), ctx.Barrier(parties)
    result = ctx.Queue()
    clients = [ctx.Process(target=pop3_client, args=(pt, u, ready, go, result))
               for pt in ports for u in users]
    for c in clients:
        c.start()
    ready.wait()
    before = probe()
    start = time.perf_counter()
    go.wait()
    n = sum(result.get(timeout=600) for _ in clients)
    elapsed = time.perf_counter() - start
    after = probe()
    for c in clients:
        c.join(60)
    if any(c.exitcode != 0 for c in clients):
        raise RuntimeError("a POP3 client failed")
    return n, elapsed, before, after


def pids(srv: support.ServerProcess) -> list[int]:
    record = json.loads((srv.state_dir / "run" / "listeners.json").read_text())
    return record.get("workers", [srv.proc.pid])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", required=True)
    p.add_argument("--b", default=str(Path(sys.executable).parent / "twistd"))
    p.add_argument("--mode", choices=("local", "relay", "pop3"), default="local")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--workers", default="2")
    p.add_argument("--py-spy", default="")
    p.add_argument("--together", action="store_true",
                   help="A and B in the same window each round (same machine load)")
    p.add_argument("--gil", "--py-spy-gil", dest="gil", action="store_true",
                   help="py-spy samples the GIL holder only (Python CPU, not waits)")
    args = p.parse_args()
    bench.WORKERS = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="cpu-ab-"))
    sink = None
    extra = ""
    rcpt = f"bench@{bench.HOSTNAME}"
    if args.mode == "relay":
        port = bench.free_port()
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "256"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        extra = f'[smarthost]\nhost = "[127.0.0.1]:{port}"\ntls = "none"\n'
        rcpt = "someone@relay.example"
    boxes = [f"pop{i}" for i in range(10)]
    users = [f"{b}@{bench.HOSTNAME}" for b in boxes]
    if args.mode == "pop3":
        bench.fill_template(tmp / "pop3-template", boxes, args.messages // len(boxes))
    servers = {}
    try:
        for name, twistd in (("A", args.a), ("B", args.b)):
            srv = bench.make_server(tmp / name, extra_config=extra)
            srv.add_mailbox(f"bench@{bench.HOSTNAME}", bench.PASSWORD)
            if args.mode == "pop3":
                for user in users:
                    srv.add_mailbox(user, bench.PASSWORD)
            support.twistd_path = lambda t=twistd: t
            srv.start()
            servers[name] = srv
        results: dict[str, list[float]] = {"A": [], "B": []}
        per_proc: dict[str, list[list[float]]] = {"A": [], "B": []}

        def done(srv: support.ServerProcess) -> None:
            start = time.perf_counter()
            if args.mode == "local":
                bench.wait_count(srv.state_dir / "mailroot" / bench.HOSTNAME / "bench" / "new",
                                 args.messages, start)
            else:
                bench.wait_empty(lambda: bench.queue_left(srv.state_dir / "queue"), start, "p3c")

        def pop3_boxes(srv: support.ServerProcess) -> None:
            bench.copy_boxes(tmp / "pop3-template", srv.state_dir / "mailroot" / bench.HOSTNAME,
                             boxes)
            # written back before the run, as mail is long before it is fetched: unlinking a
            # file whose blocks are still only in the page cache (delayed allocation) frees no
            # blocks and issues no discard, and costs a third of one on disk (QUIT's unlinks
            # measured 26-28 against 76-86 us per message, depending on the writeback's timing)
            os.sync()

        def pop3_round(srv: support.ServerProcess, probe: Any = list) -> tuple[float, Any, Any]:
            n, elapsed, before, after = pop3_window(srv.port("pop3"), users, probe)
            if n != len(boxes) * (args.messages // len(boxes)):
                raise RuntimeError(f"the POP3 clients saw {n} messages")
            return elapsed, before, after

        for srv in servers.values():  # warm-up
            if args.mode == "pop3":
                pop3_boxes(srv)
                pop3_round(srv)
                continue
            bench.smtp_source(srv.port("smtp"), 300, rcpt)
            done_n = args.messages
            args.messages = 300
            done(srv)
            args.messages = done_n
        if args.together and args.mode != "pop3":
            return _together(args, servers, rcpt, done)
        ratios: list[float] = []
        for i in range(args.runs):
            if args.together:  # both servers in one window: the same load for A and B
                for srv in servers.values():
                    pop3_boxes(srv)
                all_procs = {name: pids(srv) for name, srv in servers.items()}

                def probe_all(all_procs: dict = all_procs) -> dict[str, list[float]]:
                    return {name: [cpu(p) for p in procs] for name, procs in all_procs.items()}

                n, t, c0, c1 = pop3_window([srv.port("pop3") for srv in servers.values()],
                                           users, probe_all)
                for name in servers:
                    results[name].append(1000 * sum(c1[name][k] - c0[name][k] for k in
                                                    range(len(c0[name]))) / args.messages)
                ratios.append(results["B"][-1] / results["A"][-1])
                print(f"run {i + 1}: A {results['A'][-1]:.3f} B {results['B'][-1]:.3f} ms/msg, "
                      f"B/A {ratios[-1]:.3f}, {n / t:.0f} msg/s both", flush=True)
                continue
            for name, srv in servers.items():
                if args.mode == "local":
                    bench.empty_folder(srv.state_dir / "mailroot" / bench.HOSTNAME / "bench" / "new")
                elif args.mode == "pop3":
                    pop3_boxes(srv)
                procs = pids(srv)
                spies = []
                if args.py_spy and name == "B" and i == 0:
                    spies = [subprocess.Popen(["py-spy", "record", "-r", "200", "--nonblocking",
                                               *(["--gil"] if args.gil else []),
                                               "-p", str(pid), "-f", "raw",
                                               "-o", f"{args.py_spy}.{n}"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                             for n, pid in enumerate(procs)]
                    time.sleep(1.0)

                def probe(procs: list[int] = procs) -> tuple[list[float], list[tuple]]:
                    return [cpu(p) for p in procs], [split(p) for p in procs]

                if args.mode == "pop3":
                    t, (c0, s0), (c1, s1) = pop3_round(srv, probe)
                else:
                    c0, s0 = probe()
                    t = bench.smtp_source(srv.port("smtp"), args.messages, rcpt)
                    done(srv)
                    c1, s1 = probe()
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                for spy in spies:
                    spy.wait(30)
                ms = [1000 * (b - a) / args.messages for a, b in zip(c0, c1, strict=True)]
                results[name].append(sum(ms))
                per_proc[name].append(ms)
                print(f"run {i + 1} {name}: {sum(ms):.3f} ms/msg "
                      f"({' + '.join(f'{m:.2f}' for m in ms)}), {args.messages / t:.0f} msg/s; "
                      + ", ".join(f"{what} {1000 * sum(b[k] - a[k] for a, b in zip(s0, s1, strict=True)) / args.messages:.3f}"
                                  for k, what in enumerate(("reactor", "pool", "user", "sys"))),
                      flush=True)
        for name in ("A", "B"):
            print(f"{name} median {statistics.median(results[name]):.3f} ms/msg "
                  f"runs {[round(v, 3) for v in results[name]]}")
        a, b = statistics.median(results["A"]), statistics.median(results["B"])
        print(f"B/A {b / a:.3f} ({100 * (b - a) / a:+.1f}%)")
        if ratios:
            print(f"median of the runs' B/A {statistics.median(ratios):.3f}, B lower in "
                  f"{sum(r < 1 for r in ratios)} of {len(ratios)}")
    finally:
        for srv in servers.values():
            srv.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)  # the servers' state and the POP3 template


def _together(args: argparse.Namespace, servers: dict, rcpt: str, done) -> None:  # noqa: ANN001
    """Each round: A and B fed at once, CPU per message of each; the ratio B/A per round."""
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, list[float]] = {"A": [], "B": []}
    ratios: list[float] = []

    def one(srv: support.ServerProcess) -> tuple[float, list[float]]:
        procs = pids(srv)
        c0 = [cpu(p) for p in procs]
        t = bench.smtp_source(srv.port("smtp"), args.messages, rcpt)
        done(srv)
        c1 = [cpu(p) for p in procs]
        return t, [1000 * (b - a) / args.messages for a, b in zip(c0, c1, strict=True)]

    with ThreadPoolExecutor(2) as pool:
        for i in range(args.runs):
            if args.mode == "local":
                for srv in servers.values():
                    bench.empty_folder(srv.state_dir / "mailroot" / bench.HOSTNAME / "bench" / "new")
            futures = {name: pool.submit(one, srv) for name, srv in servers.items()}
            line = []
            for name, fut in futures.items():
                t, ms = fut.result()
                results[name].append(sum(ms))
                line.append(f"{name} {sum(ms):.3f} ({' + '.join(f'{m:.2f}' for m in ms)}, "
                            f"{args.messages / t:.0f} msg/s)")
            ratios.append(results["B"][-1] / results["A"][-1])
            print(f"round {i + 1}: " + "  ".join(line) + f"  B/A {ratios[-1]:.3f}", flush=True)
    for name in ("A", "B"):
        print(f"{name} median {statistics.median(results[name]):.3f} ms/msg "
              f"runs {[round(v, 3) for v in results[name]]}")
    print(f"B/A median of rounds {statistics.median(ratios):.3f}, B lower in "
          f"{sum(r < 1 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
