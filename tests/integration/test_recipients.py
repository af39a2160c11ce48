"""Issue 11 faults 1 and 2 over real sockets: the real twistd server on OS-picked ports, a
fresh install (no mailbox called postmaster was ever added), Python smtplib and swaks.

- postmaster: <Postmaster> and postmaster@ every local domain, including one added with
  `domain add` while the server runs, land in the postmaster mailbox, which an administrator
  can then read over POP3 after `mailbox passwd`;
- addresses: quoted local parts (with spaces, '>' and quoted pairs), a quoted dot-atom that
  names ted, address literals of this host, and the relay decision for an untrusted client
  (connected from 127.0.0.2, outside relay.networks) following the parsed domain.
"""

from __future__ import annotations

import itertools
import poplib
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Rcpt pass-word 1"
TED = f"ted@{HOSTNAME}"
_n = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server as a fresh install leaves it, with one mailbox (ted)."""
    srv = make_server(tmp_path_factory.mktemp("recipients"))
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def find(server, domain: str, box: str, marker: str, timeout: float = 10.0) -> list[Path]:
    """The messages in ``box@domain``'s new/ that contain ``marker`` (polled with a deadline)."""
    new = server.state_dir / "mailroot" / domain / box / "new"
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in new.iterdir() if marker.encode() in p.read_bytes()] if new.is_dir() else []
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def body(marker: str) -> bytes:
    return f"From: a@example.test\r\nSubject: {marker}\r\n\r\nbody {marker}\r\n".encode()


def test_postmaster_on_a_fresh_install_with_smtplib(server) -> None:
    """RCPT TO:<Postmaster> and <postmaster@domain> are accepted with no postmaster account;
    the message lands in the postmaster mailbox created at start."""
    marker = f"pm-{next(_n)}"
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test") as s:
        refused = s.sendmail("someone@example.test", ["Postmaster", f"POSTMASTER@{HOSTNAME}"],
                             body(marker))
    assert refused == {}
    assert len(find(server, HOSTNAME, "postmaster", marker)) == 1


def test_postmaster_of_a_domain_added_at_run_time_and_reading_it(server) -> None:
    """`domain add` while the server runs: postmaster@ the new domain is accepted at once from
    an untrusted client and lands in the postmaster mailbox; after `mailbox passwd` the
    administrator reads it with POP3."""
    added = server.admin("domain", "add", "added.contoso.test")
    assert "lands in <postmaster@pop.contoso.test>" in added.stdout
    marker = f"pm-added-{next(_n)}"
    # from 127.0.0.2 (not trusted: a domain not yet seen would be refused as relaying)
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test",
                      source_address=("127.0.0.2", 0)) as s:
        s.ehlo()
        assert s.mail("someone@example.test")[0] == 250
        assert s.rcpt("postmaster@added.contoso.test") == (
            250, b"2.1.5 Recipient <postmaster@added.contoso.test> OK")
        assert s.rcpt("nobody@added.contoso.test") == (
            550, b"5.1.1 <nobody@added.contoso.test>: no such user here")
        assert s.data(body(marker))[0] == 250
    assert len(find(server, HOSTNAME, "postmaster", marker)) == 1
    server.admin("mailbox", "passwd", f"postmaster@{HOSTNAME}", password=PASSWORD)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"))
    pop.user(f"postmaster@{HOSTNAME}")
    pop.pass_(PASSWORD)
    texts = [b"\r\n".join(pop.retr(i)[1]) for i in range(1, pop.stat()[0] + 1)]
    pop.quit()
    assert any(marker.encode() in t for t in texts)


