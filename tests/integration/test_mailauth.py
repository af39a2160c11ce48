"""Issue 13 items 4 to 6 against real parts: the real server (twistd) with ``[dns]`` pointed at
a real authoritative DNS server (twisted.names serving zone files, tests/support/dnsserver.py)
on an OS-picked loopback port, aiosmtpd sinks as MX hosts and smart host on distinct 127.0.0.x
addresses, smtplib clients connecting from chosen 127.0.0.x source addresses, poplib reading
the mailbox, dkimpy verifying what the smart host received against the key in the zone.

MX hosts listen on one OS-picked port P on 127.0.0.2, .3 and .4 (MX delivery uses one port for
every host; the test routes name the domain as ``domain:P``, which looks up its MX exactly as
direct delivery does and connects to port P instead of 25).
"""

from __future__ import annotations

import base64
import itertools
import poplib
import re
import smtplib
import time
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.server import HOSTNAME
from tests.support.smarthost import SmartHost, wait_until
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "M4il-auth pass"
TED = f"ted@{HOSTNAME}"
_n = itertools.count(1)


@pytest.fixture
def cleanup():  # noqa: ANN201
    items: list = []
    yield items
    for item in reversed(items):
        item.stop()


def send(server, sender: str, rcpts: list[str], data: bytes, source: str = "127.0.0.1",
         helo: str = "client.test") -> None:
    """One SMTP transaction from ``source`` (a 127.0.0.x address); raises on a refusal."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname=helo, timeout=60,
                      source_address=(source, 0)) as s:
        s.sendmail(sender, rcpts, data)


def mailbox(server, address: str, count: int, timeout: float = 30.0) -> list[bytes]:
    """Every message in ``address``'s mailbox, read over POP3, once there are ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
        p.user(address)
        p.pass_(PASSWORD)
        n = len(p.list()[1])
        if n >= count or time.monotonic() > deadline:
            messages = [b"\r\n".join(p.retr(i + 1)[1]) for i in range(n)]
            p.quit()
            return messages
        p.quit()
        time.sleep(0.1)


def message(subject: str, author: str, to: str = TED, extra: str = "") -> bytes:
    return (f"From: Author <{author}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n"
            f"{extra}\r\nHello from {author}.\r\n").encode()


def auth_results(raw: bytes) -> list[str]:
    """The unfolded Authentication-Results values of a message, top first."""
    msg = message_from_bytes(raw)
    return [re.sub(r"\s+", " ", str(v)) for v in msg.get_all("Authentication-Results") or []]


# --------------------------------------------------------------------------- MX delivery


