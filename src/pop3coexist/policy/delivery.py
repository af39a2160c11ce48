"""The SMTP avatar: every sender and recipient decision of an ESMTP session (no sockets).

As in Twisted's mail design (``IMessageDelivery``, ``validateFrom`` / ``validateTo``) and
maddy's delivery target, the ESMTP protocol (smtp/server.py) parses a command and asks one
method of its avatar; the avatar decides. ``DeliveryRealm`` gives the avatar: an anonymous one
for a new session, one for the account after SMTP AUTH (``login``: the checker, then the
log-in lock of ``identity.logins.login_locked``). Relay permission is which avatar a session
holds (``policy.relay.RelayPolicy.may_relay`` with the avatar's log-in).

``SMTPDelivery`` (``interfaces.IMessageDelivery``):

- ``validate_from``: ``smtp.sender_must_match_login``: a logged-in client sends as one of its
  own addresses (the checker's ``sender_owner``) or with ``<>``; else 553 5.7.1;
- ``validate_to``: parses the path (``policy.relay.parse_recipient``), maps an address literal
  of this host to the primary domain (RFC 1123 section 5.2.17), then decides with the gateway
  (``policy.gateway``, directory look-ups), the relay rules (``policy.relay``), the checker's
  recipient look-up and the store (mailbox exists, quota at RCPT time); a role address
  (postmaster, abuse: ``RoleAddresses``) with no real recipient goes to its configured target;
  an address no account has may be an alias, list or directory group (``policy.expansion``):
  accepted for the recipient-expansion stage, after the list's ``senders`` rule (550 5.7.1).
  The result is a ``RecipientDecision`` (local mailbox or queue); refusals are ``MailError``,
  a directory that cannot answer ``DirectoryUnavailable`` (451 4.4.3, from the source's
  ``AuthUnavailable``);
- ``begin``: a ``DeliveryTransaction`` (``IDeliveryTransaction``): recipients, then the body,
  then ``commit``, which runs the declared stages of ``policy.stages``;
- ``connect``, ``hello``, ``reset``, ``close``: the session's other steps, for the content
  filters (milters).

Content filters: with milters configured for the listener, the realm opens one conversation
(``interfaces.IContentFilter``) per SMTP session and every avatar of that session shares it
(the avatar after AUTH or STARTTLS takes it over: ``previous``). ``validate_from`` and
``validate_to`` ask it after their own rules accepted (a milter's refusal is that command's
reply); the content-check stage runs its message steps, and ``policy.content.FilterOutcomes``
applies the verdict (quarantine, discard, the infected-mail notice, added recipients).

Every multi-step flow here is an ``async def`` run with ``defer.ensureDeferred``, or with
``policy.inline.run_now`` where the answer is often known at once (RCPT from the caches).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3coexist.address import Address
from pop3coexist.errors import (
    AuthUnavailable,
    DirectoryUnavailable,
    LoginRefused,
    MailError,
    PermanentFailure,
)
from pop3coexist.identity.logins import login_locked
from pop3coexist.interfaces import (
    Distribution,
    IBlockingRecipientLookup,
    ICachedDomainList,
    ICachedMailboxCheck,
    ICachedRecipientLookup,
    IDeliveryTransaction,
    IMessageDelivery,
    IQuotaCheck,
    SMTPSession,
)
from pop3coexist.policy.content import FilterOutcomes
from pop3coexist.policy.expansion import Expander
from pop3coexist.policy.gateway import LOCAL as GATEWAY_LOCAL
from pop3coexist.policy.gateway import GatewayPolicy, Peer
from pop3coexist.policy.inline import run_now
from pop3coexist.policy.relay import (
    Client,
    RelayPolicy,
    RoleAddresses,
    Route,
    RouteKind,
    is_own_literal,
    parse_recipient,
    primary_domain,
)
from pop3coexist.policy.srs import SRSError, is_srs
from pop3coexist.policy.stages import (
    CheckAuthentication,
    Message,
    Recipient,
    default_stages,
    start_stages,
)

log = Logger(namespace="pop3coexist.smtp.server")

DOMAINS_TTL = 1.0  # seconds a read of the store's domain list is reused
HOST_TTL = 300.0  # seconds the addresses of server.hostname are reused

MailboxState = tuple[bool, bool]  # (the mailbox exists, a message of the size is over quota)


@dataclass(frozen=True)
class MailOptions:
    """The MAIL FROM parameters a delivery keeps: SIZE= (octets, 0 when not given), RET=,
    ENVID= (RFC 3461) and BODY= (RFC 6152)."""

    size: int = 0
    ret: str | None = None
    envid: str | None = None
    body: str | None = None


@dataclass(frozen=True)
class RecipientDecision:
    """Where one accepted recipient goes.

    ``given``: the address as the client wrote it (the 250 reply, Received, DSN);
    ``route``: the relay decision and the address mail is queued for; ``mailbox``:
    ``(domain, box)`` for a mailbox here, None for the queue; ``orcpt``: the ORCPT the policy
    adds when it rewrote the address (``rfc822;<given>``), unless the client gave one;
    ``distribution``: the alias, list or group the address names (mailbox None then: the
    recipient-expansion stage finds where its mail goes).
    """

    given: Address
    route: Route
    mailbox: tuple[str, str] | None = None
    orcpt: str | None = None
    distribution: Distribution | None = None


@dataclass(frozen=True)
class _Found:
    """Inside ``validate_to``: the route, the local mailbox with its state, the ORCPT, or the
    distribution (alias, list, group) the address names."""

    route: Route
    box: tuple[str, str, MailboxState] | None = None
    orcpt: str | None = None
    distribution: Distribution | None = None


def _lookup_local(resolve: Callable[[str], Any], store: Any, key: str,
                  size: int) -> tuple[str, str, MailboxState] | None:
    """Blocking: the checker's look-up and the mailbox check in one thread hop."""
    mailbox = resolve(key)
    if mailbox is None:
        return None
    if isinstance(mailbox, bytes):
        mailbox = mailbox.decode("ascii")
    box, _, domain = str(mailbox).lower().rpartition("@")
    return domain, box, _mailbox_state(store, domain, box, size)


