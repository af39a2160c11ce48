"""kill -9 in the middle of a delivery burst: durability of the 250 reply.

Several smtplib clients send numbered messages to the real server; the server is killed with
SIGKILL mid-burst and restarted on the same state. Every message that got a 250 must be in its
Maildir exactly once, complete; no half-written message may be visible in new/ or cur/; and the
restarted server accepts mail again.
"""

from __future__ import annotations

import re
import signal
import smtplib
import threading
import time

import pytest

from tests.support.server import HOSTNAME
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

TED = f"ted@{HOSTNAME}"
ANN = f"ann@{HOSTNAME}"
TRAILER = b"END-OF-MESSAGE"


def body(client: int, n: int) -> bytes:
    filler = (b"x" * 70 + b"\r\n") * (50 + (n % 7) * 200)
    return (f"From: a@example.test\r\nSubject: msg-{client}-{n}\r\n\r\n").encode() + filler + \
        TRAILER + b"\r\n"


def test_kill_9_mid_burst(tmp_path) -> None:
    """Messages with a 250 survive kill -9 exactly once and whole; nothing partial is visible."""
    srv = make_server(tmp_path)
    srv.write_config()
    srv.add_mailbox(TED, "pw-1234")
    srv.add_mailbox(ANN, "pw-1234")
    srv.start()
    port = srv.port("smtp")
    accepted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    while not stop.is_set():
                        n += 1
                        # two local recipients: one hard-linked file each
                        s.sendmail("a@example.test", [TED, ANN], body(c, n))
                        with lock:
                            accepted.add(f"msg-{c}-{n}")
            except (OSError, smtplib.SMTPException):
                # 421 after max_messages_per_connection, or the server is gone: reconnect
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(accepted) < 150 and time.monotonic() < deadline:  # mid-burst
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    srv.proc = None
    print(f"{len(accepted)} messages accepted before kill -9")
    assert accepted

    srv.start()
    try:
        for mailbox in ("ted", "ann"):
            root = srv.state_dir / "mailroot" / HOSTNAME / mailbox
            seen: dict[str, int] = {}
            for folder in ("new", "cur"):
                for path in (root / folder).iterdir():
                    data = path.read_bytes()
                    m = re.search(rb"Subject: (msg-\d+-\d+)", data)
                    assert m, f"unreadable message {path}"
                    assert data.endswith(TRAILER + b"\n"), f"partial message visible: {path}"
                    seen[m.group(1).decode()] = seen.get(m.group(1).decode(), 0) + 1
            missing = accepted - set(seen)
            assert not missing, f"{len(missing)} messages with a 250 lost from {mailbox}"
            dups = [k for k, v in seen.items() if v > 1]
            assert not dups, f"duplicated: {dups[:5]}"
        with smtplib.SMTP("127.0.0.1", srv.port("smtp")) as s:
            s.sendmail("a@example.test", [TED], body(99, 1))
    finally:
        srv.stop()
