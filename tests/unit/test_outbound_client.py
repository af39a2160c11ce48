"""The outbound ESMTP client (smtp/client.py), byte by byte over StringTransport."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure

from pop3coexist.smtp import client as c

BODY = b"Subject: t\n\n.leading dot\nline\r\n..two\nno newline at end"


class Harness:
    """One client connected to a StringTransport; ``server(line)`` feeds a reply."""

    def __init__(self, tmp_path: Path, settings: c.ClientSettings | None = None,
                 rcpts: tuple[str, ...] = ("b@example.net",), **txn: object) -> None:
        body = tmp_path / "body"
        body.write_bytes(txn.pop("body_bytes", BODY))  # type: ignore[arg-type]
        self.txn = c.Transaction(
            sender="a@example.org",
            recipients=[{"address": r, "notify": txn.get("notify"), "orcpt": txn.get("orcpt")}
                        for r in rcpts],
            body_path=body, size=len(BODY), ret=txn.get("ret"), envid=txn.get("envid"),  # type: ignore[arg-type]
        )
        self.results: list[c.TransactionResult] = []
        self.settings = settings or c.ClientSettings(helo="pop.contoso.test", tls="none")
        self.proto = c.OutboundESMTP(self.settings, self.txn, self.results.append)
        self.clock = Clock()
        self.proto.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def server(self, *lines: bytes) -> bytes:
        """Send reply lines to the client; return what the client wrote in answer."""
        for line in lines:
            self.proto.dataReceived(line + b"\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        out = self.transport.value()
        self.transport.clear()
        return out

    def close(self) -> c.TransactionResult:
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        assert len(self.results) == 1
        return self.results[0]


EHLO_DSN = (b"250-mx.example.net hello", b"250-SIZE 1000000", b"250-DSN", b"250 8BITMIME")


def test_one_transaction_with_dsn_parameters_and_per_recipient_replies(tmp_path: Path) -> None:
    """MAIL carries SIZE/RET/ENVID, RCPT carries NOTIFY/ORCPT; each RCPT reply is kept;
    the body is CRLF and dot-stuffed; QUIT ends the session."""
    h = Harness(tmp_path, rcpts=("b@example.net", "x@example.net", "y@example.net"),
                notify=["SUCCESS", "FAILURE"], orcpt="rfc822;b+x@example.net", ret="HDRS",
                envid="E=1")
    assert h.server(b"220 mx.example.net ESMTP") == b"EHLO pop.contoso.test\r\n"
    assert h.server(*EHLO_DSN) == b"MAIL FROM:<a@example.org> SIZE=%d RET=HDRS ENVID=E+3D1\r\n" % len(BODY)
    assert h.server(b"250 2.1.0 ok") == (
        b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net\r\n")
    assert h.server(b"250 2.1.5 ok").startswith(b"RCPT TO:<x@example.net>")
    assert h.server(b"550 5.1.1 no such user").startswith(b"RCPT TO:<y@example.net>")
    assert h.server(b"452 4.2.2 mailbox full") == b"DATA\r\n"
    body = h.server(b"354 go ahead")
    assert body == (b"Subject: t\r\n\r\n..leading dot\r\nline\r\n...two\r\n"
                    b"no newline at end\r\n.\r\n")
    assert h.server(b"250 2.0.0 queued as 1") == b"QUIT\r\n"
    h.server(b"221 bye")
    result = h.close()
    assert result.dsn and result.connected
    got = {r.address: (r.code, r.reply) for r in result.replies}
    assert got == {
        "b@example.net": (250, "250 2.0.0 queued as 1"),
        "x@example.net": (550, "550 5.1.1 no such user"),
        "y@example.net": (452, "452 4.2.2 mailbox full"),
    }
    assert result.replies[1].enhanced == "5.1.1" and result.replies[1].permanent


def test_no_dsn_extension_means_no_dsn_parameters(tmp_path: Path) -> None:
    """Without DSN in EHLO, NOTIFY/ORCPT/RET are not sent (the runner reports "relayed")."""
    h = Harness(tmp_path, notify=["SUCCESS"], ret="FULL")
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 SIZE") == b"MAIL FROM:<a@example.org> SIZE=%d\r\n" % len(BODY)
    assert h.server(b"250 ok") == b"RCPT TO:<b@example.net>\r\n"


def test_quoted_sender_and_recipient_go_out_as_stored(tmp_path: Path) -> None:
    """The queue stores str(Address), the canonical quoted form (issue 11 fault 2): the client
    sends it back out inside <> unchanged, so a quoted local part reaches the next hop intact."""
    from pop3coexist.address import parse_address

    sender = str(parse_address('"odd \\"sender\\""@example.org'))
    rcpt = str(parse_address('"far away"@[IPv6:2001:db8::9]'))
    h = Harness(tmp_path, rcpts=(rcpt,))
    h.txn.sender = sender
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 SIZE") == \
        b'MAIL FROM:<"odd \\"sender\\""@example.org> SIZE=%d\r\n' % len(BODY)
    assert h.server(b"250 ok") == b'RCPT TO:<"far away"@[IPv6:2001:db8::9]>\r\n'


def test_all_recipients_refused_sends_no_data(tmp_path: Path) -> None:
    """When no RCPT is accepted there is no DATA; every recipient keeps its own reply."""
    h = Harness(tmp_path, rcpts=("b@example.net",))
    h.server(b"220 x")
    h.server(b"250 x")
    h.server(b"250 ok")
    assert h.server(b"550 5.7.1 relay denied") == b"QUIT\r\n"
    assert h.close().replies[0].reply == "550 5.7.1 relay denied"


def test_mail_from_refused_applies_to_everyone(tmp_path: Path) -> None:
    """A refused MAIL FROM is each recipient's reply (here temporary)."""
    h = Harness(tmp_path, rcpts=("b@example.net", "c@example.net"))
    h.server(b"220 x")
    h.server(b"250 x")
    assert h.server(b"451 4.3.0 try later") == b"QUIT\r\n"
    assert [r.code for r in h.close().replies] == [451, 451]


