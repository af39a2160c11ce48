"""Aliases and distribution lists kept beside the mailboxes (store/aliases.py; README "Aliases
and lists"). Each operation returns JSON-able data or raises ``context.OpsError``.

The name of a new alias or list must be free: no mailbox, no account address (a password file
entry, a local account, a directory user's ``mail`` or ``proxyAddresses``), no other alias or
list, and no ``owner-`` name (``owner-LIST`` is each list's bounce address).
"""

from __future__ import annotations

from pop3coexist.errors import AuthUnavailable
from pop3coexist.interfaces import SENDERS_CHOICES
from pop3coexist.ops.context import Context, domain_name, done, fail
from pop3coexist.store.aliases import OWNER_PREFIX, AliasFiles, normalise_target, split


def _split(text: str) -> tuple[str, str]:
    try:
        return split(text)
    except ValueError as e:
        fail(str(e))


def _target(text: str) -> str:
    try:
        return normalise_target(text)
    except ValueError as e:
        fail(str(e))


def _files(ctx: Context) -> AliasFiles:
    return AliasFiles(ctx.store.root)


def _need_free(ctx: Context, local: str, domain: str) -> None:
    """The name is free for a new alias or list (module docstring)."""
    address = f"{local}@{domain}"
    if local.startswith(OWNER_PREFIX):
        fail(f"{address}: names starting with {OWNER_PREFIX!r} are the lists' bounce addresses")
    if local == "postmaster":
        fail(f"{address}: postmaster mail is set with [domains] postmaster in the config")
    if ctx.store.mailbox_exists(domain, local):
        fail(f"{address} is a mailbox")
    data = _files(ctx).read(domain)
    if local in data["aliases"]:
        fail(f"{address} is already an alias")
    if local in data["lists"]:
        fail(f"{address} is already a list")
    try:
        owner = ctx.lookup(address)
    except AuthUnavailable as e:
        fail(f"cannot reach the account source to check {address}: {e}")
    if owner is not None:
        fail(f"{address} belongs to the account whose mailbox is {owner}")


def _domains(ctx: Context, domain: str | None) -> list[str]:
    if domain:
        name = domain_name(domain)
        ctx.need_domain(name)
        return [name]
    return ctx.store.list_domains()


# -- aliases


def alias_add(ctx: Context, address: str, target: str) -> dict:
    """Mail for ``address`` also goes to ``target`` (a mailbox, a list, an outside address)."""
    local, domain = _split(address)
    ctx.need_domain(domain)
    key, goal = f"{local}@{domain}", _target(target)
    if goal == key:
        fail(f"{key} cannot be an alias of itself")
    files = _files(ctx)
    data = files.read(domain)
    if goal in data["aliases"].get(local, []):
        fail(f"{key} already goes to {goal}")
    if local not in data["aliases"]:
        _need_free(ctx, local, domain)
    with files.changing(domain) as data:
        targets = data["aliases"].setdefault(local, [])
        if goal not in targets:
            targets.append(goal)
    return done(f"alias {key} -> {goal} added", address=key, target=goal)


def alias_remove(ctx: Context, address: str, target: str | None = None) -> dict:
    """Remove one target of an alias, or (``target`` None) the whole alias."""
    local, domain = _split(address)
    ctx.need_domain(domain)
    key = f"{local}@{domain}"
    goal = _target(target) if target else None
    with _files(ctx).changing(domain) as data:
        targets = data["aliases"].get(local)
        if targets is None:
            fail(f"{key} is not an alias")
        if goal is None:
            del data["aliases"][local]
        elif goal not in targets:
            fail(f"{key} does not go to {goal}")
        else:
            targets.remove(goal)
            if not targets:
                del data["aliases"][local]
    return done(f"alias {key} -> {goal} removed" if goal else f"alias {key} removed",
                address=key)


def alias_list(ctx: Context, domain: str | None = None) -> dict:
    """``{"aliases": [{"address", "targets": [...]}]}`` of one domain or all."""
    files = _files(ctx)
    return {"aliases": [{"address": f"{local}@{d}", "targets": list(targets)}
                        for d in _domains(ctx, domain)
                        for local, targets in sorted(files.read(d)["aliases"].items())]}


# -- lists


