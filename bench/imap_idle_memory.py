"""Memory per IDLE session of the IMAP server, in one process: ``--mailboxes`` accounts of
``--messages`` messages each, ``--sessions`` sessions logged in round-robin, each SELECTing
INBOX and entering IDLE (over StringTransport, the real folder store, blocking calls run
inline). Prints the process RSS before and after the sessions and the growth per session.

    python bench/imap_idle_memory.py --sessions 1000 --mailboxes 10 --messages 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from tests.support.dialogue import connect, take
from tests.support.fakes import FakeChecker
from twisted.internet import defer, task

from pop3coexist.config import Config, DomainsConfig, ImapConfig, ServerConfig
from pop3coexist.imap.common import POLL_INTERVAL
from pop3coexist.imap.factory import IMAPServerFactory
from pop3coexist.store.folders import RACY_WINDOW
from pop3coexist.store.maildir import MaildirStore

HOST = "pop.contoso.test"


def rss() -> int:
    """Resident set size of this process, in octets (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inline(f, *args):  # noqa: ANN001, ANN202
    return defer.maybeDeferred(f, *args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--mailboxes", type=int, default=10)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--fresh", action="store_true",
                    help="no ageing of the folders: the sessions SELECT within the racy window "
                         "of the first SELECT's new -> cur move, as bench/run.py's imapidle does")
    ap.add_argument("--mallocstats", action="store_true",
                    help="print pymalloc's arenas and pools at the end (sys._debugmallocstats)")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="tracemalloc the sessions; print the N lines that hold the most")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imapmem"))
    store = MaildirStore(tmp / "mailroot")
    store.add_domain(HOST)
    users = {}
    for i in range(a.mailboxes):
        store.add_mailbox(HOST, f"u{i}")
        users[f"u{i}@{HOST}"] = "pw"
        for n in range(a.messages):
            store.deliver_bytes(HOST, f"u{i}", b"From: a@example.test\nSubject: m%d\n\nHello\n" % n)
        root = store.mailbox_folder(HOST, f"u{i}")
        past = time.time() - 120  # an unchanged folder (no racy stat signature)
        for name in ("new", "cur") if not a.fresh else ():
            os.utime(root / name, (past, past))
    clock = task.Clock()
    config = Config(server=ServerConfig(HOST, tmp), domains=DomainsConfig(local=(HOST,)),
                    imap=ImapConfig(max_connections=a.sessions + 10,
                                    max_connections_per_client=a.sessions + 10))
    factory = IMAPServerFactory(config, store, FakeChecker(users, local_domains=(HOST,),
                                                           offers_secrets=False),
                                reactor=clock, run_blocking=_inline)
    # a first session per mailbox claims \Recent and writes the uid list; then age them again
    sessions = []
    for i in range(a.mailboxes):
        p = factory.buildProtocol(None)
        t = connect(p, host_port=143)
        p.dataReceived(f"a LOGIN u{i}@{HOST} pw\r\nb SELECT INBOX\r\n".encode())
        sessions.append((p, t))
        root = store.mailbox_folder(HOST, f"u{i}")
        past = time.time() - 120
        for name in ("new", "cur", "dovecot-uidlist") if not a.fresh else ():
            os.utime(root / name, (past, past))
    if a.trace:
        tracemalloc.start()
    before = rss()
    for k in range(a.sessions):
        p = factory.buildProtocol(None)
        t = connect(p, host_port=143)
        p.dataReceived(f"a LOGIN u{k % a.mailboxes}@{HOST} pw\r\nb SELECT INBOX\r\n"
                       f"c IDLE\r\n".encode())
        assert b"+ idling" in take(t)
        t.clear()
        sessions.append((p, t))
    clock.advance(POLL_INTERVAL)  # the first IDLE poll
    if a.fresh:  # past the racy window: the polls that read the folder again
        time.sleep(RACY_WINDOW)
        clock.advance(POLL_INTERVAL)
    after = rss()
    if a.trace:
        snap = tracemalloc.take_snapshot()
        stats = snap.statistics("lineno")
        print(f"traced {sum(s.size for s in stats) / 2**20:.1f} MiB")
        for s in stats[:a.trace]:
            print(f"{s.size / a.sessions:8.0f} B/session {s.count:7d} blocks  {s.traceback}")
    print(f"sessions={a.sessions} mailboxes={a.mailboxes} messages={a.messages} "
          f"rss_before={before / 2**20:.1f}MiB rss_after={after / 2**20:.1f}MiB "
          f"per_session={(after - before) / a.sessions / 1024:.1f}KiB")
    if a.mallocstats:
        sys._debugmallocstats()


if __name__ == "__main__":
    main()
