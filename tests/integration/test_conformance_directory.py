"""The IAccountChecker conformance suite (tests/support/conformance.py) for the directory.

DirectoryChecker against a real OpenLDAP slapd holding AD-style users (tests/support/slapd.py),
with one local domain (the short form logs in) and with two (two "ted" accounts in two
domains), over plain LDAP, StartTLS and ldaps://. "Breaking the source" stops slapd; it is
started again after each test.
"""

from __future__ import annotations

import pytest

from pop3coexist.config import parse_config
from pop3coexist.identity.directory import DirectoryChecker
from tests.support.conformance import Account, CheckerConformance, CheckerEnv, run_sync
from tests.support.slapd import DIRECTORY_USERS, ReactorThreadChecker, in_reactor, slapd  # noqa: F401

pytestmark = pytest.mark.integration

TED = DIRECTORY_USERS["ted"]
TED_F = DIRECTORY_USERS["ted.f"]
DORA = DIRECTORY_USERS["dora"]
FAR = DIRECTORY_USERS["far"]


@pytest.fixture(params=["one-domain", "two-domains-starttls", "two-domains-ldaps"])
def direnv(request, slapd, tmp_path):  # noqa: F811
    """A DirectoryChecker on the slapd fixture; slapd runs again after the test."""
    one = request.param == "one-domain"
    domains = ("pop.contoso.test",) if one else ("pop.contoso.test", "fabrikam.test")
    url = slapd.ldaps_url if request.param.endswith("ldaps") else slapd.url
    secret = tmp_path / "state"
    secret.mkdir()
    cfg = parse_config(slapd.config_toml(
        secret, url=url, starttls=request.param.endswith("starttls"),
        ca_file=not one, domains=domains, timeout="5s",
    ))
    real = DirectoryChecker(cfg)
    user = Account("ted@pop.contoso.test", TED.password, "ted@pop.contoso.test")
    second = None if one else Account("ted@fabrikam.test", TED_F.password, "ted@fabrikam.test")
    env = CheckerEnv(
        checker=ReactorThreadChecker(real),
        user=user,
        run=run_sync,
        unknown_address="nobody@pop.contoso.test",
        single_domain=one,
        second_domain_user=second,
        disabled_user=Account("dora@pop.contoso.test", DORA.password, "dora@pop.contoso.test"),
        break_source=slapd.stop,
        foreign_user=Account("Far@Elsewhere.test", FAR.password, "far@elsewhere.test"),
    )
    try:
        yield env
    finally:
        slapd.ensure_running()
        in_reactor(real.close)


class TestDirectoryConformance(CheckerConformance):
    """Every conformance case against DirectoryChecker and slapd."""

    @pytest.fixture
    def env(self, direnv: CheckerEnv) -> CheckerEnv:
        return direnv
