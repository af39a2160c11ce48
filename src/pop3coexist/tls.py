"""TLS for the listeners: the server context from [tls], and a self-signed pair on request.

Protocol code asks for ``server_options(config.tls)`` and calls ``transport.startTLS`` with it
(STLS, STARTTLS) or wraps a listener in it (POP3S, SMTPS). Nothing here touches sockets.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from OpenSSL import crypto
from twisted.internet import ssl

from pop3coexist.config import TlsConfig
from pop3coexist.errors import ConfigError


def ensure_self_signed(cfg: TlsConfig, hostname: str) -> None:
    """With ``[tls] self_signed = true``, create the certificate and key if both are missing."""
    if not cfg.self_signed or cfg.certificate is None or cfg.private_key is None:
        return
    if cfg.certificate.exists() or cfg.private_key.exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cfg.private_key.parent.mkdir(parents=True, exist_ok=True)
    cfg.certificate.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cfg.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_options(cfg: TlsConfig) -> ssl.CertificateOptions | None:
    """A CertificateOptions for the configured chain and key, or None when TLS is off.

    Raises ConfigError naming the key when a file is missing or does not hold PEM.
    """
    if not cfg.enabled:
        return None
    assert cfg.certificate is not None and cfg.private_key is not None
    try:
        chain = cfg.certificate.read_bytes()
    except OSError as e:
        raise ConfigError(f"[tls.certificate] cannot read {cfg.certificate}: {e.strerror}")
    try:
        key_pem = cfg.private_key.read_bytes()
    except OSError as e:
        raise ConfigError(f"[tls.private_key] cannot read {cfg.private_key}: {e.strerror}")
    try:
        certs = ssl.Certificate.loadPEM(chain)
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except Exception as e:  # OpenSSL raises several types for bad PEM
        raise ConfigError(f"[tls] certificate or private_key is not valid PEM: {e.__class__.__name__}")
    extra = _extra_chain(chain)
    try:
        return ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs.original,
            extraCertChain=extra,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as e:
        raise ConfigError(f"[tls] certificate and private_key do not match: {e.__class__.__name__}")


def _extra_chain(chain: bytes) -> list:
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = [marker + p for p in chain.split(marker)[1:]]
    return [ssl.Certificate.loadPEM(p).original for p in parts[1:]]


def certificate_path_exists(path: Path | None) -> bool:
    return path is not None and path.is_file()