def test_data_refused_after_body_is_each_accepted_recipients_reply(tmp_path: Path) -> None:
    """The reply to the final dot decides for every accepted recipient."""
    h = Harness(tmp_path)
    for line in (b"220 x", b"250 x", b"250 ok", b"250 ok", b"354 go"):
        h.server(line)
    assert h.server(b"554 5.6.0 content rejected") == b"QUIT\r\n"
    assert h.close().replies[0].reply == "554 5.6.0 content rejected"


def test_helo_fallback_when_ehlo_is_refused(tmp_path: Path) -> None:
    """An old server refusing EHLO gets HELO (when neither TLS nor AUTH is required)."""
    h = Harness(tmp_path)
    h.server(b"220 x")
    assert h.server(b"502 unknown command") == b"HELO pop.contoso.test\r\n"
    assert h.server(b"250 x").startswith(b"MAIL FROM:<a@example.org>")


def test_bad_greeting_is_temporary_and_not_connected(tmp_path: Path) -> None:
    """A 554 greeting defers (try the next MX), never fails the mail."""
    h = Harness(tmp_path)
    assert h.server(b"554 no service") == b"QUIT\r\n"
    result = h.close()
    assert not result.connected and result.replies[0].code // 100 == 4


def test_tls_required_without_starttls_sends_nothing(tmp_path: Path) -> None:
    """tls=required and no STARTTLS offered: the mail is deferred and no MAIL is sent."""
    settings = c.ClientSettings(helo="h.test", tls="required", tls_name="mx.example.net")
    h = Harness(tmp_path, settings=settings)
    h.server(b"220 x")
    out = h.server(b"250-x", b"250 AUTH PLAIN")
    assert b"MAIL" not in out and b"AUTH" not in out
    result = h.close()
    assert result.replies[0].code == 454 and "STARTTLS" in result.replies[0].reply


