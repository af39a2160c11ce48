"""Log-in rules that every ``auth.method`` shares: the log-in name rule and what "locked" means.

Log-in names (README "Log-in names"): a POP3 or SMTP AUTH log-in name is the full address
(``ted@pop.contoso.test``, any case); the bare local part (``ted``) is accepted too while the
server has exactly one local domain. ``address.login_to_address`` is the rule itself (pure, no
I/O); ``map_login`` applies it for a checker and logs, at info level and never with a password,
why a bare name was refused, so an administrator who added a second domain sees the cause.

Locks at an SMTP log-in: SMTP AUTH needs an *account*, not a mailbox (a relay account, a
service account, a user whose mailbox lives on another server), so ``login_locked`` never
fails because the account has no mailbox here. POP3 needs the mailbox, and keeps its own check
in ``pop3.realm``. Disabled accounts are refused by the checkers themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger

from pop3coexist.address import login_to_address
from pop3coexist.errors import AuthUnavailable, NoSuchMailbox, StoreError
from pop3coexist.interfaces import IMailStore

__all__ = ["bare_name_refused", "login_locked", "map_login"]

_log = Logger(namespace="pop3coexist.identity.logins")


def bare_name_refused(login: str, local_domains: Sequence[str]) -> bool:
    """True when ``login`` is a bare name (no ``@``) that the name rule refuses only because
    the server does not have exactly one local domain (``len(local_domains) != 1``)."""
    return bool(login) and "@" not in login and len(local_domains) != 1


def map_login(login: str, local_domains: Sequence[str]) -> tuple[str, str] | None:
    """``address.login_to_address(login, local_domains)``: ``(local part, domain)``, both lower
    case, or None. When a bare name is refused because the server has no or several local
    domains, one info line says so (the name and the domains, never a password)."""
    mapped = login_to_address(login, local_domains)
    if mapped is None and bare_name_refused(login, local_domains):
        domains = sorted(d.lower() for d in local_domains)
        example = f"{login.lower()}@{domains[0]}" if domains else f"{login.lower()}@<domain>"
        _log.info(
            "log-in name {login!r} refused: a bare name (no @domain) is accepted only while "
            "the server has exactly one local domain, and it has {count} ({domains}); "
            "log in with the full address, such as {example!r}",
            login=login, count=len(domains), domains=", ".join(domains) or "none",
            example=example,
        )
    return mapped


def login_locked(store: IMailStore, address: str) -> bool:
    """Blocking: True when the SMTP log-in of the account ``address`` (the checker's avatar id,
    ``"local@domain"``) must be refused as locked.

    - its mailbox exists on this server and is locked, or lies in a locked domain: locked;
    - it has no mailbox here but its domain is a local domain that is locked: locked (locking a
      domain stops every log-in of that domain's accounts);
    - it has no mailbox here and its domain is not locked, or not a local domain at all (an
      account whose mailbox lives elsewhere): not locked.

    Raises ``errors.AuthUnavailable`` (a temporary failure, logged with the reason) when the
    store cannot be read; never for a missing mailbox or domain.
    """
    local, _, domain = address.lower().rpartition("@")
    try:
        try:
            return bool(store.is_mailbox_locked(domain, local))
        except (NoSuchMailbox, ValueError):  # no such mailbox, or a name no mailbox can have
            pass
        try:
            return bool(store.is_domain_locked(domain))
        except (NoSuchMailbox, ValueError):  # not a local domain
            return False
    except (StoreError, OSError) as e:
        _log.error("cannot read the lock state of {address}: {why}", address=address, why=str(e))
        raise AuthUnavailable("the mail store cannot answer now") from None