def _lookup_cached(checker: Any, store: Any, key: str,
                   domains: list[str]) -> tuple[str, str, MailboxState] | None:
    """On the reactor thread, never waiting for the disk: ``_lookup_local``'s answer when the
    checker and the store can give it from what is cached (a mailbox that exists, with no
    quota: ``ICachedRecipientLookup``, ``ICachedMailboxCheck``), else None (the thread hop
    gives every other answer, a refusal included)."""
    if not (ICachedRecipientLookup.providedBy(checker) and ICachedMailboxCheck.providedBy(store)):
        return None
    mailbox = checker.resolve_recipient_cached(key, [d.lower() for d in domains])
    if mailbox is None:
        return None
    box, _, domain = str(mailbox).lower().rpartition("@")
    if not store.mailbox_fits_cached(domain, box):
        return None
    return domain, box, (True, False)


def _mailbox_state(store: Any, domain: str, mailbox: str, size: int) -> MailboxState:
    """Blocking: (the mailbox exists, a message of ``size`` octets would be over its quota)."""
    if not store.domain_exists(domain) or not store.mailbox_exists(domain, mailbox):
        return False, False
    over = IQuotaCheck.providedBy(store) and bool(store.would_exceed_quota(domain, mailbox, size))
    return True, over


def _host_addresses(hostname: str) -> list[str]:
    """Blocking: the IP addresses ``hostname`` resolves to (getaddrinfo), or [] when it does
    not resolve."""
    import socket

    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})