def test_tls_required_and_starttls_refused_defers(tmp_path: Path) -> None:
    """A refused STARTTLS under tls=required defers; nothing is sent in clear text after it."""
    settings = c.ClientSettings(helo="h.test", tls="required", tls_name="mx.example.net")
    h = Harness(tmp_path, settings=settings)
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 STARTTLS") == b"STARTTLS\r\n"
    out = h.server(b"454 4.7.0 TLS not available")
    assert b"MAIL" not in out
    assert h.close().replies[0].reply.startswith("454 4.7.4 STARTTLS refused")


def _auth_settings(tls: str = "none", password: str = "s3cret-pw") -> c.ClientSettings:
    return c.ClientSettings(helo="h.test", tls=tls, username="relay@contoso.test",
                            password=c.Secret(password))


def test_auth_cram_md5_is_preferred(tmp_path: Path) -> None:
    """With CRAM-MD5 offered it is used, and the response is the RFC 2195 HMAC."""
    h = Harness(tmp_path, settings=_auth_settings())
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 AUTH PLAIN LOGIN CRAM-MD5") == b"AUTH CRAM-MD5\r\n"
    challenge = b"<1896.697170952@postoffice.example.net>"
    answer = base64.b64decode(h.server(b"334 " + base64.b64encode(challenge)).strip())
    digest = hmac.new(b"s3cret-pw", challenge, hashlib.md5).hexdigest().encode()
    assert answer == b"relay@contoso.test " + digest
    assert h.server(b"235 2.7.0 ok").startswith(b"MAIL FROM:")


def test_auth_login(tmp_path: Path) -> None:
    """LOGIN sends the user name, then the password, each base64."""
    h = Harness(tmp_path, settings=_auth_settings())
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 AUTH LOGIN") == b"AUTH LOGIN\r\n"
    assert base64.b64decode(h.server(b"334 VXNlcm5hbWU6")) == b"relay@contoso.test"
    assert base64.b64decode(h.server(b"334 UGFzc3dvcmQ6")) == b"s3cret-pw"
    assert h.server(b"235 ok").startswith(b"MAIL FROM:")


def test_auth_plain_wrong_password_defers_once_with_the_reply(tmp_path: Path) -> None:
    """PLAIN is tried once; a 535 defers the mail and keeps the server's reply, and the
    password is in no reply, repr or log."""
    h = Harness(tmp_path, settings=_auth_settings())
    h.server(b"220 x")
    out = h.server(b"250-x", b"250 AUTH PLAIN")
    assert out.startswith(b"AUTH PLAIN ")
    assert base64.b64decode(out.split()[2]).endswith(b"\0s3cret-pw")
    assert h.server(b"535 5.7.8 authentication failed") == b"QUIT\r\n"
    result = h.close()
    rep = result.replies[0]
    assert rep.code == 454 and "535 5.7.8 authentication failed" in rep.reply
    assert "s3cret" not in repr(result) + repr(h.settings) + repr(h.proto) + str(h.proto.log.str())


def test_no_clear_text_password_outside_tls_when_opportunistic(tmp_path: Path) -> None:
    """With tls=opportunistic and no TLS, PLAIN/LOGIN are not used: the mail is deferred."""
    h = Harness(tmp_path, settings=_auth_settings(tls="opportunistic"))
    h.server(b"220 x")
    out = h.server(b"250-x", b"250 AUTH PLAIN LOGIN")
    assert b"AUTH" not in out and b"MAIL" not in out
    assert h.close().replies[0].code // 100 == 4


NO_CERT_REPLY = (
    '451 4.7.0 cannot authenticate to the smart host: it offers AUTH LOGIN PLAIN only in clear '
    'text (it offers no STARTTLS) and smarthost.tls = "opportunistic" never sends the password '
    'without TLS; to change: give the smart host a certificate, or set smarthost.tls = "none" '
    'to allow clear-text AUTH'
)


