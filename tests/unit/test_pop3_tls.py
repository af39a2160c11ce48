"""One real round trip over loopback sockets (OS-picked ports) in a child process: stdlib
poplib does STLS (real TLS handshake, certificate verified against the test CA) and
USER/PASS, LIST, RETR of a 300 kB message, DELE, QUIT against POP3ServerFactory over the real
MaildirStore with threads; then the same over an implicit-TLS (POP3S) listener, and APOP."""

from __future__ import annotations

import hashlib
import json
import os
import poplib
import re
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.certs import make_ca_and_cert

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from twisted.internet import reactor, endpoints
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from pop3coexist.config import (Config, ServerConfig, Pop3Config, TlsConfig, DomainsConfig)
    from pop3coexist.tls import server_options
    from pop3coexist.store.maildir import MaildirStore
    from pop3coexist.pop3.factory import POP3ServerFactory
    from tests.support.fakes import FakeChecker

    tmp = Path(sys.argv[1])
    cfg = Config(server=ServerConfig("pop.contoso.test", tmp / "state"),
                 pop3=Pop3Config(require_secure_auth=True),
                 tls=TlsConfig(certificate=tmp / "certs" / "cert.pem",
                               private_key=tmp / "certs" / "key.pem"),
                 domains=DomainsConfig(local=("pop.contoso.test",)))
    store = MaildirStore(cfg.server.mailroot, hostname="pop.contoso.test")
    store.add_domain("pop.contoso.test")
    store.add_mailbox("pop.contoso.test", "ted")
    body = b"".join(b".line %06d of a long message\\n" % i for i in range(10000))
    store.deliver_bytes("pop.contoso.test", "ted", b"Subject: big\\n\\n" + body)
    store.deliver_bytes("pop.contoso.test", "ted", b"Subject: small\\n\\nhi\\n")
    checker = FakeChecker({"ted@pop.contoso.test": "Secret pw"})
    options = server_options(cfg.tls)
    plain = POP3ServerFactory(cfg, store, checker, tls_options=options)
    implicit = POP3ServerFactory(cfg, store, checker, tls_options=options, implicit_tls=True)
    ports = {}
    def listening(port, name):
        ports[name] = port.getHost().port
        if len(ports) == 2:
            print(json.dumps(ports), flush=True)
    endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(plain).addCallback(
        listening, "pop3")
    endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TLSMemoryBIOFactory(options, False, implicit)).addCallback(listening, "pop3s")
    reactor.callLater(60, reactor.stop)
    reactor.run()
""")


@pytest.fixture
def server(tmp_path):
    certs = make_ca_and_cert(tmp_path / "certs", hostname="pop.contoso.test")
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("server did not start: " + proc.stderr.read().decode(errors="replace"))
        ports = json.loads(line)
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        context.check_hostname = False  # the certificate names pop.contoso.test, we dial 127.0.0.1
        yield ports, context
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_stls_round_trip_with_poplib(server):
    """STLS upgrades a real connection; clear-text log-in is refused before it, works after;
    a 300 kB dot-heavy message comes back byte for byte; DELE + QUIT removes it."""
    ports, context = server
    pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=20)
    try:
        assert "STLS" in pop.capa() and "USER" not in pop.capa()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.user("ted")
        pop.stls(context)
        assert "STLS" not in pop.capa()
        pop.user("ted")
        assert pop.pass_("Secret pw").startswith(b"+OK ted@pop.contoso.test has 2 messages")
        _, listing, _ = pop.list()
        assert len(listing) == 2
        _, lines, octets = pop.retr(1)
        assert lines[0] == b"Subject: big" and lines[2] == b".line 000000 of a long message"
        assert len(lines) == 10002
        assert int(listing[0].split()[1]) == sum(len(x) + 2 for x in lines)
        pop.dele(1)
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()
    pop = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], timeout=20, context=context)
    try:
        greeting = pop.getwelcome()
        assert "STLS" not in pop.capa()
        magic = re.search(rb"<[^>]+>", greeting).group(0)
        digest = hashlib.md5(magic + b"Secret pw").hexdigest()
        assert pop._shortcmd(f"APOP ted {digest}").startswith(b"+OK ted@pop.contoso.test has 1")
        _, lines, _ = pop.retr(1)
        assert lines == [b"Subject: small", b"", b"hi"]
        pop.quit()
    finally:
        pop.close()
