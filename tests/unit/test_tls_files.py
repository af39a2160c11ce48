"""Fault 18: TLS mistakes are caught by check-config and at start-up, naming the file.

The kind: every way the [tls] certificate and private key can be unusable (a key that does not
belong to the certificate, a file that is not PEM, DER, the two files swapped, an encrypted key,
the chain in the wrong order) and a certificate out of its dates (a warning, not an error).
"""

from __future__ import annotations

import datetime
import io
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pop3coexist.admin import cli
from pop3coexist.config import load_config
from pop3coexist.errors import ConfigError
from pop3coexist.service import preflight
from pop3coexist.tls import load_tls_files, server_options
from tests.support.certs import make_ca_and_cert


def _self_signed(days_from: int, days_to: int, cn: str = "pop.contoso.test"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days_from))
        .not_valid_after(now + datetime.timedelta(days=days_to))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def setup(tmp_path):
    """A config whose [tls] names cert.pem and key.pem in tmp_path/certs (a good pair)."""
    certs = make_ca_and_cert(tmp_path / "certs", hostname="pop.contoso.test")
    path = tmp_path / "pop3coexist.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "pop.contoso.test"
        state_dir = "var"
        [tls]
        certificate = "{certs.cert}"
        private_key = "{certs.key}"
        """))
    return path, certs


def check_config(path: Path, capsys) -> tuple[int, str, str]:
    out = io.StringIO()
    code = cli.run(["-c", str(path), "check-config"], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_a_good_pair_passes(setup, capsys):
    """The control: a matching chain and key pass check-config with no warning."""
    path, _ = setup
    code, out, err = check_config(path, capsys)
    assert code == 0 and "OK" in out and err == ""


def test_key_of_another_certificate_is_refused(setup, capsys):
    """A key that does not belong to the certificate: check-config exits 1 naming both files
    (it used to say OK, and then every TLS connection failed)."""
    path, certs = setup
    _, other_key = _self_signed(-1, 30)
    certs.key.write_bytes(_pem_key(other_key))
    code, out, err = check_config(path, capsys)
    assert code == 1 and "OK" not in out
    assert str(certs.key) in err and str(certs.cert) in err and "does not belong" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("which,content,words", [
    ("cert", b"this is not a certificate\n", "is not PEM"),
    ("key", b"this is not a key\n", "is not PEM"),
    ("cert", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "no readable PEM certificate"),
    ("key", b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
     "no readable PEM private key"),
    ("cert", b"", "is empty: it should hold the PEM certificate"),
    ("key", b"", "is empty: it should hold the PEM private key"),
    ("key", b"\n\n", "is empty: it should hold the PEM private key"),
])
def test_a_file_that_is_not_pem_is_named(setup, capsys, which, content, words):
    """A file that is not PEM (or holds a broken PEM block): the error names the key and the
    file (it used to be 'not valid PEM: Error' with no file named)."""
    path, certs = setup
    target = certs.cert if which == "cert" else certs.key
    target.write_bytes(content)
    code, _, err = check_config(path, capsys)
    key = "tls.certificate" if which == "cert" else "tls.private_key"
    assert code == 1 and f"[{key}] {target}" in err and words in err


def test_der_files_get_a_conversion_hint(setup, capsys):
    """A DER (binary) certificate or key is named, with the openssl command that converts it."""
    path, certs = setup
    cert = x509.load_pem_x509_certificates(certs.cert.read_bytes())[0]
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    code, _, err = check_config(path, capsys)
    assert code == 1 and f"[tls.certificate] {certs.cert} is not PEM" in err
    assert "DER" in err and "openssl x509 -inform der" in err


def test_swapped_files_are_named(setup, capsys):
    """certificate and private_key the wrong way round: the message says they look swapped."""
    path, certs = setup
    cert_bytes, key_bytes = certs.cert.read_bytes(), certs.key.read_bytes()
    certs.cert.write_bytes(key_bytes)
    certs.key.write_bytes(cert_bytes)
    code, _, err = check_config(path, capsys)
    assert code == 1 and str(certs.cert) in err and "swapped" in err


def test_encrypted_key_is_refused(setup, capsys):
    """A passphrase-protected key: the server cannot ask for a passphrase; the file is named."""
    path, certs = setup
    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    certs.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    code, _, err = check_config(path, capsys)
    assert code == 1 and f"[tls.private_key] {certs.key} is encrypted" in err


def test_chain_in_the_wrong_order_is_refused(setup, capsys):
    """The CA first, then the server certificate: refused, saying the server's comes first."""
    path, certs = setup
    leaf, ca = x509.load_pem_x509_certificates(certs.cert.read_bytes())
    certs.cert.write_bytes(_pem_cert(ca) + _pem_cert(leaf))
    code, _, err = check_config(path, capsys)
    assert code == 1 and str(certs.cert) in err and "must come first" in err


