"""Recipient policies (``[[gateway.recipient_policies]]``): address templates and what one
policy changes on one directory object. Pure: no LDAP, no I/O (admin/policy.py does those).

A policy's ``primary`` template gives the object its primary ``SMTP:`` address when it has
none (an ``smtp:`` entry with the same address is promoted). When the object already has
another primary address it stays (as Exchange's Recipient Update Service: it "does not replace
the primary SMTP address if it has been configured") and the policy's address is added as a
secondary one - unless ``replace_primary = true``: then the old primary becomes secondary.
Each ``secondary`` template adds an ``smtp:`` address the object does not have yet.
Addresses are never removed; addresses are compared without case.

Templates: ``%m`` the alias (``sAMAccountName``), ``%g`` the given name, ``%s`` the surname,
``%Ng`` / ``%Ns`` their first N letters, ``%%`` a percent sign; ``@domain`` is short for
``%m@domain``. Characters other than letters, digits, ``.``, ``_`` and ``-`` are dropped
from the values and the local part is lower case. A template that gives no valid address
for an object (no given name, say) is reported in ``Change.skipped``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pop3coexist.address import AddressError, parse_address
from pop3coexist.config import RecipientPolicyConfig

_TEMPLATE_RE = re.compile(r"%(%|(\d*)([mgs]))")
ATTRIBUTES = ["sAMAccountName", "givenName", "sn", "proxyAddresses", "mail", "targetAddress"]


@dataclass
class Change:
    """What one object gets: proxyAddresses values to delete and to add (in this order)."""

    dn: str
    policy: str
    delete: list[str] = field(default_factory=list)
    add: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # templates that gave no address

    @property
    def empty(self) -> bool:
        return not self.delete and not self.add


def expand_template(template: str, attrs: dict[str, list[str]]) -> str | None:
    """The address a template gives for an object's attributes, or None when it cannot."""
    if template.startswith("@"):
        template = "%m" + template
    local_t, _, domain = template.rpartition("@")
    values = {
        "m": _first(attrs, "samaccountname"),
        "g": _first(attrs, "givenname"),
        "s": _first(attrs, "sn"),
    }
    missing = False

    def sub(m: re.Match) -> str:
        nonlocal missing
        if m.group(1) == "%":
            return "%"
        value = values[m.group(3)]
        if not value:
            missing = True
            return ""
        value = re.sub(r"[^A-Za-z0-9._-]", "", value)
        return value[: int(m.group(2))] if m.group(2) else value

    local = _TEMPLATE_RE.sub(sub, local_t)
    if missing or not local:
        return None
    try:
        return str(parse_address(f"{local.lower()}@{domain}"))
    except AddressError:
        return None


def _first(attrs: dict[str, list[str]], name: str) -> str:
    values = attrs.get(name) or []
    return values[0] if values else ""


def plan(dn: str, attrs: dict[str, list[str]], policy: RecipientPolicyConfig) -> Change:
    """The change one policy makes to one object (pure)."""
    change = Change(dn, policy.name)
    proxies = list(attrs.get("proxyaddresses") or [])
    smtp = {p[5:].lower(): p for p in proxies if p[:5].lower() == "smtp:"}
    primary = next((p[5:] for p in proxies if p.startswith("SMTP:")), None)

    def add_secondary(addr: str) -> None:
        if addr.lower() not in smtp:
            value = "smtp:" + addr
            change.add.append(value)
            smtp[addr.lower()] = value

    def make_primary(addr: str) -> None:
        old = smtp.get(addr.lower())
        if old is not None:
            change.delete.append(old)
        value = "SMTP:" + addr
        change.add.append(value)
        smtp[addr.lower()] = value

    if policy.primary:
        addr = expand_template(policy.primary, attrs)
        if addr is None:
            change.skipped.append(policy.primary)
        elif primary is None:
            make_primary(addr)
        elif primary.lower() != addr.lower():
            if policy.replace_primary:
                change.delete.append("SMTP:" + primary)
                change.add.append("smtp:" + primary)
                smtp[primary.lower()] = "smtp:" + primary
                make_primary(addr)
            else:
                add_secondary(addr)
    for template in policy.secondary:
        addr = expand_template(template, attrs)
        if addr is None:
            change.skipped.append(template)
        else:
            add_secondary(addr)
    return change
