"""Issue 11 re-run, faults 10 and 13, against real sockets: the delivery runner in a
subprocess (tests/support/smarthost.py ``Runner``) and small scripted SMTP servers on
OS-picked loopback ports, for the peer behaviours aiosmtpd cannot show (a STARTTLS whose
handshake fails, a 421 in the middle of a session)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pop3coexist.store.queue import FileQueue
from tests.support.smarthost import Runner, SmartHost, enqueue, wait_until, write_config

pytestmark = pytest.mark.integration

BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: rerun\r\n\r\nhello\r\n"
PASSWORD = "n0t-in-the-log-either"


@dataclass
class ScriptedSMTP:
    """A line-by-line SMTP server in a thread. ``starttls_breaks``: it offers STARTTLS, says
    220 to it, reads the client's hello, then answers with bytes that are no TLS and closes
    (a handshake that fails, as with a peer whose TLS this side cannot speak);
    ``auth``: mechanisms it offers in clear text (every log-in fails); ``rcpt_421_after``:
    after that many RCPT commands it answers 421 and closes. ``sessions`` holds each
    session's commands (AUTH lines elided); ``received``: recipients of each accepted message."""

    starttls_breaks: bool = False
    auth: str = ""
    rcpt_421_after: int | None = None
    sessions: list[list[str]] = field(default_factory=list)
    received: list[list[str]] = field(default_factory=list)

    def start(self) -> ScriptedSMTP:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    @property
    def hop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def stop(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        log: list[str] = []
        self.sessions.append(log)
        f = conn.makefile("rb")
        rcpts: list[str] = []
        n_rcpt = 0

        def say(*lines: str) -> None:
            conn.sendall("".join(line + "\r\n" for line in lines).encode())

        say("220 scripted.test ESMTP")
        try:
            for raw in f:
                line = raw.decode("ascii", "replace").rstrip("\r\n")
                verb = line.split(" ", 1)[0].upper()
                log.append(verb if verb == "AUTH" else line)
                if verb == "EHLO":
                    ext = ["250-scripted.test"]
                    if self.starttls_breaks:
                        ext.append("250-STARTTLS")
                    if self.auth:
                        ext.append("250-AUTH " + self.auth)
                    say(*ext, "250 8BITMIME")
                elif verb == "STARTTLS" and self.starttls_breaks:
                    say("220 2.0.0 go ahead")
                    conn.recv(4096)  # the client's hello
                    conn.sendall(b"this is no TLS record\r\n" * 4)
                    return
                elif verb == "AUTH":
                    say("535 5.7.8 authentication failed")
                elif verb == "MAIL":
                    rcpts, n_rcpt = [], 0
                    say("250 2.1.0 ok")
                elif verb == "RCPT":
                    n_rcpt += 1
                    if self.rcpt_421_after is not None and n_rcpt > self.rcpt_421_after:
                        say("421 4.3.2 shutting down")
                        return
                    rcpts.append(line.split(":", 1)[1].strip("<> "))
                    say("250 2.1.5 ok")
                elif verb == "DATA":
                    say("354 go ahead")
                    for body_line in f:
                        if body_line in (b".\r\n", b".\n"):
                            break
                    self.received.append(rcpts)
                    say("250 2.0.0 queued")
                elif verb == "QUIT":
                    say("221 bye")
                    return
                else:
                    say("250 ok")
        except OSError:  # the client aborted the connection
            pass
        finally:
            conn.close()


@pytest.fixture
def cleanup():  # noqa: ANN201
    items: list = []
    yield items
    for item in reversed(items):
        item.stop()


def _queue(config: Path) -> FileQueue:
    return FileQueue(config.parent / "state" / "queue", "pop.contoso.test")


def test_failing_starttls_is_retried_in_clear_at_once(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 10 (re-run), STARTTLS offered but failing, tls = "opportunistic", no password:
    the handshake fails, the same host is asked again at once without STARTTLS and takes the
    message (the retry interval is an hour); the log says why it went in clear text."""
    host = ScriptedSMTP(starttls_breaks=True).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="opportunistic", retry_intervals=("1h",))
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: host.received == [["b@example.net"]], what="the message in clear text")
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert host.sessions[0][-1] == "STARTTLS" and "STARTTLS" not in host.sessions[1]
    log = runner.log()
    assert f"{qid}: STARTTLS with 127.0.0.1 failed (421 4.7.5 TLS failure with 127.0.0.1" in log
    assert 'trying again in clear text (tls = "opportunistic")' in log


def test_failing_starttls_keeps_the_password_home_and_says_why(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 10 (re-run): the same broken STARTTLS at a smart host that offers AUTH LOGIN in
    clear text, with a password: the password never leaves (no AUTH in either session), the
    stored reply names the failed handshake and the fixes, and the log explains it once."""
    host = ScriptedSMTP(starttls_breaks=True, auth="LOGIN").start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="opportunistic", username="relay",
                       password=PASSWORD, retry_intervals=("1h",))
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: queue.load(qid).recipients[0].state == "deferred",
               what="the recipient to be deferred")
    reply = queue.load(qid).recipients[0].last_reply
    assert reply.startswith("451 4.7.0 cannot authenticate to the smart host: it offers AUTH "
                            "LOGIN only in clear text (STARTTLS failed (TLS failure with "
                            "127.0.0.1")
    assert 'give the smart host a certificate, or set smarthost.tls = "none"' in reply
    assert all("AUTH" not in s and not any(c.startswith("MAIL") for c in s)
               for s in host.sessions)
    log = runner.log()
    assert log.count(f"smart host {host.hop}: mail to this smart host waits in the queue") == 1
    assert PASSWORD not in log