def test_unreadable_file_is_named(setup, capsys):
    """A path that is not a readable file (here a folder): the key and the path named."""
    path, certs = setup
    certs.key.unlink()
    certs.key.mkdir()
    code, _, err = check_config(path, capsys)
    assert code == 1 and "[tls.private_key]" in err and str(certs.key) in err


@pytest.mark.parametrize("days_from,days_to,words", [(-30, -1, "expired on"),
                                                      (2, 30, "not valid before")])
def test_certificate_out_of_its_dates_is_a_warning(setup, capsys, days_from, days_to, words):
    """An expired (or not yet valid) certificate is a warning naming the file: check-config
    still says OK (exit 0), the warning on stderr; the server would start and log it."""
    path, certs = setup
    cert, key = _self_signed(days_from, days_to)
    certs.cert.write_bytes(_pem_cert(cert))
    certs.key.write_bytes(_pem_key(key))
    code, out, err = check_config(path, capsys)
    assert code == 0 and "OK" in out
    assert f"warning: [tls.certificate] {certs.cert}: the certificate CN=pop.contoso.test" in err
    assert words in err
    loaded = load_tls_files(load_config(path).tls)
    assert loaded is not None and len(loaded.warnings) == 1


def test_start_up_refuses_the_same_mistakes(setup):
    """preflight (run by twistd before anything listens) raises the same ConfigError, and
    server_options too, so no process ever starts with a pair that fails every handshake."""
    path, certs = setup
    _, other_key = _self_signed(-1, 30)
    certs.key.write_bytes(_pem_key(other_key))
    config = load_config(path)
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        preflight(config)
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        server_options(config.tls)


def test_key_and_certificate_in_one_file_work(setup, capsys):
    """A combined PEM file (key and chain together, as some tools write) serves as both."""
    path, certs = setup
    combined = certs.cert.parent / "combined.pem"
    combined.write_bytes(certs.key.read_bytes() + certs.cert.read_bytes())
    path.write_text(path.read_text().replace(str(certs.cert), str(combined))
                    .replace(str(certs.key), str(combined)))
    code, out, _ = check_config(path, capsys)
    assert code == 0 and "OK" in out
    assert server_options(load_config(path).tls) is not None


@pytest.mark.parametrize("which", ["cert", "key"])
def test_a_folder_where_a_tls_file_should_be_is_named(setup, capsys, which):
    """Fault 18: a certificate or key path that is a folder is "a folder, not a file" (it used
    to be "file not found"), with the config file and line of the key in front."""
    path, certs = setup
    target = certs.cert if which == "cert" else certs.key
    target.unlink()
    target.mkdir()
    code, _, err = check_config(path, capsys)
    key = "tls.certificate" if which == "cert" else "tls.private_key"
    assert code == 1 and f"[{key}] {target} is a folder, not a file" in err
    assert f"error: {path}:" in err


def test_errors_after_parsing_name_the_config_file_and_line(setup, capsys):
    """Fault 18: an error found when the TLS files are loaded (after parsing) names the config
    file and the line of the key, as the parser's errors do."""
    path, certs = setup
    certs.key.write_bytes(b"")
    code, _, err = check_config(path, capsys)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith("private_key"))
    assert code == 1 and f"{path}:{line}: [tls.private_key] {certs.key} is empty" in err


def test_sighup_reloads_the_admin_apis_client_certificate_options_too(setup, tmp_path):
    """``tls.reload_all`` (SIGHUP, in the main process and each worker) reloads every
    reloadable TLS setting of the process: the mail listeners' AND the admin API's, which
    also asks for client certificates of ``[admin_web] client_ca``; before, the admin
    listener kept its first certificate until a restart. A bad new file keeps the old one."""
    import shutil

    from pop3coexist.tls import (
        reload_all,
        reloadable_client_certificate_options,
        reloadable_server_options,
    )
    from tests.support.adminweb import make_client_ca

    path, certs = setup
    cfg = load_config(path).tls
    ca = make_client_ca(tmp_path / "clientca")
    listeners = reloadable_server_options(cfg)
    admin = reloadable_client_certificate_options(cfg, ca.ca_pem)

    def fingerprint(options) -> bytes:
        return options._options.certificate.to_cryptography().fingerprint(hashes.SHA256())

    before = fingerprint(admin)
    assert fingerprint(listeners) == before
    fresh = make_ca_and_cert(tmp_path / "fresh", hostname="pop.contoso.test", ca_name="next")
    shutil.copy(fresh.key, certs.key)
    shutil.copy(fresh.cert, certs.cert)
    assert reload_all() >= 2
    assert fingerprint(admin) == fingerprint(listeners) != before
    assert admin.getContext() is not None
    current = fingerprint(admin)
    certs.cert.write_text("not a certificate")
    reload_all()
    assert fingerprint(admin) == current