class DeliveryContext:
    """What every avatar of one listener shares: the config, store, checker and committer,
    the relay, gateway and role rules, and two small caches (the store's domains, the
    addresses of ``server.hostname``).

    ``run_blocking(f, *args)`` runs blocking store calls off the reactor (a Deferred);
    ``clock`` gives ``seconds()``; ``resolve_host(name)`` is blocking (default getaddrinfo);
    ``committer`` is an ``ICommitter`` (the group commit of smtp/incoming.py); ``verifier``
    an ``ISenderVerifier`` for the sender-authentication stage (None: no such stage).
    """

    def __init__(self, config: Any, store: Any, checker: Any, committer: Any,
                 run_blocking: Callable[..., defer.Deferred], clock: Any,
                 resolve_host: Callable[[str], list[str]] | None = None,
                 verifier: Any = None, rules: Any = None, srs: Any = None,
                 content_filters: Any = None, quarantine: Any = None,
                 queue: Any = None) -> None:
        # content_filters: an IContentFilterFactory (the listener's milters) or None;
        # quarantine: an IQuarantine; queue: the outbound queue (the infected-mail notice)
        self.content_filters = content_filters
        self.quarantine = quarantine
        self.queue = queue
        self.config = config
        self.store = store
        self.checker = checker
        self.committer = committer
        self.run_blocking = run_blocking
        self.clock = clock
        self.relay = RelayPolicy.from_config(config)
        self.gateway = GatewayPolicy.from_config(config, checker)  # None: not a gateway
        self.roles = RoleAddresses.from_config(config)
        sa = config.sender_authentication
        authentication = None
        if verifier is not None and sa.enabled:  # an ISenderVerifier (mailauth/verify.py)
            authentication = CheckAuthentication(verifier, self.relay.is_trusted,
                                                 sa.authserv_id or config.server.hostname,
                                                 sa.dmarc_reject)
        self.expander = Expander(config, store, checker, run_blocking, self.local_domains)
        # the stages' parts; a session with milters gets its own list (DeliveryTransaction)
        self.stage_parts = {"expander": self.expander, "authentication": authentication,
                            "trusted": self.relay.is_trusted, "rules": rules}
        self.stages = default_stages(committer, **self.stage_parts)
        self.srs = srs  # policy.srs.SRS: bounces to SRS addresses go back to the sender
        self._domains: list[str] | None = None
        self._domains_at = 0.0
        self._reading: list[defer.Deferred] | None = None  # callers of the read in progress
        self._next_read: list[defer.Deferred] = []  # callers that need a read started later
        self._reads = 0  # domain reads started so far
        self._domains_read = 0  # the number of the read that gave self._domains
        self._resolve_host = resolve_host or _host_addresses
        self._host_ips: list[str] | None = None
        self._host_ips_at = 0.0

    def primary_domain(self, domains: list[str]) -> str | None:
        """See ``policy.relay.primary_domain``: what <Postmaster> and own literals stand for."""
        return primary_domain(self.config, domains)

    def authoritative(self, domains: list[str]) -> set[str]:
        """The domains postmaster (and abuse) must work for (RFC 5321 section 4.5.1): the
        store's domains (``domains.local`` and ``domain add``) and the gateway's."""
        out = {d.lower() for d in domains} | {d.lower() for d in self.config.domains.local}
        if self.gateway is not None:
            out |= self.gateway.authoritative
        return out

    async def host_addresses(self) -> list[str]:
        """The addresses ``server.hostname`` resolves to, looked up off the reactor at most once
        per HOST_TTL seconds (a failed look-up gives no addresses and is retried then)."""
        now = self.clock.seconds()
        if self._host_ips is not None and 0 <= now - self._host_ips_at < HOST_TTL:
            return self._host_ips
        try:
            ips = list(await self.run_blocking(self._resolve_host, self.config.server.hostname))
        except Exception:
            ips = []
        self._host_ips, self._host_ips_at = ips, now
        return ips

    def local_domains(self, refresh: bool = False) -> defer.Deferred:
        """The store's domains (a Deferred list of lower-case names), read off the reactor at
        most once per DOMAINS_TTL seconds: every RCPT needs them.

        ``refresh``: the answer comes from a read that starts after this call, for a recipient
        domain the cached list does not know (a domain just added with ``domain add`` is local
        at once). Refreshes share reads: at most one read runs at a time, and every refresh
        that arrives meanwhile waits for the single next one, so a flood of foreign
        recipients costs one read at a time, not one per RCPT. A failed read fails its callers.
        """
        now = self.clock.seconds()
        if not refresh and self._domains is not None and 0 <= now - self._domains_at < DOMAINS_TTL:
            return defer.succeed(self._domains)
        if self._reading is None and ICachedDomainList.providedBy(self.store):
            # the store's list, when the kernel's cache shows it unchanged: a read, no hop
            cached = self.store.list_domains_cached()
            if cached is not None:
                self._reads += 1
                self._domains, self._domains_at, self._domains_read = cached, now, self._reads
                return defer.succeed(cached)
        d: defer.Deferred = defer.Deferred()
        if self._reading is not None and not refresh:
            self._reading.append(d)  # the read in progress is fresh enough for the TTL
        else:
            self._next_read.append(d)
            if self._reading is None:
                self._start_read()
        return d

    def _start_read(self) -> None:
        """Read the store's domains for every caller waiting for the next read."""
        waiting, self._next_read = self._next_read, []
        self._reading = waiting
        started = self.clock.seconds()
        self._reads += 1
        number = self._reads

        def done(result: Any) -> None:
            callers, self._reading = self._reading or [], None
            if not isinstance(result, Failure):
                self._domains, self._domains_at, self._domains_read = result, started, number
            if self._next_read:
                self._start_read()
            for caller in callers:
                if isinstance(result, Failure):
                    caller.errback(result)
                else:
                    caller.callback(result)

        self.run_blocking(self.store.list_domains).addBoth(done)

    def read_mark(self) -> int:
        """A mark for ``fresh_since``: how many reads of the store's domains have started."""
        return self._reads

    def fresh_since(self, mark: int) -> bool:
        """True when the cached domain list comes from a read that started after ``mark`` was
        taken (so it already shows every ``domain add`` and ``domain remove`` done before)."""
        return self._domains_read > mark

    def knows_domain(self, domain: str, domains: list[str]) -> bool:
        """True when ``domain`` (lower case) is one whose route needs no fresh read of the
        store's domains: one of ``domains`` (a read of them), a ``domains.local`` entry, a
        ``domains.remote`` domain or a connector's address space, or a domain the gateway
        resolves."""
        if domain in domains or domain in {d.lower() for d in self.config.domains.local}:
            return True
        if domain in self.relay.relay_domains or domain in self.relay.routed_domains:
            return True
        return self.gateway is not None and self.gateway.handles(domain)