def test_smart_host_with_auth_but_no_starttls_says_why_and_what_to_change(tmp_path: Path) -> None:
    """Fault 10: tls=opportunistic, a password, and a smart host that offers AUTH PLAIN LOGIN but
    no STARTTLS (an Exchange 2003 smart host without a certificate): no password and no MAIL
    leave; the reply names the reason and both fixes; the advice for the log says more; the
    result marks the hop as unusable (another hop may be tried)."""
    h = Harness(tmp_path, settings=_auth_settings(tls="opportunistic"))
    assert h.server(b"220 exchange2003.test Microsoft ESMTP MAIL Service") == b"EHLO h.test\r\n"
    out = h.server(b"250-exchange2003.test Hello", b"250-AUTH GSSAPI NTLM LOGIN",
                   b"250-AUTH=LOGIN", b"250 AUTH PLAIN LOGIN")
    assert b"AUTH" not in out and b"MAIL" not in out
    result = h.close()
    assert result.replies[0].reply == NO_CERT_REPLY and result.replies[0].code == 451
    assert result.hop_failed and result.connected
    assert "certificate" in result.advice and 'smarthost.tls = "none"' in result.advice
    assert "Exchange 2003" in result.advice
    assert "s3cret" not in repr(result) + result.advice


def test_refused_starttls_is_named_in_the_reason(tmp_path: Path) -> None:
    """Fault 10: STARTTLS offered but refused under tls=opportunistic: the reply quotes the
    refusal; the password still stays home."""
    h = Harness(tmp_path, settings=_auth_settings(tls="opportunistic"))
    h.server(b"220 x")
    assert h.server(b"250-x", b"250-STARTTLS", b"250 AUTH PLAIN") == b"STARTTLS\r\n"
    out = h.server(b"454 4.7.0 TLS not available due to temporary reason")
    assert b"AUTH" not in out and b"MAIL" not in out
    assert h.close().replies[0].reply == (
        '451 4.7.0 cannot authenticate to the smart host: it offers AUTH PLAIN only in clear text '
        '(STARTTLS was refused (454 4.7.0 TLS not available due to temporary reason)) and '
        'smarthost.tls = "opportunistic" never sends the password without TLS; to change: give '
        'the smart host a certificate, or set smarthost.tls = "none" to allow clear-text AUTH')


@pytest.mark.parametrize(("ehlo", "reply"), [
    ((b"250 x",),
     "451 4.7.0 cannot authenticate to the smart host: it offers no AUTH without TLS (no "
     "STARTTLS either); to change: enable AUTH there, or drop smarthost.username if it relays "
     "for this server's address"),
    ((b"250-x", b"250 AUTH GSSAPI NTLM"),
     "451 4.7.0 cannot authenticate to the smart host: it offers AUTH GSSAPI NTLM, none of "
     "which this server speaks (CRAM-MD5 LOGIN PLAIN); to change: enable one of them there"),
])
def test_other_reasons_auth_is_impossible_are_named(tmp_path: Path, ehlo: tuple[bytes, ...],
                                                     reply: str) -> None:
    """Fault 10's kind: whenever no AUTH mechanism can be used, the reply says why."""
    h = Harness(tmp_path, settings=_auth_settings(tls="none"))
    h.server(b"220 x")
    out = h.server(*ehlo)
    assert b"AUTH" not in out and b"MAIL" not in out
    result = h.close()
    assert result.replies[0].reply == reply and result.advice


def test_tls_none_sends_clear_text_auth_to_such_a_smart_host(tmp_path: Path) -> None:
    """The documented way out: with tls=none the same smart host gets AUTH in clear text."""
    h = Harness(tmp_path, settings=_auth_settings(tls="none"))
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 AUTH PLAIN LOGIN") == b"AUTH LOGIN\r\n"
    h.server(b"334 VXNlcm5hbWU6")
    h.server(b"334 UGFzc3dvcmQ6")
    assert h.server(b"235 2.7.0 ok").startswith(b"MAIL FROM:<a@example.org>")


