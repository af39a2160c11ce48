"""Unit tests for recipient policies (policy/recipient_policies.py): address templates and
the change one policy makes to one directory object."""

from __future__ import annotations

import pytest

from pop3coexist.config import RecipientPolicyConfig
from pop3coexist.policy.recipient_policies import expand_template, plan

TED = {"samaccountname": ["Ted"], "givenname": ["Ted"], "sn": ["Bremer"],
       "proxyaddresses": ["SMTP:ted@pop.northwindtraders.test", "X400:c=US;a= ;p=NW;"]}
POP_POLICY = RecipientPolicyConfig(
    name="POP User Addresses", filter="(targetAddress=*)", priority=1,
    primary="%m@pop.northwindtraders.test", secondary=("%m@northwindtraders.test",),
)


@pytest.mark.parametrize(("template", "expected"), [
    ("%m@northwindtraders.test", "ted@northwindtraders.test"),
    ("@northwindtraders.test", "ted@northwindtraders.test"),
    ("%g.%s@northwindtraders.test", "ted.bremer@northwindtraders.test"),
    ("%1g%s@northwindtraders.test", "tbremer@northwindtraders.test"),
    ("%m%%@northwindtraders.test", "ted%@northwindtraders.test"),
])
def test_templates(template: str, expected: str) -> None:
    """%m, %g, %s, %Ng and %% expand as in Exchange; the local part is lower case."""
    assert expand_template(template, TED) == expected


def test_template_without_the_value_gives_nothing() -> None:
    """A template needing a missing attribute (no given name) gives no address."""
    assert expand_template("%g@a.test", {"samaccountname": ["x"]}) is None
    assert expand_template("%m@a.test", {"samaccountname": ["Ann Lee"]}) == "annlee@a.test"


def test_existing_primary_stays_and_secondary_is_added() -> None:
    """The seed's POP3 policy: the POP3-domain primary is kept (it is already the one the
    policy names); the shared domain is stamped as a secondary smtp: address; other proxy
    types are untouched."""
    change = plan("cn=Ted", TED, POP_POLICY)
    assert change.delete == []
    assert change.add == ["smtp:ted@northwindtraders.test"]
    # applied again: nothing to do
    after = dict(TED, proxyaddresses=TED["proxyaddresses"] + change.add)
    assert plan("cn=Ted", after, POP_POLICY).empty


def test_no_primary_gets_one_and_secondary_is_promoted() -> None:
    """An object without a primary gets the policy's; an smtp: entry with that address is
    promoted (deleted as smtp:, added as SMTP:)."""
    obj = {"samaccountname": ["kim"], "proxyaddresses": ["smtp:kim@pop.northwindtraders.test"]}
    change = plan("cn=Kim", obj, POP_POLICY)
    assert change.delete == ["smtp:kim@pop.northwindtraders.test"]
    assert change.add == ["SMTP:kim@pop.northwindtraders.test", "smtp:kim@northwindtraders.test"]
    bare = plan("cn=New", {"samaccountname": ["new"]}, POP_POLICY)
    assert bare.add == ["SMTP:new@pop.northwindtraders.test", "smtp:new@northwindtraders.test"]


def test_other_primary_is_kept_unless_replace_primary() -> None:
    """A different existing primary is kept (policy address added as secondary); with
    replace_primary the old one becomes secondary and the policy's the primary."""
    obj = {"samaccountname": ["al"], "proxyaddresses": ["SMTP:al@old.test"]}
    keep = RecipientPolicyConfig(name="p", primary="@new.test")
    change = plan("cn=Al", obj, keep)
    assert (change.delete, change.add) == ([], ["smtp:al@new.test"])
    replace = RecipientPolicyConfig(name="p", primary="@new.test", replace_primary=True)
    change = plan("cn=Al", obj, replace)
    assert change.delete == ["SMTP:al@old.test"]
    assert change.add == ["smtp:al@old.test", "SMTP:al@new.test"]


def test_case_insensitive_and_skipped_templates() -> None:
    """Addresses are compared without case; a template that gives nothing is reported."""
    obj = {"samaccountname": ["ted"], "proxyaddresses": ["SMTP:Ted@Pop.Northwindtraders.Test",
                                                        "smtp:TED@northwindtraders.test"]}
    assert plan("cn=Ted", obj, POP_POLICY).empty
    pol = RecipientPolicyConfig(name="p", secondary=("%g@a.test",))
    change = plan("cn=Ted", obj, pol)
    assert change.empty and change.skipped == ["%g@a.test"]