@implementer(IRealm)
class DeliveryRealm:
    """Gives the SMTP avatars: ``anonymous()`` for a new session, ``login(credentials)`` for
    SMTP AUTH, and ``requestAvatar`` (``twisted.cred.portal.IRealm``) for an avatar id."""

    def __init__(self, context: DeliveryContext) -> None:
        self.context = context

    def anonymous(self, previous: SMTPDelivery | None = None) -> SMTPDelivery:
        """The avatar of a session that has not logged in; ``previous``: the session's avatar
        so far (after STARTTLS), whose content-filter conversation it keeps."""
        return SMTPDelivery(self.context, None, self._conversation(previous))

    def _conversation(self, previous: SMTPDelivery | None) -> Any:
        if previous is not None:
            return previous.conversation
        factory = self.context.content_filters
        return factory.open() if factory is not None else None

    def login(self, credentials: Any, previous: SMTPDelivery | None = None) -> defer.Deferred:
        """Deferred firing with the avatar of the account ``credentials`` name; fails with
        ``UnauthorizedLogin`` / ``UnhandledCredentials`` (the checker's), ``LoginRefused`` (the
        mailbox or its domain is locked) or ``AuthUnavailable``. SMTP AUTH needs an account,
        not a mailbox: an account with no mailbox here (a relay or service account) logs in.
        ``previous``: the session's avatar so far, whose content-filter conversation the new
        one keeps."""
        return defer.ensureDeferred(self._login(credentials, previous))

    async def _login(self, credentials: Any, previous: SMTPDelivery | None) -> SMTPDelivery:
        avatar_id = await defer.maybeDeferred(self.context.checker.requestAvatarId, credentials)
        _iface, avatar, _logout = await self.requestAvatar(avatar_id, None, IMessageDelivery)
        if previous is not None:
            avatar.conversation = previous.conversation
        return avatar

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> defer.Deferred:  # noqa: N802,N803
        """(IMessageDelivery, the avatar of ``avatarId``, a no-op logout); LoginRefused when
        its mailbox or domain is locked (``identity.logins.login_locked``)."""
        if IMessageDelivery not in interfaces:
            return defer.fail(NotImplementedError("the SMTP realm gives IMessageDelivery avatars"))
        return defer.ensureDeferred(self._avatar(avatarId))

    async def _avatar(self, avatar_id: Any) -> tuple:
        if isinstance(avatar_id, bytes):
            avatar_id = avatar_id.decode("ascii")
        if not avatar_id:
            raise UnauthorizedLogin("no account")
        user = str(avatar_id).lower()
        ctx = self.context
        if await ctx.run_blocking(login_locked, ctx.store, user):
            raise LoginRefused()
        return IMessageDelivery, SMTPDelivery(ctx, user, None), lambda: None