def test_command_timeout_defers_and_closes(tmp_path: Path) -> None:
    """No reply within command_timeout: the connection is aborted, the mail deferred."""
    settings = c.ClientSettings(helo="h.test", tls="none", command_timeout=30)
    h = Harness(tmp_path, settings=settings)
    h.server(b"220 x")
    h.clock.advance(31)
    assert h.transport.disconnecting or h.transport.disconnected
    result = h.close()
    assert result.replies[0].reply.startswith("451 4.4.2 timeout waiting for the reply to EHLO")


def test_connection_lost_mid_transaction_defers(tmp_path: Path) -> None:
    """A dropped connection (e.g. after DATA) is a temporary failure for everyone unanswered."""
    h = Harness(tmp_path)
    for line in (b"220 x", b"250 x", b"250 ok", b"250 ok", b"354 go"):
        h.server(line)
    result = h.close()
    assert result.replies[0].code == 421 and "connection lost" in result.replies[0].reply


def test_connect_failure_is_one_reply_per_recipient() -> None:
    """deliver() connects with the connect timeout; a refused connection becomes 421 replies."""
    reactor = MemoryReactor()
    settings = c.ClientSettings(helo="h.test", tls="none", connect_timeout=7)
    txn = c.Transaction(sender="a@b.test", recipients=[{"address": "x@y.test"}], body_path=Path("/x"))
    d = c.deliver(reactor, "192.0.2.1", 2525, settings, txn, remote_mta="mx.y.test")
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.1", 2525, 7)
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    result = d.result  # type: ignore[attr-defined]
    assert not result.connected and result.replies[0].reply == "421 4.4.1 connection refused"


@pytest.mark.parametrize("chunks", [[b"a\r", b"\nb\n"], [b"a\n", b".b\n"], [b"a", b"\n.", b"\n"]])
def test_body_transform_across_chunk_boundaries(chunks: list[bytes]) -> None:
    """CRLF conversion and dot-stuffing work whatever the chunk boundaries."""
    t = c._BodyTransform()
    out = b"".join(t(ch) for ch in chunks) + t.tail()
    whole = b"".join(chunks).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    expected = b"\r\n".join((b"." + ln if ln.startswith(b".") else ln)
                            for ln in whole.split(b"\r\n"))
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert out == expected + b".\r\n"


def test_secret_never_shows() -> None:
    """A Secret's repr and str hide the value."""
    s = c.Secret("hunter2")
    assert "hunter2" not in repr(s) + str(s) + repr(_auth_settings(password="hunter2"))


# --------------------------------------------------------------------------- issue 11 re-run

@pytest.mark.parametrize(("tls", "dialogue", "reply"), [
    # AUTH offered only after STARTTLS (aiosmtpd's default, Postfix smtpd_tls_auth_only), and
    # tls = "none" never starts TLS: the reply must not claim there is no STARTTLS
    ("none", ((b"220 x",), (b"250-x", b"250 STARTTLS")),
     '451 4.7.0 cannot authenticate to the smart host: it offers AUTH only after STARTTLS and '
     'smarthost.tls = "none" never starts TLS; to change: set smarthost.tls = "opportunistic" '
     '(or "required")'),
    # STARTTLS offered but refused, AUTH only inside TLS
    ("opportunistic", ((b"220 x",), (b"250-x", b"250 STARTTLS"), (b"454 4.7.0 TLS not available",)),
     "451 4.7.0 cannot authenticate to the smart host: it offers no AUTH without TLS and "
     "STARTTLS was refused (454 4.7.0 TLS not available); to change: make STARTTLS work there "
     "(a valid certificate, TLS 1.2 or later)"),
])
def test_auth_impossible_because_of_starttls_says_so(tmp_path: Path, tls: str, dialogue: tuple,
                                                     reply: str) -> None:
    """Fault 10 (re-run): a smart host that offers AUTH only inside TLS, with TLS off by our
    setting or refused by the host: the reply and the advice name that reason and its fix
    (not "no STARTTLS either"), no password and no MAIL leave, another hop may be tried."""
    h = Harness(tmp_path, settings=_auth_settings(tls=tls))
    out = b"".join(h.server(*lines) for lines in dialogue)
    assert b"AUTH" not in out and b"MAIL" not in out
    result = h.close()
    assert result.replies[0].reply == reply and result.hop_failed
    assert "STARTTLS" in result.advice and "s3cret" not in result.advice


