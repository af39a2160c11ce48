"""``pop3coexist-admin dkim keygen DOMAIN SELECTOR [--bits N]``: a DKIM signing key.

Writes a new RSA key (PKCS#1 PEM, as dkimpy reads it) to
``<state_dir>/dkim/<domain>.<selector>.pem`` with mode 0600, owned like the state folder
(when run as root for a server that runs as another user), and prints the DNS TXT record to
publish at ``<selector>._domainkey.<domain>`` (RFC 6376 section 3.6.1: ``v=DKIM1; k=rsa;
p=<base64 SubjectPublicKeyInfo>``, cut into strings of at most 255 characters, section 3.6.2.2)
and the ``[[dkim]]`` entry to add to the config. An existing key file is never overwritten:
a new key gets a new selector (publish it, switch the config, then retire the old record).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

from pop3coexist.address import AddressError, normalise_domain
from pop3coexist.config import Config
from pop3coexist.errors import AdminError

MIN_BITS, MAX_BITS = 1024, 4096


def key_path(config: Config, domain: str, selector: str) -> Path:
    """Where ``dkim keygen`` writes the key of ``domain`` and ``selector``."""
    return config.server.state_dir / "dkim" / f"{domain}.{selector}.pem"


def txt_record(domain: str, selector: str, public_der: bytes) -> str:
    """The zone-file line of the DKIM key record (strings of at most 255 characters)."""
    value = "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der).decode("ascii")
    parts = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = "\n    ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. 3600 IN TXT ( {quoted} )"


def keygen(config: Config, domain: str, selector: str, bits: int, out: Any) -> Path:
    """Write the key and print what to publish; AdminError on bad input or an existing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        domain = normalise_domain(domain)
    except AddressError as e:
        raise AdminError(str(e)) from None
    selector = selector.lower()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                        r"[a-z0-9])?)*", selector):
        raise AdminError(f"{selector!r} is not a selector (letters, digits, '-', dot-separated)")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise AdminError(f"--bits must be from {MIN_BITS} to {MAX_BITS} (RFC 8301: at least "
                         "1024; 2048 is the usual size)")
    path = key_path(config, domain, selector)
    if path.exists():
        raise AdminError(f"{path} exists: choose a new selector for a new key")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    state = config.server.state_dir
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        _own_like(state, path.parent, tmp)
        os.link(tmp, path)  # never replaces a key written meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    print(f"DKIM key for {domain} (selector {selector}, RSA {bits} bits) written to {path}",
          file=out)
    print(f"\n1. Publish this TXT record in the DNS zone of {domain}:\n", file=out)
    print(txt_record(domain, selector, public), file=out)
    print("\n2. Once it resolves (dig +short TXT "
          f"{selector}._domainkey.{domain}), add to the config and restart:\n", file=out)
    print(f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{path}"',
          file=out)
    return path


def _own_like(state: Path, *paths: Path) -> None:
    """Run as root: give ``paths`` the owner and group of the state folder (the account the
    server runs as), so that it can read the key."""
    if os.geteuid() != 0:
        return
    try:
        st = state.stat()
    except OSError:
        return
    for p in paths:
        os.chown(p, st.st_uid, st.st_gid)
