"""DATA in equals RETR out, across both protocols and the real Maildir store: a generated
message sent through the real ESMTP session (CRLF lines, bare-LF lines as ``normalize``
allows, dot lines, header-like lines, NUL and 8-bit octets, cut into pieces), made durable by
the real group committer into a real MaildirStore, then fetched with the real POP3 session:
RETR's unstuffed content ends with exactly the lines the client sent (each line end as CRLF),
LIST's size equals RETR's octets, and nothing is logged as a failure."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address

from pop3coexist.pop3.factory import POP3ServerFactory
from pop3coexist.store.maildir import MaildirStore
from tests.fuzz import oracles
from tests.fuzz.test_smtp_stateful import stuff
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.support.smtp_fakes import make_factory, open_session
from tests.unit.pop3_env import TLSTransport, make_config

pytestmark = pytest.mark.timeout(600)

HOST = "pop.contoso.test"

content_line = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b". x", b"From me", b"Return-Path: <x>", b"Received: y",
                     b" folded", b"", b"\x00", b"\xff\xfe", b"a\nb", b".\n.", b"\x1a"]),
)
bodies = st.lists(content_line, max_size=15).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@given(body=bodies, cut=st.integers(0, 9))
def test_data_in_equals_retr_out(body: bytes, cut: int) -> None:
    """A message's body lines come back from RETR exactly as sent (line ends as CRLF)."""
    tmp = Path(tempfile.mkdtemp(prefix="roundtrip-fuzz-"))
    try:
        store = MaildirStore(tmp / "mailroot", hostname="mx.test")
        store.add_domain(HOST)
        store.add_mailbox(HOST, "ted")
        content = b"Subject: round trip\r\n\r\n" + body
        with oracles.no_logged_failures():
            factory, *_ = make_factory(store=store)
            smtp, t = open_session(factory)
            smtp.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"
                              b"RCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n")
            wire = stuff(content)
            for i in range(0, len(wire), cut or len(wire)):
                smtp.dataReceived(wire[i : i + (cut or len(wire))])
            replies = oracles.split_smtp_replies(t.value())
            assert replies[-1][0] == 250, replies

            clock = task.Clock()
            pop = POP3ServerFactory(make_config(), store, FakeChecker({f"ted@{HOST}": "pw"}),
                                    reactor=clock, run_blocking=sync_run_blocking).buildProtocol(None)
            pt = TLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                              hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
            pop.makeConnection(pt)
            pt.clear()
            chunks = [b"USER ted@pop.contoso.test\r\nPASS pw\r\nLIST\r\nRETR 1\r\nQUIT\r\n"]
            pop.dataReceived(chunks[0])
            transcript = oracles.Pop3Transcript()
            transcript.check(chunks, pt.value())
        retr = transcript.responses[3]
        assert retr[1].startswith(b"+OK"), retr
        sent = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert retr[2].endswith(b"\r\n" + sent), (retr[2], sent)
        assert transcript.list_sizes[1] == len(retr[2])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
