"""Sieve rules end to end: the real server (twistd) with an aiosmtpd smart host as "the
outside". Out-of-office replies reach an outside sender once per period (also across a
restart) and never a list, a bulk sender, an auto-reply or ``<>``; a redirected message
arrives outside with its SRS envelope sender and passes a real SPF check there (pyspf against
a twisted.names DNS server, tests/support/dnsserver.py), and a bounce to that address goes
back to the original sender; a loop is kept, not redirected again; reject, discard and a failing script
do what RFC 5228 / 5429 say, and the log line tells."""

from __future__ import annotations

import email
import smtplib
from pathlib import Path

import pytest

from pop3coexist.config import DnsConfig
from pop3coexist.mailauth.resolver import BlockingDNS, spf_dns
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import SieveScripts
from tests.support.dnsserver import DnsServer
from tests.support.server import ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost, wait_until

pytestmark = pytest.mark.integration

DOMAIN = "pop.contoso.test"
TED = f"ted@{DOMAIN}"


@pytest.fixture(scope="module")
def host():  # noqa: ANN201
    h = SmartHost().start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, host: SmartHost):  # noqa: ANN201
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("sieve"), tls=False,
                        extra_config=f'[smarthost]\nhost = "{host.hop}"\ntls = "none"\n\n'
                                     '[sieve]\nsrs = true\n')
    srv.write_config()
    for box in ("ted", "ann", "fwd", "copy", "loop", "bad", "rej", "gone"):
        srv.add_mailbox(f"{box}@{DOMAIN}", f"{box} password")
    srv.start()
    yield srv
    srv.stop_cleanly()


def _put(srv: ServerProcess, box: str, text: str) -> None:
    scripts = SieveScripts(MaildirStore(srv.state_dir / "mailroot"))
    scripts.put_script(DOMAIN, box, "rules", text)
    scripts.set_active(DOMAIN, box, "rules")


def _stored(srv: ServerProcess, box: str) -> list[bytes]:
    new = srv.state_dir / "mailroot" / DOMAIN / box / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())]


def _send(srv: ServerProcess, sender: str, rcpts: list[str], headers: str,
          body: str = "hello\r\n") -> dict:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as s:
        return s.sendmail(sender, rcpts, (headers + "\r\n" + body).encode())


def _received_by(host: SmartHost, rcpt: str) -> list:
    return [m for m in host.received if rcpt in m.rcpt_tos]


def _wait_log(srv: ServerProcess, text: str, count: int = 1) -> None:
    wait_until(lambda: srv.log_text().count(text) >= count, timeout=30, what=repr(text))