def test_the_old_auth_equals_form_is_read(tmp_path: Path) -> None:
    """Fault 10 (re-run): a server that announces its mechanisms only in the pre-RFC 2554
    form `250-AUTH=LOGIN` (old Exchange and Netscape servers) is authenticated with them."""
    h = Harness(tmp_path, settings=_auth_settings(tls="none"))
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 AUTH=LOGIN") == b"AUTH LOGIN\r\n"


@pytest.mark.parametrize(("refusal", "advice"), [
    (b"535 5.7.8 authentication credentials invalid", True),
    (b"454 4.7.0 Temporary authentication failure", False),
])
def test_a_refused_log_in_is_explained_for_the_log(tmp_path: Path, refusal: bytes,
                                                   advice: bool) -> None:
    """Fault 10 (re-run), a wrong password against an impossible AUTH: a 535 defers with the
    server's reply and gives the log an advice naming smarthost.username and password_file
    (never the password); a 4xx is the smart host's temporary trouble: no advice."""
    h = Harness(tmp_path, settings=_auth_settings(tls="none"))
    h.server(b"220 x")
    h.server(b"250-x", b"250 AUTH PLAIN")
    assert h.server(refusal) == b"QUIT\r\n"
    result = h.close()
    assert result.replies[0].reply == "454 4.7.0 smart host refused AUTH PLAIN: " + refusal.decode()
    assert result.hop_failed
    if advice:
        assert "smarthost.username 'relay@contoso.test'" in result.advice
        assert "smarthost.password_file" in result.advice and "s3cret" not in result.advice
    else:
        assert result.advice == ""


def test_tls_required_without_starttls_is_explained_for_the_log(tmp_path: Path) -> None:
    """Fault 10 (re-run): tls = "required" and a host without a certificate (no STARTTLS):
    the advice for the log says what to change."""
    h = Harness(tmp_path, settings=c.ClientSettings(helo="h.test", tls="required",
                                                    tls_name="mx.example.net"))
    h.server(b"220 x")
    h.server(b"250-x", b"250 AUTH LOGIN")
    result = h.close()
    assert "certificate" in result.advice and 'smarthost.tls = "opportunistic"' in result.advice


def test_530_at_mail_from_is_the_hops_not_the_messages(tmp_path: Path) -> None:
    """Fault 10 (re-run), a route or connector hop that wants AUTH (it never gets the smart
    host's password): `530 5.7.0` to MAIL FROM defers (never a bounce), marks the hop as
    unusable so that the next one is tried, and the advice says why."""
    h = Harness(tmp_path)
    h.server(b"220 x")
    h.server(b"250 x")
    assert h.server(b"530 5.7.0 Authentication required") == b"QUIT\r\n"
    result = h.close()
    rep = result.replies[0]
    assert rep.reply == "451 4.7.0 the next hop requires AUTH: 530 5.7.0 Authentication required"
    assert result.hop_failed and rep.elsewhere
    assert "Only the smart host gets smarthost.username" in result.advice


