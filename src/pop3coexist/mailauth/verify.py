"""SPF, DKIM and DMARC of one message from outside: ``SenderVerifier`` provides
``interfaces.ISenderVerifier`` for the sender-authentication stage (policy/stages.py).

The checks run in a thread (``run_blocking``), with the ``[dns]`` resolvers
(mailauth/resolver.py ``BlockingDNS``):

- **SPF** (RFC 7208) with pyspf: the MAIL FROM identity, or the HELO identity for the null
  sender (section 2.4); the DNS look-ups of one check share ``spf_timeout`` seconds
  (section 4.6.4). Results: pass, fail, softfail, neutral, none, temperror, permerror.
- **DKIM** (RFC 6376) with dkimpy: every ``DKIM-Signature`` field is verified; a signature
  whose key cannot be fetched now is temperror, a malformed one or a missing key permerror, a
  signature that does not match fail (RFC 8601 section 2.7.1).
- **DMARC** (RFC 7489): the policy record of the RFC5322.From domain
  (``_dmarc.<domain>``), else of its organisational domain (section 6.6.3; the public suffix
  list of the ``publicsuffixlist`` package); identifier alignment (section 3.1) of a passing
  SPF identity or a passing DKIM ``d=``, strict (equal) or relaxed (the same organisational
  domain) as ``aspf=`` / ``adkim=`` ask; the policy that applies: ``sp=`` for a subdomain of
  the organisational domain whose record was used, ``pct=`` sampling (section 6.6.4: outside
  the sample, reject becomes quarantine and quarantine none). A From: field missing, repeated
  or with several addresses is permerror (section 6.6.1); a DNS failure temperror.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from pop3coexist import headers
from pop3coexist.interfaces import ISenderVerifier, MethodResult, SenderAuthentication
from pop3coexist.mailauth.resolver import BlockingDNS, DNSTemporaryError, spf_dns

_QUIET = logging.getLogger("pop3coexist.mailauth.dkimpy")  # results are ours to report
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class DkimOutcome:
    """One DKIM-Signature's result and its signing domain (``d=``, lower case)."""

    result: MethodResult
    domain: str


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of a DMARC record that decide (RFC 7489 section 6.3)."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def parse_dmarc(text: str) -> DmarcRecord | None:
    """A DMARC record (``v=DMARC1; p=...``), or None when ``text`` is none or unusable
    (RFC 7489 section 6.6.3: a record without a valid ``p=`` is unusable unless it has
    ``rua=``, when ``p=none`` is taken)."""
    parts = [p.strip() for p in text.split(";")]
    if not parts or re.sub(r"\s+", "", parts[0]) != "v=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    policies = ("none", "quarantine", "reject")
    p = tags.get("p", "").lower()
    if p not in policies:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    sp = sp if sp in policies else p
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DmarcRecord(p, sp, adkim, aspf, pct)


