"""The gateway role (the Exchange server's part in the coexistence setup): recipient
resolution at RCPT time. No sockets.

``GatewayPolicy.decide`` answers, for one recipient of a domain the gateway is responsible
for, where its mail goes. It asks the directory (``DirectoryChecker.lookup``: ``mail``,
``proxyAddresses`` with ``SMTP:`` primary and ``smtp:`` secondary, ``targetAddress``):

- **authoritative domains** (``gateway.authoritative_domains`` and every local domain): a
  recipient that is not in the directory, or has neither a target address nor a mailbox here,
  is refused with ``550 5.1.1`` (the ESMTP server then still takes postmaster@, and abuse@ when
  set, for the configured address: ``policy.relay.RoleAddresses``);
- **non-authoritative domains** (``gateway.non_authoritative_domains``): a known recipient is
  resolved the same way; an unknown one is forwarded unchanged through the connector whose
  address space matches (else the default route) - but never back to the server it came from
  (``554 5.4.6``);
- a directory object with a ``targetAddress`` (a mail-enabled user or contact) is redirected
  there: mail for ``ted@northwindtraders.test`` goes to ``ted@pop.northwindtraders.test``.
  Targets are followed through the directory up to ``gateway.max_target_depth`` times; a
  target that leads back to an address already seen, or into an authoritative domain where it
  has no mailbox, is a routing loop (``554 5.4.6``);
- an object without a target but with a mailbox in a local domain is delivered to that
  mailbox (the gateway's own users, in the same Maildir store).

Connector domains (``[[gateway.connectors]]`` address spaces) are not resolved: with
``allow_relay`` they are accepted from anyone and routed by ``policy.routing`` through the
connectors for the domain, lowest cost first (the next cost when a connector's next hops are
down); mail for them that came from the next hop of any of those connectors is refused
(``554 5.4.6``), because it could only loop.

The outcomes use Haraka's small vocabulary: ``Decision`` (deliver locally / forward), or a
raised ``errors.MailError`` (permanent or temporary refusal). ``errors.AuthUnavailable`` from
the directory passes through: the ESMTP server answers ``451 4.4.3``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from pop3coexist.address import Address, AddressError, parse_address
from pop3coexist.config import Config, ConnectorConfig
from pop3coexist.errors import PermanentFailure
from pop3coexist.interfaces import IDirectoryLookup
from pop3coexist.policy.routing import connectors_for, own_addresses, parse_next_hop

LOCAL = "local"
FORWARD = "forward"


@dataclass(frozen=True)
class Decision:
    """Where one accepted recipient goes.

    ``kind`` LOCAL: ``mailbox`` (``"box@domain"``) in this server's store. FORWARD: queue for
    ``address`` (possibly rewritten from ``original`` by a targetAddress).
    """

    kind: str
    address: Address
    original: Address
    mailbox: str | None = None

    @property
    def rewritten(self) -> bool:
        return self.address.key != self.original.key


@dataclass(frozen=True)
class Peer:
    """The SMTP client as the loop check sees it: its address and its EHLO name."""

    ip: str
    helo: str | None = None


def _hop_ip(spec: str) -> str | None:
    if spec.startswith("["):
        inside = spec[1:].partition("]")[0]
        try:
            return str(ipaddress.ip_address(inside))
        except ValueError:
            return None
    return None


def came_from(connector: ConnectorConfig, peer: Peer) -> bool:
    """True when ``peer`` is one of the connector's next hops (so forwarding to it loops).

    A next hop written ``[address]`` matches by address; a named next hop matches the EHLO
    name. With ``peer_hostname`` set, the EHLO name must also be that name (on one host every
    server shares the address, so the name tells them apart).
    """
    helo = (peer.helo or "").lower().rstrip(".")
    if connector.peer_hostname and helo != connector.peer_hostname:
        return False
    try:
        client = str(ipaddress.ip_address(peer.ip))
    except ValueError:
        client = peer.ip
    for hop in connector.next_hops:
        ip = _hop_ip(hop)
        if ip is not None and ip == client:
            return True
        if ip is None and parse_next_hop(hop).host == helo:
            return True
    return False


def _loop(address: Address, why: str) -> PermanentFailure:
    return PermanentFailure(f"<{address}>: routing loop: {why}", "5.4.6", 554)


class GatewayPolicy:
    """Recipient resolution of the gateway role; see the module docstring.

    ``lookup(address)`` is the directory's (a Deferred firing with the attribute dict of
    ``DirectoryChecker.lookup`` or None).
    """

    def __init__(self, config: Config, lookup: Any) -> None:
        gw = config.gateway
        self.config = config
        self.gateway = gw
        self._lookup = lookup
        self.local_domains = {d.lower() for d in config.domains.local}
        self.authoritative = set(gw.authoritative_domains) | self.local_domains
        self.non_authoritative = set(gw.non_authoritative_domains)
        # relay-allowed connector domains are accepted from anyone (with the loop check);
        # the others only from clients that may relay (policy/relay.py)
        self.connector_domains = {
            s.domain for c in gw.connectors if c.allow_relay for s in c.address_spaces
        }

    @classmethod
    def from_config(cls, config: Config, checker: Any) -> GatewayPolicy | None:
        """The policy for a config with ``[gateway]``, or None for a plain mailbox server."""
        if not config.gateway.enabled:
            return None
        if not IDirectoryLookup.providedBy(checker):
            raise ValueError("the gateway role needs a directory checker (auth.method = \"directory\")")
        return cls(config, checker.lookup)

    def handles(self, domain: str) -> bool:
        """True when recipients of ``domain`` are decided here (not by the relay rules alone)."""
        domain = domain.lower()
        return (domain in self.authoritative or domain in self.non_authoritative
                or domain in self.connector_domains)

    def decide(self, address: Address, peer: Peer) -> defer.Deferred:
        """Deferred firing with a Decision, or failing with MailError / AuthUnavailable."""
        return defer.ensureDeferred(self._decide(address, peer))

    async def _decide(self, original: Address, peer: Peer) -> Decision:
        seen: list[str] = []
        address = original
        depth = self.gateway.max_target_depth
        while True:
            if address.key in seen:
                raise _loop(original, f"targetAddress leads back to <{address}>")
            seen.append(address.key)
            domain = address.domain.lower()
            rewritten = address.key != original.key
            if domain in self.connector_domains and domain not in self.non_authoritative:
                self._refuse_return(original, address, peer, rewritten)
                return Decision(FORWARD, address, original)
            if domain not in self.authoritative and domain not in self.non_authoritative:
                # a target outside our domains (the POP3 domain, an external contact)
                return Decision(FORWARD, address, original)
            entry = await self._lookup(address.key)
            if entry is not None:
                target = self._target(entry, address)
                if target is not None and target.key != address.key:
                    if len(seen) > depth:
                        raise _loop(original, f"more than {depth} targetAddress redirections")
                    address = target
                    continue
                mailbox = entry.get("mailbox")
                if target is None and mailbox and mailbox.rpartition("@")[2] in self.local_domains:
                    local = parse_address(mailbox)
                    return Decision(LOCAL, local, original, mailbox=mailbox.lower())
                if target is not None:  # its target is this very address
                    if domain in self.authoritative:
                        raise _loop(original, f"the target <{address}> is in a domain this "
                                              "server is authoritative for and has no mailbox here")
                    self._refuse_return(original, address, peer, rewritten)
                    return Decision(FORWARD, address, original)
            if domain in self.authoritative:
                if rewritten:
                    raise PermanentFailure(
                        f"<{original}>: its target address <{address}> does not exist", "5.1.1", 550
                    )
                raise PermanentFailure(f"<{original}>: no such user here", "5.1.1", 550)
            # non-authoritative and unknown: forward through the connector for the domain
            self._refuse_return(original, address, peer, rewritten)
            return Decision(FORWARD, address, original)

    @staticmethod
    def _target(entry: dict, address: Address) -> Address | None:
        target = entry.get("target_address")
        if not target:
            return None
        try:
            return parse_address(target.strip())
        except AddressError:
            raise PermanentFailure(
                f"<{address}>: the directory gives an unusable targetAddress", "5.1.3", 550
            ) from None

    def _refuse_return(self, original: Address, address: Address, peer: Peer, rewritten: bool) -> None:
        """An unknown recipient is never forwarded back to the server it came from."""
        if rewritten:
            return  # resolved through the directory: the next hop knows it
        # every connector of the route counts: a fall-back connector's next hop is on it too
        for _cost, connector in connectors_for(self.gateway, address.domain):
            if came_from(connector, peer):
                raise _loop(
                    original,
                    f"mail for {address.domain} would go back to the server it came from "
                    f"(connector {connector.name!r})",
                )


SHARED_DOMAIN_RULE = (
    "the POP3 server and the gateway must not share a mail domain (Microsoft's coexistence "
    "guide for the Windows Server 2003 POP3 service and Exchange Server 2003: \"You cannot "
    "configure a server running the Windows Server POP3 service that uses the same mail domain "
    "as the Exchange Server system\"): mail from one system to an unknown user of the other "
    "would loop"
)


def check_pair(config: Config, peer: Config) -> str | None:
    """``check-config --peer``: one line naming the broken coexistence rule, or None.

    With one gateway and one mailbox server: the mailbox server's local domains must not be
    the gateway's authoritative (shared) or local domains. Two servers of the same role must
    not keep mailboxes for the same domain.
    """
    gateways = [c for c in (config, peer) if c.gateway.enabled]
    if len(gateways) == 1:
        gw = gateways[0]
        mailbox = peer if gw is config else config
        shared = set(gw.domains.local) | set(gw.gateway.authoritative_domains)
        clash = sorted(set(mailbox.domains.local) & shared)
        if clash:
            return (f"{mailbox.path or 'the mailbox server'}: local domain {', '.join(clash)} is the "
                    f"gateway's authoritative shared domain; {SHARED_DOMAIN_RULE}")
        return None
    clash = sorted(set(config.domains.local) & set(peer.domains.local))
    if clash:
        return (f"both configs keep mailboxes for {', '.join(clash)}: {SHARED_DOMAIN_RULE}")
    return None


def check_connectors(config: Config) -> str | None:
    """``check-config``: a connector whose next hop is one of this server's own SMTP listeners
    would loop back to itself (the delivery runner refuses it with 554 5.4.6 at run time)."""
    if not config.gateway.enabled:
        return None
    own = own_addresses(config)
    for c in config.gateway.connectors:
        for spec in c.next_hops:
            hop = parse_next_hop(spec)
            if own.is_self(hop.host, hop.host if hop.literal else None, hop.port):
                return (f"connector {c.name!r}: next hop {spec} is this server itself: mail for "
                        f"{', '.join(s.domain for s in c.address_spaces)} would loop back to myself")
    return None
