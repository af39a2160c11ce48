"""Server CPU per message, A/B: two builds of pop3coexist side by side, runs alternating.

    python bench/cpu_ab.py --a /path/to/venv-A/bin/twistd [--b twistd-B] [--mode local|relay]
                           [--runs 3] [--messages 3000] [--workers 2] [--py-spy OUT]

The measure is CPU time, not throughput (a shared machine makes wall-clock rates noise):
utime + stime from /proc/<pid>/stat summed over every serving process of the server (the main
process and its workers, all their threads), read before and after one ``smtp-source -s 20
-m N -l 4096`` run, until every message is in the Maildir (``local``) or the queue is empty
after relaying to an ``smtp-sink`` (``relay``). Prints ms per message per run and the
medians. ``--b`` defaults to the twistd beside the Python running this script.
``--together`` runs A and B at the same time in each round (two ``smtp-source`` at once), so
both meet the same load from the rest of a shared machine; the pairs' ratios B/A are printed
with their median. ``--py-spy OUT`` records B's first worker during B's first timed run (raw folded stacks), and
the main process into ``OUT.main``.
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
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK


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
    p.add_argument("--together", action="store_true")
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
        if args.together:
            return _together(args, servers, rcpt, done)
        for i in range(args.runs):
            for name, srv in servers.items():
                if args.mode == "local":
                    bench.empty_folder(srv.state_dir / "mailroot" / bench.HOSTNAME / "bench" / "new")
                procs = pids(srv)
                spies = []
                if args.py_spy and name == "B" and i == 0 and len(procs) > 1:
                    for pid, out in ((procs[1], args.py_spy), (procs[0], args.py_spy + ".main")):
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "-r", "200", "--nonblocking", "-p", str(pid),
                             "-f", "raw", "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(1.0)
                c0 = [cpu(p) for p in procs]
                t = bench.smtp_source(srv.port("smtp"), args.messages, rcpt)
                done(srv)
                c1 = [cpu(p) for p in procs]
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                for spy in spies:
                    spy.wait(30)
                ms = [1000 * (b - a) / args.messages for a, b in zip(c0, c1, strict=True)]
                results[name].append(sum(ms))
                per_proc[name].append(ms)
                print(f"run {i + 1} {name}: {sum(ms):.3f} ms/msg "
                      f"({' + '.join(f'{m:.2f}' for m in ms)}), {args.messages / t:.0f} msg/s",
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
