"""Recipient decisions for the ESMTP server: deliver locally, relay, or refuse (no sockets).

The protocol parses a ``RCPT TO`` path with ``parse_recipient``, asks ``RelayPolicy.route``
where the address goes (local mailbox, relay domain, foreign domain) and, for a local domain,
looks the mailbox up (directory, store) and hands the result to ``local_outcome``. Every
refusal is an ``errors.MailError`` carrying the reply (README "Replies a client can rely on"):

- local domain, known mailbox: deliver (a locked mailbox still receives); over quota 552 5.2.2;
- local domain, unknown mailbox: 550 5.1.1;
- ``domains.remote`` with ``relay = true``: accept and queue, from anyone;
- any other domain: only from ``relay.networks`` or an authenticated client (when
  ``relay.authenticated``); otherwise 554 5.7.1.

Addresses are parsed by ``pop3coexist.address`` (the whole RFC 5321 section 4.1.2 Path): the
percent hack, bang paths and quoted local parts stay local parts of a local domain (and then are
unknown users, 550 5.1.1); a source route is ignored (RFC 5321 section 4.1.1.3), so the Mailbox
after it is what is judged; double ``@`` outside quotes, trailing dots and anything else outside
the grammar are syntax errors (501); valid forms refused as policy (a domain that is not fully
qualified or is an IP address without brackets, an address literal of an unknown tag) get
553 5.7.1; non-ASCII addresses (SMTPUTF8 is not offered) 553 5.6.7 (RFC 6531 section 3.5). An
address literal that names this host (``is_own_literal``, RFC 1123 section 5.2.17) means the
primary local domain; any other literal is a foreign destination like any other domain. Domains
are compared exactly, never by suffix: the decision follows the parsed domain, never the quoting
or a route.

Role addresses (``RoleAddresses``): ``postmaster`` (RFC 5321 section 4.5.1, also unqualified)
and, when ``domains.abuse`` is set, ``abuse`` (RFC 2142) at every domain this server is
authoritative for go to the configured address when no real recipient of that name exists; a
configured address in such a domain receives its own mail too, log-in or not.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from pop3coexist.address import (
    Address,
    AddressError,
    AddressNeedsUTF8,
    AddressRefused,
    parse_address,
    strip_source_route,
)
from pop3coexist.errors import MailError, PermanentFailure
from pop3coexist.policy.connections import Network, ip_in_networks

TRUSTED_CACHE = 4096  # client addresses whose relay.networks answer is kept (then cleared)


class RouteKind(enum.Enum):
    """Where an accepted recipient goes."""

    LOCAL = "local"  # a mailbox in one of our domains (still to be looked up)
    RELAY_DOMAIN = "relay-domain"  # a domains.remote entry with relay = true
    RELAY = "relay"  # any other domain, for a client allowed to relay


@dataclass(frozen=True)
class Client:
    """What the policy knows about the SMTP client: its address and whether it logged in."""

    ip: str
    authenticated: bool = False


@dataclass(frozen=True)
class Route:
    """The decision for one recipient: its kind, the parsed address and the next hop if any."""

    kind: RouteKind
    address: Address
    next_hop: str | None = None


def parse_recipient(text: str, postmaster_domain: str | None = None) -> Address:
    """Parse the inside of a ``RCPT TO:<...>`` path (RFC 5321 section 4.1.2 ``Path``: an
    ignored source route, then a Mailbox).

    The unqualified ``postmaster`` (any case) is accepted as RFC 5321 section 4.5.1 requires
    and means ``postmaster@<postmaster_domain>`` (with no such domain: 550 5.1.1). A malformed
    address raises ``MailError`` 501 5.1.3; a valid form refused as policy 553 5.7.1; a
    non-ASCII address 553 5.6.7 (SMTPUTF8 is not offered: RFC 6531 section 3.5).
    """
    if text.lower() == "postmaster":
        if not postmaster_domain:
            raise PermanentFailure("<Postmaster>: this server has no mail domain yet", "5.1.1", 550)
        return Address("postmaster", postmaster_domain.lower())
    return _parse_path_inner(text, "Recipient", "5.1.3")


def parse_sender(text: str) -> Address:
    """Parse the inside of a ``MAIL FROM:<...>`` path (not empty; a source route is ignored);
    MailError 501 5.1.7 for a malformed address, 553 5.7.1 for a valid form refused as policy,
    553 5.6.7 for a non-ASCII address."""
    return _parse_path_inner(text, "Sender", "5.1.7")


def _parse_path_inner(text: str, what: str, syntax_code: str) -> Address:
    try:
        return parse_address(strip_source_route(text))
    except AddressNeedsUTF8:
        raise PermanentFailure(f"{what} address rejected: non-ASCII addresses need SMTPUTF8, "
                               "which this server does not offer", "5.6.7", 553)
    except AddressRefused as e:
        raise PermanentFailure(f"{what} address rejected: {e}", "5.7.1", 553)
    except AddressError as e:
        raise PermanentFailure(f"Bad {what.lower()} address syntax: {e}", syntax_code, 501)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_own_literal(ip: IPAddress, own: Iterable[str]) -> bool:
    """True when an address literal names this host (RFC 1123 section 5.2.17).

    Loopback and the unspecified address always do; ``own`` adds the addresses of this host
    (the listener's local address, the addresses ``server.hostname`` resolves to). An
    IPv4-mapped IPv6 address is compared as the IPv4 address it holds.
    """
    def plain(a: IPAddress) -> IPAddress:
        mapped = getattr(a, "ipv4_mapped", None)
        return mapped if mapped is not None else a

    ip = plain(ip)
    if ip.is_loopback or ip.is_unspecified:
        return True
    for text in own:
        try:
            if plain(ipaddress.ip_address(str(text).partition("%")[0])) == ip:
                return True
        except ValueError:
            continue
    return False


def primary_domain(config, domains: Sequence[str] = ()) -> str | None:
    """The domain that unqualified ``<Postmaster>``, the default postmaster address and
    address literals of this host stand for: the first of ``domains.local``; without local
    domains the gateway's first authoritative domain; else the first (alphabetical) domain
    of ``domains`` (added with ``domain add``); else None."""
    if config.domains.local:
        return config.domains.local[0].lower()
    gateway = config.gateway
    if gateway.enabled and gateway.authoritative_domains:
        return gateway.authoritative_domains[0].lower()
    return sorted(d.lower() for d in domains)[0] if domains else None


@dataclass(frozen=True)
class RoleAddresses:
    """Where postmaster and abuse mail lands (``domains.postmaster``, ``domains.abuse``).

    ``postmaster`` None: ``postmaster@<primary_domain>``. ``abuse`` None: abuse@ is an ordinary
    local part (no redirection).
    """

    postmaster: Address | None = None
    abuse: Address | None = None

    @classmethod
    def from_config(cls, config) -> RoleAddresses:
        """Build from ``config.domains`` (the addresses were checked by config.py)."""
        doms = config.domains
        return cls(
            parse_address(doms.postmaster) if getattr(doms, "postmaster", "") else None,
            parse_address(doms.abuse) if getattr(doms, "abuse", "") else None,
        )

    def postmaster_for(self, primary: str | None) -> Address | None:
        """The address postmaster mail goes to, or None when there is nowhere (no domain)."""
        if self.postmaster is not None:
            return self.postmaster
        return Address("postmaster", primary) if primary else None

    def target(self, address: Address, authoritative: Collection[str],
               primary: str | None) -> Address | None:
        """The role address ``address`` stands for, or None when it is not a role address of
        a domain in ``authoritative`` (lower case). The caller still gives a real recipient of
        that name its own mail (RFC 5321 section 4.5.1 only asks that postmaster works).

        A configured target in such a domain (``domains.postmaster = "admin@..."``, the
        ``domains.abuse`` mailbox) stands for itself: its mailbox receives mail sent to it
        directly as well, although no log-in may exist for it."""
        if address.quoted or address.domain not in authoritative:
            return None
        name = address.local.lower()
        if name == "postmaster":
            return self.postmaster_for(primary)
        if name == "abuse" and self.abuse is not None:
            return self.abuse
        for target in (self.postmaster_for(primary), self.abuse):
            if target is not None and not target.quoted and target.key == address.key:
                return target
        return None


def role_mailboxes(config, domains: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(domain, mailbox)`` pairs, lower case, that must exist so that postmaster (and
    abuse, when set) mail can land: each role target that lies in one of ``domains`` (the
    store's domains). The service creates them at start, ``domain add`` with a new domain."""
    domains = [d.lower() for d in domains]
    roles = RoleAddresses.from_config(config)
    out: list[tuple[str, str]] = []
    for target in (roles.postmaster_for(primary_domain(config, domains)), roles.abuse):
        if target is None or target.quoted or target.domain not in domains:
            continue
        pair = (target.domain, target.local.lower())
        if pair not in out:
            out.append(pair)
    return out


def describe_roles(config, domains: Iterable[str] = ()) -> list[str]:
    """``check-config`` lines: where postmaster (and abuse) mail lands."""
    domains = [d.lower() for d in domains]
    roles = RoleAddresses.from_config(config)
    here = {d.lower() for d in (*config.domains.local, *domains)}
    lines = []
    for name, target in (("postmaster", roles.postmaster_for(primary_domain(config, domains))),
                         ("abuse", roles.abuse)):
        if target is None:
            if name == "postmaster":
                lines.append("postmaster mail has nowhere to land (no mail domain): set "
                             "[domains] postmaster")
            continue
        where = "a mailbox here" if target.domain in here else "relayed there"
        what = "<Postmaster> and postmaster@" if name == "postmaster" else "abuse@"
        lines.append(f"{name}: mail for {what}<every domain this server is authoritative for> "
                     f"lands in <{target}> ({where}), except where that domain has its own "
                     f"{name} mailbox")
    return lines


class RelayPolicy:
    """The recipient rules of one server, built from ``[domains.remote]`` and ``[relay]``."""

    def __init__(
        self,
        relay_domains: dict[str, str | None] | None = None,
        networks: Iterable[Network] = (),
        authenticated_may_relay: bool = True,
        routed_domains: dict[str, str | None] | None = None,
    ) -> None:
        # relay_domains: name -> route for domains.remote entries with relay = true
        # routed_domains: name -> route for domains.remote entries with relay = false
        self.relay_domains = {k.lower(): v for k, v in (relay_domains or {}).items()}
        self.routed_domains = {k.lower(): v for k, v in (routed_domains or {}).items()}
        self.networks = tuple(networks)
        self.authenticated_may_relay = authenticated_may_relay
        self._trusted: dict[str, bool] = {}  # client address -> in networks (is_trusted)

    @classmethod
    def from_config(cls, config) -> RelayPolicy:
        """Build the policy from a ``config.Config``."""
        relay = {d.name: d.route for d in config.domains.remote if d.relay}
        routed = {d.name: d.route for d in config.domains.remote if not d.relay}
        gateway = config.gateway
        if gateway.enabled:
            # connector address spaces (policy/gateway.py): "allow messages to be relayed to
            # these domains" accepts them from anyone; routing picks the connector's next hop
            for c in gateway.connectors:
                for space in c.address_spaces:
                    (relay if c.allow_relay else routed).setdefault(space.domain, None)
        return cls(relay, config.relay.networks, config.relay.authenticated, routed)

    def is_trusted(self, client_ip: str) -> bool:
        """True when the client address is in ``relay.networks``. The answer per address is
        kept (``networks`` never changes in a policy; a reload builds a new one): one parse
        of the address per client, not one per RCPT (issue 17's relay profile)."""
        known = self._trusted.get(client_ip)
        if known is None:
            if len(self._trusted) >= TRUSTED_CACHE:
                self._trusted.clear()
            known = self._trusted[client_ip] = ip_in_networks(client_ip, self.networks)
        return known

    def may_relay(self, client: Client) -> bool:
        """True when this client may send to any domain."""
        if client.authenticated and self.authenticated_may_relay:
            return True
        return self.is_trusted(client.ip)

    def route(self, address: Address, local_domains: Collection[str], client: Client) -> Route:
        """Decide where ``address`` goes for ``client``; raise MailError 554 5.7.1 to refuse."""
        domain = address.domain.lower()
        if domain in {d.lower() for d in local_domains}:
            return Route(RouteKind.LOCAL, address)
        if domain in self.relay_domains:
            return Route(RouteKind.RELAY_DOMAIN, address, self.relay_domains[domain])
        if self.may_relay(client):
            return Route(RouteKind.RELAY, address, self.routed_domains.get(domain))
        raise PermanentFailure(f"Relay access denied for <{address}>", "5.7.1", 554)

    @staticmethod
    def local_outcome(address: Address, mailbox_exists: bool, over_quota: bool = False) -> None:
        """Refuse a local recipient that has no mailbox (550 5.1.1) or is over quota (552 5.2.2).

        A locked mailbox still receives: locks are not a question here.
        """
        if not mailbox_exists:
            raise PermanentFailure(f"<{address}>: no such user here", "5.1.1", 550)
        if over_quota:
            raise MailError(552, "5.2.2", f"<{address}>: mailbox full")
