"""Stateful property tests of the real POP3 session (pop3.server over the real Maildir store in
a temporary folder, a fake checker and a StringTransport that records STLS): hypothesis fills
the mailbox with generated files (as a foreign Maildir writer leaves them: any line ends, a
bare CR, an mbox ``From `` line, Ctrl-Z, no final line end, empty; and as the server's own
delivery writes them), then drives generated command sequences (USER/PASS, APOP, AUTH PLAIN /
LOGIN / CRAM-MD5 right and wrong, STLS with pipelined commands after it, CAPA, STAT, LIST,
UIDL, RETR, TOP, DELE, RSET, NOOP, garbage, over-long lines, pipelined groups, lines cut in
pieces, QUIT) and after every step checks:

- one well-formed response per complete line, in order; multi-line responses are
  dot-stuffed and end with a lone dot (``oracles.Pop3Transcript`` over the whole transcript);
- RETR of any stored file is a valid dot-stuffed stream whose unstuffed length matches LIST
  and STAT, and whose content is the file's canonical form; TOP is its header, the empty line
  and the asked number of body lines;
- nothing reached Twisted's log as a failure or an error;
- QUIT removes exactly the messages marked with DELE (and nothing without QUIT).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet import task
from twisted.internet.address import IPv4Address

from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.pop3.factory import POP3ServerFactory
from pop3coexist.store.maildir import MaildirStore
from tests.fuzz import oracles
from tests.fuzz.harnesses import settle
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.unit.pop3_env import TLSTransport, make_config

HOST = "pop.contoso.test"
TED = f"ted@{HOST}"
PW = "ted secret 1"

stored_line = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b".", b"..", b".x", b"From x", b"Subject: s", b"", b"\x1a", b"\x00"]),
)
line_end = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])
stored_files = st.lists(st.tuples(stored_line, line_end), max_size=10).map(
    lambda pairs: b"".join(a + b for a, b in pairs))


def _b64(data: bytes) -> bytes:
    import base64

    return base64.b64encode(data)


class Pop3Session(RuleBasedStateMachine):
    """One mailbox and one session per example."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pop3-fuzz-"))
        self.store = MaildirStore(self.tmp / "mailroot", hostname="mx.test")
        self.store.add_domain(HOST)
        self.store.add_mailbox(HOST, "ted")
        self.logged = oracles.no_logged_failures()
        self.logged.__enter__()
        self.started = False

    @initialize(files=st.lists(st.tuples(stored_files, st.booleans()), max_size=5))
    def fill(self, files: list[tuple[bytes, bool]]) -> None:
        new = self.tmp / "mailroot" / HOST / "ted" / "new"
        # the maildrop lists by the time in the name: the foreign files (dated 2023) first,
        # then the server's deliveries in their order
        foreign_files, delivered = [], []
        for i, (data, foreign) in enumerate(files):
            if foreign:
                (new / f"170000000{i}.M1P1Q{i}.other").write_bytes(data)
                foreign_files.append(oracles.canonical(data))
            else:
                self.store.deliver_bytes(HOST, "ted", data)
                delivered.append(oracles.canonical(data))
        self.canon: list[bytes] = foreign_files + delivered
        self.clock = task.Clock()
        checker = FakeChecker({TED: PW}, local_domains=(HOST,))
        self.factory = POP3ServerFactory(
            make_config(), self.store, checker, tls_options=object(), reactor=self.clock,
            run_blocking=sync_run_blocking, throttle=AuthThrottle(self.clock, base=2.0, maximum=30.0))
        self.proto = self.factory.buildProtocol(None)
        self.transport = TLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                                      hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
        self.proto.makeConnection(self.transport)
        self.greeting = self.transport.value()
        assert self.greeting.startswith(b"+OK pop.contoso.test POP3 server ready <"), self.greeting
        self.transport.clear()
        self.chunks: list[bytes] = []
        self.output = b""
        self.transcript = oracles.Pop3Transcript()
        self.state = "auth"
        self.secure = False
        self.deleted: set[int] = set()
        self.seen: dict[int, bytes] = {}  # message number -> canonical content sent by RETR
        self.closed = False
        self.started = True

    def teardown(self) -> None:
        try:
            if self.started and not self.closed:
                self.proto.connectionLost(None)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.logged.__exit__(None, None, None)

    # -- sending

    def send(self, *chunks: bytes) -> list[tuple[bytes, bytes, bytes | None]]:
        """Send ``chunks`` (each answered before the next); return the new responses."""
        before = len(self.transcript.responses)
        for chunk in chunks:
            if self.transport.disconnecting:
                break
            self.chunks.append(chunk)
            self.proto.dataReceived(chunk)
            settle(self.clock, lambda: self.proto._waiting is not None)
            self.output += self.transport.value()
            self.transport.clear()
        self.transcript = oracles.Pop3Transcript()
        self.transcript.check(self.chunks, self.output)
        if self.transport.disconnecting:
            self.closed = True
        return self.transcript.responses[before:]

    def command(self, line: bytes) -> tuple[bytes, bytes | None]:
        [(_, status, body)] = self.send(line + b"\r\n")
        return status, body

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.canon) + 1) if n not in self.deleted]

    # -- authorization

    @precondition(lambda self: self.started and not self.closed and self.state == "auth")
    @rule(right=st.booleans(), how=st.sampled_from(["USER", "APOP", "PLAIN", "LOGIN", "CRAM",
                                                    "PIPELINED"]))
    def login(self, right: bool, how: str) -> None:
        pw = PW if right else "nope"
        if how == "USER":
            assert self.command(f"USER {TED}".encode())[0].startswith(b"+OK")
            status = self.command(f"PASS {pw}".encode())[0]
        elif how == "PIPELINED":
            responses = self.send(f"USER {TED}\r\nPASS {pw}\r\nSTAT\r\n".encode())
            status = responses[1][1]
            assert responses[2][1].startswith(b"+OK" if right else b"-ERR"), responses
        elif how == "APOP":
            magic = self.greeting.rstrip(b"\r\n").rsplit(b" ", 1)[1]
            digest = hashlib.md5(magic + pw.encode()).hexdigest()
            status = self.command(f"APOP {TED} {digest}".encode())[0]
        elif how == "PLAIN":
            status = self.command(b"AUTH PLAIN " + _b64(f"\0{TED}\0{pw}".encode()))[0]
        elif how == "LOGIN":
            assert self.command(b"AUTH LOGIN")[0].startswith(b"+ ")
            assert self.command(_b64(TED.encode()))[0].startswith(b"+ ")
            status = self.command(_b64(pw.encode()))[0]
        else:
            import base64
            import hmac

            challenge_line = self.command(b"AUTH CRAM-MD5")[0]
            challenge = base64.b64decode(challenge_line[2:])
            digest = hmac.new(pw.encode(), challenge, hashlib.md5).hexdigest()
            status = self.command(_b64(f"{TED} {digest}".encode()))[0]
        assert status.startswith(b"+OK" if right else b"-ERR"), (how, right, status)
        if right:
            self.state = "transaction"
            n = len(self.canon)
            total = sum(len(c) for c in self.canon)
            assert status.endswith(f"{n} messages ({total} octets)".encode()), (status, total)

    @precondition(lambda self: self.started and not self.closed)
    @rule(tail=st.sampled_from([b"", b"USER x\r\nPASS y\r\n", b"QUIT\r\n"]))
    def stls(self, tail: bytes) -> None:
        responses = self.send(b"STLS\r\n" + tail)
        status = responses[0][1]
        if self.secure or self.state != "auth":
            assert status.startswith(b"-ERR"), status
            self.after_refused(tail, responses[1:])
            return
        assert status.startswith(b"+OK") and len(responses) == 1, responses  # tail discarded
        assert self.transport.written_before_tls.endswith(b"+OK Begin TLS negotiation\r\n")
        self.secure = True

    def after_refused(self, tail: bytes, responses) -> None:
        for line, status, _ in responses:
            if line == b"QUIT" and status.startswith(b"+OK"):
                self.check_quit(status)

    # -- transaction

    @precondition(lambda self: self.started and not self.closed and self.state == "transaction")
    @rule(data=st.data())
    def retr(self, data) -> None:
        n = data.draw(st.integers(0, len(self.canon) + 1))
        status, body = self.command(f"RETR {n}".encode())
        if n not in self.live():
            assert status.startswith(b"-ERR"), status
            return
        assert status == f"+OK {len(self.canon[n - 1])} octets".encode(), status
        assert body is not None
        assert body == self.canon[n - 1], (body, self.canon[n - 1])
        self.seen[n] = body

    @precondition(lambda self: self.started and not self.closed and self.state == "transaction")
    @rule(data=st.data(), lines=st.integers(0, 4))
    def top(self, data, lines: int) -> None:
        n = data.draw(st.integers(1, max(1, len(self.canon))))
        status, body = self.command(f"TOP {n} {lines}".encode())
        if n not in self.live():
            assert status.startswith(b"-ERR"), status
            return
        assert status.startswith(b"+OK")
        assert body == oracles.top_of(self.canon[n - 1], lines), (body, self.canon[n - 1], lines)

    @precondition(lambda self: self.started and not self.closed and self.state == "transaction")
    @rule(which=st.sampled_from(["STAT", "LIST", "UIDL", "LIST1", "UIDL1"]))
    def listing(self, which: str) -> None:
        live = self.live()
        if which == "STAT":
            status, _ = self.command(b"STAT")
            total = sum(len(self.canon[n - 1]) for n in live)
            assert status == f"+OK {len(live)} {total}".encode(), status
        elif which == "LIST":
            status, body = self.command(b"LIST")
            assert body == b"".join(f"{n} {len(self.canon[n - 1])}\r\n".encode() for n in live)
        elif which == "UIDL":
            status, body = self.command(b"UIDL")
            rows = body.split(b"\r\n")[:-1]
            assert [int(r.split(b" ")[0]) for r in rows] == live
            uids = [r.split(b" ", 1)[1] for r in rows]
            assert len(set(uids)) == len(uids), uids
        else:
            n = live[0] if live else 1
            status, _ = self.command(f"{which[:4]} {n}".encode())
            assert status.startswith(b"+OK" if live else b"-ERR"), status
            if live and which == "LIST1":
                assert status == f"+OK {n} {len(self.canon[n - 1])}".encode()

    @precondition(lambda self: self.started and not self.closed and self.state == "transaction")
    @rule(data=st.data())
    def dele(self, data) -> None:
        n = data.draw(st.integers(0, len(self.canon) + 1))
        status, _ = self.command(f"DELE {n}".encode())
        assert status.startswith(b"+OK") == (n in self.live()), (n, status)
        if status.startswith(b"+OK"):
            self.deleted.add(n)

    @precondition(lambda self: self.started and not self.closed and self.state == "transaction")
    @rule()
    def rset(self) -> None:
        status, _ = self.command(b"RSET")
        assert status.startswith(b"+OK")
        self.deleted.clear()

    # -- any state

    @precondition(lambda self: self.started and not self.closed)
    @rule(line=st.one_of(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")),
                         st.sampled_from([b"NOOP", b"CAPA", b"AUTH", b"CAPA x", b"RETR",
                                          b"TOP 1", b"LIST 1 2", b"x" * 300, b"y" * 5000,
                                          b"AUTH XYZ", b"AUTH PLAIN !!!", b"PASS x",
                                          b"USER", b"APOP a b"])),
          cut=st.integers(0, 6))
    def other(self, line: bytes, cut: int) -> None:
        data = line + b"\r\n"
        pieces = [data] if not cut else [data[i : i + cut] for i in range(0, len(data), cut)]
        responses = self.send(*pieces)
        assert len(responses) >= 1
        for sent, status, _ in responses:
            verb = sent.split(b" ", 1)[0].upper()
            if status.startswith(b"+ "):
                # an AUTH exchange began: cancel it (one more response)
                [(_, cancel, _)] = self.send(b"*\r\n")
                assert cancel.startswith(b"-ERR"), cancel
            if verb == b"QUIT" and status.startswith(b"+OK"):
                self.check_quit(status)
            if status.startswith(b"+OK") and verb in (b"PASS", b"APOP", b"AUTH") and sent != b"AUTH":
                self.state = "transaction"  # a generated line that logs in (rare)
            if status.startswith(b"+OK") and verb == b"RSET":
                self.deleted.clear()
            if status.startswith(b"+OK") and verb == b"DELE":
                self.deleted.add(int(sent.split()[1]))

    @precondition(lambda self: self.started and not self.closed)
    @rule()
    def quit(self) -> None:
        status, _ = self.command(b"QUIT")
        assert status.startswith(b"+OK"), status
        self.check_quit(status)

    def check_quit(self, status: bytes) -> None:
        self.closed = True
        left = sorted(
            oracles.canonical(p.read_bytes())
            for sub in ("new", "cur") for p in (self.tmp / "mailroot" / HOST / "ted" / sub).iterdir())
        if self.state == "transaction":
            expected = [self.canon[n - 1] for n in self.live()]
        else:
            expected = list(self.canon)
        assert Counter(left) == Counter(expected), (left, expected)

    @precondition(lambda self: self.started and self.closed)
    @rule()
    def after_close(self) -> None:
        self.proto.dataReceived(b"NOOP\r\n")
        assert self.transport.value() == b""

    @invariant()
    def no_stray_output(self) -> None:
        if self.started:
            assert self.transport.value() == b""


TestPop3Session = Pop3Session.TestCase
TestPop3Session.__doc__ = ("Generated POP3 command sequences over generated Maildir files keep "
                           "the response, RETR/LIST and DELE invariants of the module docstring.")
