"""DirectoryChecker against a real OpenLDAP slapd (tests/support/slapd.py).

Beyond the conformance suite: the TLS modes and their certificate checks, the required
group, ambiguous addresses, secondary proxy addresses for recipients, contacts for lookup,
stopping and restarting slapd mid-test (temporary failures, then recovery without a new
checker), and the log-ins per second on loopback.
"""

from __future__ import annotations

import time

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable
from pop3coexist.identity.directory import DirectoryChecker
from tests.support.certs import make_ca_and_cert
from tests.support.slapd import DIRECTORY_USERS, GROUP_DN, in_reactor, slapd  # noqa: F401

pytestmark = pytest.mark.integration
TED = DIRECTORY_USERS["ted"]


@pytest.fixture
def make(slapd, tmp_path):  # noqa: F811
    """Build DirectoryCheckers on the slapd fixture; closes them and restarts slapd after."""
    made: list[DirectoryChecker] = []

    def factory(**kw) -> DirectoryChecker:
        checker = DirectoryChecker(parse_config(slapd.config_toml(tmp_path, **kw)))
        made.append(checker)
        return checker

    yield factory
    slapd.ensure_running()
    for checker in made:
        in_reactor(checker.close)


def login(checker, name, password):
    try:
        return in_reactor(checker.requestAvatarId, UsernamePassword(name, password))
    except (UnauthorizedLogin, AuthUnavailable) as e:
        return type(e)


@pytest.mark.parametrize("mode", ["plain", "starttls", "ldaps"])
def test_tls_modes(make, slapd, mode) -> None:  # noqa: F811
    """Plain LDAP, StartTLS and ldaps:// with the test CA all log in."""
    checker = make(
        url=slapd.ldaps_url if mode == "ldaps" else slapd.url,
        starttls=mode == "starttls", ca_file=mode != "plain",
    )
    assert login(checker, "ted@pop.contoso.test", TED.password) == "ted@pop.contoso.test"


@pytest.mark.parametrize("mode", ["starttls", "ldaps"])
def test_untrusted_certificate_is_temporary(make, slapd, tmp_path, mode) -> None:  # noqa: F811
    """A server certificate the configured CA did not sign: no password is sent, the log-in
    fails temporarily (AuthUnavailable), never succeeds."""
    other = make_ca_and_cert(tmp_path / "other-ca", ca_name="someone else")
    checker = make(url=slapd.ldaps_url if mode == "ldaps" else slapd.url, starttls=mode == "starttls",
                   ca_file=other.ca_cert)
    assert login(checker, "ted@pop.contoso.test", TED.password) is AuthUnavailable


def test_required_group(make) -> None:
    """With required_group only members log in; nora (not a member) is refused."""
    checker = make(extra=f'required_group = "{GROUP_DN}"\n')
    assert login(checker, "ted@pop.contoso.test", TED.password) == "ted@pop.contoso.test"
    nora = DIRECTORY_USERS["nora"]
    assert login(checker, "nora@pop.contoso.test", nora.password) is UnauthorizedLogin
    assert login(make(), "nora@pop.contoso.test", nora.password) == "nora@pop.contoso.test"


def test_locked_out_refused(make) -> None:
    """userAccountControl with the lockout bit refuses the right password."""
    lou = DIRECTORY_USERS["lou"]
    assert login(make(), "lou@pop.contoso.test", lou.password) is UnauthorizedLogin


def test_ambiguous_address_refused(make) -> None:
    """An address two entries claim neither logs in nor resolves."""
    checker = make()
    assert login(checker, "dup@pop.contoso.test", DIRECTORY_USERS["dup1"].password) is UnauthorizedLogin
    assert in_reactor(checker.resolve_recipient, "dup@pop.contoso.test") is None


def test_short_form_and_upn(make) -> None:
    """With one local domain: sAMAccountName and the UPN log in; the mailbox is the primary
    SMTP address (kim's mail is in the upstream domain)."""
    checker = make(domains=("pop.contoso.test",))
    kim = DIRECTORY_USERS["kim"]
    assert login(checker, "KIM", kim.password) == "kim@pop.contoso.test"
    assert login(checker, "kim.akers@northwindtraders.test", kim.password) == "kim@pop.contoso.test"
    assert login(checker, "kim.akers@pop.contoso.test", kim.password) == "kim@pop.contoso.test"


def test_secondary_proxy_address_resolves(make) -> None:
    """Mail to a secondary (smtp:) proxy address goes to the user's mailbox; the X400 proxy
    and addresses in non-local domains do not resolve."""
    checker = make()
    assert in_reactor(checker.resolve_recipient, "Theodore@POP.contoso.test") == "ted@pop.contoso.test"
    assert in_reactor(checker.resolve_recipient, "ted@fabrikam.test") == "ted@fabrikam.test"
    assert in_reactor(checker.resolve_recipient, "ted@northwindtraders.test") is None
    assert in_reactor(checker.resolve_recipient, "ext@northwindtraders.test") is None