def test_out_of_office_once_per_sender_and_never_to_lists_bulk_or_null(
        server: ServerProcess, host: SmartHost, tmp_path: Path) -> None:
    """`pop3coexist-admin vacation ... on`; an outside sender gets one reply (null envelope
    sender, Auto-Submitted, In-Reply-To, References, the subject and text given); a second
    message in the period and one after a restart get none; a list message, a bulk one, an
    auto-reply, one from <> and a Bcc copy get none; every message is kept; `off` stops it."""
    body = tmp_path / "away.txt"
    body.write_text("I am away until Monday.\nMail is read then.\n")
    done = server.admin("vacation", TED, "on", "--file", str(body), "--subject",
                        "Out of office", "--days", "7")
    assert "out-of-office on" in done.stdout
    head = (f"From: Ann <ann@example.org>\r\nTo: Ted <{TED}>\r\nSubject: plans\r\n"
            "Message-ID: <m1@example.org>\r\nReferences: <m0@example.org>\r\n")
    _send(server, "ann@example.org", [TED], head)
    wait_until(lambda: _received_by(host, "ann@example.org"), what="the reply")
    [reply] = _received_by(host, "ann@example.org")
    assert reply.mail_from == "<>"  # RFC 3834 section 3.3: the null envelope sender
    msg = email.message_from_bytes(reply.content)
    assert msg["Auto-Submitted"] == "auto-replied (vacation)"
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg["References"] == "<m0@example.org> <m1@example.org>"
    assert msg["Subject"] == "Out of office" and msg["To"] == "<ann@example.org>"
    assert TED in msg["From"]
    assert "I am away until Monday." in msg.get_payload(decode=True).decode()

    _send(server, "ann@example.org", [TED], head.replace("m1@", "m2@"))
    _wait_log(server, "no vacation reply: <ann@example.org> had one in the last 7 days")
    cases = [
        ("list@lists.example.net", "List-Id: <team.lists.example.net>\r\n",
         "a List-Id header field (mailing list)"),
        ("news@bulk.example.net", "Precedence: bulk\r\n", "Precedence: bulk"),
        ("robot@example.net", "Auto-Submitted: auto-generated\r\n",
         "Auto-Submitted: auto-generated (RFC 3834 section 5)"),
        ("", "", "the envelope sender is <>"),
        ("carol@example.net", "", "the mailbox is not in To or Cc"),
    ]
    for sender, extra, why in cases:
        to = "To: someone@example.net\r\n" if sender == "carol@example.net" else f"To: {TED}\r\n"
        _send(server, sender, [TED], f"From: x@example.net\r\n{to}Subject: x\r\n{extra}")
        _wait_log(server, f"no vacation reply: {why}")
    server.stop()
    server.start()  # the record is on disk: a restart does not reset it
    _send(server, "ann@example.org", [TED], head.replace("m1@", "m3@"))
    _wait_log(server, "no vacation reply: <ann@example.org> had one in the last 7 days", 2)
    assert len(_received_by(host, "ann@example.org")) == 1
    for sender in ("list@lists.example.net", "news@bulk.example.net", "robot@example.net",
                   "carol@example.net"):
        assert not _received_by(host, sender)
    assert len(_stored(server, "ted")) == 8  # every message was kept
    off = server.admin("vacation", TED, "off")
    assert "out-of-office off" in off.stdout
    assert "no active script" in server.admin("vacation", TED, "show").stdout


def _spf(dns_server: DnsServer, ip: str, mail_from: str, helo: str) -> str:
    """The SPF result (RFC 7208 section 2.6) an outside receiver gets for ``mail_from`` sent
    from ``ip``: pyspf's check_host, every look-up asking ``dns_server``."""
    import spf

    resolver = BlockingDNS(DnsConfig(servers=("127.0.0.1",), port=dns_server.port, timeout=5.0))
    with spf_dns(resolver):
        result, _explanation = spf.check2(i=ip, s=mail_from, h=helo)
    return result


def test_redirect_leaves_with_srs_and_a_bounce_finds_the_sender(
        server: ServerProcess, host: SmartHost, tmp_path: Path) -> None:
    """redirect: the copy reaches the outside target with an SRS0 envelope sender in the
    forwarder's domain and the loop marker; the mailbox keeps nothing. A real SPF check of
    that copy, as the outside receiver does it (pyspf against a real DNS server where the
    forwarder's domain publishes ``v=spf1 ip4:127.0.0.1 -all`` and example.org publishes
    ``v=spf1 -all``), from the address the smart host saw the server connect from, gives
    ``pass``; the same check of the original sender <ann@example.org> from that address
    gives ``fail``: without SRS the redirect would fail SPF. A bounce to the SRS address is
    relayed to the original sender; a forged SRS address is refused 550 5.1.1."""
    _put(server, "fwd", 'redirect "far@example.net";\n')
    _send(server, "ann@example.org", [f"fwd@{DOMAIN}"],
          f"From: ann@example.org\r\nTo: fwd@{DOMAIN}\r\nSubject: forward me\r\n")
    wait_until(lambda: _received_by(host, "far@example.net"), what="the redirected copy")
    [copy] = _received_by(host, "far@example.net")
    assert copy.mail_from.startswith("SRS0=") and copy.mail_from.endswith(f"=example.org=ann@{DOMAIN}")
    assert b"X-Sieve-Redirected-From: <fwd@pop.contoso.test>" in copy.content
    assert b"Subject: forward me" in copy.content
    assert _stored(server, "fwd") == []

    # the outside receiver's SPF check (RFC 7208 section 2.4: MAIL FROM, the client's IP)
    assert copy.peer == "127.0.0.1" and copy.helo
    dns_server = DnsServer(tmp_path / "dns", {
        DOMAIN: [(DOMAIN, "TXT", "v=spf1 ip4:127.0.0.1 -all")],
        "example.org": [("example.org", "TXT", "v=spf1 -all")],
    }).start()
    try:
        assert _spf(dns_server, copy.peer, copy.mail_from, copy.helo) == "pass"
        assert _spf(dns_server, copy.peer, "ann@example.org", copy.helo) == "fail"
    finally:
        dns_server.stop()

    # the far side bounces: the DSN comes back to the SRS address with <>
    _send(server, "", [copy.mail_from], "From: MAILER-DAEMON@example.net\r\nSubject: bounce\r\n")
    wait_until(lambda: _received_by(host, "ann@example.org") and any(
        b"Subject: bounce" in m.content for m in _received_by(host, "ann@example.org")),
        what="the bounce relayed to the original sender")
    forged = "SRS0=AAAAAA=" + copy.mail_from.split("=", 2)[2]
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as s:
        s.ehlo()
        s.mail("")
        code, _ = s.rcpt(forged)
    assert code == 550