def from_domain(message: bytes) -> str | None:
    """The domain of the one author address of ``message``'s one From: field (lower case),
    or None when there is not exactly one (RFC 7489 section 6.6.1)."""
    values = headers.values(message, "From")
    if len(values) != 1:
        return None
    addresses = [a for _name, a in getaddresses(values) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def _crlf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@implementer(ISenderVerifier)
class SenderVerifier:
    """See ISenderVerifier and the module docstring.

    ``dns``: a BlockingDNS; ``run_blocking(f, *args)``: runs ``f`` off the reactor, a
    Deferred (like ``threads.deferToThread``); ``spf_timeout``: seconds for one SPF check;
    ``sample``: a number in [0, 1) for ``pct=`` (default ``random.random``).
    """

    def __init__(self, dns: BlockingDNS, run_blocking: Callable[..., defer.Deferred],
                 spf_timeout: float = 20.0, sample: Callable[[], float] | None = None) -> None:
        from publicsuffixlist import PublicSuffixList

        self.dns = dns
        self.run_blocking = run_blocking
        self.spf_timeout = spf_timeout
        self.sample = sample or random.random
        self.psl = PublicSuffixList()

    def verify(self, message: bytes, client_ip: str, helo: str | None,
               mail_from: str) -> defer.Deferred:
        """See ISenderVerifier."""
        return self.run_blocking(self.check, message, client_ip, helo, mail_from)

    # -- blocking

    def check(self, message: bytes, client_ip: str, helo: str | None,
              mail_from: str) -> SenderAuthentication:
        """Blocking: every check (see ISenderVerifier.verify)."""
        spf_result, spf_domain = self.check_spf(client_ip, helo, mail_from)
        dkim = self.check_dkim(message)
        dmarc, domain, policy = self.check_dmarc(message, spf_result, spf_domain, dkim)
        return SenderAuthentication(spf_result, tuple(d.result for d in dkim), dmarc,
                                    domain or "", policy)

    def check_spf(self, client_ip: str, helo: str | None,
                  mail_from: str) -> tuple[MethodResult, str]:
        """(the SPF result, the domain of the identity checked: MAIL FROM's, or HELO's for
        the null sender)."""
        import spf

        helo = (helo or "").strip()
        if mail_from:
            prop, value = "smtp.mailfrom", mail_from
            domain = mail_from.rpartition("@")[2].lower()
        else:
            prop, value = "smtp.helo", helo
            domain = helo.lower()
        if not domain or domain.startswith("["):
            return MethodResult("spf", "none", ((prop, value or "<>"),),
                                "no domain to check"), ""
        try:
            with spf_dns(self.dns):
                q = spf.query(i=client_ip, s=mail_from, h=helo or domain,
                              timeout=self.dns.timeout, querytime=self.spf_timeout)
                result, _code, explanation = q.check()
        except Exception as e:  # noqa: BLE001 - pyspf's own errors are results already
            result, explanation = "temperror", f"SPF check failed: {e.__class__.__name__}"
        result = str(result).lower()
        if result not in SPF_RESULTS:
            result = "permerror"
        comment = {
            "pass": f"{domain}: {client_ip} is allowed to send",
            "fail": f"{domain}: {client_ip} is not allowed to send",
            "softfail": f"{domain}: {client_ip} is not allowed to send (softfail)",
            "neutral": f"{domain}: no statement about {client_ip}",
            "none": f"{domain} publishes no SPF record",
        }.get(result, str(explanation))
        return MethodResult("spf", result, ((prop, value),), comment), domain

    def check_dkim(self, message: bytes) -> list[DkimOutcome]:
        """One outcome per DKIM-Signature field, topmost first ([] when there is none)."""
        import dkim
        from dkim.util import InvalidTagValueList, parse_tag_value

        data = _crlf(message)
        try:
            signer = dkim.DKIM(data, logger=_QUIET, timeout=int(max(1, self.dns.timeout)))
        except dkim.DKIMException as e:
            return [DkimOutcome(MethodResult("dkim", "permerror", (), str(e)), "")]
        sigs = [v for k, v in signer.headers if k.lower() == b"dkim-signature"]
        out: list[DkimOutcome] = []
        for idx, raw in enumerate(sigs):
            try:
                tags = parse_tag_value(re.sub(rb"\s+", b"", raw).rstrip(b";") or b"")
            except InvalidTagValueList:
                tags = {}
            d = tags.get(b"d", b"").decode("ascii", "replace").lower()
            props: list[tuple[str, str]] = []
            if d:
                props.append(("header.d", d))
            if tags.get(b"s"):
                props.append(("header.s", tags[b"s"].decode("ascii", "replace")))
            if tags.get(b"b"):
                props.append(("header.b", tags[b"b"][:8].decode("ascii", "replace")))
            comment = ""
            key_problem: list[tuple[str, str]] = []  # dkimpy turns these into a bare False
            try:
                ok = signer.verify(idx=idx, dnsfunc=self._key_lookup(key_problem))
                result = "pass" if ok else "fail"
                if result == "fail":
                    result, comment = (key_problem[0] if key_problem
                                       else ("fail", "signature does not verify"))
            except dkim.DnsTimeoutError:
                result, comment = "temperror", "key look-up failed"
            except dkim.ValidationError as e:
                result, comment = "fail", str(e).split(" (")[0][:80]
            except dkim.DKIMException as e:
                result, comment = "permerror", str(e)[:80]
            except DNSTemporaryError:
                result, comment = "temperror", "key look-up failed"
            out.append(DkimOutcome(MethodResult("dkim", result, tuple(props), comment), d))
        return out

    def _key_lookup(self, problems: list[tuple[str, str]]) -> Callable[..., bytes | None]:
        """dkimpy's ``dnsfunc`` for one signature: notes in ``problems`` why a key is missing
        (no record: permerror; unusable: permerror; timeout: temperror), which dkimpy itself
        reports only as a failed verification."""
        import dkim

        def lookup(name: bytes, timeout: float = 5) -> bytes | None:
            try:
                txt = self.dns.dkim_txt(name, timeout)
            except dkim.DnsTimeoutError:
                problems.append(("temperror", "key look-up failed"))
                raise
            if txt is None:
                problems.append(("permerror", "no key published"))
                return None
            try:
                dkim.evaluate_pk(name, txt)
            except (dkim.DKIMException, ValueError):
                problems.append(("permerror", "the published key is unusable"))
            return txt

        return lookup

    def organisational(self, domain: str) -> str:
        """The organisational domain (RFC 7489 section 3.2): the public suffix plus one
        label; the domain itself when it is a public suffix or unknown to the list."""
        return self.psl.privatesuffix(domain) or domain

    def aligned(self, identity: str, author: str, mode: str) -> bool:
        """RFC 7489 section 3.1: strict is equality, relaxed the same organisational domain."""
        if not identity:
            return False
        if mode == "s":
            return identity == author
        return self.organisational(identity) == self.organisational(author)

    def dmarc_record(self, domain: str) -> tuple[DmarcRecord | None, bool]:
        """(the record that applies to ``domain``, True when it came from its organisational
        domain instead); DNSTemporaryError passes through."""
        for name, inherited in ((domain, False), (self.organisational(domain), True)):
            if inherited and name == domain:
                break
            texts = [t.decode("utf-8", "replace") for t in self.dns.txt(f"_dmarc.{name}")]
            records = [r for r in (parse_dmarc(t) for t in texts) if r is not None]
            candidates = [t for t in texts if t.strip().startswith("v=DMARC1")]
            if len(candidates) == 1 and len(records) == 1:
                return records[0], inherited
            if len(candidates) > 1:  # RFC 7489 section 6.6.3 step 5: none applies
                return None, inherited
        return None, False

    def check_dmarc(self, message: bytes, spf_result: MethodResult, spf_domain: str,
                    dkim: list[DkimOutcome]) -> tuple[MethodResult, str | None, str]:
        """(the DMARC result, the From: domain, the policy that applies or "")."""
        author = from_domain(message)
        if author is None:
            return MethodResult("dmarc", "permerror", (),
                                "not exactly one From: address"), None, ""
        props = (("header.from", author),)
        try:
            record, inherited = self.dmarc_record(author)
        except DNSTemporaryError:
            return MethodResult("dmarc", "temperror", props, "policy look-up failed"), author, ""
        if record is None:
            return MethodResult("dmarc", "none", props), author, ""
        policy = record.sp if inherited else record.p
        spf_ok = spf_result.result == "pass" and self.aligned(spf_domain, author, record.aspf)
        dkim_ok = any(d.result.result == "pass" and self.aligned(d.domain, author, record.adkim)
                      for d in dkim)
        result = "pass" if spf_ok or dkim_ok else "fail"
        disposition = "none"
        if result == "fail":
            disposition = policy
            if record.pct < 100 and self.sample() * 100 >= record.pct:
                disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
        comment = f"p={record.p} sp={record.sp} dis={disposition}"
        return MethodResult("dmarc", result, props, comment), author, (
            disposition if result == "fail" else policy)


def make_verifier(config: Any, run_blocking: Callable[..., defer.Deferred]) -> SenderVerifier:
    """The verifier of a config: its ``[dns]`` resolvers, ``sender_authentication.spf_timeout``."""
    return SenderVerifier(BlockingDNS(config.dns), run_blocking,
                          config.sender_authentication.spf_timeout)