class BusyHost:
    """A host that greets every connection with ``421 4.3.2 busy`` and hangs up (a thread
    with a listening socket); ``connections`` counts them."""

    def __init__(self, address: str, port: int) -> None:
        import socket
        import threading

        self.connections = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(b"421 4.3.2 busy, try another host\r\n")

    def stop(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def test_mx_delivery_preference_fallback_null_mx_and_implicit_mx(tmp_path: Path, cleanup) -> None:
    """MX delivery through the [dns] resolver, against a real DNS zone:

    - multi.test (MX 5 mx-a, 10 mx-b, 20 mx-c): delivered to mx-a (127.0.0.2), the lowest
      preference, and to no other host;
    - fallback.test (MX 5 down, 7 busy, 10 up): the preferred host refuses connections, the
      next greets with 421, so the message goes to the third (127.0.0.3) in the same run (the
      retry interval is an hour);
    - amx.test (no MX, an A record): delivered to its own address (127.0.0.4, implicit MX);
    - nullmx.test (``MX 0 .``, RFC 7505): fails at once, the sender's mailbox gets a failure
      report with 556 5.1.10, and the message leaves the queue."""
    mx_a = SmartHost(address="127.0.0.2", hostname="mx-a.multi.test").start()
    cleanup.append(mx_a)
    port = mx_a.port
    mx_b = SmartHost(address="127.0.0.3", port=port, hostname="mx-b.test").start()
    cleanup.append(mx_b)
    mx_c = SmartHost(address="127.0.0.4", port=port, hostname="mx-c.test").start()
    cleanup.append(mx_c)
    busy = BusyHost("127.0.0.6", port)
    cleanup.append(busy)
    zones = {
        "multi.test": [("multi.test", "MX", 10, "mx-b.multi.test"),
                       ("multi.test", "MX", 5, "mx-a.multi.test"),
                       ("multi.test", "MX", 20, "mx-c.multi.test"),
                       ("mx-a.multi.test", "A", "127.0.0.2"),
                       ("mx-b.multi.test", "A", "127.0.0.3"),
                       ("mx-c.multi.test", "A", "127.0.0.4")],
        "fallback.test": [("fallback.test", "MX", 5, "down.fallback.test"),
                          ("fallback.test", "MX", 7, "busy.fallback.test"),
                          ("fallback.test", "MX", 10, "up.fallback.test"),
                          ("down.fallback.test", "A", "127.0.0.5"),  # nothing listens there
                          ("busy.fallback.test", "A", "127.0.0.6"),
                          ("up.fallback.test", "A", "127.0.0.3")],
        "amx.test": [("amx.test", "A", "127.0.0.4")],
        "nullmx.test": [("nullmx.test", "MX", 0, "")],
    }
    dns = DnsServer(tmp_path / "dns", zones).start()
    cleanup.append(dns)
    routes = "".join(f'[[domains.remote]]\nname = "{d}"\nrelay = false\nroute = "{d}:{port}"\n'
                     for d in zones)
    extra = (dns.config() + routes + '[smarthost]\ntls = "none"\nconnect_timeout = "5s"\n'
             '[queue]\nretry_intervals = ["1h"]\n')
    srv = make_server(tmp_path / "srv", extra_config=extra, tls=False)
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    try:
        for domain in zones:
            send(srv, TED, [f"user@{domain}"], message(f"to-{domain}", TED, f"user@{domain}"))
        [a] = mx_a.wait_for(1)
        assert a.rcpt_tos == ["user@multi.test"]
        got_b = wait_until(lambda: [m for m in mx_b.received if m.rcpt_tos == ["user@fallback.test"]],
                           what="fallback.test at the second MX")
        assert len(got_b) == 1 and busy.connections == 1
        got_c = wait_until(lambda: [m for m in mx_c.received if m.rcpt_tos == ["user@amx.test"]],
                           what="amx.test at its A address")
        assert len(got_c) == 1
        assert not [m for m in (*mx_b.received, *mx_c.received) if "multi.test" in m.rcpt_tos[0]]
        [report] = mailbox(srv, TED, 1)
        assert b"user@nullmx.test" in report and b"5.1.10" in report and b"556" in report
        queue = srv.state_dir / "queue"
        wait_until(lambda: not any(queue.glob("env/*.json")) and not any(queue.glob("claimed/*/*.json")),
                   what="the queue to empty")
        log = srv.log_text()
        assert "to=<user@fallback.test> relay=up.fallback.test" in log
        assert "attempts=1 state=delivered" in log.split("to=<user@fallback.test>", 1)[1]
    finally:
        srv.stop_cleanly(PASSWORD)


# --------------------------------------------------------------------------- DKIM signing


def _published(out: str) -> str:
    """The TXT value that ``dkim keygen`` printed (its quoted strings joined)."""
    record = out.split("IN TXT (", 1)[1].split(")", 1)[0]
    return "".join(re.findall(r'"([^"]*)"', record))


def test_dkim_signature_after_masquerading_verifies_against_the_published_key(
        tmp_path: Path, cleanup) -> None:
    """``pop3coexist-admin dkim keygen contoso.test mail2026`` writes a 0600 key and prints a
    TXT record; published in the test zone, it verifies (dkimpy, over real DNS) the signature
    of a message from inside relayed through the smart host: d=contoso.test, s=mail2026,
    c=relaxed/relaxed, From oversigned, and signed after masquerading (the From: the smart host
    gets is the rewritten ted@contoso.test). Mail from outside relayed onward through the same
    smart host is not signed."""
    import dkim

    host = SmartHost(hostname="smarthost.test").start()
    cleanup.append(host)
    srv = make_server(tmp_path / "srv", tls=False)
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    out = srv.admin("dkim", "keygen", "contoso.test", "mail2026").stdout
    key = srv.state_dir / "dkim" / "contoso.test.mail2026.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    zones = {"contoso.test": [("mail2026._domainkey.contoso.test", "TXT", _published(out))]}
    dns = DnsServer(tmp_path / "dns", zones).start()
    cleanup.append(dns)
    srv.extra_config = (
        dns.config()
        + f'[smarthost]\nhost = "{host.hop}"\ntls = "none"\n'
        + f'[[dkim]]\ndomain = "contoso.test"\nselector = "mail2026"\nkey_file = "{key}"\n'
        + '[masquerade]\ndomain = "contoso.test"\nheader_from = true\n'
        + f'[[domains.remote]]\nname = "partner.test"\nrelay = true\nroute = "{host.hop}"\n'
    )
    srv.write_config()
    srv.start()
    try:
        send(srv, TED, ["bob@example.org"], message("signed", TED, "bob@example.org"))
        [signed] = host.wait_for(1)
        assert signed.mail_from == "ted@contoso.test"
        msg = message_from_bytes(signed.content)
        assert "ted@contoso.test" in msg["From"]
        sig = re.sub(r"\s+", "", msg["DKIM-Signature"])
        tags = dict(t.split("=", 1) for t in sig.split(";") if "=" in t)
        assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (
            "contoso.test", "mail2026", "relaxed/relaxed", "rsa-sha256")
        assert tags["h"].lower().split(":").count("from") == 2  # oversigned
        resolver = dns.resolver()

        def txt(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode(), "TXT")
            return b"".join(answer[0].strings)

        assert dkim.verify(signed.content, dnsfunc=txt)
        tampered = signed.content.replace(b"Hello from", b"Hullo from")
        assert not dkim.verify(tampered, dnsfunc=txt)

        # from outside, relayed to a relay domain: never signed with our key
        send(srv, "x@example.net", ["x@partner.test"], message("outside", TED, "x@partner.test"),
             source="127.0.0.7", helo="outside.test")
        outside = host.wait_for(2)[1]
        assert b"DKIM-Signature" not in outside.content
    finally:
        srv.stop_cleanly(PASSWORD)


# --------------------------------------------------------------------------- inbound checks


def _fabrikam_key() -> tuple[bytes, str]:
    """A fresh RSA key: (PKCS#1 PEM, the DKIM TXT value)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def test_inbound_spf_dkim_dmarc_results_read_over_pop3(tmp_path: Path, cleanup) -> None:
    """[sender_authentication] against a real zone; clients connect from chosen addresses:

    | client | MAIL FROM / From: | DKIM | result |
    | 127.0.0.5 | fabrikam.test (ip4:127.0.0.5 ~all, p=reject) | none | spf=pass dmarc=pass |
    | 127.0.0.6 | fabrikam.test | valid | spf=softfail dkim=pass dmarc=pass |
    | 127.0.0.6 | fabrikam.test | none | spf=softfail dmarc=fail: 550 5.7.1, not stored |
    | 127.0.0.6 | fabrikam.test | body changed | dkim=fail dmarc=fail: 550 5.7.1 |
    | 127.0.0.6 | strict.test (-all, p=quarantine) | none | spf=fail dmarc=fail, marked |
    | 127.0.0.5 | nospf.test (no records) | none | spf=none dmarc=none |
    | 127.0.0.1 (relay.networks) | strict.test | none | not checked: no field added |

    An Authentication-Results field from outside that names us is removed; one naming another
    host stays (below ours); mail from inside keeps its fields untouched."""
    import dkim

    pem, published = _fabrikam_key()
    zones = {
        "fabrikam.test": [("fabrikam.test", "TXT", "v=spf1 ip4:127.0.0.5 ~all"),
                          ("_dmarc.fabrikam.test", "TXT", "v=DMARC1; p=reject"),
                          ("sel._domainkey.fabrikam.test", "TXT", published)],
        "strict.test": [("strict.test", "TXT", "v=spf1 ip4:127.0.0.5 -all"),
                        ("_dmarc.strict.test", "TXT", "v=DMARC1; p=quarantine; adkim=s")],
        "nospf.test": [("www.nospf.test", "A", "127.0.0.9")],
    }
    dns = DnsServer(tmp_path / "dns", zones).start()
    cleanup.append(dns)
    srv = make_server(tmp_path / "srv", tls=False,
                      extra_config=dns.config() + "[sender_authentication]\n")
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    forged = (f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=b@strict.test\r\n"
              "Authentication-Results: other.example; dkim=pass header.d=strict.test\r\n")
    try:
        send(srv, "a@fabrikam.test", [TED], message("spf-pass", "a@fabrikam.test"),
             source="127.0.0.5", helo="mail.fabrikam.test")
        signed = dkim.sign(message("dkim-pass", "a@fabrikam.test"), b"sel", b"fabrikam.test",
                           pem, canonicalize=(b"relaxed", b"relaxed"))
        send(srv, "a@fabrikam.test", [TED], signed + message("dkim-pass", "a@fabrikam.test"),
             source="127.0.0.6")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(srv, "a@fabrikam.test", [TED], message("dmarc-reject", "a@fabrikam.test"),
                 source="127.0.0.6")
        assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error
        assert b"fabrikam.test" in refused.value.smtp_error
        broken = (signed + message("dkim-broken", "a@fabrikam.test")).replace(
            b"Subject: dkim-pass", b"Subject: dkim-broken")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(srv, "a@fabrikam.test", [TED], broken, source="127.0.0.6")
        assert refused.value.smtp_code == 550
        send(srv, "b@strict.test", [TED], message("spf-fail", "b@strict.test", extra=forged),
             source="127.0.0.6")
        send(srv, "c@nospf.test", [TED], message("spf-none", "c@nospf.test"),
             source="127.0.0.5")
        send(srv, "b@strict.test", [TED], message("inside", "b@strict.test", extra=forged))

        got = {message_from_bytes(m)["Subject"]: m for m in mailbox(srv, TED, 5)}
        assert sorted(got) == ["dkim-pass", "inside", "spf-fail", "spf-none", "spf-pass"]

        [ar] = auth_results(got["spf-pass"])
        assert ar.startswith(f"{HOSTNAME};")
        assert "spf=pass" in ar and "smtp.mailfrom=a@fabrikam.test" in ar
        assert "dkim=none" in ar and "dmarc=pass" in ar and "header.from=fabrikam.test" in ar

        [ar] = auth_results(got["dkim-pass"])
        assert "spf=softfail" in ar and "dmarc=pass" in ar
        assert "dkim=pass" in ar and "header.d=fabrikam.test" in ar and "header.s=sel" in ar

        ours, theirs = auth_results(got["spf-fail"])
        assert ours.startswith(f"{HOSTNAME};") and "spf=fail" in ours
        assert "dmarc=fail" in ours and "dis=quarantine" in ours
        assert theirs.startswith("other.example;")  # another host's field stays, ours is gone
        assert sum(v.startswith(HOSTNAME) for v in auth_results(got["spf-fail"])) == 1

        [ar] = auth_results(got["spf-none"])
        assert "spf=none" in ar and "dmarc=none" in ar

        inside = auth_results(got["inside"])  # inside: nothing checked, nothing removed
        assert inside == [f"{HOSTNAME}; spf=pass smtp.mailfrom=b@strict.test",
                          "other.example; dkim=pass header.d=strict.test"]
        assert "dmarc=fail" in srv.log_text()
    finally:
        srv.stop_cleanly(PASSWORD)