def list_add(ctx: Context, list: str, senders: str = "anyone",  # noqa: A002
             owner: str | None = None) -> dict:
    """A new, empty distribution list; ``senders``: anyone | members | authenticated;
    ``owner``: where ``owner-LIST@DOMAIN`` mail (bounces) goes (None: the postmaster)."""
    if senders not in SENDERS_CHOICES:
        fail(f"senders must be one of {', '.join(SENDERS_CHOICES)}")
    local, domain = _split(list)
    ctx.need_domain(domain)
    _need_free(ctx, local, domain)
    owner_key = _target(owner) if owner else None
    with _files(ctx).changing(domain) as data:
        data["lists"][local] = {"members": [], "senders": senders, "owner": owner_key}
    return done(f"list {local}@{domain} added (senders: {senders}; bounces to "
                f"{OWNER_PREFIX}{local}@{domain} -> {owner_key or 'the postmaster'})",
                list=f"{local}@{domain}")


def _list(ctx: Context, name: str) -> tuple[str, str]:
    local, domain = _split(name)
    ctx.need_domain(domain)
    if local not in _files(ctx).read(domain)["lists"]:
        fail(f"{local}@{domain} is not a list (pop3coexist-admin list add {local}@{domain})")
    return local, domain


def list_remove(ctx: Context, list: str) -> dict:  # noqa: A002
    """Remove a list."""
    local, domain = _list(ctx, list)
    with _files(ctx).changing(domain) as data:
        data["lists"].pop(local, None)
    return done(f"list {local}@{domain} removed", list=f"{local}@{domain}")


def list_set(ctx: Context, list: str, senders: str | None = None,  # noqa: A002
             owner: str | None = None) -> dict:
    """Change who may send to a list and/or its owner (``"none"``: the postmaster)."""
    if senders is None and owner is None:
        fail("nothing to set: give --senders and/or --owner")
    if senders is not None and senders not in SENDERS_CHOICES:
        fail(f"senders must be one of {', '.join(SENDERS_CHOICES)}")
    local, domain = _list(ctx, list)
    owner_key = None if owner is None or owner.lower() == "none" else _target(owner)
    files = _files(ctx)
    with files.changing(domain) as data:
        entry = data["lists"][local]
        if senders is not None:
            entry["senders"] = senders
        if owner is not None:
            entry["owner"] = owner_key
    entry = files.read(domain)["lists"][local]
    return done(f"list {local}@{domain}: senders {entry['senders']}, owner "
                f"{entry['owner'] or 'the postmaster'}", list=f"{local}@{domain}")


def list_members(ctx: Context, list: str, members: list[str] | tuple[str, ...],  # noqa: A002
                 add: bool = True) -> dict:
    """Add (or remove) members; all or none: one that is already in (or not in) the list
    fails the whole change."""
    local, domain = _list(ctx, list)
    if isinstance(members, str) or not members:
        fail("give at least one member")
    wanted = [_target(m) for m in members]
    with _files(ctx).changing(domain) as data:
        current = data["lists"][local]["members"]
        for member in wanted:
            if add:
                if member in current:
                    fail(f"{member} is already a member of {local}@{domain}")
                current.append(member)
            else:
                if member not in current:
                    fail(f"{member} is not a member of {local}@{domain}")
                current.remove(member)
    verb = "added to" if add else "removed from"
    return done(f"{len(wanted)} member(s) {verb} {local}@{domain}", list=f"{local}@{domain}")


def list_member_add(ctx: Context, list: str, members: list[str]) -> dict:  # noqa: A002
    """Add members to a list."""
    return list_members(ctx, list, members, True)


def list_member_remove(ctx: Context, list: str, members: list[str]) -> dict:  # noqa: A002
    """Remove members from a list."""
    return list_members(ctx, list, members, False)


def list_show(ctx: Context, name: str | None = None) -> dict:
    """One list (``name`` LIST@DOMAIN): ``{"list": {"address", "senders", "owner",
    "members": [...]}}``; else the lists of a domain or all: ``{"lists": [{"address",
    "members": count, "senders", "owner"}]}``."""
    files = _files(ctx)
    if name and "@" in name:
        local, domain = _list(ctx, name)
        entry = files.read(domain)["lists"][local]
        return {"list": {"address": f"{local}@{domain}", "senders": entry["senders"],
                         "owner": entry["owner"], "bounces": f"{OWNER_PREFIX}{local}@{domain}",
                         "members": entry["members"]}}
    return {"lists": [{"address": f"{local}@{d}", "members": len(entry["members"]),
                       "senders": entry["senders"], "owner": entry["owner"]}
                      for d in _domains(ctx, name)
                      for local, entry in sorted(files.read(d)["lists"].items())]}
