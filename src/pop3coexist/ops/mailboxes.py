"""Domains, mailboxes and ``stat``: the operations over the Maildir store and the password file
(README "Administration"). Each returns JSON-able data (``context.done`` for a change) or
raises ``context.OpsError``.
"""

from __future__ import annotations

from collections.abc import Callable

from pop3coexist.config import parse_size
from pop3coexist.errors import AuthUnavailable
from pop3coexist.ops.context import Context, domain_name, done, fail, split_address

#: a password: the text, or a function that reads it (called only once it is needed, so that
#: a command reads standard input after the checks that may refuse the change)
Password = str | Callable[[], str] | None


def _password(source: Password) -> str:
    password = source() if callable(source) else source
    if not password:
        fail("empty passwords are not allowed")
    if "\n" in password or "\r" in password or "\0" in password:
        fail("a password is one line")
    return password


# -- domains


def domain_add(ctx: Context, name: str) -> dict:
    """Add a local domain (and its postmaster mailbox when the config wants one there).
    ``warnings``: when it is the second domain, that bare-name log-ins end (README "Log-in
    names"): a bare name (``ted``) logs in only while there is exactly one local domain."""
    domain = domain_name(name)
    store, config = ctx.store, ctx.config
    before = store.list_domains()
    if config.auth.method == "local":
        others = [d for d in before if d != domain]
        if others:
            fail(f"auth.method \"local\" allows one mail domain only; {others[0]} exists")
    if not store.add_domain(domain):
        fail(f"domain {domain} already exists")
    messages = [f"domain {domain} added"]
    from pop3coexist.policy.relay import RoleAddresses, primary_domain, role_mailboxes

    domains = store.list_domains()
    for box_domain, mailbox in role_mailboxes(config, domains):
        if box_domain == domain and store.add_mailbox(box_domain, mailbox):
            messages.append(f"mailbox {mailbox}@{domain} added (postmaster mail lands there)")
    target = RoleAddresses.from_config(config).postmaster_for(primary_domain(config, domains))
    if target is not None:
        messages.append(f"mail for postmaster@{domain} lands in <{target}> unless a mailbox "
                        f"postmaster@{domain} exists (RFC 5321 section 4.5.1)")
    warnings = []
    if len(before) == 1 and domain not in before:
        warnings.append(
            f"the server now has two local domains, so bare-name log-ins end: users must log in "
            f"with their full address (ted@{before[0]}, not ted) for POP3 and SMTP AUTH; a bare "
            "name works only while there is exactly one local domain")
    return done(*messages, warnings=warnings, domain=domain)


def domain_remove(ctx: Context, name: str, yes: bool = False) -> dict:
    """Remove a domain, its mailboxes, their mail and their passwords (``yes`` required)."""
    domain = domain_name(name)
    if domain in ctx.config.domains.local:
        fail(f"domain {domain} is named in [domains] local of {ctx.config.path}; remove it "
             "there first")
    ctx.need_domain(domain)
    if not yes:
        fail(f"removing {domain} deletes all its mailboxes and mail: add --yes")
    if ctx.config.auth.method == "passwordfile":
        ctx.password_file().remove_domain(domain)
    ctx.store.remove_domain(domain)
    return done(f"domain {domain} removed", domain=domain)


def domain_list(ctx: Context) -> dict:
    """``{"domains": [{"domain", "mailboxes": count, "locked"}]}``."""
    store = ctx.store
    return {"domains": [{"domain": d, "mailboxes": len(store.list_mailboxes(d)),
                         "locked": store.is_domain_locked(d)} for d in store.list_domains()]}


def domain_lock(ctx: Context, name: str, locked: bool = True) -> dict:
    """Lock (or unlock) a domain: nobody in it can log in; mail still arrives."""
    domain = domain_name(name)
    ctx.need_domain(domain)
    ctx.store.set_domain_locked(domain, locked)
    return done(f"domain {domain} {'locked' if locked else 'unlocked'}", domain=domain,
                locked=locked)


def domain_unlock(ctx: Context, name: str) -> dict:
    """Unlock a domain."""
    return domain_lock(ctx, name, False)


# -- mailboxes


def mailbox_add(ctx: Context, address: str, password: Password = None) -> dict:
    """Add a mailbox. With ``auth.method = "passwordfile"`` ``password`` is required and
    stored; otherwise the account must exist in the directory or the system, and a password
    is refused (it lives there)."""
    local, domain = split_address(address)
    ctx.need_domain(domain)
    if ctx.store.mailbox_exists(domain, local):
        fail(f"mailbox {local}@{domain} already exists")
    method = ctx.config.auth.method
    if method == "passwordfile":
        if password is None:
            fail("a password is needed (auth.method = \"passwordfile\")")
        ctx.password_file().set_password(f"{local}@{domain}", _password(password))
    else:
        if password is not None:
            fail(f"with auth.method \"{method}\" the password lives in the "
                 f"{'directory' if method == 'directory' else 'system'}; drop --password-stdin")
        _check_account(ctx, f"{local}@{domain}")
    ctx.store.add_mailbox(domain, local)
    return done(f"mailbox {local}@{domain} added", address=f"{local}@{domain}")


