"""Benchmark: POP3 RETR throughput and server memory while streaming a large message.

Starts the real installed server (twistd) in a temporary folder, fills one mailbox with
N messages of S bytes (dropped into new/ as any Maildir writer would), then one poplib client
on loopback retrieves them all. Then one 100 MB message is retrieved while the server's peak
RSS (VmHWM) is read before and after. Prints a table and writes JSON.

    python bench/pop3_retr.py [--messages 1000] [--size 4096] [--big-mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.server import HOSTNAME, ServerProcess  # noqa: E402

PASSWORD = "bench-Passw0rd"


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fill(server: ServerProcess, name: str, count: int, size: int) -> None:
    new = server.state_dir / "mailroot" / HOSTNAME / name / "new"
    line = b"x" * 70 + b"\n"
    body = (line * (size // len(line) + 1))[: size - 60]
    for i in range(count):
        header = f"Subject: bench {i}\nMessage-ID: <{i}@bench>\n\n".encode()
        (new / f"{1700000000 + i}.M{i}P1.bench").write_bytes(header + body)


def retr_all(port: int, address: str) -> tuple[int, float, int]:
    p = poplib.POP3("127.0.0.1", port, timeout=120)
    p.user(address)
    p.pass_(PASSWORD)
    count, _ = p.stat()
    start = time.perf_counter()
    total = 0
    for i in range(1, count + 1):
        _, lines, octets = p.retr(i)
        total += octets
    elapsed = time.perf_counter() - start
    p.quit()
    return count, elapsed, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--big-mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default="bench/results/pop3_retr.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), tls=False)
        srv.write_config()
        srv.add_mailbox(f"bench@{HOSTNAME}", PASSWORD)
        srv.add_mailbox(f"big@{HOSTNAME}", PASSWORD)
        fill(srv, "bench", args.messages, args.size)
        fill(srv, "big", 1, args.big_mb * 1000 * 1000)
        with srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            rates = []
            for _ in range(args.runs):
                count, elapsed, total = retr_all(srv.port("pop3"), f"bench@{HOSTNAME}")
                rates.append(count / elapsed)
            before_hwm = rss_kb(pid, "VmHWM")
            before_rss = rss_kb(pid, "VmRSS")
            _, big_elapsed, big_total = retr_all(srv.port("pop3"), f"big@{HOSTNAME}")
            after_hwm = rss_kb(pid, "VmHWM")
    result = {
        "retr_messages_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
        "messages": args.messages, "size": args.size, "runs": args.runs,
        "big_message_bytes": big_total, "big_retr_seconds": big_elapsed,
        "server_rss_before_kb": before_rss, "server_peak_rss_before_kb": before_hwm,
        "server_peak_rss_after_kb": after_hwm,
        "peak_growth_mb": (after_hwm - before_hwm) / 1024,
    }
    print(f"RETR {args.messages} x {args.size} B, one poplib client: "
          f"median {result['retr_messages_per_s']['median']:.0f} msg/s "
          f"(min {min(rates):.0f}, max {max(rates):.0f})")
    print(f"RETR {big_total / 1e6:.0f} MB in {big_elapsed:.1f}s; server RSS {before_rss / 1024:.1f} MB, "
          f"peak RSS {before_hwm / 1024:.1f} -> {after_hwm / 1024:.1f} MB "
          f"(+{result['peak_growth_mb']:.1f} MB)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    main()
