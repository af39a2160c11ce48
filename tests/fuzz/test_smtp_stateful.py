"""Stateful property tests of the real ESMTP session (smtp.server.ESMTPServer over the unit-tier
fakes and a TLS-capable StringTransport): hypothesis generates command sequences (EHLO/HELO,
MAIL, RCPT, DATA with generated bodies, RSET, NOOP, VRFY, HELP, unknown and binary lines,
over-long lines, STARTTLS, AUTH PLAIN/LOGIN/CRAM-MD5 exchanges with right and wrong
secrets, cancelled exchanges), sends them one by one, pipelined in one write, or cut into
random pieces, and after every step checks:

- every complete command line got exactly one well-formed reply, in order, with one code and a
  code its verb may get (``oracles.smtp_expected_replies`` over the whole transcript);
- nothing reached Twisted's log as a failure or an error;
- the model's view of the session: MAIL only after EHLO/HELO (and not after STARTTLS until a
  new EHLO), RCPT only after MAIL, DATA only with a recipient, no relay for an unauthenticated
  stranger, relay after AUTH;
- DATA in equals message out: a 250 after the dot means every local recipient's mailbox (and
  the queue, for the relay domain) got the unstuffed body byte for byte (LF line ends).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.fuzz import oracles
from tests.fuzz.harnesses import settle
from tests.support.smtp_fakes import HOST, RELAY_DOMAIN, make_factory, open_session

GOOD = {"ted@pop.contoso.test": "secret1", "ann@pop.contoso.test": "secret2"}
LOCAL = ["ted@pop.contoso.test", "Ann@Pop.Contoso.Test", "theodore@pop.contoso.test"]
UNKNOWN_LOCAL = ["nobody@pop.contoso.test"]
RELAY = [f"bob@{RELAY_DOMAIN}"]
FOREIGN = ["eve@elsewhere.test", "x@[192.0.2.1]"]
BAD_PATHS = ["<a@b@c.test>", "<@x.test>", "<a b@c.test>", "<ted@pop.contoso.test",
             "ted@pop.contoso.test", "<\"q\"@>", "<é@x.test>", "<a@192.0.2.1>"]

text_line = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
body_line = st.one_of(
    text_line,
    st.sampled_from([b".", b"..", b".x", b"From x", b"Received: hop", b"Return-Path: <x>",
                     b" folded", b"", b"Subject: s", b"\x00\x7f\xff"]),
)
# a header (maybe none), the empty line (maybe none), body lines: all CRLF lines
bodies = st.lists(body_line, max_size=12).map(lambda lines: b"".join(x + b"\r\n" for x in lines))


def stuff(content: bytes) -> bytes:
    """Dot-stuff CRLF text (RFC 5321 section 4.5.2) and add the end marker."""
    lines = content.split(b"\r\n")[:-1] if content else []
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SmtpSession(RuleBasedStateMachine):
    """One SMTP session per example; the model tracks what the session must allow."""

    def __init__(self) -> None:
        super().__init__()
        self.factory, self.store, self.checker, self.queue, self.clock = make_factory()
        self.proto, self.transport = open_session(self.factory, peer="203.0.113.5")
        greeting = self.transport.value()
        assert greeting == b"220 pop.contoso.test ESMTP pop3coexist\r\n", greeting
        self.transport.clear()
        self.chunks: list[bytes] = []
        self.output = b""
        self.logged = oracles.no_logged_failures()
        self.logged.__enter__()
        self.helo = False
        self.esmtp = False
        self.secure = False
        self.user: str | None = None
        self.txn = False
        self.rcpts: list[str] = []
        self.closed = False

    def teardown(self) -> None:
        try:
            if not self.closed:
                self.proto.connectionLost(None)
        finally:
            for path in (self.store._spool, self.store._links):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            self.logged.__exit__(None, None, None)

    # -- sending

    def send(self, *chunks: bytes) -> list[tuple[int, list[bytes]]]:
        """Send ``chunks`` (each answered before the next), return the new replies."""
        before = len(oracles.split_smtp_replies(self.output))
        for chunk in chunks:
            if self.transport.disconnecting:
                break
            self.chunks.append(chunk)
            self.proto.dataReceived(chunk)
            settle(self.clock, lambda: self.proto._busy)
            self.output += self.transport.value()
            self.transport.clear()
        replies = oracles.split_smtp_replies(self.output)
        oracles.smtp_expected_replies(self.chunks, replies)
        if self.transport.disconnecting:
            self.closed = True
        return replies[before:]

    def command(self, line: bytes, cut: int = 0) -> int:
        """Send one command line (cut into pieces when ``cut``); return its reply code."""
        data = line + b"\r\n"
        pieces = [data] if not cut else [data[i : i + cut] for i in range(0, len(data), cut)]
        replies = self.send(*pieces)
        assert len(replies) >= 1, line
        if len(replies) == 2:
            assert replies[1][0] == 421  # the closing notice after too many errors
        return replies[0][0]

    # -- rules

    @precondition(lambda self: not self.closed)
    @rule(esmtp=st.booleans(), name=st.sampled_from([b"client.test", b"[192.0.2.9]", b"", b"a b"]),
          cut=st.integers(0, 5))
    def hello(self, esmtp: bool, name: bytes, cut: int) -> None:
        code = self.command((b"EHLO " if esmtp else b"HELO ") + name, cut)
        if name in (b"", b"a b"):
            assert code == 501
            return
        assert code == 250
        self.helo, self.esmtp, self.txn, self.rcpts = True, esmtp, False, []

    @precondition(lambda self: not self.closed)
    @rule(sender=st.sampled_from(["<>", "<a@b.test>", "<ted@pop.contoso.test>", *BAD_PATHS]),
          params=st.sampled_from(["", " SIZE=100", " BODY=8BITMIME RET=HDRS ENVID=x+2By",
                                  " SIZE=99999999999", " FOO", " RET=BAD", " SIZE=1 SIZE=2"]))
    def mail(self, sender: str, params: str) -> None:
        code = self.command(f"MAIL FROM:{sender}{params}".encode())
        if not self.helo or self.txn:
            assert code == 503, code
            return
        if code == 250:
            assert sender not in BAD_PATHS and params in ("", " SIZE=100",
                                                          " BODY=8BITMIME RET=HDRS ENVID=x+2By")
            self.txn, self.rcpts = True, []
        else:
            assert code // 100 in (4, 5), code

    @precondition(lambda self: not self.closed)
    @rule(rcpt=st.sampled_from(LOCAL + UNKNOWN_LOCAL + RELAY + FOREIGN),
          params=st.sampled_from(["", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40y.test",
                                  " NOTIFY=NEVER,SUCCESS", " ORCPT=bad"]))
    def rcpt(self, rcpt: str, params: str) -> None:
        code = self.command(f"RCPT TO:<{rcpt}>{params}".encode())
        if not self.txn:
            assert code == 503, code
            return
        if params in (" NOTIFY=NEVER,SUCCESS", " ORCPT=bad"):
            assert code == 501, code
            return
        if rcpt in FOREIGN:
            # no relay for an unauthenticated stranger; an authenticated user may relay
            assert (code == 250) == (self.user is not None), (rcpt, code, self.user)
        elif rcpt in UNKNOWN_LOCAL:
            assert code == 550, code
        else:
            assert code == 250, (rcpt, code)
        if code == 250:
            self.rcpts.append(rcpt)

    @precondition(lambda self: not self.closed)
    @rule(body=bodies, cut=st.integers(0, 7), header=st.booleans())
    def data(self, body: bytes, cut: int, header: bool) -> None:
        content = (b"Subject: fuzz\r\n\r\n" if header else b"X-A: 1\r\n\r\n") + body
        code = self.command(b"DATA")
        if not self.txn or not self.rcpts:
            assert code in (503, 554), code
            return
        assert code == 354, code
        wire = stuff(content)
        pieces = [wire] if not cut else [wire[i : i + cut] for i in range(0, len(wire), cut)]
        replies = self.send(*pieces)
        assert len(replies) == 1, replies
        code = replies[0][0]
        self.txn, rcpts, self.rcpts = False, self.rcpts, []
        if code != 250:
            assert code in (550, 552), (code, content)  # a line or the message too long
            return
        expected = content.replace(b"\r\n", b"\n")
        for rcpt in rcpts:
            if rcpt.lower().endswith("@" + HOST):
                box = "ted@" + HOST if rcpt.startswith("theodore") else rcpt
                stored = self.store.messages(box)[-1]
                assert stored.endswith(b"\n" + expected), (stored, expected)
            else:
                stored = self.queue.items[-1][0]
                assert stored.endswith(b"\n" + expected), (stored, expected)

    @precondition(lambda self: not self.closed)
    @rule(verb=st.sampled_from([b"RSET", b"NOOP", b"HELP", b"VRFY ted", b"EXPN list", b"BDAT 1",
                                b"RSET x", b"XYZZY", b"", b"MAIL", b"RCPT TO:", b"DATA x"]))
    def simple(self, verb: bytes) -> None:
        code = self.command(verb)
        if verb == b"RSET":
            assert code == 250
            self.txn, self.rcpts = False, []

    @precondition(lambda self: not self.closed)
    @rule(line=st.binary(max_size=60))
    def garbage(self, line: bytes) -> None:
        data = line.replace(b"\n", b"") + b"\r\n"
        replies = self.send(data)
        assert len(replies) >= 1
        code = replies[0][0]
        if code == 250 and data[:4].upper() == b"RSET":
            self.txn, self.rcpts = False, []
        # garbage must not change the model's state in other ways we rely on
        if code in (221,):
            self.closed = True
        if code in (250, 235, 354, 334):
            verb = data.split(b" ", 1)[0].strip().upper()
            assert verb in (b"NOOP", b"RSET", b"HELP", b"EHLO", b"HELO", b"VRFY"), (data, code)
            if verb in (b"EHLO", b"HELO"):
                self.helo, self.esmtp, self.txn, self.rcpts = True, verb == b"EHLO", False, []

    @precondition(lambda self: not self.closed)
    @rule(size=st.sampled_from([2049, 5000, 13000]))
    def long_line(self, size: int) -> None:
        code = self.command(b"NOOP " + b"x" * size)
        assert code == 500, code

    @precondition(lambda self: not self.closed)
    @rule(tail=st.sampled_from([b"", b"MAIL FROM:<evil@x.test>\r\n", b"RSET\r\nNOOP\r\n"]))
    def starttls(self, tail: bytes) -> None:
        replies = self.send(b"STARTTLS\r\n" + tail)
        code = replies[0][0]
        if self.secure:
            assert code == 503
            # refused: the pipelined commands after it are commands like any other
            for line, (tail_code, _) in zip(tail.split(b"\r\n"), replies[1:], strict=False):
                if line.startswith(b"MAIL") and tail_code == 250:
                    self.txn, self.rcpts = True, []
                elif line == b"RSET":
                    self.txn, self.rcpts = False, []
            return
        assert code == 220 and len(replies) == 1, replies  # pipelined commands discarded
        assert self.transport.tls_started
        self.secure, self.helo, self.esmtp, self.user = True, False, False, None
        self.txn, self.rcpts = False, []

    @precondition(lambda self: not self.closed)
    @rule(account=st.sampled_from(sorted(GOOD)), right=st.booleans(),
          mech=st.sampled_from(["PLAIN", "PLAIN-INITIAL", "LOGIN", "CRAM-MD5", "CANCEL"]))
    def auth(self, account: str, right: bool, mech: str) -> None:
        secret = GOOD[account] if right else "wrong"
        allowed = self.helo and self.esmtp and self.user is None and not self.txn
        if mech == "PLAIN-INITIAL":
            codes = [self.command(b"AUTH PLAIN " + _b64(f"\0{account}\0{secret}".encode()))]
        elif mech == "PLAIN":
            codes = [self.command(b"AUTH PLAIN")]
            if codes[0] == 334:
                codes.append(self.command(_b64(f"\0{account}\0{secret}".encode())))
        elif mech == "LOGIN":
            codes = [self.command(b"AUTH LOGIN")]
            for answer in (account, secret):
                if codes[-1] != 334:
                    break
                codes.append(self.command(_b64(answer.encode())))
        elif mech == "CRAM-MD5":
            replies = self.send(b"AUTH CRAM-MD5\r\n")
            codes = [replies[0][0]]
            if codes[0] == 334:
                challenge = base64.b64decode(replies[0][1][0])
                digest = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()
                codes.append(self.command(_b64(f"{account} {digest}".encode())))
        else:
            codes = [self.command(b"AUTH LOGIN")]
            if codes[0] == 334:
                codes.append(self.command(b"*"))
                assert codes[-1] == 501, codes
                return
        if not allowed:
            assert codes[0] == 503, codes
            return
        assert codes[-1] == (235 if right and mech != "CANCEL" else 535), (mech, right, codes)
        if codes[-1] == 235:
            self.user = account

    @precondition(lambda self: not self.closed)
    @rule(rcpt=st.sampled_from(LOCAL + RELAY), body=bodies)
    def pipelined_transaction(self, rcpt: str, body: bytes) -> None:
        """MAIL, RCPT, DATA in one write (RFC 2920), then the body."""
        # an authenticated client sends as itself (others' addresses get 553 5.7.1)
        sender = self.user or "p@q.test"
        replies = self.send(f"RSET\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        codes = [c for c, _ in replies]
        self.txn, self.rcpts = False, []
        if not self.helo:
            assert codes == [250, 503, 503, 503], codes
            return
        assert codes == [250, 250, 250, 354], codes
        content = b"Subject: p\r\n\r\n" + body
        [(code, _)] = self.send(stuff(content))
        assert code in (250, 550, 552), code

    @precondition(lambda self: not self.closed)
    @rule()
    def quit(self) -> None:
        assert self.command(b"QUIT") == 221
        assert self.transport.disconnecting
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule(data=st.binary(max_size=40))
    def after_close(self, data: bytes) -> None:
        """Input after QUIT or 421 gets no reply."""
        self.proto.dataReceived(data + b"\r\n")
        assert self.transport.value() == b""

    @invariant()
    def nothing_after_close(self) -> None:
        if self.closed:
            assert self.transport.value() == b""


TestSmtpSession = SmtpSession.TestCase
TestSmtpSession.__doc__ = ("Generated ESMTP command sequences (pipelined, cut, STARTTLS, AUTH, "
                           "DATA) keep the reply, relay and DATA invariants of the module "
                           "docstring.")
