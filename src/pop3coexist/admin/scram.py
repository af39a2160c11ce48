"""``pop3coexist-admin mailbox scram-keys [USER@DOMAIN]``: give password-file accounts their
SCRAM-SHA-256 keys (README "SCRAM-SHA-256").

Accounts whose password was set before SCRAM keys existed have none, and the server offers
SCRAM-SHA-256 only once every account has them. This verb makes them from the stored secrets
(kept with ``auth.apop = true``); an account without a stored secret is named, with what to do
(set its password again, or let its owner log in once with a clear-text mechanism, which adds
the keys). The running server sees the change without a restart.
"""

from __future__ import annotations

from typing import Any

from pop3coexist.config import Config
from pop3coexist.errors import AdminError


def run_scram_keys(config: Config, pwfile: Any, address: str | None, say: Any) -> None:
    """Make SCRAM keys for ``address`` (or every account lacking them); report on ``say``.
    AdminError (exit 1) with another ``auth.method`` or when an address has no password."""
    if config.auth.method != "passwordfile":
        raise AdminError(f'SCRAM-SHA-256 keys live in the password file; with auth.method '
                         f'"{config.auth.method}" the server does not offer SCRAM-SHA-256')
    made, missing = pwfile.keys_from_secrets(address.lower() if address else None)
    for a in made:
        say(f"SCRAM-SHA-256 keys made for {a}")
    for a in missing:
        say(f"{a}: no stored secret to make SCRAM keys from: set its password again "
            f"(mailbox passwd {a}), or its owner logs in once with USER/PASS, PLAIN or LOGIN")
    if not made and not missing:
        say("every account already has SCRAM-SHA-256 keys" if address is None
            else f"{address.lower()} already has SCRAM-SHA-256 keys")
    elif not missing:
        say("every account has SCRAM-SHA-256 keys: the server offers SCRAM-SHA-256")
