"""The resolvers of ``[dns]``: every DNS look-up of the server asks the same servers.

``[dns] servers`` (addresses) and ``port`` name the resolvers; with no servers the
nameservers of ``/etc/resolv.conf`` are used (as the C library would). Two clients share the
setting, each where it fits:

- ``twisted_resolver``: a twisted.names resolver (``IResolver``, asynchronous, in the reactor)
  for the outbound queue's MX and address look-ups (smtp/hops.py ``HopResolver``); ``/etc/hosts``
  is read first, as ``twisted.names.client.createResolver`` does;
- ``BlockingDNS``: a dnspython stub resolver for the SPF, DKIM and DMARC checks, which run in
  a thread (mailauth/verify.py): pyspf and dkimpy take a blocking DNS function, and these give
  them one that asks the configured servers (``spf_lookup``, ``dkim_txt``).

A timeout or a server failure (SERVFAIL, no server answers) is ``DNSTemporaryError``; a name or
type that does not exist is an empty answer.
"""

from __future__ import annotations

import threading
from typing import Any

from pop3coexist.config import DnsConfig

RESOLV_CONF = "/etc/resolv.conf"
HOSTS = "/etc/hosts"


class DNSTemporaryError(Exception):
    """No answer now (timeout, SERVFAIL, no server reachable): try again later."""


def twisted_resolver(cfg: DnsConfig, reactor: Any = None) -> Any:
    """A twisted.names ``IResolver`` asking ``cfg.servers`` on ``cfg.port`` (or those of
    /etc/resolv.conf), after /etc/hosts; each query waits ``cfg.timeout`` seconds in all."""
    from twisted.names import cache, client, hosts, resolve

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    servers = [(ip, cfg.port) for ip in cfg.servers] or None
    timeout = _timeouts(cfg.timeout)
    upstream = client.Resolver(resolv=None if servers else RESOLV_CONF, servers=servers,
                               timeout=timeout, reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(file=HOSTS), cache.CacheResolver(reactor=reactor),
                                  upstream])


def _timeouts(total: float) -> tuple[float, ...]:
    """twisted.names' retry schedule for ``total`` seconds: one try, then two more."""
    first = max(total / 4, 0.1)
    return (first, max(total - first, 0.1))


class BlockingDNS:
    """Blocking look-ups through the configured resolvers (dnspython), for code that runs in
    a thread. Thread-safe: dnspython's ``Resolver.resolve`` keeps no per-query state."""

    def __init__(self, cfg: DnsConfig) -> None:
        import dns.resolver

        if cfg.servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = list(cfg.servers)
        else:
            try:
                resolver = dns.resolver.Resolver(filename=RESOLV_CONF)
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]  # what the C library does then
        resolver.port = cfg.port
        resolver.lifetime = cfg.timeout
        resolver.timeout = cfg.timeout
        resolver.search = []  # names here are absolute
        self.resolver = resolver
        self.timeout = cfg.timeout

    def query(self, name: str, qtype: str, timeout: float | None = None) -> list[Any]:
        """The rdata of ``name``'s ``qtype`` records ([] for NXDOMAIN or no such record);
        DNSTemporaryError on a timeout or a server failure."""
        import dns.exception
        import dns.name
        import dns.resolver

        lifetime = min(timeout, self.timeout) if timeout else self.timeout
        try:
            answer = self.resolver.resolve(name.rstrip(".") + ".", qtype, lifetime=lifetime,
                                           raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DNSTemporaryError(f"{qtype} {name}: {e.__class__.__name__}") from None
        except dns.exception.DNSException as e:  # a name that cannot be (too long, bad label)
            if isinstance(e, (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel)):
                return []
            raise DNSTemporaryError(f"{qtype} {name}: {e.__class__.__name__}") from None
        return list(answer.rrset or [])

    def txt(self, name: str, timeout: float | None = None) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined (RFC 7208 section 3.3)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT", timeout)]

    # -- the DNS functions the libraries call

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name``, or None; a temporary
        failure is dkimpy's ``DnsTimeoutError`` (its temperror)."""
        import dkim

        if isinstance(name, bytes):
            try:
                name = name.decode("ascii")
            except UnicodeDecodeError:
                return None
        try:
            records = self.txt(name, timeout)
        except DNSTemporaryError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str, strict: Any = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup``: ``[((name, type), data)]`` as its dnspython driver gives
        them; a temporary failure is pyspf's ``TempError``."""
        import spf

        try:
            records = self.query(name, qtype, timeout)
        except DNSTemporaryError as e:
            raise spf.TempError(f"DNS {e}") from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out


# pyspf looks its DNS function up in its module at every query; this one sends each query to
# the BlockingDNS of the SPF check running in the calling thread (``spf_dns``), so that two
# servers (tests) with different [dns] settings never share one.
class _Current(threading.local):
    dns: BlockingDNS | None = None  # the check running in this thread


_current = _Current()
_installed = False
_install_lock = threading.Lock()


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> Any:
    dns = _current.dns
    if dns is None:
        raise RuntimeError("an SPF look-up outside mailauth.resolver.spf_dns")
    return dns.spf_lookup(name, qtype, strict, timeout)


class spf_dns:  # noqa: N801 - used as a context manager, like a function
    """``with spf_dns(dns): spf.query(...).check()``: pyspf's look-ups in this thread go to
    ``dns`` (a BlockingDNS)."""

    def __init__(self, dns: BlockingDNS) -> None:
        global _installed
        self.dns = dns
        if not _installed:
            import spf

            with _install_lock:
                spf.DNSLookup = _dispatch
                _installed = True

    def __enter__(self) -> BlockingDNS:
        _current.dns = self.dns
        return self.dns

    def __exit__(self, *exc: object) -> None:
        _current.dns = None
