"""The listeners of a web front-end: the rule "TLS required except on loopback" and the
(role, endpoint description, factory) triples service.py binds.

The rule itself is checked when the config is read (``config.check_web_listeners``: a plain
``listen`` that is not loopback is a config error naming file, line and key); ``listeners``
checks it again (``config.is_loopback_endpoint``), so no caller can bind a plain HTTP port
on the network by mistake. A ``tls_listen`` entry is a plain TCP description wrapped in TLS
from the first byte with the server's reloadable ``[tls]`` options (SIGHUP reloads them).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory

from pop3coexist.config import is_loopback_endpoint
from pop3coexist.errors import ConfigError


def listeners(role: str, section: str, listen: tuple[str, ...], tls_listen: tuple[str, ...],
              site: Any, tls_options: Any) -> list[tuple[str, str, Any]]:
    """(role or role + "_tls", description, factory) for each listener of a front-end;
    ConfigError naming ``[section.listen]`` for a plain listener off loopback."""
    out: list[tuple[str, str, Any]] = []
    for desc in listen:
        if not is_loopback_endpoint(desc):
            raise ConfigError(f"[{section}.listen] {desc!r} is not a loopback address: use "
                              "tls_listen")
        out.append((role, desc, site))
    for desc in tls_listen:
        if tls_options is None:
            raise ConfigError(f"[{section}.tls_listen] needs [tls] certificate and private_key")
        out.append((role + "_tls", desc, TLSMemoryBIOFactory(tls_options, False, site)))
    return out
