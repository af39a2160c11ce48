"""What a /metrics scrape costs with a large store (issue 15): ``python bench/scrape_cost.py``.

Builds a state folder with ``--mailboxes`` Maildir mailboxes (default 10,000, spread over
``--domains`` domains, ``--messages`` messages each, written straight into ``new/`` as any
Maildir writer may), then measures:

- **count**: one reading of the mailbox figures per domain (``monitor.storestats.read_store``,
  in this process): what a refresh costs, in a thread of the server, at most every
  ``metrics.store_refresh``;
- **scrape**: ``--scrapes`` GETs of ``/metrics`` from the real server (twistd, two serving
  processes, the count already cached), one after the other: median, 95th percentile and
  maximum wall time, and the size of the answer.

Prints one JSON object. Needs the project installed (README "Set-up on a fresh machine").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MESSAGE = b"Subject: bench\n\nhello\n"


def build_store(mailroot: Path, mailboxes: int, domains: int, messages: int) -> None:
    """Plain Maildir folders, as another Maildir writer would leave them (no fsync: a bench)."""
    for i in range(mailboxes):
        box = mailroot / f"d{i % domains}.test" / f"user{i}"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        for j in range(messages):
            name = f"{1700000000 + j}.M{i}P1Q{j}.bench,S={len(MESSAGE)}"
            (box / "new" / name).write_bytes(MESSAGE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--domains", type=int, default=10)
    ap.add_argument("--messages", type=int, default=2)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()

    from pop3coexist.monitor.storestats import read_store
    from pop3coexist.store.maildir import MaildirStore

    root = Path(tempfile.mkdtemp(prefix="pop3coexist-scrape-"))
    proc = None
    try:
        state = root / "var"
        t0 = time.perf_counter()
        build_store(state / "mailroot", args.mailboxes, args.domains, args.messages)
        built = time.perf_counter() - t0

        store = MaildirStore(state / "mailroot")
        t0 = time.perf_counter()
        figures = read_store(store)
        count_s = time.perf_counter() - t0
        assert sum(f[0] for f in figures.values()) == args.mailboxes, figures

        domains = ", ".join(f'"d{i}.test"' for i in range(args.domains))
        config = root / "pop3coexist.toml"
        config.write_text(
            '[server]\nhostname = "bench.test"\nstate_dir = "var"\nworkers = 2\n'
            '[pop3]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            f"[domains]\nlocal = [{domains}]\n"
            '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
        twistd = Path(sys.executable).parent / "twistd"
        proc = subprocess.Popen(
            [str(twistd if twistd.exists() else "twistd"), "-n", "--logfile",
             str(root / "twistd.log"), "--pidfile", "", "pop3coexist", "-c", str(config)],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        listeners = state / "run" / "listeners.json"
        deadline = time.monotonic() + 120
        while not listeners.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((root / "twistd.log").read_text()[-3000:])
            time.sleep(0.1)
        port = json.loads(listeners.read_text())["listeners"]["metrics"][0]
        url = f"http://127.0.0.1:{port}/metrics"

        def get() -> bytes:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()

        t0 = time.perf_counter()
        while b"pop3coexist_mailboxes{" not in get():  # the first count, made at start
            if time.monotonic() > deadline:
                raise SystemExit("the first mailbox count did not finish")
            time.sleep(0.2)
        first_count_s = time.perf_counter() - t0
        times = []
        size = 0
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            size = len(get())
            times.append(time.perf_counter() - t0)
        times.sort()
        print(json.dumps({
            "mailboxes": args.mailboxes, "domains": args.domains,
            "messages": args.mailboxes * args.messages,
            "build_seconds": round(built, 2),
            "count_seconds": round(count_s, 3),
            "first_count_after_start_seconds": round(first_count_s, 3),
            "scrape_ms": {"median": round(statistics.median(times) * 1000, 2),
                          "p95": round(times[int(len(times) * 0.95) - 1] * 1000, 2),
                          "max": round(times[-1] * 1000, 2)},
            "scrape_bytes": size,
        }, indent=1))
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


if __name__ == "__main__":
    sys.exit(main())
