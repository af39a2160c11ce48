"""Stateful property tests of the real IMAP session (imap/server.py through its factory, over the
real Maildir store in a temporary folder, the unit tier's fake checker and a StringTransport):
hypothesis fills INBOX with generated messages (as a delivery leaves them in new/, LF line
ends), then drives generated command sequences: LOGIN right and wrong, SELECT/EXAMINE, APPEND
with a synchronising or a LITERAL+ literal, FETCH BODY[] / BODY.PEEK[] / FLAGS / UID /
RFC822.SIZE of any sequence set, STORE, SEARCH, EXPUNGE, NOOP, STATUS, garbage and bad
sequence sets, several commands pipelined in one write or cut in pieces, IDLE ... DONE. After
every step:

- every tagged command got exactly one tagged completion (OK, NO or BAD), in order, and every
  output line is a well-formed response (tests/fuzz/imap_oracles.py);
- FETCH BODY[] of a message returns the stored bytes exactly (CRLF line ends), and
  RFC822.SIZE is their length;
- EXISTS and EXPUNGE keep the session's count equal to the model's;
- nothing reached Twisted's log as a failure or an error.

20 examples of up to 20 steps in CI (in /dev/shm where it exists); ``IMAP_STATEFUL_EXAMPLES`` asks for more.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from pop3coexist.config import Config, DomainsConfig, ImapConfig, ServerConfig
from pop3coexist.imap.factory import IMAPServerFactory
from pop3coexist.store.maildir import MaildirStore
from tests.fuzz import imap_oracles, oracles
from tests.fuzz.harnesses import settle
from tests.support.fakes import FakeChecker, sync_run_blocking

HOST = "pop.contoso.test"
TED = f"ted@{HOST}"
PW = "ted imap secret"

# no NUL: an IMAP literal may not carry one (RFC 3501 section 4.3, CHAR8); and a NUL-bracketed
# marker in a body is a known defect (tests/fuzz/test_imap_regressions.py)
text_line = st.binary(max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"@"))
messages = st.lists(text_line, min_size=1, max_size=6).map(
    lambda lines: b"Subject: s\r\n\r\n" + b"".join(x + b"\r\n" for x in lines))
seqsets = st.one_of(st.sampled_from(["1", "*", "1:*", "2:3", "1,3", "3:1"]),
                    st.integers(1, 9).map(str))
garbage = st.one_of(st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
                    st.sampled_from([b"x FETCH", b"y FETCH a:b (FLAGS)", b"z STORE 1 +FLAGS (\\Bogus",
                                     b"w UID FROB 1", b"v SEARCH UNDEFINED", b"u LIST", b"t SELECT",
                                     b"s APPEND INBOX {0}", b"r ENABLE", b"q ID (\"a\")"]))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class ImapSession(RuleBasedStateMachine):
    """One mailbox and one session per example; ``self.model`` is INBOX in message order."""

    def __init__(self) -> None:
        super().__init__()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.tmp = Path(tempfile.mkdtemp(prefix="imap-stateful-", dir=shm))  # tmpfs: cheap fsync
        self.store = MaildirStore(self.tmp / "mailroot")
        self.store.add_domain(HOST)
        self.store.add_mailbox(HOST, "ted")
        self.clock = task.Clock()
        checker = FakeChecker({TED: PW}, local_domains=(HOST,), offers_secrets=False)
        config = Config(server=ServerConfig(HOST, self.tmp), domains=DomainsConfig(local=(HOST,)),
                        imap=ImapConfig(auth_failure_delay=0.0))
        self.factory = IMAPServerFactory(config, self.store, checker, reactor=self.clock,
                                         run_blocking=sync_run_blocking, tls_options=None)
        self.logged = oracles.no_logged_failures()
        self.logged.__enter__()
        self.model: list[bytes] = []
        self.state = "unauth"
        self.count = 0  # the session's idea of EXISTS
        self.n = 0
        self.proto = None

    @initialize(stored=st.lists(messages, max_size=4))
    def fill(self, stored: list[bytes]) -> None:
        new = self.tmp / "mailroot" / HOST / "ted" / "new"
        for i, data in enumerate(stored):
            (new / f"17000000{i:02d}.M{i}P1.gen").write_bytes(data.replace(b"\r\n", b"\n"))
            self.model.append(data)
        # a first session looks at INBOX, so the delivered messages have their UIDs (in
        # delivery order) before any APPEND: UIDs are given when a message is first seen
        for first in (True, False):
            self.proto = self.factory.buildProtocol(None)
            self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                             hostAddress=IPv4Address("TCP", "127.0.0.1", 143))
            self.proto.makeConnection(self.transport)
            assert self.take().startswith(b"* OK [CAPABILITY IMAP4rev1")
            if first:
                self.send([f'F1 LOGIN {TED} "{PW}"'.encode(), b"F2 STATUS INBOX (MESSAGES)",
                           b"F3 LOGOUT"])
                self.proto.connectionLost(None)

    def teardown(self) -> None:
        try:
            if self.proto is not None:
                self.proto.connectionLost(None)
            self.logged.__exit__(None, None, None)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -------------------------------------------------------------- helpers

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def tag(self) -> bytes:
        self.n += 1
        return b"T%d" % self.n

    def send(self, commands: list[bytes], cuts: int = 0) -> list[bytes]:
        """Send tagged commands (pipelined; cut in ``cuts``-octet pieces if given); check one
        tagged completion each, in order; return the responses."""
        data = b"".join(c + b"\r\n" for c in commands)
        pieces = [data[i:i + cuts] for i in range(0, len(data), cuts)] if cuts else [data]
        for piece in pieces:
            self.proto.dataReceived(piece)
            settle(self.clock, lambda: self.proto._busy)  # log-in failure delays
        out = self.take()
        responses = imap_oracles.split_responses(out)
        sent = [imap_oracles.tag_of(c) for c in commands]
        tags = imap_oracles.check_transcript(commands, out)
        assert tags == sent, f"tagged replies {tags!r} for commands {sent!r}\n{out[:2000]!r}"
        for r in responses:
            m = re.match(rb"\* (\d+) (EXISTS|EXPUNGE)\Z", r)
            if m and m.group(2) == b"EXISTS":
                self.count = int(m.group(1))
            elif m:
                self.count -= 1
        return responses

    @staticmethod
    def status(responses: list[bytes], tag: bytes) -> bytes:
        return [r for r in responses if r.startswith(tag + b" ")][-1].split(b" ")[1]

    # -------------------------------------------------------------- rules

    @rule(right=st.booleans())
    def login(self, right: bool) -> None:
        t = self.tag()
        pw = PW if right else "wrong"
        r = self.send([t + f' LOGIN {TED} "{pw}"'.encode()])
        if self.state == "unauth":
            assert self.status(r, t) == (b"OK" if right else b"NO"), r
            if right:
                self.state = "auth"
        else:
            assert self.status(r, t) == b"BAD", r

    @precondition(lambda self: self.state != "unauth")
    @rule(readonly=st.booleans())
    def select(self, readonly: bool) -> None:
        t = self.tag()
        r = self.send([t + (b" EXAMINE INBOX" if readonly else b" SELECT INBOX")])
        assert self.status(r, t) == b"OK", r
        assert self.count == len(self.model), (self.count, len(self.model), r)
        self.state = "selected"

    @precondition(lambda self: self.state != "unauth")
    @rule(data=messages, plus=st.booleans(), cuts=st.sampled_from([0, 1, 7]))
    def append(self, data: bytes, plus: bool, cuts: int) -> None:
        t = self.tag()
        lit = b"{%d+}" % len(data) if plus else b"{%d}" % len(data)
        command = t + b" APPEND INBOX (\\Flagged) " + lit + b"\r\n" + data
        r = self.send([command], cuts)
        assert self.status(r, t) == b"OK", r
        assert plus or any(x.startswith(b"+ ") for x in r), r
        self.model.append(data)
        if self.state == "selected":
            assert self.count == len(self.model), (self.count, r)

    @precondition(lambda self: self.state == "selected")
    @rule(seq=seqsets, peek=st.booleans(), uid=st.booleans())
    def fetch_body(self, seq: str, peek: bool, uid: bool) -> None:
        t = self.tag()
        item = b"BODY.PEEK[]" if peek else b"BODY[]"
        verb = b" UID FETCH " if uid else b" FETCH "
        if uid:
            seq = "1:*"  # UIDs are the server's; fetch them all
        r = self.send([t + verb + seq.encode() + b" (" + item + b" RFC822.SIZE UID FLAGS)"])
        status = self.status(r, t)
        if not self.model:
            assert status in (b"OK", b"NO", b"BAD"), r
            return
        if status != b"OK":  # a message number beyond EXISTS: BAD (RFC 3501 section 9, seq-number)
            numbers = [int(x) for x in re.findall(r"\d+", seq)]
            assert not uid and max(numbers, default=0) > len(self.model), (seq, r)
            return
        for resp in r:
            m = re.match(rb"\* (\d+) FETCH \(", resp)
            if not m:
                continue
            n = int(m.group(1))
            expected = self.model[n - 1]
            body = re.search(rb"BODY\[\] \{(\d+)\}\r\n", resp)
            assert body, resp[:300]
            got = resp[body.end():body.end() + int(body.group(1))]
            assert got == expected, (n, got, expected)
            size = re.search(rb"RFC822\.SIZE (\d+)", resp)
            assert size and int(size.group(1)) == len(expected), resp[:300]

    @precondition(lambda self: self.state == "selected")
    @rule(seq=seqsets, op=st.sampled_from([b"+FLAGS", b"-FLAGS", b"FLAGS", b"+FLAGS.SILENT"]),
          flags=st.sampled_from([b"(\\Seen)", b"(\\Deleted)", b"(\\Flagged \\Answered)", b"()", b"(\\Draft $Label)"]))
    def store_flags(self, seq: str, op: bytes, flags: bytes) -> None:
        t = self.tag()
        self.send([t + b" STORE " + seq.encode() + b" " + op + b" " + flags])

    @precondition(lambda self: self.state == "selected")
    @rule()
    def expunge(self) -> None:
        t = self.tag()
        fetch = self.tag()
        r = self.send([fetch + b" FETCH 1:* (FLAGS)", t + b" EXPUNGE"])
        if self.status(r, t) != b"OK":
            return
        deleted = sorted((int(m.group(1)) for x in r if (m := re.match(rb"\* (\d+) FETCH \(FLAGS \([^)]*\\Deleted", x))),
                         reverse=True)
        for n in deleted:
            del self.model[n - 1]
        assert self.count == len(self.model), (self.count, len(self.model), r)

    @precondition(lambda self: self.state != "unauth")
    @rule(keys=st.sampled_from([b"ALL", b"UNSEEN", b"DELETED", b"SUBJECT s", b"LARGER 10", b"NOT SEEN"]))
    def search_status_noop(self, keys: bytes) -> None:
        a, b, c = self.tag(), self.tag(), self.tag()
        r = self.send([a + b" SEARCH " + keys, b + b" STATUS INBOX (MESSAGES UIDNEXT)", c + b" NOOP"])
        if self.state == "selected":
            found = [x for x in r if x.startswith(b"* SEARCH")]
            assert len(found) == 1, r
            if keys == b"ALL":
                assert found[0].split()[2:] == [str(i).encode() for i in range(1, len(self.model) + 1)], r
        status = [x for x in r if x.startswith(b"* STATUS")]
        assert status and b"MESSAGES %d" % len(self.model) in status[0], (status, len(self.model))

    @rule(junk=st.lists(garbage, min_size=1, max_size=3), cuts=st.sampled_from([0, 3]))
    def garbage(self, junk: list[bytes], cuts: int) -> None:
        """Garbage lines each get a tagged BAD/NO (or an untagged BAD when the tag is bad),
        and the session lives on (a NOOP after them is answered OK)."""
        t = self.tag()
        lines = [j for j in junk if not re.search(rb"\{\d+\+?\}$", j)]
        data = b"".join(j + b"\r\n" for j in lines) + t + b" NOOP\r\n"
        for i in range(0, len(data), cuts or len(data)):
            self.proto.dataReceived(data[i:i + (cuts or len(data))])
        out = self.take()
        assert not self.transport.disconnecting, out
        responses = imap_oracles.split_responses(out)
        assert responses and responses[-1].startswith(t + b" OK"), out[-500:]
        for r in responses:
            m = re.match(rb"\* (\d+) (EXISTS|EXPUNGE)\Z", r)
            if m and m.group(2) == b"EXISTS":
                self.count = int(m.group(1))
            elif m:
                self.count -= 1
        self.state = self.state  # garbage cannot change the state (no valid LOGIN/SELECT)

    @precondition(lambda self: self.state == "selected")
    @rule()
    def idle(self) -> None:
        t = self.tag()
        self.proto.dataReceived(t + b" IDLE\r\n")
        assert self.take().startswith(b"+ ")
        self.proto.dataReceived(b"DONE\r\n")
        out = self.take()
        assert imap_oracles.split_responses(out)[-1].startswith(t + b" OK"), out

    @invariant()
    def alive(self) -> None:
        if self.proto is not None:
            assert not self.transport.disconnecting


TestImapSession = pytest.mark.timeout(600)(ImapSession.TestCase)
TestImapSession.settings = settings(max_examples=int(os.environ.get("IMAP_STATEFUL_EXAMPLES", "20")),
                                    stateful_step_count=20, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