def test_wrong_password_is_explained_once_per_host(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 10 (re-run), a wrong password (535) rather than an impossible AUTH: the mail
    waits with the server's reply, and the log explains it once for the host, naming
    smarthost.username and password_file, never the password."""
    host = ScriptedSMTP(auth="LOGIN PLAIN").start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="none", username="relay",
                       password=PASSWORD, retry_intervals=("1h",))
    queue = _queue(cfg)
    ids = [enqueue(queue, [f"u{i}@example.net"], BODY) for i in range(3)]
    runner = Runner(cfg).start()
    cleanup.append(runner)
    wait_until(lambda: all(queue.load(q).recipients[0].state == "deferred" for q in ids),
               what="three deferred messages")
    assert queue.load(ids[0]).recipients[0].last_reply == (
        "454 4.7.0 smart host refused AUTH LOGIN: 535 5.7.8 authentication failed")
    log = runner.log()
    advice = (f"smart host {host.hop}: mail to this smart host waits in the queue: it refused "
              "the log-in of smarthost.username 'relay'")
    assert log.count(advice) == 1 and "smarthost.password_file" in log
    assert PASSWORD not in log


def test_421_mid_session_takes_the_next_route_hop_at_once(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 13 (re-run): a `[[domains.remote]]` route whose primary accepts the first RCPT,
    then answers 421 and closes: both recipients go through the fall-back in the same run
    (the retry interval is an hour), nothing went to the smart host."""
    primary = ScriptedSMTP(rcpt_421_after=1).start()
    cleanup.append(primary)
    fallback = SmartHost(hostname="fallback.test").start()
    cleanup.append(fallback)
    smarthost = SmartHost(hostname="smarthost.test").start()
    cleanup.append(smarthost)
    extra = f'[[domains.remote]]\nname = "d.test"\nroute = ["{primary.hop}", "{fallback.hop}"]\n'
    cfg = write_config(tmp_path / "run", smarthost.hop, retry_intervals=("1h",), extra=extra)
    queue = _queue(cfg)
    enqueue(queue, ["b@d.test", "c@d.test"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = fallback.wait_for(1)
    assert msg.rcpt_tos == ["b@d.test", "c@d.test"] and primary.received == []
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert smarthost.received == []
    assert runner.log().count('via="route of d.test, next hop 2 of 2"') == 2