def _check_account(ctx: Context, address: str) -> None:
    try:
        found = ctx.lookup(address)
    except AuthUnavailable as e:
        fail(f"cannot reach the account source: {e}")
    where = "directory" if ctx.config.auth.method == "directory" else "system accounts"
    if found is None:
        fail(f"no account {address} in the {where}")
    if found.lower() != address.lower():
        fail(f"{address} belongs to the account whose mailbox is {found}")


def _need_mailbox(ctx: Context, address: str) -> tuple[str, str]:
    local, domain = split_address(address)
    if not ctx.store.mailbox_exists(domain, local):
        fail(f"mailbox {local}@{domain} does not exist")
    return local, domain


def mailbox_remove(ctx: Context, address: str, yes: bool = False) -> dict:
    """Remove a mailbox and its mail (``yes`` required); its log-in goes first, so a failure
    half-way leaves mail nobody can log in to, never a log-in without its mail."""
    local, domain = _need_mailbox(ctx, address)
    if not yes:
        fail(f"removing {local}@{domain} deletes its mail: add --yes")
    if ctx.config.auth.method == "passwordfile":
        pw = ctx.password_file()
        if pw.exists(f"{local}@{domain}"):
            pw.remove(f"{local}@{domain}")
    ctx.store.remove_mailbox(domain, local)
    return done(f"mailbox {local}@{domain} removed", address=f"{local}@{domain}")


def mailbox_list(ctx: Context, domain: str | None = None) -> dict:
    """``{"mailboxes": [{"address", "locked", "quota": bytes or None}]}`` of one domain or
    all."""
    store = ctx.store
    domains = [domain_name(domain)] if domain else store.list_domains()
    rows = []
    for d in domains:
        ctx.need_domain(d)
        for mb in store.list_mailboxes(d):
            rows.append({"address": f"{mb}@{d}", "locked": store.is_mailbox_locked(d, mb),
                         "quota": store.get_quota(d, mb)})
    return {"mailboxes": rows}


def mailbox_lock(ctx: Context, address: str, locked: bool = True) -> dict:
    """Lock (or unlock) a mailbox: its owner cannot log in; mail still arrives."""
    local, domain = _need_mailbox(ctx, address)
    ctx.store.set_mailbox_locked(domain, local, locked)
    return done(f"mailbox {local}@{domain} {'locked' if locked else 'unlocked'}",
                address=f"{local}@{domain}", locked=locked)


def mailbox_unlock(ctx: Context, address: str) -> dict:
    """Unlock a mailbox (StoreError while its domain is locked)."""
    return mailbox_lock(ctx, address, False)


def mailbox_passwd(ctx: Context, address: str, password: Password = None) -> dict:
    """Set a mailbox's password (``auth.method = "passwordfile"`` only)."""
    local, domain = split_address(address)
    method = ctx.config.auth.method
    if method != "passwordfile":
        where = "the directory" if method == "directory" else "the system (passwd)"
        fail(f"with auth.method \"{method}\" the password of {local}@{domain} lives in "
             f"{where}; change it there")
    if not ctx.store.mailbox_exists(domain, local):
        fail(f"mailbox {local}@{domain} does not exist")
    if password is None:
        fail("a password is needed")
    ctx.password_file().set_password(f"{local}@{domain}", _password(password))
    return done(f"password of {local}@{domain} changed", address=f"{local}@{domain}")


def mailbox_quota(ctx: Context, address: str, size: str | int | None) -> dict:
    """Set a mailbox's quota: bytes, ``"50MB"``, or ``"none"`` / None for no limit."""
    local, domain = _need_mailbox(ctx, address)
    if size is None or (isinstance(size, str) and size.lower() == "none"):
        limit = None
    else:
        try:
            limit = parse_size(size)
        except (ValueError, TypeError) as e:
            fail(str(e))
    ctx.store.set_quota(domain, local, limit)
    return done(f"quota of {local}@{domain}: {'none' if limit is None else limit}",
                address=f"{local}@{domain}", quota=limit)


# -- stat


def stat(ctx: Context, domain: str | None = None) -> dict:
    """``{"mailboxes": [{"address", "messages", "bytes", "locked", "quota"}], "total":
    {"messages", "bytes"}}`` for one domain or all."""
    store = ctx.store
    domains = [domain_name(domain)] if domain else store.list_domains()
    rows = []
    total_m = total_b = 0
    for d in domains:
        ctx.need_domain(d)
        for mb in store.list_mailboxes(d):
            messages, size = store.usage(d, mb)
            total_m += messages
            total_b += size
            rows.append({"address": f"{mb}@{d}", "messages": messages, "bytes": size,
                         "locked": store.is_mailbox_locked(d, mb),
                         "quota": store.get_quota(d, mb)})
    return {"mailboxes": rows, "total": {"messages": total_m, "bytes": total_b}}
