"""Helpers for the admin API and console tests: a server with ``[admin_web]``, an API token, a
client certificate authority, and a plain HTTP(S) caller that shows status and body."""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.server import ServerProcess


@dataclass
class ClientCA:
    """A CA (ca.pem) and how to issue client certificates from it."""

    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def ca_pem(self) -> Path:
        return self.directory / "client-ca.pem"

    def issue(self, cn: str) -> tuple[Path, Path]:
        """A client certificate for ``cn``: (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path = self.directory / f"client-{cn}.pem"
        key_path = self.directory / f"client-{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def make_client_ca(directory: Path, name: str = "admin client CA") -> ClientCA:
    """A new client CA written to ``directory/client-ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    ca = ClientCA(directory, key, cert)
    ca.ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def admin_web_server(root: Path, client_ca: Path | None = None, extra: str = "") -> ServerProcess:
    """A ServerProcess with ``[admin_web]`` on loopback HTTP and HTTPS (port 0)."""
    ca_line = f'client_ca = "{client_ca}"\n' if client_ca else ""
    return ServerProcess(root, extra_config=(
        '[admin_web]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'tls_listen = ["tcp:0:interface=127.0.0.1"]\n{ca_line}graph_interval = "1s"\n'
        + extra))


def admin_here(server: ServerProcess, *args: str, stdin: str = "") -> str:
    """``pop3coexist-admin -c CONFIG ARGS`` run in this process (the console script's code;
    a process start costs seconds on a busy machine); its standard output, or AssertionError
    with its exit code."""
    import io
    import sys

    from pop3coexist.admin import cli

    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = cli.run(["-c", str(server.config_path), *args], out)
    finally:
        sys.stdin = saved
    assert code == 0, f"admin {args} failed ({code})"
    return out.getvalue()


def make_token(server: ServerProcess, name: str) -> Path:
    """``admin token add NAME``; the token in a 0600 file."""
    token = admin_here(server, "admin", "token", "add", name).strip()
    path = server.root / f"{name}.token"
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return path


def http(url: str, *, token: str | None = None, data: dict | None = None,
         context: ssl.SSLContext | None = None, headers: dict | None = None
         ) -> tuple[int, dict, dict]:
    """``(status, JSON body or {}, headers)`` of one request (POST when ``data``)."""
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        hdrs.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=body, headers=hdrs,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            raw, status, got = answer.read(), answer.status, dict(answer.headers)
    except urllib.error.HTTPError as e:
        raw, status, got = e.read(), e.code, dict(e.headers)
        e.close()
    try:
        value = json.loads(raw)
    except ValueError:
        value = {}
    return status, value, got
