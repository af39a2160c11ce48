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

Addresses are parsed strictly by ``pop3coexist.address``: the percent hack, bang paths and
quoted local parts stay local parts of a local domain (and then are unknown users), source
routes, address literals, double ``@``, trailing dots and unqualified names are syntax errors.
Domains are compared exactly, never by suffix.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pop3coexist.address import Address, AddressError, parse_address
from pop3coexist.errors import MailError, PermanentFailure
from pop3coexist.policy.connections import Network, ip_in_networks


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
    """Parse the inside of a ``RCPT TO:<...>`` path strictly.

    The unqualified ``postmaster`` (any case) is accepted as RFC 5321 section 4.5.1 requires
    and means ``postmaster@<postmaster_domain>``. Any other malformed address raises
    ``MailError`` 501 5.1.3.
    """
    if text.lower() == "postmaster" and postmaster_domain:
        return Address("postmaster", postmaster_domain.lower())
    try:
        return parse_address(text)
    except AddressError as e:
        raise PermanentFailure(f"Bad recipient address syntax: {e}", "5.1.3", 501)


def parse_sender(text: str) -> Address:
    """Parse the inside of a ``MAIL FROM:<...>`` path (not empty); MailError 501 5.1.7."""
    try:
        return parse_address(text)
    except AddressError as e:
        raise PermanentFailure(f"Bad sender address syntax: {e}", "5.1.7", 501)


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

    @classmethod
    def from_config(cls, config) -> RelayPolicy:
        """Build the policy from a ``config.Config``."""
        relay = {d.name: d.route for d in config.domains.remote if d.relay}
        routed = {d.name: d.route for d in config.domains.remote if not d.relay}
        gateway = getattr(config, "gateway", None)
        if gateway is not None and gateway.enabled:
            # connector address spaces (policy/gateway.py): "allow messages to be relayed to
            # these domains" accepts them from anyone; routing picks the connector's next hop
            for c in gateway.connectors:
                for space in c.address_spaces:
                    (relay if c.allow_relay else routed).setdefault(space.domain, None)
        return cls(relay, config.relay.networks, config.relay.authenticated, routed)

    def is_trusted(self, client_ip: str) -> bool:
        """True when the client address is in ``relay.networks``."""
        return ip_in_networks(client_ip, self.networks)

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