@pytest.mark.parametrize(("lines", "elsewhere"), [
    # 421 to MAIL FROM: the host is going away, nothing is known about anyone
    ((b"220 x", b"250 x", b"421 4.3.2 shutting down"), {"b@x.test": True, "c@x.test": True}),
    # 421 at the second RCPT, after the first was refused for good
    ((b"220 x", b"250 x", b"250 ok", b"550 5.1.1 no such user", b"421 4.3.2 shutting down"),
     {"b@x.test": False, "c@x.test": True}),
    # 421 to DATA, after both RCPTs were accepted
    ((b"220 x", b"250 x", b"250 ok", b"250 ok", b"250 ok", b"421 4.3.2 bye"),
     {"b@x.test": True, "c@x.test": True}),
    # a 4xx for one recipient is about that recipient: the answer, not a host failure
    ((b"220 x", b"250 x", b"250 ok", b"450 4.2.1 greylisted", b"250 ok"),
     {"b@x.test": False, "c@x.test": False}),
])
def test_421_mid_session_marks_the_unanswered_recipients_for_another_host(
        tmp_path: Path, lines: tuple[bytes, ...], elsewhere: dict[str, bool]) -> None:
    """Fault 13 (re-run): a 421 at any point before the message is accepted is the host's
    failure (RFC 5321 section 3.8), not an answer: every recipient without a final reply is
    marked ``elsewhere`` so that the runner takes the next host or hop at once; a recipient's
    own reply (550, 450) stays its answer."""
    h = Harness(tmp_path, rcpts=("b@x.test", "c@x.test"))
    for line in lines:
        h.server(line)
    if not h.transport.disconnecting:
        h.server(b"354 go")  # the last case goes on to DATA
        h.server(b"250 2.0.0 queued")
    result = h.close()
    got = {r.address: r.elsewhere for r in result.replies}
    if lines[-1].startswith(b"250"):
        assert got == elsewhere and not result.hop_failed
    else:
        assert got == elsewhere
        assert result.hop_failed == all(elsewhere.values())


@pytest.mark.parametrize(("dot_sent", "elsewhere"), [(False, True), (True, False)])
def test_connection_lost_before_and_after_the_end_of_the_message(
        tmp_path: Path, dot_sent: bool, elsewhere: bool) -> None:
    """Fault 13 (re-run): a connection lost before the end of the message was sent says
    nothing about it (another host may take it at once); after the final dot it may have been
    accepted, so it waits for the retry (the same host first) rather than risk a second copy
    at once."""
    h = Harness(tmp_path)
    for line in (b"220 x", b"250 x", b"250 ok", b"250 ok"):
        h.server(line)
    if dot_sent:
        h.server(b"354 go")
    result = h.close()
    assert result.replies[0].code == 421 and result.replies[0].elsewhere is elsewhere


def test_bytes_after_the_220_to_starttls_are_never_read(tmp_path: Path) -> None:
    """Fault 10 (re-run), STARTTLS offered but failing: a reply that arrives in clear text
    right behind the 220 to STARTTLS (a response injection, or a broken server) is not taken
    as the server's first word inside TLS: no TLS is started on it, the session ends as a
    failed TLS handshake (``tls_failed``: an opportunistic runner retries in clear), and no
    password or MAIL leaves."""
    h = Harness(tmp_path, settings=_auth_settings(tls="opportunistic"))
    h.server(b"220 x")
    assert h.server(b"250-x", b"250 STARTTLS") == b"STARTTLS\r\n"
    h.proto.dataReceived(b"220 go ahead\r\n250-x\r\n250 AUTH PLAIN\r\n")
    out = h.transport.value()
    assert b"AUTH" not in out and b"MAIL" not in out
    result = h.close()
    assert result.tls_failed and result.hop_failed
    assert result.replies[0].reply == ("454 4.7.5 TLS failure with : the server sent data after "
                                       "its 220 to STARTTLS")