@implementer(IMessageDelivery)
class SMTPDelivery:
    """The avatar: see the module docstring and ``interfaces.IMessageDelivery``."""

    def __init__(self, context: DeliveryContext, user: str | None,
                 conversation: Any = None) -> None:
        self.context = context
        self.user = user
        self.conversation = conversation  # the session's IContentFilter, or None

    # -- the session's other steps (the content filters')

    def connect(self, session: SMTPSession) -> defer.Deferred:
        """See IMessageDelivery: the milters' connect step."""
        if self.conversation is None:
            return defer.succeed(None)
        return self.conversation.connect(session)

    def hello(self, session: SMTPSession) -> defer.Deferred:
        """See IMessageDelivery: the milters' HELO step."""
        if self.conversation is None:
            return defer.succeed(None)
        return self.conversation.helo(session)

    def reset(self) -> None:
        """See IMessageDelivery."""
        if self.conversation is not None:
            self.conversation.abort()

    def close(self) -> None:
        """See IMessageDelivery."""
        if self.conversation is not None:
            self.conversation.close()

    # -- MAIL

    def validate_from(self, session: SMTPSession, sender: Address | None,
                      options: MailOptions | None = None) -> defer.Deferred:
        """See IMessageDelivery: ``smtp.sender_must_match_login`` for a logged-in client, then
        the milters' MAIL step (``options``: the MAIL parameters they are shown)."""
        user = self.user
        if self.conversation is None and (
                user is None or sender is None or sender.key == user
                or not self.context.config.smtp.sender_must_match_login):
            return defer.succeed(None)  # nothing to look up or ask (see _validate_from)
        return defer.ensureDeferred(self._validate_from(session, sender, options))

    async def _validate_from(self, session: SMTPSession, sender: Address | None,
                             options: MailOptions | None) -> None:
        await self._own_sender_rules(sender)
        if self.conversation is not None:
            o = options or MailOptions()
            args = [f"{k}={v}" for k, v in (("SIZE", o.size or None), ("BODY", o.body),
                                             ("RET", o.ret), ("ENVID", o.envid)) if v]
            await self.conversation.mail(session, str(sender) if sender else "", self.user, args)

    async def _own_sender_rules(self, sender: Address | None) -> None:
        user = self.user
        if user is None or not self.context.config.smtp.sender_must_match_login:
            return
        if sender is None:
            # The null reverse-path claims no address: read receipts (RFC 8098 section 2.1:
            # MUST be null) and auto-replies (RFC 3834 section 3.3) are sent with it.
            return
        if sender.key == user:
            return
        try:
            owner = await defer.maybeDeferred(self.context.checker.sender_owner, sender.key)
        except AuthUnavailable:
            raise DirectoryUnavailable() from None
        except Exception:
            log.failure("SMTP sender lookup failed")
            raise DirectoryUnavailable() from None
        if isinstance(owner, bytes):
            owner = owner.decode("ascii")
        if owner is None or str(owner).lower() != user:
            raise MailError(553, "5.7.1", f"Sender address <{sender}> is not yours")

    def begin(self, session: SMTPSession, sender: Address | None,
              options: MailOptions) -> DeliveryTransaction:
        """See IMessageDelivery: a new transaction."""
        return DeliveryTransaction(self.context, session, sender, options, self)

    # -- RCPT

    def validate_to(self, session: SMTPSession, address: str, size: int,
                    sender: Address | None = None) -> defer.Deferred:
        """See IMessageDelivery: a RecipientDecision for the inside of a RCPT path; fired
        already when nothing had to wait (the caches answered: ``policy.inline.run_now``)."""
        return run_now(self._validate_to(session, address, size, sender))

    async def _validate_to(self, session: SMTPSession, inner: str, size: int,
                           sender: Address | None = None) -> RecipientDecision:
        try:
            given, found = await self._find_recipient(session, inner, size)
            if found.distribution is not None:
                refusal = await self.context.expander.sender_refusal(
                    found.distribution, sender, self.user)
                if refusal is not None:
                    raise refusal
                return RecipientDecision(given, found.route, None, found.orcpt,
                                         found.distribution)
        except AuthUnavailable:  # the directory (or the checker's source) cannot answer now
            raise DirectoryUnavailable() from None
        if found.box is not None:
            domain, box, (exists, over_quota) = found.box
            RelayPolicy.local_outcome(found.route.address, exists, over_quota)
            decision = RecipientDecision(given, found.route, (domain, box), found.orcpt)
        else:
            decision = RecipientDecision(given, found.route, None, found.orcpt)
        if self.conversation is not None:  # the milters' RCPT step, once our rules accepted
            await self.conversation.rcpt(session, str(given), decision.mailbox is not None)
        return decision

    async def resolve_added(self, session: SMTPSession, inner: str) -> Recipient | None:
        """A Recipient for an address a milter added (no relay check: as Postfix, the filter
        is trusted), or None when it is a local address nobody receives."""
        ctx = self.context
        try:
            domains = await ctx.local_domains()
            address = parse_recipient(inner, ctx.primary_domain(domains))
            found = await self._resolve(session, address, domains, 0, may_relay=True)
        except (MailError, AuthUnavailable):
            return None
        entry = {"address": str(address), "orcpt": found.orcpt, "notify": None}
        if found.box is not None:
            domain, box, (exists, _over) = found.box
            return Recipient(entry, (domain, box)) if exists else None
        entry["address"] = str(found.route.address)
        return Recipient(entry)

    async def postmaster(self, session: SMTPSession) -> str | None:
        """Where mail for <Postmaster> goes (a mailbox here as ``box@domain``, or the remote
        address), for the infected-mail notice; None when it cannot be found."""
        try:
            _given, found = await self._find_recipient(session, "Postmaster", 0)
        except Exception:
            log.failure("milter: cannot find where postmaster mail goes")
            return None
        if found.box is not None:
            domain, box, _state = found.box
            return f"{box}@{domain}"
        return str(found.route.address)

    async def _find_recipient(self, session: SMTPSession, inner: str,
                              size: int) -> tuple[Address, _Found]:
        """(the address as the client gave it, where its mail goes); MailError to refuse.

        A literal naming this host means the primary local domain (RFC 1123 section 5.2.17);
        a role address (postmaster, abuse) with no real recipient of that name goes to the
        configured address (RFC 5321 section 4.5.1, RFC 2142). A domain that the cached domain
        list does not know is looked up again (``local_domains(refresh=True)``), so a domain
        added with ``domain add`` is local at once, never relayed or refused as foreign; and
        before an unknown user of a domain added at run time gets 550 5.1.1 or a role address's
        mail, the list is read again too, so a domain removed meanwhile is foreign at once.
        """
        ctx = self.context
        mark = ctx.read_mark()
        domains = await ctx.local_domains()
        fresh = ctx.fresh_since(mark)  # read after this RCPT came: no need to read again
        if not fresh and ctx.primary_domain(domains) is None:  # perhaps one just added
            domains, fresh = await ctx.local_domains(refresh=True), True
        while True:  # at most twice: with the cached list, then with a fresh one
            primary = ctx.primary_domain(domains)
            given = parse_recipient(inner, primary)
            address = given
            ip = given.literal
            if ip is not None and await self._is_own_literal(session, ip):
                if primary is None:
                    raise PermanentFailure(f"<{given}>: no such user here", "5.1.1", 550)
                address = Address(given.local, primary, given.quoted)
            if fresh or address.literal is not None or ctx.knows_domain(address.domain, domains):
                break
            reread, fresh = await ctx.local_domains(refresh=True), True
            if address.domain not in reread:
                break
            domains = reread  # added since the cached read: decide again with it
        try:
            return given, await self._resolve(session, address, domains, size)
        except MailError as e:
            if (e.code, e.enhanced) != (550, "5.1.1"):
                raise
            # unknown: a role address (of the domains this RCPT decided with)? Asked only
            # now: pure, and most recipients exist (issue 17)
            target = ctx.roles.target(address, ctx.authoritative(domains), primary)
            if not fresh and address.domain not in ctx.authoritative([]):
                # a domain added at run time: if `domain remove` took it meanwhile, it is a
                # foreign domain now (relayed for a trusted client, 554 for others)
                reread = await ctx.local_domains(refresh=True)
                if address.domain not in reread:
                    return given, await self._resolve(session, address, reread, size)
            if target is None:
                raise
        try:
            return given, await self._resolve_role(session, address, target, domains, size)
        except MailError as e:
            if (e.code, e.enhanced) == (550, "5.1.1"):  # never name the configured target
                log.warn("SMTP: mail for <{a}> goes to <{t}>, which does not exist",
                         a=address, t=target)
                raise PermanentFailure(f"<{given}>: no such user here", "5.1.1", 550) from None
            raise

    async def _is_own_literal(self, session: SMTPSession,
                              ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """An address literal of this host: loopback, the listener's own address, or one of the
        addresses ``server.hostname`` resolves to (looked up off the reactor, cached)."""
        own = [session.listener_ip] if session.listener_ip else []
        if is_own_literal(ip, own):
            return True
        return is_own_literal(ip, await self.context.host_addresses())

    async def _resolve(self, session: SMTPSession, address: Address, domains: list[str],
                       size: int, may_relay: bool = False) -> _Found:
        """Where ``address`` goes: the gateway's directory, a local mailbox, or the queue.

        ``may_relay``: the address comes from our own config (a role address), so a foreign
        domain is queued without asking the relay rules. MailError 550 5.1.1 for an unknown
        local recipient, 554 5.7.1 when the client may not relay there.
        """
        ctx = self.context
        gateway = ctx.gateway
        if gateway is not None and gateway.handles(address.domain):
            # the gateway role: the directory decides (policy/gateway.py)
            decision = await gateway.decide(address, Peer(session.client_ip, session.helo))
            if decision.kind == GATEWAY_LOCAL:
                return await self._local_box(Route(RouteKind.LOCAL, decision.original),
                                             decision.mailbox, size)
            orcpt = f"rfc822;{decision.original}" if decision.rewritten else None
            return _Found(Route(RouteKind.RELAY_DOMAIN, decision.address), None, orcpt)
        if may_relay and address.domain not in {d.lower() for d in domains}:
            return _Found(Route(RouteKind.RELAY_DOMAIN, address))
        if ctx.srs is not None and is_srs(address.local) and \
                address.domain in {d.lower() for d in domains}:
            return self._srs_bounce(address)
        r = ctx.relay.route(address, domains, Client(session.client_ip, self.user is not None))
        if r.kind is not RouteKind.LOCAL:
            return _Found(r)
        if IBlockingRecipientLookup.providedBy(ctx.checker):
            box = _lookup_cached(ctx.checker, ctx.store, address.key, domains)
            if box is not None:  # answered from what is cached: no thread hop (issue 17)
                return _Found(r, box)
            # one thread hop for the look-up and the mailbox check together
            box = await ctx.run_blocking(_lookup_local, ctx.checker.resolve_recipient_blocking,
                                         ctx.store, address.key, size)
            if box is None or not box[2][0]:
                if box is None and not address.quoted:
                    dist = await ctx.expander.classify(address.key, domains)
                    if dist is not None:  # an alias, list or group (policy/expansion.py)
                        return _Found(r, distribution=dist)
                RelayPolicy.local_outcome(r.address, False)
            return _Found(r, box)
        mailbox = await defer.maybeDeferred(ctx.checker.resolve_recipient, address.key)
        if mailbox is None and not address.quoted:
            dist = await ctx.expander.classify(address.key, domains)
            if dist is not None:  # an alias, list or group (policy/expansion.py)
                return _Found(r, distribution=dist)
        return await self._local_box(r, mailbox, size)

    def _srs_bounce(self, address: Address) -> _Found:
        """Mail to an SRS address of ours (a bounce of a forwarded copy): relayed to the
        original sender it stands for; a forged, malformed or too old one is 550 5.1.1."""
        try:
            original = parse_recipient(self.context.srs.reverse(address.local))
        except (SRSError, MailError) as e:
            log.info("SMTP: refused SRS address <{a}>: {why}", a=address, why=str(e))
            raise PermanentFailure(f"<{address}>: no such user here", "5.1.1", 550) from None
        return _Found(Route(RouteKind.RELAY_DOMAIN, original), None, f"rfc822;{address}")

    async def _local_box(self, r: Route, mailbox: Any, size: int) -> _Found:
        """The store's state of the mailbox a checker named (``box@domain``); 550 5.1.1 when
        there is none."""
        if mailbox is None:
            RelayPolicy.local_outcome(r.address, False)
        if isinstance(mailbox, bytes):
            mailbox = mailbox.decode("ascii")
        box, _, domain = str(mailbox).lower().rpartition("@")
        ctx = self.context
        state = await ctx.run_blocking(_mailbox_state, ctx.store, domain, box, size)
        if not state[0]:
            RelayPolicy.local_outcome(r.address, False)
        return _Found(r, (domain, box, state))

    async def _resolve_role(self, session: SMTPSession, address: Address, target: Address,
                            domains: list[str], size: int) -> _Found:
        """A role address with no account: its own store mailbox if it has one (a mailbox with
        no log-in still receives), else the configured target, which receives the same way."""
        ctx = self.context
        for candidate in (address, target):
            if candidate.domain in {d.lower() for d in domains} and not candidate.quoted:
                box = candidate.local.lower()
                state = await ctx.run_blocking(_mailbox_state, ctx.store, candidate.domain, box,
                                               size)
                if state[0]:
                    return _Found(Route(RouteKind.LOCAL, candidate), (candidate.domain, box, state))
        found = await self._resolve(session, target, domains, size, may_relay=True)
        if found.box is None and found.orcpt is None:
            return _Found(found.route, None, f"rfc822;{address}")
        return found


@implementer(IDeliveryTransaction)
class DeliveryTransaction:
    """One mail transaction: MAIL FROM, the accepted recipients, the body; ``commit`` runs the
    stages of ``policy.stages`` (see there for their order and outcomes)."""

    def __init__(self, context: DeliveryContext, session: SMTPSession, sender: Address | None,
                 options: MailOptions, avatar: SMTPDelivery | None = None) -> None:
        self.context = context
        self.avatar = avatar  # the avatar that began it (its user, its milter conversation)
        self.session = session
        self.user = avatar.user if avatar is not None else None  # SMTP AUTH account, or None
        self.sender = sender
        self.options = options
        self.recipients: list[str] = []  # as accepted, for Received / logs
        # (domain, mailbox) -> {"address", "orcpt", "notify"} of the first RCPT naming it (DSN)
        self.local: dict[tuple[str, str], dict] = {}
        self.remote: dict[str, dict] = {}  # address key -> envelope entry
        # address key -> (entry, the alias, list or group to expand after DATA)
        self.expand: dict[str, tuple[dict, Distribution]] = {}
        self._message: Message | None = None
        self._aborted = False

    @property
    def local_delivery(self) -> bool:
        """True when a recipient's mailbox is here, or may be once an alias or list expands (the
        spool file starts with Return-Path)."""
        return bool(self.local or self.expand)

    def add_recipient(self, decision: RecipientDecision, notify: list[str] | None,
                      orcpt: str | None) -> None:
        """See IDeliveryTransaction: the first RCPT naming a mailbox (or queued address) sets
        its DSN parameters; every accepted RCPT counts for Received and the logs."""
        entry = {"orcpt": orcpt or decision.orcpt, "notify": notify}
        if decision.distribution is not None:
            dist = decision.distribution
            self.expand.setdefault(dist.address, ({"address": str(decision.given), **entry}, dist))
        elif decision.mailbox is not None:
            self.local.setdefault(decision.mailbox, {"address": str(decision.given), **entry})
        else:
            address = decision.route.address
            self.remote.setdefault(address.key, {"address": str(address), **entry})
        self.recipients.append(str(decision.given))

    def body(self, spool: Any, size: int, hops: int, arrival: float, received_from: str) -> None:
        """See IDeliveryTransaction: the spool file (``smtp.incoming.SpoolWriter``) and what
        the queue and the delivery reports need to know of it."""
        sender = str(self.sender) if self.sender else ""
        rcpts = [Recipient(entry, mailbox) for mailbox, entry in self.local.items()]
        rcpts += [Recipient(entry) for entry in self.remote.values()]
        rcpts += [Recipient(entry, expand=dist) for entry, dist in self.expand.values()]
        self._message = Message(
            queue_id=spool.queue_id, spool=spool, sender=sender,
            recipients=rcpts, size=size, hops=hops, arrival=arrival,
            received_from=received_from, ret=self.options.ret, envid=self.options.envid,
            body=self.options.body, reporting_mta=self.context.config.server.hostname,
            session=self.session, user=self.user,
        )

    def commit(self) -> defer.Deferred:
        """See IDeliveryTransaction: run the stages; fires with ``{recipient: Verdict}`` once the
        message is durable, or fails with MailError (nothing stored)."""
        if self._message is None or self._aborted:
            return defer.fail(Failure(RuntimeError("commit without a body, or after abort")))
        return start_stages(self._message, self._stages())

    def _stages(self) -> list:
        """The context's stages, or with a content check over the session's milters."""
        avatar = self.avatar
        if avatar is None or avatar.conversation is None:
            return self.context.stages
        ctx = self.context
        session = self.session
        outcomes = FilterOutcomes(
            ctx.config.server.hostname, ctx.quarantine, ctx.queue,
            lambda: avatar.postmaster(session),
            lambda address: avatar.resolve_added(session, address))
        return default_stages(ctx.committer, content_filter=avatar.conversation,
                              outcomes=outcomes, **ctx.stage_parts)

    def abort(self) -> None:
        """See IDeliveryTransaction: the spool file is removed; nothing is stored."""
        self._aborted = True
        if self._message is not None:
            self._message.spool.abort()
        if self.avatar is not None:
            self.avatar.reset()
