"""LocalChecker with real Unix accounts and real PAM (tests/support/pam.py; needs root).

Beyond the conformance suite: expired and system accounts, a PAM service that cannot run
(temporary failure), recipients, the start-up check, the shipped sample service file, and the
log-ins per second on this machine.
"""

from __future__ import annotations

import time

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.identity.local import LocalChecker
from tests.support.pam import PAM_DIR, SAMPLE_PAM_SERVICE, local_accounts  # noqa: F401
from tests.support.slapd import in_reactor

pytestmark = pytest.mark.integration
DOMAIN = "pop.contoso.test"


def config(tmp_path, service: str, domains=(DOMAIN,)):
    dom = ", ".join(f'"{d}"' for d in domains)
    return parse_config(
        f'[server]\nhostname = "{DOMAIN}"\nstate_dir = "{tmp_path}"\n'
        f'[auth]\nmethod = "local"\napop = false\n[auth.local]\npam_service = "{service}"\n'
        f"[domains]\nlocal = [{dom}]\n"
    )


def login(checker, name, password):
    try:
        return in_reactor(checker.requestAvatarId, UsernamePassword(name, password))
    except (UnauthorizedLogin, AuthUnavailable) as e:
        return type(e)


@pytest.fixture
def checker(local_accounts, tmp_path):  # noqa: F811
    c = LocalChecker(config(tmp_path, local_accounts.service), None)
    c.check()
    return c


def test_sample_service_file_is_used(local_accounts) -> None:  # noqa: F811
    """The fixture's PAM service is the project's sample etc/pam.d/pop3coexist, which has no
    nullok (empty passwords never log in)."""
    text = (PAM_DIR / local_accounts.service).read_text()
    assert text == SAMPLE_PAM_SERVICE.read_text()
    assert "nullok" not in "".join(line for line in text.splitlines() if not line.startswith("#"))


def test_good_account(checker, local_accounts) -> None:  # noqa: F811
    """The right password logs in as account@domain, by bare name or address, any case."""
    good = local_accounts.accounts["good"]
    for name in (good.name, good.name.upper(), f"{good.name}@{DOMAIN.upper()}"):
        assert login(checker, name, good.password) == f"{good.name}@{DOMAIN}"
    assert login(checker, good.name, local_accounts.accounts["other"].password) is UnauthorizedLogin


def test_expired_account_refused(checker, local_accounts) -> None:  # noqa: F811
    """An expired account (pam_acct_mgmt) is refused with its right password."""
    expired = local_accounts.accounts["expired"]
    assert login(checker, expired.name, expired.password) is UnauthorizedLogin


def test_system_account_refused(checker, local_accounts) -> None:  # noqa: F811
    """A system account (uid below 1000) neither logs in nor receives mail, and root is
    never even tried."""
    system = local_accounts.accounts["system"]
    assert login(checker, system.name, system.password) is UnauthorizedLogin
    assert in_reactor(checker.resolve_recipient, f"{system.name}@{DOMAIN}") is None
    assert in_reactor(checker.resolve_recipient, f"root@{DOMAIN}") is None
    assert in_reactor(checker.resolve_recipient, f"nobody@{DOMAIN}") is None


def test_recipients(checker, local_accounts) -> None:  # noqa: F811
    """An ordinary account receives mail at the local domain only."""
    good = local_accounts.accounts["good"]
    assert in_reactor(checker.resolve_recipient, f"{good.name.upper()}@{DOMAIN}") == f"{good.name}@{DOMAIN}"
    assert in_reactor(checker.resolve_recipient, f"{good.name}@elsewhere.test") is None
    assert in_reactor(checker.resolve_recipient, f"p3cnosuchuser@{DOMAIN}") is None


def test_broken_pam_service_is_temporary(local_accounts, tmp_path) -> None:  # noqa: F811
    """A PAM service whose module cannot be loaded gives AuthUnavailable, never success."""
    name = local_accounts.service + "-broken"
    path = PAM_DIR / name
    path.write_text("auth required pam_pop3coexist_missing_module.so\naccount required pam_permit.so\n")
    try:
        c = LocalChecker(config(tmp_path, name), None)
        good = local_accounts.accounts["good"]
        assert login(c, good.name, good.password) is AuthUnavailable
    finally:
        path.unlink()


def test_check_refuses_missing_service(tmp_path) -> None:
    """check() refuses a PAM service name with no file in /etc/pam.d (PAM would fall back
    to 'other')."""
    c = LocalChecker(config(tmp_path, "pop3coexist-no-such-service"), None)
    with pytest.raises(ConfigError, match="pam_service"):
        c.check()


def test_sequential_logins_all_succeed(checker, local_accounts, capsys) -> None:  # noqa: F811
    """50 sequential PAM log-ins (one client, pam_unix) all succeed: no state left by one
    conversation spoils the next. The rate is printed for the record, not asserted (speed is
    bench/'s business)."""
    good = local_accounts.accounts["good"]
    n = 50
    start = time.monotonic()
    for _ in range(n):
        assert login(checker, good.name, good.password) == f"{good.name}@{DOMAIN}"
    rate = n / (time.monotonic() - start)
    with capsys.disabled():
        print(f"\n[local/PAM] {rate:.0f} log-ins per second (one client, pam_unix)")