def test_lookup_contact(make) -> None:
    """lookup finds a contact with its targetAddress (for the gateway role)."""
    info = in_reactor(make().lookup, "EXT@northwindtraders.test")
    assert info["target_address"] == "ext.person@external.test"
    assert info["mailbox"] is None
    assert info["dn"].startswith("cn=Ext Contact,")


def test_user_filter_excludes_contacts(make) -> None:
    """user_filter (default objectClass=user) keeps contacts out of log-ins and recipients."""
    checker = make(domains=("pop.contoso.test", "northwindtraders.test"))
    assert in_reactor(checker.resolve_recipient, "ext@northwindtraders.test") is None


def test_stop_and_restart(make, slapd) -> None:  # noqa: F811
    """Stopping slapd mid-test gives temporary failures (log-in and recipients); after a
    restart the same checker recovers on its own."""
    checker = make(starttls=True, ca_file=True)
    assert login(checker, "ted@pop.contoso.test", TED.password) == "ted@pop.contoso.test"
    slapd.stop()
    assert login(checker, "ted@pop.contoso.test", TED.password) is AuthUnavailable
    assert login(checker, "ted@pop.contoso.test", "wrong") is AuthUnavailable
    with pytest.raises(AuthUnavailable):
        in_reactor(checker.resolve_recipient, "ted@pop.contoso.test")
    slapd.start()
    assert login(checker, "ted@pop.contoso.test", TED.password) == "ted@pop.contoso.test"
    assert in_reactor(checker.resolve_recipient, "theodore@pop.contoso.test") == "ted@pop.contoso.test"


def test_changes_seen_at_once(make, slapd) -> None:  # noqa: F811
    """Nothing is cached: disabling an account in the directory refuses the next log-in."""
    checker = make()
    kim = DIRECTORY_USERS["kim"]
    assert login(checker, "kim@pop.contoso.test", kim.password) == "kim@pop.contoso.test"
    change = "dn: {dn}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {v}\n"
    slapd.modify(change.format(dn=kim.dn, v=514))
    try:
        assert login(checker, "kim@pop.contoso.test", kim.password) is UnauthorizedLogin
    finally:
        slapd.modify(change.format(dn=kim.dn, v=512))
    assert login(checker, "kim@pop.contoso.test", kim.password) == "kim@pop.contoso.test"


def test_logins_reuse_the_directory_connections(make, capsys) -> None:
    """200 sequential log-ins (one client, loopback) open no new directory connection after
    the first log-in made them: the checker keeps its service and bind connections instead of
    reconnecting for every log-in (counted, not timed; the rate is printed for the record)."""
    checker = make()
    opened: list[int] = []
    connect = checker._connector

    def counting_connector():  # noqa: ANN202
        opened.append(1)
        return connect()

    checker._connector = counting_connector
    login(checker, "ted@pop.contoso.test", TED.password)  # connections made
    first = len(opened)
    n = 200
    start = time.monotonic()
    for _ in range(n):
        assert login(checker, "ted@pop.contoso.test", TED.password) == "ted@pop.contoso.test"
    rate = n / (time.monotonic() - start)
    with capsys.disabled():
        print(f"\n[directory] {rate:.0f} log-ins per second (one client, loopback, plain LDAP)")
    assert 1 <= first <= 2 and len(opened) == first, (first, len(opened))


def test_credential_stamp_follows_password_and_disabled_flag(make, slapd) -> None:  # noqa: F811
    """ICredentialStamp against slapd (no ppolicy overlay, so the stamp comes from
    modifyTimestamp and entryCSN): the same value while nothing changes, a new one after the
    password is replaced (even within the same second), None while the account is disabled,
    None for an address no entry has."""
    checker = make()
    kim = DIRECTORY_USERS["kim"]
    account = "kim@pop.contoso.test"
    first = in_reactor(checker.credential_stamp, account)
    assert isinstance(first, bytes) and first == in_reactor(checker.credential_stamp, account)
    slapd.modify(f"dn: {kim.dn}\nchangetype: modify\nreplace: userPassword\n"
                 f"userPassword: {kim.password}\n")
    second = in_reactor(checker.credential_stamp, account)
    assert second is not None and second != first
    change = "dn: {dn}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {v}\n"
    slapd.modify(change.format(dn=kim.dn, v=514))
    try:
        assert in_reactor(checker.credential_stamp, account) is None
    finally:
        slapd.modify(change.format(dn=kim.dn, v=512))
    assert in_reactor(checker.credential_stamp, "nobody-here@pop.contoso.test") is None
