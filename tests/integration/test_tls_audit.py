"""The TLS audit (issue 16 item 3): testssl.sh against a running server's four TLS doors, and
certificates reloaded on SIGHUP without dropping a session.

testssl.sh (Debian's package) scans POP3S and SMTPS (TLS from the first byte) and the STLS
(POP3) and STARTTLS (SMTP) upgrades of the real twistd with the shipped TLS defaults
(``pop3coexist.tls``), and its JSON findings are read: none may be MEDIUM, HIGH or CRITICAL.
The certificate is a test PKI's (its CA given to testssl with --add-ca), valid for a year and
naming a CRL, so that the certificate checks judge the server's settings and not the test's
shortcuts. All four doors use one TLS context object per process, so the check groups are
spread to keep CI time down (about 5 minutes on a loaded 2-core machine): POP3S gets every
group that bears on the settings (protocols, cipher categories, forward secrecy, server
cipher order, server defaults, renegotiation, compression, the vulnerability checks); SMTP
STARTTLS (the Internet-facing door) protocols, cipher categories, renegotiation and
compression; STLS and SMTPS protocols, renegotiation and compression.
"""

from __future__ import annotations

import hashlib
import json
import os
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.certs import make_ca_and_cert
from tests.support.programs import require_program
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration

PASSWORD = "Tls-audit pass 7"
BLOCKING = {"MEDIUM", "HIGH", "CRITICAL"}
FULL = ["-p", "-s", "-f", "-P", "-S", "-R", "-C", "-U"]
SETTINGS = ["-p", "-s", "-R", "-C"]
SAME_CONTEXT = ["-p", "-R", "-C"]

