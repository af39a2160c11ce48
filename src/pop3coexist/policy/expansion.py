"""Aliases, distribution lists and directory groups: what an address of a local domain stands
for, and how a message for it expands (README "Aliases and lists"). No sockets, no file
formats: the store answers through ``interfaces.IAliasTable``, a directory through
``interfaces.IGroupLookup``, accounts through ``interfaces.IAccountChecker``.

``Expander.resolve(address)`` says where one address goes: a mailbox here (the checker's
recipient look-up: password file, local account, a directory user's ``mail`` or
``proxyAddresses``; or a store mailbox without a log-in, as postmaster's), a ``Distribution``
(an administrator's alias or list, a directory group, or ``owner-LIST@DOMAIN``), an outside
address (relayed through the queue), or nothing. Accounts win: an admin alias adds addresses,
it never takes one from an account.

``Expander.expand(distribution)`` walks it into ``Part`` s: the recipients that get the message
as it is (an alias's targets: the envelope sender stays), and one part per list reached (its
members get the *list copy*: ``List-Id`` in front (RFC 2919) and ``owner-LIST@DOMAIN`` as
envelope sender, so bounces go to the list's owner, not to every sender: RFC 5321 section
3.9). A nested list or group inside a list joins the outer list's copy (one copy per person,
one List-Id). Every distribution is expanded once per message: a list that includes itself,
or two lists that include each other, end there. At most MAX_DEPTH levels.

``owner-LIST@DOMAIN`` is delivered to the list's configured owner (``list set --owner``; a
directory group's ``managedBy``), or, when none is set, to the postmaster address
(``domains.postmaster``, default ``postmaster@<first local domain>``).

Used by the recipient-expansion stage (``policy.stages.ExpandRecipients``), by RCPT (which
accepts an alias or list address and applies a list's ``senders`` rule) and by the queue's
local hop (a delivery report to an alias reaches its target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pop3coexist.address import Address, AddressError, parse_address
from pop3coexist.errors import MailError
from pop3coexist.interfaces import Distribution, IAliasTable, IGroupLookup, IMailStore
from pop3coexist.policy.relay import RoleAddresses, primary_domain

log = Logger(namespace="pop3coexist.expansion")

MAX_DEPTH = 16  # nesting levels of aliases, lists and groups followed
OWNER_PREFIX = "owner-"


@dataclass(frozen=True)
class ListCopy:
    """The copy of a message that a list's members get: ``sender`` the envelope sender
    (``owner-LIST@DOMAIN``), ``header`` the fields put in front (LF line ends)."""

    address: str
    sender: str
    header: bytes


@dataclass
class Part:
    """Recipients of one copy: ``copy`` None for the message as it is, else a list copy.
    ``local``: ``(domain, mailbox, address as named)``; ``remote``: outside addresses."""

    copy: ListCopy | None
    local: list[tuple[str, str, str]] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resolved:
    """Where one address goes: exactly one of a mailbox ``(domain, box)``, a distribution, or
    an outside address."""

    mailbox: tuple[str, str] | None = None
    distribution: Distribution | None = None
    remote: str | None = None


def list_id(address: str) -> str:
    """The RFC 2919 list identifier of a list address: ``<local.domain>`` (the list's local
    part as list-label, its domain as list-id-namespace)."""
    local, _, domain = address.rpartition("@")
    return f"<{local}.{domain}>"


def owner_address(address: str) -> str:
    """``owner-LIST@DOMAIN``: the envelope sender of the list copy of ``LIST@DOMAIN``."""
    local, _, domain = address.rpartition("@")
    return f"{OWNER_PREFIX}{local}@{domain}"


def list_copy(dist: Distribution) -> ListCopy:
    """The list copy of a list or group (``List-Id`` and the owner as envelope sender)."""
    return ListCopy(dist.address, owner_address(dist.address),
                    f"List-Id: {list_id(dist.address)}\n".encode("ascii"))


def _key(text: str) -> Address | None:
    try:
        parsed = parse_address(text.strip().strip("<>"))
    except AddressError:
        return None
    return None if parsed.quoted or parsed.literal is not None else parsed


class Expander:
    """Resolves and expands addresses (see the module docstring).

    ``store``: an IMailStore (IAliasTable when it keeps aliases); ``checker``: the
    IAccountChecker (IGroupLookup for a directory); ``run_blocking(f, *args)``: a Deferred of
    ``f`` run off the reactor; ``local_domains()``: a Deferred list of the store's domains
    (default: read through ``run_blocking``).
    """

    def __init__(self, config: Any, store: Any, checker: Any,
                 run_blocking: Callable[..., defer.Deferred],
                 local_domains: Callable[[], defer.Deferred] | None = None) -> None:
        self.config = config
        self.store = store
        self.checker = checker
        self.run_blocking = run_blocking
        self.roles = RoleAddresses.from_config(config)
        self._local_domains = local_domains

    async def domains(self) -> list[str]:
        """The local domains: the store's and ``domains.local`` (lower case)."""
        found: list[str] = []
        if self._local_domains is not None:
            found = list(await self._local_domains())
        elif IMailStore.providedBy(self.store):
            found = list(await self.run_blocking(self.store.list_domains))
        out = [d.lower() for d in found]
        for d in self.config.domains.local:
            if d.lower() not in out:
                out.append(d.lower())
        return out

    # -- one address

    async def classify(self, address: str, domains: list[str] | None = None) -> Distribution | None:
        """The distribution ``address`` (in a local domain) names: an admin alias or list, a
        directory group, or ``owner-`` of one of those; None when it names none. Does not ask
        the checker's accounts (``resolve`` does, first)."""
        parsed = _key(address)
        if parsed is None:
            return None
        key = parsed.key
        if IAliasTable.providedBy(self.store):
            found = await self.run_blocking(self.store.distribution, key)
            if found is not None:
                return found
        if IGroupLookup.providedBy(self.checker):
            group = await defer.maybeDeferred(self.checker.group, key)
            if group is not None:
                return group
        local = parsed.local.lower()
        if local.startswith(OWNER_PREFIX) and len(local) > len(OWNER_PREFIX):
            base = await self.classify(f"{local[len(OWNER_PREFIX):]}@{parsed.domain}", domains)
            if base is not None and base.is_list:
                owner = base.owner or await self._postmaster(domains)
                if owner is None:
                    return None
                return Distribution("owner", key, (owner,))
        return None

    async def _postmaster(self, domains: list[str] | None) -> str | None:
        if domains is None:
            domains = await self.domains()
        target = self.roles.postmaster_for(primary_domain(self.config, domains))
        return None if target is None else target.key

    async def resolve(self, address: str, domains: list[str] | None = None) -> Resolved | None:
        """Where ``address`` goes (``Resolved``), or None when it is a local domain's address
        that nothing here has. Fails with ``errors.AuthUnavailable`` when the checker's source
        cannot answer now."""
        parsed = _key(address)
        if parsed is None:
            return None
        if domains is None:
            domains = await self.domains()
        if parsed.domain not in domains:
            return Resolved(remote=parsed.key)
        key = parsed.key
        mailbox = await defer.maybeDeferred(self.checker.resolve_recipient, key)
        if isinstance(mailbox, bytes):
            mailbox = mailbox.decode("ascii")
        if mailbox:
            box, _, domain = str(mailbox).lower().rpartition("@")
            if await self._exists(domain, box):
                return Resolved(mailbox=(domain, box))
        dist = await self.classify(key, domains)
        if dist is not None:
            return Resolved(distribution=dist)
        local = parsed.local.lower()
        if await self._exists(parsed.domain, local):  # a mailbox with no log-in (postmaster)
            return Resolved(mailbox=(parsed.domain, local))
        role = self.roles.target(parsed, set(domains), primary_domain(self.config, domains))
        if role is not None and role.key != key:
            return await self.resolve(role.key, domains)
        return None

    async def _exists(self, domain: str, box: str) -> bool:
        store = self.store

        def exists() -> bool:
            try:
                return bool(store.domain_exists(domain) and store.mailbox_exists(domain, box))
            except ValueError:
                return False

        return await self.run_blocking(exists)

    # -- expansion

    async def expand(self, dist: Distribution, domains: list[str] | None = None) -> list[Part]:
        """The parts ``dist`` expands to (module docstring); unknown local addresses are left
        out (logged). Fails with AuthUnavailable when a source cannot answer now."""
        if domains is None:
            domains = await self.domains()
        parts: dict[str | None, Part] = {}
        visited = {dist.address}

        def part(copy: ListCopy | None) -> Part:
            key = None if copy is None else copy.address
            if key not in parts:
                parts[key] = Part(copy)
            return parts[key]

        async def walk(address: str, copy: ListCopy | None, within: str, depth: int) -> None:
            if depth > MAX_DEPTH:
                log.warn("<{within}>: member <{a}> is nested deeper than {n} levels; left out",
                         within=within, a=address, n=MAX_DEPTH)
                return
            found = await self.resolve(address, domains)
            if found is None:
                log.warn("<{within}>: <{a}> has no mailbox, alias or list here; left out",
                         within=within, a=address)
                return
            if found.distribution is not None:
                inner = found.distribution
                if inner.address in visited:
                    return  # expanded once already: a loop or a diamond
                visited.add(inner.address)
                if inner.is_list and copy is None:
                    copy = list_copy(inner)
                for target in inner.targets:
                    await walk(target, copy, inner.address, depth + 1)
            elif found.mailbox is not None:
                part(copy).local.append((*found.mailbox, address.lower()))
            elif found.remote is not None:
                part(copy).remote.append(found.remote)

        start = list_copy(dist) if dist.is_list else None
        for target in dist.targets:
            await walk(target, start, dist.address, 1)
        return list(parts.values())

    async def flatten(self, address: str) -> tuple[list[tuple[str, str]], list[str]] | None:
        """Every mailbox and outside address ``address`` reaches, each once, ignoring list
        copies (for a delivery report, whose envelope sender stays ``<>``); None when nothing
        here has the address."""
        domains = await self.domains()
        found = await self.resolve(address, domains)
        if found is None:
            return None
        if found.mailbox is not None:
            return [found.mailbox], []
        if found.remote is not None:
            return [], [found.remote]
        assert found.distribution is not None
        boxes: list[tuple[str, str]] = []
        remote: list[str] = []
        for p in await self.expand(found.distribution, domains):
            for domain, box, _named in p.local:
                if (domain, box) not in boxes:
                    boxes.append((domain, box))
            for r in p.remote:
                if r not in remote:
                    remote.append(r)
        return boxes, remote

    # -- who may send

    async def sender_refusal(self, dist: Distribution, sender: Address | None,
                             user: str | None) -> MailError | None:
        """The RCPT refusal of a list's ``senders`` rule (None: may send). An alias with one
        target that is a list follows that list's rule. ``members``: the envelope sender (or
        the logged-in account) is a member, directly or through a nested list or group;
        ``authenticated``: the client logged in (SMTP AUTH). 550 5.7.1 otherwise
        (RFC 3463: delivery not authorized)."""
        domains = await self.domains()
        rule_of = dist
        seen = {dist.address}
        while rule_of.kind == "alias" and len(rule_of.targets) == 1:
            inner = await self.resolve(rule_of.targets[0], domains)
            if inner is None or inner.distribution is None or inner.distribution.address in seen:
                break
            rule_of = inner.distribution
            seen.add(rule_of.address)
        if rule_of.kind != "list" or rule_of.senders == "anyone":
            return None
        if rule_of.senders == "authenticated":
            if user is not None:
                return None
            return MailError(550, "5.7.1", f"<{rule_of.address}>: only authenticated senders may "
                             "send to this list")
        members = await self.member_addresses(rule_of, domains)
        if (sender is not None and sender.key.lower() in members) or (
                user is not None and user.lower() in members):
            return None
        return MailError(550, "5.7.1", f"<{rule_of.address}>: only members may send to this list")

    async def member_addresses(self, dist: Distribution,
                               domains: list[str] | None = None) -> set[str]:
        """Every member address of ``dist`` as written in it and its nested lists and groups,
        and the mailbox address each local one reaches (lower case)."""
        if domains is None:
            domains = await self.domains()
        out: set[str] = set()
        for p in await self.expand(dist, domains):
            for domain, box, named in p.local:
                out.add(named)
                out.add(f"{box}@{domain}")
            out.update(p.remote)
        return out
