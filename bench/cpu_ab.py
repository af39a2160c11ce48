"""Server CPU per message, A/B: two builds of pop3coexist side by side, runs alternating.

    python bench/cpu_ab.py --a /path/to/venv-A/bin/twistd [--b twistd-B] [--mode local|relay]
                           [--runs 3] [--messages 3000] [--workers 2] [--py-spy OUT [--gil]]

The measure is CPU time, not throughput (a shared machine makes wall-clock rates noise):
utime + stime from /proc/<pid>/stat summed over every serving process of the server (the main
process and its workers, all their threads), read before and after one ``smtp-source -s 20
-m N -l 4096`` run, until every message is in the Maildir (``local``) or the queue is empty
after relaying to an ``smtp-sink`` (``relay``). Prints ms per message per run (per process,
and the kernel's share: stime) and the medians. ``--b`` defaults to the twistd beside the
Python running this script. ``--py-spy OUT`` records every process of B during B's first
timed run (raw folded stacks, ``OUT.0`` the main process, ``OUT.1`` the first worker, ...;
``--gil``: only the thread holding the GIL, i.e. Python's CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def pids(srv: support.ServerProcess) -> list[int]:
    record = json.loads((srv.state_dir / "run" / "listeners.json").read_text())
    return record.get("workers", [srv.proc.pid])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", required=True)
    p.add_argument("--b", default=str(Path(sys.executable).parent / "twistd"))
    p.add_argument("--mode", choices=("local", "relay"), default="local")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--workers", default="2")
    p.add_argument("--py-spy", default="")
    p.add_argument("--gil", action="store_true", help="py-spy samples the GIL holder only")
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
    servers = {}
    try:
        for name, twistd in (("A", args.a), ("B", args.b)):
            srv = bench.make_server(tmp / name, extra_config=extra)
            srv.add_mailbox(f"bench@{bench.HOSTNAME}", bench.PASSWORD)
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

        for srv in servers.values():  # warm-up
            bench.smtp_source(srv.port("smtp"), 300, rcpt)
            done_n = args.messages
            args.messages = 300
            done(srv)
            args.messages = done_n
        for i in range(args.runs):
            for name, srv in servers.items():
                if args.mode == "local":
                    bench.empty_folder(srv.state_dir / "mailroot" / bench.HOSTNAME / "bench" / "new")
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
                s0 = [cpu_split(p) for p in procs]
                c0 = [u + k for u, k in s0]
                t = bench.smtp_source(srv.port("smtp"), args.messages, rcpt)
                done(srv)
                s1 = [cpu_split(p) for p in procs]
                c1 = [u + k for u, k in s1]
                sys_ms = 1000 * sum(b[1] - a[1] for a, b in zip(s0, s1, strict=True)) / args.messages
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                for spy in spies:
                    spy.wait(30)
                ms = [1000 * (b - a) / args.messages for a, b in zip(c0, c1, strict=True)]
                results[name].append(sum(ms))
                per_proc[name].append(ms)
                print(f"run {i + 1} {name}: {sum(ms):.3f} ms/msg "
                      f"({' + '.join(f'{m:.2f}' for m in ms)}; kernel {sys_ms:.2f}), "
                      f"{args.messages / t:.0f} msg/s",
                      flush=True)
        for name in ("A", "B"):
            print(f"{name} median {statistics.median(results[name]):.3f} ms/msg "
                  f"runs {[round(v, 3) for v in results[name]]}")
        a, b = statistics.median(results["A"]), statistics.median(results["B"])
        print(f"B/A {b / a:.3f} ({100 * (b - a) / a:+.1f}%)")
    finally:
        for srv in servers.values():
            srv.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)


if __name__ == "__main__":
    main()
