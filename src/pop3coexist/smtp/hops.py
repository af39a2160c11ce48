"""Next-hop resolution for the delivery runner (smtp/outbound.py): a route's next hop
(policy/routing.py ``NextHop``) into the hosts to connect to, and the check that none of them is
this server.

A hop that cannot be used raises ``HopError`` (an errors.MailError): its code, enhanced code
and text are the reply every recipient of the group gets. A name that is not in DNS is permanent
(``550 5.1.2``) for a recipient's own domain and temporary (``451 4.4.3``) for a hop named in
the config (smart host, connector, route): a configuration problem never bounces mail. A null MX
(RFC 7505) is ``556 5.1.10``; a hop that is this server is ``554 5.4.6``.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address

from pop3coexist.config import Config
from pop3coexist.errors import MailError
from pop3coexist.policy import routing

MAX_HOSTS_PER_ATTEMPT = 5  # MX host names tried in one attempt
MAX_ADDRESSES_PER_ATTEMPT = 10  # addresses of those hosts tried in one attempt


class HopError(MailError):
    """A next hop cannot be used now (or ever): carries the reply for its recipients."""


@dataclass(frozen=True)
class Candidate:
    """One host to connect to: its name (for logs, TLS and DSN Remote-MTA), address, port."""

    name: str
    ip: str
    port: int


class HopResolver:
    """Turns a NextHop into the hosts to try: ``[address]`` as is, else MX (by preference,
    hosts of equal preference in random order as RFC 5321 section 5.1 requires), else the
    name's own addresses (RFC 5321 5.1 implicit MX). Every A and AAAA address of each host is
    a candidate of its own (A first), so that a host whose first address does not answer is
    reached at the next (RFC 5321 section 5.1); at most ``MAX_HOSTS_PER_ATTEMPT`` names and
    ``MAX_ADDRESSES_PER_ATTEMPT`` addresses. Uses twisted.names (an ``IResolver``).

    ``shuffle`` (default ``random.shuffle``) orders each group of equal preference in place.
    """

    def __init__(self, resolver: Any = None,
                 shuffle: Callable[[list[str]], None] | None = None) -> None:
        self._resolver = resolver
        self._shuffle = shuffle or random.shuffle

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from twisted.names import client

            self._resolver = client.createResolver()
        return self._resolver

    async def resolve(self, hop: routing.NextHop) -> list[Candidate]:
        """The hosts to try for ``hop``, in order (at most ``MAX_HOSTS_PER_ATTEMPT``);
        HopError when there is none (module docstring)."""
        if hop.literal or isIPAddress(hop.host) or isIPv6Address(hop.host):
            return [Candidate(hop.host, hop.host, hop.port)]
        from twisted.names import error as dns_error

        names: list[str] = []
        try:
            answers, _auth, _add = await self.resolver.lookupMailExchange(hop.host)
        except dns_error.DNSNameError:
            if hop.smarthost:
                raise HopError(451, "4.4.3", f"smart host {hop.host} not found in DNS")
            if hop.configured:  # a connector's or a route's next hop: our configuration
                raise HopError(451, "4.4.3", f"next hop {hop.host} not found in DNS")
            raise HopError(550, "5.1.2", f"domain {hop.host} not found in DNS")
        except Exception as e:
            raise HopError(451, "4.4.3",
                           f"MX lookup of {hop.host} failed: {e.__class__.__name__}")
        by_pref: dict[int, list[str]] = {}
        for a in answers:
            if getattr(a.payload, "preference", None) is not None:
                by_pref.setdefault(a.payload.preference, []).append(str(a.payload.name).rstrip("."))
        for pref in sorted(by_pref):
            group = sorted(by_pref[pref])
            self._shuffle(group)  # RFC 5321 5.1: spread over MX hosts of equal preference
            names.extend(group)
        if names == [""]:  # RFC 7505 null MX
            raise HopError(556, "5.1.10", f"domain {hop.host} accepts no mail (null MX)")
        if not names:
            names = [hop.host]
        out: list[Candidate] = []
        failure: HopError | None = None
        for name in names[:MAX_HOSTS_PER_ATTEMPT]:
            if isIPAddress(name) or isIPv6Address(name):
                out.append(Candidate(name, name, hop.port))
                continue
            try:
                ips = await self.addresses(name)
            except Exception as e:
                failure = HopError(451, "4.4.3", f"no address for {name}: {e.__class__.__name__}")
                continue
            out.extend(Candidate(name, ip, hop.port) for ip in ips)
        if not out:
            raise failure or HopError(451, "4.4.3", f"no address for {hop.host}")
        return out[:MAX_ADDRESSES_PER_ATTEMPT]

    async def addresses(self, name: str) -> list[str]:
        """Every address of host ``name``: its A records, then its AAAA records, each in the
        order the resolver gave them (RFC 5321 section 5.1: a client tries each address of a
        host in turn before it gives up on the host). An answer with no address of either
        type (a CNAME whose target the resolver left out) is asked again through
        ``getHostByName``, which follows the CNAME. Raises the resolver's error when neither
        look-up could be made, or when the name has no address."""
        from twisted.names import dns

        queries = [(dns.A, self.resolver.lookupAddress(name)),
                   (dns.AAAA, self.resolver.lookupIPV6Address(name))]
        found: list[str] = []
        failures: list[Exception] = []
        for rtype, query in queries:
            try:
                answers, _auth, _add = await query
            except Exception as e:  # noqa: BLE001 - no such name, a time-out: the other type
                failures.append(e)
                continue
            for rr in answers:
                if rr.type == dns.A and rtype == dns.A:
                    found.append(rr.payload.dottedQuad())
                elif rr.type == dns.AAAA and rtype == dns.AAAA:
                    found.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        if found:
            return list(dict.fromkeys(found))
        if len(failures) == len(queries):
            raise failures[0]
        return [await self.resolver.getHostByName(name)]


def own_addresses(config: Config) -> routing.OwnAddresses:
    """What "myself" is: the configured SMTP listeners plus the ports really bound, read from
    ``<state_dir>/run/listeners.json`` (missing or unreadable: the configured ones only).
    Blocking (reads a file)."""
    ports: list[int] = []
    try:
        data = json.loads((config.server.run_dir / "listeners.json").read_text())
        for role in ("smtp", "submission", "smtps"):
            ports.extend(int(p) for p in data.get("listeners", {}).get(role, []))
    except (OSError, ValueError, AttributeError):
        pass
    return routing.own_addresses(config, ports)


def before_self(candidates: list[Candidate], own: routing.OwnAddresses,
                domain: str) -> list[Candidate]:
    """The hosts of ``candidates`` that come before the first one that is this server (a host
    of lower MX preference than ourselves would send the mail back: RFC 5321 section 5.1).
    HopError ``554 5.4.6`` when the first one already is: mail for ``domain`` would loop."""
    kept = []
    for c in candidates:
        if own.is_self(c.name, c.ip, c.port):
            break
        kept.append(c)
    if not kept:
        c = candidates[0]
        raise HopError(554, "5.4.6",
                       f"mail for {domain} loops back to myself ({c.name} [{c.ip}]:{c.port})")
    return kept
