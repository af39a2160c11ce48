"""IMAP APPEND's quota cost on a big mailbox (issue 18; a timed loop outside the tests).

A mailbox with a quota and ``--folders`` folders (INBOX and its Maildir++ subfolders) of
``--messages`` messages each (small files named with ``,S=``, as deliveries name them); then
``--appends`` APPENDs of a 2 KB message through the store (``AccountFolders.append``: the
quota check, the write, the uid list), alternating between two folders, and as many
GETQUOTAROOT-style ``quota()`` calls with no change in between (once USAGE_RACY_WINDOW
has passed since the last APPEND). Prints the median time of
each, in microseconds, as one JSON line. Run it on each side of a change::

    python bench/imap_append_quota.py --folders 20 --messages 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pop3coexist.store.folders import MaildirFolders
from pop3coexist.store.maildir import MaildirStore

try:
    from pop3coexist.store.maildir import USAGE_RACY_WINDOW
except ImportError:  # before the usage cache
    USAGE_RACY_WINDOW = 0.0

MESSAGE = b"From: a@example.org\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"


def _fill(root: Path, folders: int, messages: int) -> tuple[MaildirStore, object]:
    store = MaildirStore(root)
    store.add_domain("example.org")
    store.add_mailbox("example.org", "ann")
    store.set_quota("example.org", "ann", 1 << 40)
    account = MaildirFolders(store).open_account("example.org", "ann")
    names = ["INBOX"] + [f"F{i:02d}" for i in range(1, folders)]
    for name in names[1:]:
        account.create(name)
    base = int(time.time()) - 3600
    for name in names:
        cur = account.path(name) / "cur"
        for n in range(messages):
            (cur / f"{base + n}.M{n}P1Q{n}.bench,S=2048,W=2090:2,S").write_bytes(b"x" * 16)
    return store, account


def main() -> None:
    """Build the mailbox, time the loops, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--appends", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp:
        store, account = _fill(Path(tmp), args.folders, args.messages)
        account.quota()  # one warm-up pass (the dentry cache, any usage cache)
        appends = []
        for i in range(args.appends):
            t = time.perf_counter()
            account.append("F01" if i % 2 else "INBOX", MESSAGE, ["\\Seen"], None)
            appends.append(time.perf_counter() - t)
        time.sleep(USAGE_RACY_WINDOW + 0.1)  # past the window: folders just written are trusted
        quotas = []
        for _ in range(args.appends):
            t = time.perf_counter()
            account.quota()
            quotas.append(time.perf_counter() - t)
        print(json.dumps({
            "folders": args.folders, "messages_per_folder": args.messages,
            "append_median_us": round(statistics.median(appends) * 1e6),
            "quota_median_us": round(statistics.median(quotas) * 1e6),
            "used_bytes": account.quota()[0],
        }))


if __name__ == "__main__":
    main()