def test_redirect_copy_keeps_and_a_loop_is_not_redirected_again(
        server: ServerProcess, host: SmartHost) -> None:
    """redirect :copy stores the message and forwards it; a message that already carries this
    mailbox's loop marker is kept instead of being redirected again, and the log says why."""
    _put(server, "copy", 'require "copy";\nredirect :copy "phone@example.net";\n')
    _send(server, "bob@example.org", [f"copy@{DOMAIN}"], "Subject: copy me\r\n")
    wait_until(lambda: _received_by(host, "phone@example.net"), what="the :copy")
    assert len(_stored(server, "copy")) == 1

    _put(server, "loop", 'redirect "elsewhere@example.net";\n')
    _send(server, "bob@example.org", [f"loop@{DOMAIN}"],
          f"X-Sieve-Redirected-From: <loop@{DOMAIN}>\r\nSubject: came back\r\n")
    _wait_log(server, f"redirect to <elsewhere@example.net> not done (it was redirected by "
              f"<loop@{DOMAIN}> before: a loop)")
    assert len(_stored(server, "loop")) == 1
    assert not _received_by(host, "elsewhere@example.net")


def test_a_script_error_keeps_the_message_and_says_so(server: ServerProcess) -> None:
    """A script that goes past the redirect limit at run time: nothing it decided is done, the
    message is kept, and the log line names the script, the line and the reason."""
    _put(server, "bad", "".join(f'redirect "r{i}@example.net";\n' for i in range(6)))
    _send(server, "bob@example.org", [f"bad@{DOMAIN}"], "Subject: too many\r\n")
    _wait_log(server, f'<bad@{DOMAIN}>: script "rules" failed at line 5: more than 4 '
              "redirects; the message is kept (RFC 5228 section 2.10.6)")
    assert len(_stored(server, "bad")) == 1


def test_reject_refuses_at_data_and_discard_drops(server: ServerProcess) -> None:
    """reject: the only recipient is refused with 550 5.7.1 and the reason; discard: 250 and
    nothing stored."""
    _put(server, "rej", 'require "reject";\nreject "I do not take mail from you";\n')
    with pytest.raises(smtplib.SMTPDataError) as e:
        _send(server, "bob@example.org", [f"rej@{DOMAIN}"], "Subject: hi\r\n")
    assert e.value.smtp_code == 550 and b"5.7.1 I do not take mail from you" in e.value.smtp_error
    assert _stored(server, "rej") == []
    _put(server, "gone", "discard;\n")
    assert _send(server, "bob@example.org", [f"gone@{DOMAIN}"], "Subject: bye\r\n") == {}
    _wait_log(server, f'<gone@{DOMAIN}>: script "rules": discard')
    assert _stored(server, "gone") == []
