"""Outbound routing: the ordered next hops for a recipient domain, and loop detection. Pure.

The route of a recipient domain (README "Configuration": ``[[domains.remote]]``,
``[smarthost]``, ``[[gateway.connectors]]``; Exchange 2003 connector selection) is an ordered
list of attempts (``Route``):

- a local domain (``domains.local``) is delivered locally (one attempt: the store);
- on a gateway, every ``[[gateway.connectors]]`` connector with an address space for the
  domain, lowest cost first; each connector's ``next_hops`` in the order written (the first
  is its primary, the others its fall-backs). Among connectors of *equal* cost the order
  rotates with the message (``spread``: a stable hash of the queue id), so that messages are
  spread evenly over them and one message tries them in the same order on every retry;
- else a remote domain's ``route`` (one next hop or a list: the first is the primary);
- else ``smarthost.host`` if set;
- else straight to the recipient domain's MX (port 25).

The delivery runner (smtp/outbound.py) walks a route: it takes the next attempt only when a
next hop could not start a transaction (no connection, no greeting, TLS or AUTH impossible)
or ended the session (421, a lost connection) before the end of the message, and stops at the
first reply about the message or a recipient, which is the answer. Only when
every attempt failed does the message wait for its next retry. A connector route never falls
back to the smart host or the MX: the connectors are the route for their domains.

A next hop written ``[address][:port]`` is used as it is (no DNS lookup at all); a next hop
written ``name[:port]`` has its MX looked up, then its A/AAAA records (the bracket rule of
the Windows SMTP service's smart host). A recipient domain that is an address literal
(``user@[192.0.2.1]``, ``user@[IPv6:...]``) goes without a smart host straight to that address,
port 25 (RFC 5321 section 4.1.3).
Nothing here resolves names or opens sockets: the delivery runner (smtp/outbound.py) does.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pop3coexist.address import literal_ip
from pop3coexist.config import Config, ConnectorConfig, GatewayConfig, RemoteDomain

SMTP_PORT = 25

_BRACKET_RE = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")
_NAME_RE = re.compile(r"^([A-Za-z0-9.-]+)(?::(\d+))?$")
_TCP_DESC_RE = re.compile(r"^tcp6?:(\d+)(?::(.*))?$")


@dataclass(frozen=True)
class NextHop:
    """Where a group of recipients goes.

    ``literal``: ``host`` is an IP address used without lookup. Otherwise ``host`` is a name
    whose MX (then A/AAAA) records are looked up. ``smarthost``: this hop is the configured
    smart host, so ``smarthost.username`` / ``password_file`` are used for AUTH. ``local``: the
    recipients live in a local domain and go to the mail store. ``configured``: the hop is
    named in the config (smart host, connector, route), so a name that is not in DNS is a
    temporary configuration problem, never a reason to bounce the mail.
    """

    host: str
    port: int = SMTP_PORT
    literal: bool = False
    smarthost: bool = False
    local: bool = False
    configured: bool = False

    @property
    def key(self) -> str:
        """A stable name for grouping and per-host connection limits."""
        if self.local:
            return "local"
        if self.literal:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.key

    @property
    def label(self) -> str:
        """The route's name in the metrics (a bounded set): ``local``, ``smarthost``, the
        ``key`` of a hop the config names (route, connector), or ``mx`` (looked up per
        domain: too many to name)."""
        if self.local:
            return "local"
        if self.smarthost:
            return "smarthost"
        return self.key if self.configured else "mx"


LOCAL = NextHop(host="", port=0, local=True)


@dataclass(frozen=True)
class Attempt:
    """One step of a route: a next hop and, for the log, where it comes from
    (``"connector 'backup' cost 2, next hop 1 of 2"``, ``"smart host"``, ``"MX of example.net"``)."""

    hop: NextHop
    via: str


@dataclass(frozen=True)
class Route:
    """The ordered attempts for one recipient domain (see the module docstring); never empty."""

    attempts: tuple[Attempt, ...]

    @property
    def first(self) -> NextHop:
        """The primary next hop (the one used while it works)."""
        return self.attempts[0].hop

    @property
    def local(self) -> bool:
        return self.first.local

    @property
    def key(self) -> str:
        """The hops in order, for logs: ``"[192.0.2.1]:25, [192.0.2.2]:25"``."""
        return ", ".join(a.hop.key for a in self.attempts)


LOCAL_ROUTE = Route((Attempt(LOCAL, "local delivery"),))


@functools.lru_cache(maxsize=256)
def parse_next_hop(spec: str, smarthost: bool = False, configured: bool = False) -> NextHop:
    """Parse ``name[:port]`` or ``[address][:port]`` (as checked by config) into a NextHop.

    ``smarthost`` marks the smart host (it gets the AUTH credentials) and implies
    ``configured``. Raises ValueError for any other form. The answers are kept (a NextHop is
    immutable; the specs are the config's few): the smart host is not parsed again for each
    message (issue 17).
    """
    configured = configured or smarthost
    m = _BRACKET_RE.match(spec)
    if m:
        addr = str(ipaddress.ip_address(m.group(1)))
        port = int(m.group(2)) if m.group(2) else SMTP_PORT
        return NextHop(host=addr, port=port, literal=True, smarthost=smarthost,
                       configured=configured)
    m = _NAME_RE.match(spec)
    if not m:
        raise ValueError(f"{spec!r} is not name[:port] or [address][:port]")
    port = int(m.group(2)) if m.group(2) else SMTP_PORT
    return NextHop(host=m.group(1).lower().rstrip("."), port=port, smarthost=smarthost,
                   configured=configured)


def domain_of(address: str) -> str:
    """The lower-case domain of ``local@domain`` (the last ``@`` decides)."""
    return address.rpartition("@")[2].lower()


def spread_key(text: str) -> int:
    """A stable, evenly spread number for ``text`` (a queue id): the rotation among equal
    costs. The same on every run and in every process (CRC-32, not Python's salted hash)."""
    return zlib.crc32(text.encode("utf-8", "replace"))


def connectors_for(gateway: GatewayConfig, domain: str) -> list[tuple[int, ConnectorConfig]]:
    """Every connector with an address space for ``domain`` as ``(cost, connector)``, in the
    order of the config file; a connector listing the domain twice counts with its lowest
    cost. Domains match exactly (address spaces are never wildcards)."""
    domain = domain.lower().rstrip(".")
    found: list[tuple[int, ConnectorConfig]] = []
    for c in gateway.connectors:
        costs = [s.cost for s in c.address_spaces if s.domain == domain]
        if costs:
            found.append((min(costs), c))
    return found


def order_by_cost(matches: list[tuple[int, ConnectorConfig]], spread: int = 0
                  ) -> list[tuple[int, ConnectorConfig]]:
    """``matches`` (from ``connectors_for``) lowest cost first. Connectors of equal cost keep
    their config order rotated by ``spread`` (``spread % n`` places): with ``spread_key`` of
    the queue id, messages are spread evenly over equal-cost connectors, and one message tries
    them in the same order every time."""
    ordered = sorted(matches, key=lambda m: m[0])  # stable: config order among equals
    out: list[tuple[int, ConnectorConfig]] = []
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        group = ordered[i:j]
        k = spread % len(group)
        out.extend(group[k:] + group[:k])
        i = j
    return out


def connector_route(gateway: GatewayConfig, domain: str, smarthost_spec: str = "",
                    spread: int = 0) -> Route | None:
    """The connector attempts for ``domain`` (see ``order_by_cost``), each connector's next
    hops in the order written; a hop already on the route is not tried twice. None when no
    connector has an address space for it. A hop equal to ``smarthost_spec`` gets the smart
    host's credentials."""
    attempts: list[Attempt] = []
    seen: set[str] = set()
    for cost, c in order_by_cost(connectors_for(gateway, domain), spread):
        n = len(c.next_hops)
        for i, spec in enumerate(c.next_hops, 1):
            hop = parse_next_hop(spec, smarthost=bool(smarthost_spec) and spec == smarthost_spec,
                                 configured=True)
            if hop.key in seen:
                continue
            seen.add(hop.key)
            attempts.append(Attempt(hop, f"connector {c.name!r} cost {cost}, next hop {i} of {n}"))
    return Route(tuple(attempts)) if attempts else None


def _remote_hops(remote: RemoteDomain) -> tuple[str, ...]:
    """A remote domain's next hops in order (``routes``; a hand-built entry may set only
    ``route``)."""
    if remote.routes:
        return remote.routes
    return (remote.route,) if remote.route else ()


def route_for(domain: str, config: Config, local_delivery: bool = True, spread: int = 0,
              local_domains: Collection[str] = ()) -> Route:
    """The ordered attempts for one recipient domain (see the module docstring).

    ``local_delivery`` false (no mail store attached) routes local domains like any other.
    ``spread``: the rotation among equal-cost connectors (``spread_key(queue_id)``).
    ``local_domains``: lower-case domains local besides ``domains.local`` (those the store
    holds after ``domain add``).
    """
    domain = domain.lower()
    if local_delivery and (domain in config.domains.local or domain in local_domains):
        return LOCAL_ROUTE
    sh = config.smarthost.host
    gateway = config.gateway
    if gateway.enabled:
        route = connector_route(gateway, domain, sh, spread)
        if route is not None:
            return route
    for remote in config.domains.remote:
        hops = _remote_hops(remote)
        if remote.name == domain and hops:
            n = len(hops)
            return Route(tuple(
                Attempt(parse_next_hop(spec, smarthost=spec == sh, configured=True),
                        f"route of {domain}" + (f", next hop {i} of {n}" if n > 1 else ""))
                for i, spec in enumerate(hops, 1)
            ))
    if sh:
        return Route((Attempt(parse_next_hop(sh, smarthost=True), "smart host"),))
    port = config.smarthost.mx_port  # 25 but in tests and unusual networks
    ip = literal_ip(domain)
    if ip is not None:
        return Route((Attempt(NextHop(host=str(ip), port=port, literal=True),
                              f"address literal {domain}"),))
    return Route((Attempt(NextHop(host=domain, port=port), f"MX of {domain}"),))


def next_hop(domain: str, config: Config, local_delivery: bool = True) -> NextHop:
    """The primary next hop for one recipient domain: ``route_for(...).first``."""
    return route_for(domain, config, local_delivery).first


def group_by_route(
    addresses: Iterable[str], config: Config, local_delivery: bool = True, spread: int = 0,
    local_domains: Collection[str] = (),
) -> dict[Route, list[str]]:
    """Group recipient addresses by route (one SMTP transaction per group), in order;
    ``local_domains`` as for ``route_for``."""
    groups: dict[Route, list[str]] = {}
    for addr in addresses:
        groups.setdefault(route_for(domain_of(addr), config, local_delivery, spread,
                                    local_domains), []).append(addr)
    return groups


def group_by_hop(
    addresses: Iterable[str], config: Config, local_delivery: bool = True
) -> dict[NextHop, list[str]]:
    """Group recipient addresses by primary next hop, in order."""
    groups: dict[NextHop, list[str]] = {}
    for addr in addresses:
        groups.setdefault(next_hop(domain_of(addr), config, local_delivery), []).append(addr)
    return groups


# --------------------------------------------------------------------------- loops


@dataclass(frozen=True)
class OwnAddresses:
    """What "myself" is: the server's host name and the (address, port) pairs it listens on.

    An address of ``0.0.0.0`` or ``::`` is a wildcard listener: every loopback or unspecified
    address on that port is this server too.
    """

    hostname: str
    endpoints: frozenset[tuple[str, int]]

    def is_self(self, host_name: str | None, ip: str | None, port: int) -> bool:
        """True when connecting to ``ip:port`` (found for ``host_name``) would reach this server."""
        if host_name and host_name.lower().rstrip(".") == self.hostname.lower():
            return True
        if ip is None:
            return False
        return _ip_is_self(self.endpoints, ip, port)


@functools.lru_cache(maxsize=1024)
def _ip_is_self(endpoints: frozenset[tuple[str, int]], ip: str, port: int) -> bool:
    """True when ``ip:port`` is one of ``endpoints`` (OwnAddresses.is_self), kept per
    argument: the smart host's address is asked about once, not parsed per message."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for own_ip, own_port in endpoints:
        if own_port != port:
            continue
        own = ipaddress.ip_address(own_ip)
        if own == addr:
            return True
        if own.is_unspecified and (addr.is_loopback or addr.is_unspecified):
            return True
    return False


def own_addresses(config: Config, bound_ports: Iterable[int] = ()) -> OwnAddresses:
    """The SMTP listeners of ``config`` (plus ports really bound, e.g. from listeners.json,
    counted as wildcard listeners) as an OwnAddresses."""
    eps: set[tuple[str, int]] = set()
    for desc in (*config.smtp.listen, *config.smtp.submission_listen, *config.smtp.tls_listen):
        m = _TCP_DESC_RE.match(desc)
        if not m:
            continue
        port = int(m.group(1))
        iface = "::" if desc.startswith("tcp6") else "0.0.0.0"
        for part in (m.group(2) or "").split(":"):
            if part.startswith("interface="):
                iface = part[len("interface="):].replace("\\:", ":")
        try:
            ipaddress.ip_address(iface)
        except ValueError:
            continue
        if port:
            eps.add((iface, port))
    for port in bound_ports:
        if port:
            eps.add(("0.0.0.0", int(port)))
    return OwnAddresses(hostname=config.server.hostname, endpoints=frozenset(eps))
