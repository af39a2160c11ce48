"""TLS for the listeners: the server context from [tls], and a self-signed pair on request.

Protocol code asks for ``server_options(config.tls)`` and calls ``transport.startTLS`` with it
(STLS, STARTTLS) or wraps a listener in it (POP3S, SMTPS). ``load_tls_files`` loads and checks
the files (PEM, the key belongs to the first certificate, dates) for ``check-config`` and the
start-up check; every error names the key and the file. Nothing here touches sockets.

The shipped defaults (README "TLS"): TLS 1.2 and 1.3 only; for TLS 1.2 only forward-secret
ECDHE suites, AEAD first (``CIPHERS``); the server's cipher order; no TLS compression (CRIME);
no renegotiation at all (``OP_NO_RENEGOTIATION``: neither client- nor server-initiated).

``ReloadableServerOptions`` is what the listeners and STLS/STARTTLS hold: an
``IOpenSSLContextFactory`` whose ``getContext()`` is asked once per new TLS connection, and
whose ``reload()`` (SIGHUP, ``reload_all`` for every one of the process: the mail listeners'
and the admin API's with its client CA) swaps in a context made from the files as they are
now. A session already in TLS keeps the connection object made from the old context, so a
reload drops none.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist.config import TlsConfig
from pop3coexist.errors import ConfigError


def ensure_self_signed(cfg: TlsConfig, hostname: str) -> None:
    """With ``[tls] self_signed = true``, create the certificate and key if both are missing."""
    if not cfg.self_signed or cfg.certificate is None or cfg.private_key is None:
        return
    if cfg.certificate.exists() or cfg.private_key.exists():
        return
    from cryptography.hazmat.primitives import hashes
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


@dataclass(frozen=True)
class LoadedTls:
    """The checked contents of the [tls] files: the chain (server certificate first), the key,
    and warnings (an expired certificate) for the log and ``check-config``."""

    chain: tuple[x509.Certificate, ...]
    key: Any
    warnings: tuple[str, ...]


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"[tls.{key}] {path} is a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"[tls.{key}] cannot read {path}: {e.strerror}")


def _not_pem(path: Path, key: str, what: str, data: bytes) -> ConfigError:
    if not data.strip():
        return ConfigError(f"[tls.{key}] {path} is empty: it should hold the PEM {what}")
    if b"-----BEGIN" not in data:
        hint = ("it looks like DER (binary): convert it with "
                f"`openssl {'x509' if key == 'certificate' else 'pkey'} -inform der -in FILE`"
                if data[:1] == b"\x30" else "a PEM file has -----BEGIN ...----- lines")
        return ConfigError(f"[tls.{key}] {path} is not PEM: {hint}")
    return ConfigError(f"[tls.{key}] {path} holds no readable PEM {what}")


def load_tls_files(cfg: TlsConfig, now: datetime.datetime | None = None) -> LoadedTls | None:
    """Load and check the [tls] certificate chain and private key; None when TLS is off.

    Raises ConfigError naming the key and the file when a file cannot be read, holds no PEM
    certificate or private key (a DER file, a certificate where the key should be, an encrypted
    key), or when the key does not belong to the first certificate of the chain. A certificate
    that has expired or is not valid yet is not an error (clients decide): it is a warning.
    """
    if not cfg.enabled:
        return None
    assert cfg.certificate is not None and cfg.private_key is not None
    cert_pem = _read(cfg.certificate, "certificate")
    key_pem = _read(cfg.private_key, "private_key")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        if b"PRIVATE KEY-----" in cert_pem and b"CERTIFICATE-----" not in cert_pem:
            raise ConfigError(f"[tls.certificate] {cfg.certificate} holds a private key, not a "
                              "certificate (are certificate and private_key swapped?)") from None
        raise _not_pem(cfg.certificate, "certificate", "certificate", cert_pem) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # a passphrase is needed
        raise ConfigError(f"[tls.private_key] {cfg.private_key} is encrypted; the server cannot "
                          "ask for a passphrase (decrypt it with `openssl pkey -in FILE -out "
                          "NEW`, readable by the server only)") from None
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY-----" not in key_pem and b"CERTIFICATE-----" in key_pem:
            raise ConfigError(f"[tls.private_key] {cfg.private_key} holds a certificate, not a "
                              "private key (are certificate and private_key swapped?)") from None
        raise _not_pem(cfg.private_key, "private_key", "private key", key_pem) from None
    mine = _public_der(key.public_key())
    if _public_der(chain[0].public_key()) != mine:
        later = [i for i, c in enumerate(chain[1:], 2) if _public_der(c.public_key()) == mine]
        if later:
            raise ConfigError(
                f"[tls.certificate] {cfg.certificate}: the certificate of the private key "
                f"{cfg.private_key} is number {later[0]} in the file; the server certificate "
                "must come first, then the intermediates")
        raise ConfigError(
            f"[tls] the private key {cfg.private_key} does not belong to the certificate "
            f"{cfg.certificate} (their public keys differ)")
    now = now or datetime.datetime.now(datetime.UTC)
    warnings: list[str] = []
    first = chain[0]
    subject = first.subject.rfc4514_string() or "(no subject)"
    if first.not_valid_after_utc < now:
        warnings.append(f"[tls.certificate] {cfg.certificate}: the certificate {subject} expired "
                        f"on {first.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; clients that "
                        "verify it will refuse to connect")
    elif first.not_valid_before_utc > now:
        warnings.append(f"[tls.certificate] {cfg.certificate}: the certificate {subject} is not "
                        f"valid before {first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return LoadedTls(chain, key, tuple(warnings))


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


# TLS 1.3 suites first (OpenSSL picks among them itself), then TLS 1.2: only ECDHE key
# exchange (forward secrecy; no RSA key transport, so no ROBOT), AEAD before CBC. The
# ECDHE CBC suites stay for Windows 7 / Outlook 2010-era clients, which have no ECDHE-RSA
# GCM suite; testssl.sh rates them LOW (LUCKY13), never MEDIUM.
CIPHERS = (
    "TLS13-AES-256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256:TLS13-AES-128-GCM-SHA256:"
    "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES256:ECDHE+AES128:"
    "!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP:!CAMELLIA:!ARIA"
)

_log = Logger()


class _Options(ssl.CertificateOptions):
    """CertificateOptions with renegotiation switched off in every context it makes."""

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:  # noqa: N802 (Twisted's)
        ctx = super()._makeContext(skipCiphers)
        ctx.set_options(SSL.OP_NO_RENEGOTIATION)
        return ctx


def _options(loaded: Any, **extra: Any) -> ssl.CertificateOptions:
    """The server options every listener shares (the chain and key of ``loaded``, TLS 1.2 at
    least, CIPHERS), with ``extra`` CertificateOptions arguments (client verification)."""
    return _Options(
        privateKey=crypto.PKey.from_cryptography_key(loaded.key),
        certificate=crypto.X509.from_cryptography(loaded.chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in loaded.chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        **extra,
    )


def server_options(cfg: TlsConfig) -> ssl.CertificateOptions | None:
    """A CertificateOptions for the configured chain and key, or None when TLS is off.

    Raises ConfigError as ``load_tls_files`` does (the key and the file named).
    """
    loaded = load_tls_files(cfg)
    if loaded is None:
        return None
    try:
        options = _options(loaded)
        options.getContext()  # make it now: a key OpenSSL refuses fails here, not at a client
        return options
    except Exception as e:  # OpenSSL refuses a key type or a certificate it cannot use
        raise ConfigError(f"[tls] {cfg.certificate} and {cfg.private_key} cannot be used for "
                          f"TLS: {e.__class__.__name__}: {e}")


def client_certificate_options(cfg: TlsConfig, client_ca: Path) -> ssl.CertificateOptions:
    """Server options for ``cfg`` that ask for a client certificate (not require one) and
    verify it against the CA certificates in ``client_ca`` (a certificate that does not verify
    fails the handshake): the admin API's ``tls_listen`` with ``[admin_web] client_ca``.
    ConfigError as ``server_options``, or for a ``client_ca`` without a PEM certificate."""
    loaded = load_tls_files(cfg)
    if loaded is None:
        raise ConfigError("[admin_web] tls_listen needs [tls] certificate and private_key")
    try:
        cas = x509.load_pem_x509_certificates(client_ca.read_bytes())
    except OSError as e:
        raise ConfigError(f"[admin_web] client_ca: cannot read {client_ca}: {e.strerror}")
    except ValueError as e:
        raise ConfigError(f"[admin_web] client_ca {client_ca}: no PEM certificate ({e})")
    try:
        options = _options(loaded, verify=True, requireCertificate=False,
                           caCerts=[crypto.X509.from_cryptography(c) for c in cas])
        options.getContext()
        return options
    except Exception as e:
        raise ConfigError(f"[tls] {cfg.certificate} with [admin_web] client_ca {client_ca} "
                          f"cannot be used for TLS: {e.__class__.__name__}: {e}")


@implementer(IOpenSSLContextFactory)
class ReloadableServerOptions:
    """The server TLS settings of one process, reloadable: see the module docstring.

    ``getContext()`` returns the current ``SSL.Context`` (Twisted asks once per connection,
    for TLS-on-connect listeners and for STLS/STARTTLS alike). ``reload()`` re-reads
    ``[tls]``; when the new files fail the checks of ``server_options`` it logs the reason
    and keeps serving the old certificate, and returns False.
    """

    def __init__(self, cfg: TlsConfig,
                 build: Callable[[TlsConfig], ssl.CertificateOptions | None] | None = None,
                 ) -> None:
        """``build(cfg)`` makes the options from the files (``server_options``, or the
        admin API's ``client_certificate_options``); every instance is reloaded by
        ``reload_all``."""
        self.cfg = cfg
        self._build = build or server_options
        options = self._build(cfg)
        assert options is not None, "ReloadableServerOptions needs [tls] set"
        self._options = options
        _LIVE.add(self)

    def getContext(self) -> SSL.Context:  # noqa: N802 (IOpenSSLContextFactory)
        return self._options.getContext()

    def reload(self) -> bool:
        """Load the certificate and key again; True when the new pair is now in use."""
        try:
            options = self._build(self.cfg)
        except ConfigError as e:
            _log.error("SIGHUP: TLS certificate not reloaded, the old one stays in use: {why}",
                       why=str(e))
            return False
        assert options is not None
        self._options = options
        _log.info("SIGHUP: TLS certificate and key reloaded from {cert}",
                  cert=str(self.cfg.certificate))
        return True


_LIVE: weakref.WeakSet[ReloadableServerOptions] = weakref.WeakSet()


def reload_all() -> int:
    """SIGHUP: ``reload()`` every ReloadableServerOptions of this process (the mail
    listeners' and the admin API's); how many took their new files."""
    return sum(1 for options in list(_LIVE) if options.reload())


def reloadable_client_certificate_options(cfg: TlsConfig,
                                          client_ca: Path) -> ReloadableServerOptions:
    """``client_certificate_options`` that SIGHUP reloads (the certificate, key and the
    client CA file), like the mail listeners' (ConfigError as it raises)."""
    return ReloadableServerOptions(cfg, lambda c: client_certificate_options(c, client_ca))


def reloadable_server_options(cfg: TlsConfig) -> ReloadableServerOptions | None:
    """``ReloadableServerOptions`` for ``cfg``, or None when TLS is off (ConfigError as
    ``server_options``)."""
    if not cfg.enabled:
        return None
    return ReloadableServerOptions(cfg)


def certificate_path_exists(path: Path | None) -> bool:
    return path is not None and path.is_file()
