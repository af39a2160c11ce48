"""The IAccountChecker conformance suite (tests/support/conformance.py) for the password file.

Run with one local domain (the short log-in form works) and with two (the same mailbox name in
both domains), with secrets kept (APOP / CRAM-MD5) and without.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.identity.passwordfile import PasswordFile, PasswordFileChecker, _run_now
from tests.support.conformance import Account, CheckerConformance, CheckerEnv, run_sync

FAST_N = 2**4
DOMAIN = "pop.contoso.test"
OTHER = "fabrikam.test"


@pytest.fixture(params=["one-domain", "two-domains", "two-domains-no-secrets"])
def pwenv(request: pytest.FixtureRequest, tmp_path: Path) -> CheckerEnv:
    """A password file with ted (and, with two domains, another ted) and its checker."""
    keep = request.param != "two-domains-no-secrets"
    domains = [DOMAIN] if request.param == "one-domain" else [DOMAIN, OTHER]
    pw = PasswordFile(tmp_path / "passwords.json", tmp_path / "passwords.key", keep, scrypt_n=FAST_N)
    user = Account("Ted@Pop.Contoso.Test", "Tanstaafl-ü-1", "ted@pop.contoso.test")
    pw.set_password(user.login, user.password)
    second = None
    if len(domains) > 1:
        second = Account("ted@fabrikam.test", "other secret 2", "ted@fabrikam.test")
        pw.set_password(second.login, second.password)
    checker = PasswordFileChecker(pw, lambda: list(domains), run_blocking=_run_now)

    def break_source() -> None:
        pw.path.write_text("{ not json")

    return CheckerEnv(
        checker=checker,
        user=user,
        run=run_sync,
        unknown_address=f"nobody@{DOMAIN}",
        single_domain=len(domains) == 1,
        second_domain_user=second,
        disabled_user=None,
        break_source=break_source,
    )


class TestPasswordFileConformance(CheckerConformance):
    """Every conformance case against PasswordFileChecker."""

    @pytest.fixture
    def env(self, pwenv: CheckerEnv) -> CheckerEnv:
        return pwenv