# (listener role, testssl STARTTLS protocol or None for TLS on connect, check groups)
DOORS = [
    ("pop3s", None, FULL),
    ("smtp", "smtp", SETTINGS),
    ("pop3", "pop3", SAME_CONTEXT),
    ("smtps", None, SAME_CONTEXT),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server (two processes: the audit reaches whichever accepts) with a
    certificate that is valid for a year and names a CRL."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("tls-audit"), server_config="workers = 2")
    srv.write_config()
    srv.certs = make_ca_and_cert(srv.root / "certs", hostname="localhost", days=365,
                                 crl_url="http://127.0.0.1/pop3coexist-test-ca.crl")
    srv.add_mailbox(f"ted@{HOSTNAME}", PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def run_testssl(server: ServerProcess, role: str, starttls: str | None, groups: list[str],
                out: Path) -> list[dict]:
    """Run testssl.sh against one listener; return its flat JSON findings."""
    testssl = require_program("testssl", "testssl.sh")
    assert server.certs is not None
    report = out / f"testssl-{role}.json"
    cmd = [testssl, "--quiet", "--warnings", "off", "--color", "0", "--nodns", "none",
           "--connect-timeout", "10", "--openssl-timeout", "10",
           "--add-ca", str(server.certs.ca_cert), "--jsonfile", str(report), *groups]
    if starttls:
        cmd += ["-t", starttls]
    cmd.append(f"127.0.0.1:{server.port(role)}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=out,
                          stdin=subprocess.DEVNULL)
    assert report.exists(), f"testssl wrote no report ({done.returncode}):\n{done.stdout[-3000:]}"
    return json.loads(report.read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("role", "starttls", "groups"), DOORS, ids=[d[0] for d in DOORS])
def test_testssl_finds_nothing_medium_or_higher(server, tmp_path, role, starttls, groups):
    """testssl.sh rates no finding MEDIUM or higher on this door with the shipped defaults:
    only TLS 1.2 and 1.3, no weak or export cipher, secure renegotiation only and no
    client-initiated one, no TLS compression (CRIME), and (full groups) forward secrecy,
    server cipher order and none of the known protocol vulnerabilities."""
    findings = run_testssl(server, role, starttls, groups, tmp_path)
    by_id = {f["id"]: f for f in findings}
    bad = [f"{f['id']} {f['severity']}: {f['finding']}" for f in findings
           if f.get("severity") in BLOCKING]
    assert not bad, "testssl.sh findings of MEDIUM or higher:\n" + "\n".join(bad)
    # The checks really ran (a scan that could not connect has no such findings).
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert by_id[old]["finding"].startswith("not offered"), by_id[old]
    assert by_id["TLS1_2"]["finding"].startswith("offered"), by_id["TLS1_2"]
    assert by_id["TLS1_3"]["finding"].startswith("offered"), by_id["TLS1_3"]
    assert by_id["secure_client_renego"]["severity"] == "OK", by_id["secure_client_renego"]
    assert by_id["CRIME_TLS"]["severity"] == "OK", by_id["CRIME_TLS"]
    if "-f" in groups:
        assert by_id["PFS"]["severity"] == "OK", by_id["PFS"]


# ---------------------------------------------------------------------- SIGHUP reload


def _fingerprint_pop3s(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            tls.recv(512)  # the greeting
    return hashlib.sha256(der).hexdigest()


def _fingerprint_starttls(port: int, ca: Path) -> str:
    import smtplib

    ctx = ssl.create_default_context(cafile=str(ca))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        der = smtp.sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _cert_fingerprint(path: Path) -> str:
    pem = path.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


@pytest.mark.timeout(180)
def test_sighup_reloads_certificate_without_dropping_sessions(tmp_path):
    """After the certificate and key files are replaced and the main process gets SIGHUP, a
    POP3S session opened before the signal keeps working (STAT, RETR, QUIT on the old TLS
    connection), and every new connection, to the main process and to the worker alike, gets
    the new certificate, on POP3S and with SMTP STARTTLS; the server logs the reload."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", server_config="workers = 2")
    srv.write_config()
    address = f"ted@{HOSTNAME}"
    srv.add_mailbox(address, PASSWORD)
    new = srv.state_dir / "mailroot" / HOSTNAME / "ted" / "new"
    new.mkdir(parents=True, exist_ok=True)
    (new / "1.reload.test").write_bytes(b"Subject: before the reload\n\nhello\n")
    with srv:
        assert srv.certs is not None and srv.proc is not None
        old_ca, old_fp = srv.certs.ca_cert, _cert_fingerprint(srv.certs.cert)
        saved = tmp_path / "old-ca.pem"
        shutil.copy(old_ca, saved)
        assert _fingerprint_pop3s(srv.port("pop3s"), saved) == old_fp
        before = poplib.POP3_SSL("127.0.0.1", srv.port("pop3s"), timeout=10,
                                 context=ssl.create_default_context(cafile=str(saved)))
        before.user(address)
        before.pass_(PASSWORD)

        fresh = make_ca_and_cert(tmp_path / "new-certs", hostname="localhost", ca_name="second CA")
        new_fp = _cert_fingerprint(fresh.cert)
        assert new_fp != old_fp
        # Replace in place, as an ACME client's deploy hook does (key first, then chain).
        tmp_key = srv.certs.key.with_suffix(".new")
        tmp_key.write_bytes(fresh.key.read_bytes())
        os.chmod(tmp_key, 0o600)
        os.replace(tmp_key, srv.certs.key)
        tmp_cert = srv.certs.cert.with_suffix(".new")
        tmp_cert.write_bytes(fresh.cert.read_bytes())
        os.replace(tmp_cert, srv.certs.cert)
        srv.proc.send_signal(signal.SIGHUP)

        # Poll until the reload shows, then demand it of a run of new connections (which
        # the two processes share between them).
        deadline = time.monotonic() + 30
        while True:
            try:
                if _fingerprint_pop3s(srv.port("pop3s"), fresh.ca_cert) == new_fp:
                    break
            except ssl.SSLCertVerificationError:
                pass  # still the old certificate (not signed by the new CA): not reloaded yet
            assert time.monotonic() < deadline, "no new certificate within 30 s of SIGHUP"
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        seen = 0
        while seen < 8:
            try:
                assert _fingerprint_pop3s(srv.port("pop3s"), fresh.ca_cert) == new_fp
                assert _fingerprint_starttls(srv.port("smtp"), fresh.ca_cert) == new_fp
                seen += 1
            except ssl.SSLCertVerificationError:  # a worker that has not reloaded yet
                assert time.monotonic() < deadline, "a process kept the old certificate"
                seen = 0

        count, _size = before.stat()
        assert count == 1
        _resp, lines, _octets = before.retr(1)
        assert b"Subject: before the reload" in lines
        assert before.quit().startswith(b"+OK")
        log = srv.log_text()
        assert "TLS certificate and key reloaded" in log
        assert "[worker 1" in log and log.count("TLS certificate and key reloaded") >= 2, \
            srv.log_tail(60)
    assert "Traceback" not in srv.log_text()