def test_domain_added_is_local_within_the_cache_second(server) -> None:
    """The server keeps its domain list for a second; a domain added within that second (here
    by the store code `domain add` runs, in-process so that it takes milliseconds) is local for
    the very next RCPT: from a trusted client (127.0.0.1, which may relay) an unknown user of it
    is 550 5.1.1 and its postmaster lands here, never relayed out; from an untrusted one it is
    no 554. After `domain remove` it is foreign again at once (554 5.7.1 for postmaster@)."""
    from pop3coexist.store.maildir import MaildirStore

    store = MaildirStore(server.state_dir / "mailroot", hostname=HOSTNAME)
    domain = f"quick{next(_n)}.contoso.test"
    marker = f"pm-quick-{next(_n)}"
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test") as s, \
            smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test",
                         source_address=("127.0.0.2", 0)) as u:
        for c in (s, u):
            c.ehlo()
            assert c.mail("someone@example.test")[0] == 250
            assert c.rcpt(TED)[0] == 250  # the domain list is read now, and kept for a second
        assert store.add_domain(domain)
        assert s.rcpt(f"nobody@{domain}") == (550, f"5.1.1 <nobody@{domain}>: no such user here".encode())
        assert s.rcpt(f"postmaster@{domain}") == (250, f"2.1.5 Recipient <postmaster@{domain}> OK".encode())
        assert u.rcpt(f"nobody@{domain}") == (550, f"5.1.1 <nobody@{domain}>: no such user here".encode())
        assert s.data(body(marker))[0] == 250
        u.rset()
    assert len(find(server, HOSTNAME, "postmaster", marker)) == 1
    assert len(find(server, HOSTNAME, "ted", marker)) == 1
    assert not any(marker.encode() in p.read_bytes() for p in (server.state_dir / "queue").rglob("*")
                   if p.is_file())
    server.admin("domain", "remove", domain, "--yes")
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test",
                      source_address=("127.0.0.2", 0)) as u:
        u.ehlo()
        assert u.mail("someone@example.test")[0] == 250
        assert u.rcpt(TED)[0] == 250  # the domain list is read again now
        store.add_domain(domain)
        assert u.rcpt(f"postmaster@{domain}")[0] == 250
        store.remove_domain(domain)  # what `domain remove` does, within the cache second
        assert u.rcpt(f"postmaster@{domain}") == (
            554, f"5.7.1 Relay access denied for <postmaster@{domain}>".encode())


