"""Outbound routing: which next hop a recipient domain goes to, and loop detection. Pure.

The rules (README "Configuration": ``[[domains.remote]]`` and ``[smarthost]``; the smart host
and remote-domain settings of the Windows Server 2003 SMTP service):

- a local domain (``domains.local``) is delivered locally;
- a remote domain with ``route`` goes to that route;
- otherwise ``smarthost.host`` if set;
- otherwise straight to the recipient domain's MX (port 25).

A next hop written ``[address][:port]`` is used as it is (no DNS lookup at all); a next hop
written ``name[:port]`` has its MX looked up, then its A/AAAA records (the bracket rule of the Windows SMTP service's smart host).
Nothing here resolves names or opens sockets: the delivery runner (smtp/outbound.py) does.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pop3coexist.config import Config

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
    recipients live in a local domain and go to the mail store.
    """

    host: str
    port: int = SMTP_PORT
    literal: bool = False
    smarthost: bool = False
    local: bool = False

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


LOCAL = NextHop(host="", port=0, local=True)


def parse_next_hop(spec: str, smarthost: bool = False) -> NextHop:
    """Parse ``name[:port]`` or ``[address][:port]`` (as checked by config) into a NextHop."""
    m = _BRACKET_RE.match(spec)
    if m:
        addr = str(ipaddress.ip_address(m.group(1)))
        port = int(m.group(2)) if m.group(2) else SMTP_PORT
        return NextHop(host=addr, port=port, literal=True, smarthost=smarthost)
    m = _NAME_RE.match(spec)
    if not m:
        raise ValueError(f"{spec!r} is not name[:port] or [address][:port]")
    port = int(m.group(2)) if m.group(2) else SMTP_PORT
    return NextHop(host=m.group(1).lower().rstrip("."), port=port, smarthost=smarthost)


def domain_of(address: str) -> str:
    """The lower-case domain of ``local@domain`` (the last ``@`` decides)."""
    return address.rpartition("@")[2].lower()


def next_hop(domain: str, config: Config, local_delivery: bool = True) -> NextHop:
    """The next hop for one recipient domain (see the module docstring).

    ``local_delivery`` false (no mail store attached) routes local domains like any other.
    """
    domain = domain.lower()
    if local_delivery and domain in config.domains.local:
        return LOCAL
    gateway = getattr(config, "gateway", None)
    if gateway is not None and gateway.enabled:
        hops = gateway.connector_hops(domain)  # the lowest-cost connector(s); equal costs share
        if hops:
            spec = hops[0] if len(hops) == 1 else random.choice(hops)
            return parse_next_hop(spec, smarthost=spec == config.smarthost.host)
    for remote in config.domains.remote:
        if remote.name == domain and remote.route:
            return parse_next_hop(remote.route, smarthost=remote.route == config.smarthost.host)
    if config.smarthost.host:
        return parse_next_hop(config.smarthost.host, smarthost=True)
    return NextHop(host=domain, port=SMTP_PORT)


def group_by_hop(
    addresses: Iterable[str], config: Config, local_delivery: bool = True
) -> dict[NextHop, list[str]]:
    """Group recipient addresses by next hop (one SMTP transaction per group), in order."""
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
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for own_ip, own_port in self.endpoints:
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
