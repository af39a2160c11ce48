"""The IAccountChecker conformance suite (tests/support/conformance.py) for local accounts.

LocalChecker with real Unix accounts and a real PAM service (tests/support/pam.py; needs
root, which CI has). One mail domain only, as the method demands, so there is no second-domain
user. The disabled account is a password-locked one (usermod -L). "Breaking the source" makes
the account database fail (an NSS error, injected through getpwnam).
"""

from __future__ import annotations

import pwd

import pytest

from pop3coexist.config import parse_config
from pop3coexist.identity.local import LocalChecker
from tests.support.conformance import Account, CheckerConformance, CheckerEnv, run_sync
from tests.support.pam import local_accounts  # noqa: F401
from tests.support.slapd import ReactorThreadChecker

pytestmark = pytest.mark.integration
DOMAIN = "pop.contoso.test"


def local_config(tmp_path, service: str):
    return parse_config(
        f'[server]\nhostname = "{DOMAIN}"\nstate_dir = "{tmp_path}"\n'
        f'[auth]\nmethod = "local"\napop = false\n[auth.local]\npam_service = "{service}"\n'
        f'[domains]\nlocal = ["{DOMAIN}"]\n'
    )


@pytest.fixture
def localenv(local_accounts, tmp_path):  # noqa: F811
    """A LocalChecker on the test PAM service and accounts."""
    broken = {"on": False}

    def getpwnam(name: str):
        if broken["on"]:
            raise OSError("account database unavailable")
        return pwd.getpwnam(name)

    real = LocalChecker(local_config(tmp_path, local_accounts.service), None, getpwnam=getpwnam)
    real.check()
    good = local_accounts.accounts["good"]
    locked = local_accounts.accounts["locked"]
    return CheckerEnv(
        checker=ReactorThreadChecker(real),
        user=Account(good.name, good.password, f"{good.name}@{DOMAIN}"),
        run=run_sync,
        unknown_address=f"p3cnobody@{DOMAIN}",
        single_domain=True,
        second_domain_user=None,
        disabled_user=Account(locked.name, locked.password, f"{locked.name}@{DOMAIN}"),
        break_source=lambda: broken.update(on=True),
    )


class TestLocalConformance(CheckerConformance):
    """Every conformance case against LocalChecker with real PAM."""

    @pytest.fixture
    def env(self, localenv: CheckerEnv) -> CheckerEnv:
        return localenv