def test_source_routes_utf8_and_ip_domains_over_a_socket(server) -> None:
    """Raw socket, untrusted client (127.0.0.2): a source route is ignored (a route through
    this server to a foreign mailbox is still 554 5.7.1, one to ted delivers to ted); a UTF-8
    address is 553 5.6.7 (no SMTPUTF8 offered) and the session goes on; an IP address written
    as a domain name is 553 5.7.1; a General-address-literal is 553 5.7.1."""
    import socket

    marker = f"route-{next(_n)}"
    with socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        f = sock.makefile("rb")

        def say(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert f.readline().startswith(b"220 ")
        assert say(b"EHLO client.test").startswith(b"250 ")
        assert say(b"MAIL FROM:<@relay.example:sender@example.test>") == (
            b"250 2.1.0 Sender <sender@example.test> OK\r\n")
        assert say(b"RCPT TO:<@pop.contoso.test:victim@foreign.example>") == (
            b"554 5.7.1 Relay access denied for <victim@foreign.example>\r\n")
        assert say(b"RCPT TO:<@foreign.example,@other.example:ted@pop.contoso.test>") == (
            b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n")
        assert say("RCPT TO:<t\u00e9d@pop.contoso.test>".encode()) == (
            b"553 5.6.7 Recipient address rejected: non-ASCII addresses need SMTPUTF8, which "
            b"this server does not offer\r\n")
        assert say(b"RCPT TO:<ted@127.0.0.1>") == (
            b"553 5.7.1 Recipient address rejected: domain '127.0.0.1' is an IP address: write "
            b"it as an address literal [127.0.0.1]\r\n")
        assert say(b"RCPT TO:<ted@[x-tag:abc]>").startswith(b"553 5.7.1 ")
        assert say(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        assert say(body(marker) + b".").startswith(b"250 2.0.0 Ok: queued as ")
        assert say(b"QUIT").startswith(b"221 ")
    [path] = find(server, HOSTNAME, "ted", marker)
    assert path.read_bytes().startswith(b"Return-Path: <sender@example.test>\n")


def test_quoted_addresses_with_smtplib(server) -> None:
    """A quoted sender with a space is accepted and kept quoted in Received; "ted" is ted; an
    unknown quoted user is 550 5.1.1; a literal of this host reaches ted."""
    marker = f"quoted-{next(_n)}"
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test") as s:
        s.ehlo()
        assert s.mail('"odd sender"@example.test') == (250, b'2.1.0 Sender <"odd sender"@example.test> OK')
        assert s.rcpt('"no such user"@pop.contoso.test') == (
            550, b'5.1.1 <"no such user"@pop.contoso.test>: no such user here')
        assert s.rcpt('"x>y \\"z\\""@pop.contoso.test') == (
            550, b'5.1.1 <"x>y \\"z\\""@pop.contoso.test>: no such user here')
        assert s.rcpt('"ted"@pop.contoso.test') == (250, b"2.1.5 Recipient <ted@pop.contoso.test> OK")
        assert s.rcpt("ted@[127.0.0.1]") == (250, b"2.1.5 Recipient <ted@[127.0.0.1]> OK")
        assert s.rcpt("ted@[IPv6:::1]") == (250, b"2.1.5 Recipient <ted@[IPv6:::1]> OK")
        assert s.rcpt("root@localhost")[0] == 553
        assert s.data(body(marker))[0] == 250
    [path] = find(server, HOSTNAME, "ted", marker)
    assert path.read_bytes().startswith(
        b'Return-Path: <"odd sender"@example.test>\nReceived: from client.test ([127.0.0.1])')


def test_untrusted_client_cannot_relay_through_quotes_or_literals(server) -> None:
    """From 127.0.0.2 (outside relay.networks, not logged in) a foreign domain stays foreign
    however the local part is quoted, and a literal that is not this host is 554 5.7.1."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test",
                      source_address=("127.0.0.2", 0)) as s:
        s.ehlo()
        assert s.mail("a@example.test")[0] == 250
        assert s.rcpt('"ted@pop.contoso.test"@foreign.example') == (
            554, b'5.7.1 Relay access denied for <"ted@pop.contoso.test"@foreign.example>')
        assert s.rcpt("victim@[192.0.2.1]") == (554, b"5.7.1 Relay access denied for <victim@[192.0.2.1]>")
        assert s.rcpt('"victim@foreign.example"@pop.contoso.test') == (
            550, b'5.1.1 <"victim@foreign.example"@pop.contoso.test>: no such user here')
        assert s.rcpt("Postmaster") == (250, b"2.1.5 Recipient <postmaster@pop.contoso.test> OK")


def test_swaks_quoted_sender_quoted_ted_and_postmaster(server) -> None:
    """swaks sends from a quoted local part with a space to "ted" and to <postmaster>: one
    message lands in each mailbox; a quoted unknown user makes swaks report 550 5.1.1."""
    swaks = require_program("swaks")
    marker = f"swaks-quoted-{next(_n)}"
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("smtp")), "--helo", "client.test",
         "--from", '"odd sender"@example.test', "--to", f'"ted"@{HOSTNAME},postmaster',
         "--header", f"Subject: {marker}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert '<-  250 2.1.0 Sender <"odd sender"@example.test> OK' in result.stdout
    assert len(find(server, HOSTNAME, "ted", marker)) == 1
    assert len(find(server, HOSTNAME, "postmaster", marker)) == 1
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.port("smtp")), "--helo", "client.test",
         "--from", "a@example.test", "--to", f'"no such user"@{HOSTNAME}'],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f'<** 550 5.1.1 <"no such user"@{HOSTNAME}>: no such user here' in result.stdout