def test_an_exchange_2003_smart_host_gets_the_reply_docs_coexistence_shows(tmp_path: Path) -> None:
    """Fault 10/11 (re-run): the EHLO of an Exchange 2003 smart host without a certificate
    (`AUTH GSSAPI NTLM LOGIN` and the old `AUTH=LOGIN`) gives exactly the reply that
    docs/coexistence.md quotes."""
    h = Harness(tmp_path, settings=_auth_settings(tls="opportunistic"))
    h.server(b"220 exchange2003.test Microsoft ESMTP MAIL Service, Version: 6.0.3790.3959")
    h.server(b"250-exchange2003.test Hello [127.0.0.1]", b"250-TURN", b"250-SIZE",
             b"250-ETRN", b"250-PIPELINING", b"250-DSN", b"250-ENHANCEDSTATUSCODES",
             b"250-8bitmime", b"250-BINARYMIME", b"250-CHUNKING", b"250-VRFY",
             b"250-X-EXPS GSSAPI NTLM LOGIN", b"250-X-EXPS=LOGIN", b"250-AUTH GSSAPI NTLM LOGIN",
             b"250-AUTH=LOGIN", b"250-X-LINK2STATE", b"250-XEXCH50", b"250 OK")
    reply = h.close().replies[0].reply
    assert reply == (
        '451 4.7.0 cannot authenticate to the smart host: it offers AUTH GSSAPI LOGIN NTLM only '
        'in clear text (it offers no STARTTLS) and smarthost.tls = "opportunistic" never sends '
        'the password without TLS; to change: give the smart host a certificate, or set '
        'smarthost.tls = "none" to allow clear-text AUTH')
    assert reply in (Path(__file__).parents[2] / "docs" / "coexistence.md").read_text()


def test_a_whole_transaction_sets_attributes_without_twisteds_deprecation_hook(
        tmp_path: Path) -> None:
    """OutboundESMTP sets its attributes plainly (issue 17: ESMTPClient's ``__setattr__``,
    there only to warn about the deprecated ``tlsMode``, ran on every attribute set): a
    whole transaction emits no DeprecationWarning, its TLS state stays in ``_tlsMode``,
    and the result is the same as ever."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        h = Harness(tmp_path)
        assert h.server(b"220 mx.example.net ESMTP") == b"EHLO pop.contoso.test\r\n"
        h.server(*EHLO_DSN)
        h.server(b"250 2.1.0 ok")
        h.server(b"250 2.1.5 ok")
        h.server(b"354 go ahead")
        assert h.server(b"250 2.0.0 queued") == b"QUIT\r\n"
        h.server(b"221 bye")
        result = h.close()
    assert "tlsMode" not in vars(h.proto) and h.proto._tlsMode is False
    assert result.replies[0].delivered and not result.tls


@pytest.mark.parametrize("size", [10, c.SMALL_BODY + 70_001])
def test_body_read_unbuffered_goes_out_whole_small_and_large(tmp_path: Path,
                                                              size: int) -> None:
    """The queued body, opened unbuffered (issue 17: no isatty ioctl nor lseek per message),
    goes out whole, CRLF and dot-stuffed, both in one write (small) and through the file
    producer's chunks (larger than SMALL_BODY), and the file is closed after the dot."""
    line = b".dot line\n" + b"x" * 88 + b"\n"
    body = (line * (size // len(line) + 1))[:size]
    h = Harness(tmp_path, body_bytes=body)
    h.server(b"220 mx.example.net ESMTP")
    h.server(*EHLO_DSN)
    h.server(b"250 2.1.0 ok")
    h.server(b"250 2.1.5 ok")
    sent = h.server(b"354 go ahead")
    want = body.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    want = (b"." + want if want.startswith(b".") else want)
    want += (b"" if want.endswith(b"\r\n") else b"\r\n") + b".\r\n"
    assert sent == want
    assert h.server(b"250 2.0.0 queued") == b"QUIT\r\n"
    assert h.proto._body_file is None
