"""A conformance suite every ``interfaces.IAccountChecker`` must pass, whatever its method.

Use it by subclassing ``CheckerConformance`` in a test module (name the subclass ``Test...``)
and giving the subclass a pytest fixture named ``env`` that returns a ``CheckerEnv``::

    class TestPasswordFileConformance(CheckerConformance):
        @pytest.fixture
        def env(self, tmp_path) -> CheckerEnv:
            ...
            return CheckerEnv(checker=..., user=Account(...), run=run_sync, ...)

The fixture may be parametrised (e.g. one and two local domains) to run every case in each
setting. What ``CheckerEnv`` must offer:

- ``checker``: the IAccountChecker under test, its source already filled.
- ``user``: an ``Account`` that can log in: ``login`` the name an administrator would give a
  user (any case), ``password`` its password, ``address`` the lower-case ``mailbox@domain``
  the checker must return for it. Its local part must be a plain atom (letters, digits).
- ``run(deferred)``: wait for a Deferred the checker returned and return its result, or raise
  the exception it failed with (``run_sync`` below does that for Deferreds that have already
  fired; a checker talking to a real server needs a runner that spins the reactor).
- ``unknown_address``: an address in a local domain that no account has.
- ``single_domain``: True when the checker's server has exactly one local domain (then the bare
  local part of ``user.address`` must log in), False when it has several (then it must not).
- ``second_domain_user``: an ``Account`` with the same local part as ``user`` in another local
  domain and a different password, or None when the method cannot have one (local accounts).
- ``disabled_user``: an ``Account`` whose right password must be refused because the source
  marks it disabled (a directory's userAccountControl, a locked PAM account), or None.
- ``foreign_user``: an ``Account`` whose addresses are all outside the local domains (it has
  no mailbox here), ``address`` its expected avatar id; or None when the method cannot have
  one (the password file and local accounts live in the local domains).
- ``break_source``: a callable that makes the credential source unable to answer (stop the
  directory server, corrupt the password file), or None; after it every log-in must fail with
  ``errors.AuthUnavailable``, never succeed.

Cases: right password (login as given, full address, any case, str or bytes), wrong password,
unknown user, empty password, prefixes and extensions of the password, one look-alike failure
for all refusals with no password in its text, the short form, the same name in two domains,
disabled accounts, names that try filter or wildcard injection, resolve_recipient and
sender_owner for known, unknown and malformed addresses, accounts outside the local domains,
the log line for a refused bare name, credential interfaces matching ``offers_secrets``, and APOP
and CRAM-MD5 (with ``identity.credentials``) when ``offers_secrets`` is true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pop3coexist.errors import AuthUnavailable
from pop3coexist.identity.credentials import (
    APOPCredentials,
    CramMD5Credentials,
    apop_digest,
    cram_md5_response,
)
from pop3coexist.interfaces import IAccountChecker

__all__ = ["Account", "CheckerEnv", "CheckerConformance", "run_sync"]

APOP_MAGIC = b"<4711.1700000000@pop.conformance.test>"


@dataclass(frozen=True)
class Account:
    """A test account. ``password`` never shows in a repr (so not in test output either)."""

    login: str
    password: str = field(repr=False)
    address: str


@dataclass
class CheckerEnv:
    """What a ``CheckerConformance`` subclass's ``env`` fixture returns (see the module doc)."""

    checker: Any
    user: Account
    run: Callable[[defer.Deferred], Any]
    unknown_address: str
    single_domain: bool
    second_domain_user: Account | None = None
    disabled_user: Account | None = None
    break_source: Callable[[], None] | None = None
    foreign_user: Account | None = None


def run_sync(d: defer.Deferred) -> Any:
    """The result of a Deferred that has already fired, or raise its exception."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("the Deferred did not fire (the checker needs a reactor-spinning run)")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _local(address: str) -> str:
    return address.rpartition("@")[0]


class CheckerConformance:
    """The method-neutral cases. Subclasses provide the ``env`` fixture (see the module doc)."""

    # -- helpers

    def login(self, env: CheckerEnv, username: str | bytes, password: str | bytes) -> Any:
        return env.run(env.checker.requestAvatarId(UsernamePassword(username, password)))

    def refused(self, env: CheckerEnv, credentials: Any) -> UnauthorizedLogin:
        with pytest.raises(UnauthorizedLogin) as info:
            env.run(env.checker.requestAvatarId(credentials))
        return info.value

    def refused_login(self, env: CheckerEnv, username: str | bytes, password: str | bytes) -> UnauthorizedLogin:
        return self.refused(env, UsernamePassword(username, password))

    # -- the interface

    def test_provides_interface(self, env: CheckerEnv) -> None:
        """The checker provides IAccountChecker (verifyObject) and a boolean offers_secrets."""
        assert verifyObject(IAccountChecker, env.checker)
        assert env.checker.offers_secrets in (True, False)

    def test_credential_interfaces_match_offers_secrets(self, env: CheckerEnv) -> None:
        """IUsernamePassword is always accepted; IUsernameHashedPassword exactly when the
        checker says it offers secrets (APOP and CRAM-MD5 are advertised only then)."""
        interfaces = tuple(env.checker.credentialInterfaces)
        assert IUsernamePassword in interfaces
        assert (IUsernameHashedPassword in interfaces) == bool(env.checker.offers_secrets)

    # -- right passwords

    def test_right_password(self, env: CheckerEnv) -> None:
        """The right password with the login as given yields the lower-case address."""
        assert self.login(env, env.user.login, env.user.password) == env.user.address

    def test_full_address(self, env: CheckerEnv) -> None:
        """The full address is always a valid log-in name (CONTRACT section 7)."""
        assert self.login(env, env.user.address, env.user.password) == env.user.address

    def test_any_case(self, env: CheckerEnv) -> None:
        """The log-in name is compared without case; the avatar id is still lower case."""
        for name in (env.user.address.upper(), env.user.address.swapcase(), env.user.login.upper()):
            assert self.login(env, name, env.user.password) == env.user.address

    def test_bytes_credentials(self, env: CheckerEnv) -> None:
        """Protocol code hands over bytes: user name and password as UTF-8 bytes work too."""
        result = self.login(env, env.user.address.encode(), env.user.password.encode("utf-8"))
        assert result == env.user.address

    def test_result_is_str(self, env: CheckerEnv) -> None:
        """The avatar id is a str ``mailbox@domain``, not bytes."""
        result = self.login(env, env.user.address, env.user.password)
        assert isinstance(result, str) and "@" in result

    # -- refusals

    def test_wrong_password(self, env: CheckerEnv) -> None:
        """A wrong password is UnauthorizedLogin."""
        self.refused_login(env, env.user.address, env.user.password + "-wrong")

    def test_password_case_matters(self, env: CheckerEnv) -> None:
        """Passwords are compared exactly: another case is a wrong password."""
        other = env.user.password.swapcase()
        if other == env.user.password:
            pytest.skip("the test password has no letters")
        self.refused_login(env, env.user.address, other)

    def test_prefix_and_extension_refused(self, env: CheckerEnv) -> None:
        """A prefix of the password, or the password with something appended, is refused."""
        self.refused_login(env, env.user.address, env.user.password[:-1])
        self.refused_login(env, env.user.address, env.user.password + "x")
        self.refused_login(env, env.user.address, env.user.password + "\0")

    def test_unknown_user(self, env: CheckerEnv) -> None:
        """An address no account has is UnauthorizedLogin, even with a known password."""
        self.refused_login(env, env.unknown_address, env.user.password)

    def test_unknown_domain(self, env: CheckerEnv) -> None:
        """The user's local part in a domain that is not local is refused."""
        self.refused_login(env, _local(env.user.address) + "@not-local.invalid", env.user.password)

    def test_empty_password(self, env: CheckerEnv) -> None:
        """An empty password never logs in (an LDAP simple bind with an empty password is an
        unauthenticated bind that 'succeeds': the classic hole)."""
        self.refused_login(env, env.user.address, "")
        self.refused_login(env, env.user.address, b"")
        self.refused_login(env, env.unknown_address, "")

    def test_empty_user(self, env: CheckerEnv) -> None:
        """An empty user name is refused."""
        self.refused_login(env, "", env.user.password)
        self.refused_login(env, b"", env.user.password)

    def test_non_utf8_user_name(self, env: CheckerEnv) -> None:
        """A user name that is not UTF-8 is refused, not an internal error."""
        self.refused_login(env, b"\xff\xfe" + env.user.address.encode(), env.user.password)

    def test_refusals_look_alike(self, env: CheckerEnv) -> None:
        """Unknown user, wrong password and empty password fail with the same exception type
        and text, and the text never holds the password."""
        failures = [
            self.refused_login(env, env.unknown_address, env.user.password),
            self.refused_login(env, env.user.address, env.user.password + "-wrong"),
            self.refused_login(env, env.user.address, ""),
        ]
        assert len({type(f) for f in failures}) == 1
        assert len({str(f) for f in failures}) == 1
        for f in failures:
            assert env.user.password not in str(f) and env.user.password not in repr(f)

    def test_injection_names_refused(self, env: CheckerEnv) -> None:
        """Names that are wildcards or try to inject into a lookup (LDAP filters, PAM, paths)
        never log in, even with the user's password."""
        local, _, domain = env.user.address.partition("@")
        for name in (
            "*",
            f"*@{domain}",
            f"{local}*@{domain}",
            f"{local})(objectClass=*",
            f"{local}*",
            f"{local}\0@{domain}",
            f"{local}@{domain}\r\n",
            f" {local}@{domain}",
            f"../{local}@{domain}",
            f"{local}@{domain}@{domain}",
        ):
            self.refused_login(env, name, env.user.password)

    # -- the short form

    def test_short_form(self, env: CheckerEnv) -> None:
        """The bare local part logs in when the server has exactly one local domain, and is
        refused when it has several (CONTRACT section 7)."""
        local = _local(env.user.address)
        if env.single_domain:
            assert self.login(env, local, env.user.password) == env.user.address
            assert self.login(env, local.upper(), env.user.password) == env.user.address
            self.refused_login(env, local, env.user.password + "-wrong")
        else:
            self.refused_login(env, local, env.user.password)

    # -- the same name in two domains

    def test_same_name_in_two_domains(self, env: CheckerEnv) -> None:
        """Two accounts with one local part in two domains are separate: each logs in with its
        own password only."""
        other = env.second_domain_user
        if other is None:
            pytest.skip("this method cannot have the same name in two domains")
        assert _local(other.address) == _local(env.user.address)
        assert other.address != env.user.address
        assert self.login(env, other.address, other.password) == other.address
        assert self.login(env, env.user.address, env.user.password) == env.user.address
        self.refused_login(env, other.address, env.user.password)
        self.refused_login(env, env.user.address, other.password)

    # -- disabled accounts

    def test_disabled_account_refused(self, env: CheckerEnv) -> None:
        """An account the source marks disabled is refused with its right password, in the
        same way as a wrong password."""
        if env.disabled_user is None:
            pytest.skip("this method has no disabled accounts (locks live in the mail store)")
        failure = self.refused_login(env, env.disabled_user.login, env.disabled_user.password)
        wrong = self.refused_login(env, env.user.address, env.user.password + "-wrong")
        assert str(failure) == str(wrong)

    # -- recipients

    def test_resolve_known(self, env: CheckerEnv) -> None:
        """resolve_recipient finds the account's address in any case."""
        for text in (env.user.address, env.user.address.upper()):
            assert env.run(env.checker.resolve_recipient(text)) == env.user.address

    def test_resolve_unknown(self, env: CheckerEnv) -> None:
        """resolve_recipient gives None for an address no account has."""
        assert env.run(env.checker.resolve_recipient(env.unknown_address)) is None

    def test_resolve_malformed(self, env: CheckerEnv) -> None:
        """Malformed or wildcard addresses resolve to None, not an error or a match."""
        local, _, domain = env.user.address.partition("@")
        for text in ("", "*", f"*@{domain}", f"{local}*@{domain}", f"{local})(mail=*", "not an address"):
            assert env.run(env.checker.resolve_recipient(text)) is None

    def test_resolve_second_domain(self, env: CheckerEnv) -> None:
        """The same local part in two domains resolves to two different accounts."""
        other = env.second_domain_user
        if other is None:
            pytest.skip("this method cannot have the same name in two domains")
        assert env.run(env.checker.resolve_recipient(other.address)) == other.address
        assert env.run(env.checker.resolve_recipient(env.user.address)) == env.user.address

    # -- senders (the sender-matches-login rule)

    def test_sender_owner(self, env: CheckerEnv) -> None:
        """sender_owner names the account for its own address in any case, and gives None for
        an address no account has and for malformed or wildcard ones."""
        for text in (env.user.address, env.user.address.upper()):
            assert env.run(env.checker.sender_owner(text)) == env.user.address
        assert env.run(env.checker.sender_owner(env.unknown_address)) is None
        local, _, domain = env.user.address.partition("@")
        for text in ("", "*", f"*@{domain}", f"{local}*@{domain}", f"{local})(mail=*", "not an address"):
            assert env.run(env.checker.sender_owner(text)) is None

    def test_account_outside_local_domains(self, env: CheckerEnv) -> None:
        """An account whose addresses are all outside the local domains (no mailbox here: a
        relay account, a user whose mailbox lives on another server) logs in with its address
        as avatar id, and owns that address as a sender (issue 11 faults 14 and 15)."""
        other = env.foreign_user
        if other is None:
            pytest.skip("this method has no accounts outside its local domains")
        assert self.login(env, other.login, other.password) == other.address
        self.refused_login(env, other.login, other.password + "-wrong")
        assert env.run(env.checker.sender_owner(other.address)) == other.address
        assert env.run(env.checker.resolve_recipient(other.address)) is None

    def test_bare_name_refusal_is_logged(self, env: CheckerEnv) -> None:
        """With several local domains a bare name is refused and one info line says why (the
        log-in name rule), naming the name but never the password (issue 11 fault 20)."""
        if env.single_domain:
            pytest.skip("one local domain: bare names log in")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.refused_login(env, _local(env.user.address), env.user.password)
        finally:
            globalLogPublisher.removeObserver(events.append)
        lines = [formatEvent(e) for e in events]
        why = [e for e in events if "bare name" in formatEvent(e)]
        assert len(why) == 1, lines
        assert why[0]["log_level"] == LogLevel.info
        assert repr(_local(env.user.address)) in formatEvent(why[0])
        assert "exactly one local domain" in formatEvent(why[0])
        assert not any(env.user.password in line for line in lines)

    # -- shared-secret mechanisms

    def _need_secrets(self, env: CheckerEnv) -> None:
        if not env.checker.offers_secrets:
            pytest.skip("the checker does not offer secrets (no APOP / CRAM-MD5)")

    def test_apop(self, env: CheckerEnv) -> None:
        """APOP (RFC 1939 section 7) with the right digest logs in, by any name case."""
        self._need_secrets(env)
        digest = apop_digest(APOP_MAGIC, env.user.password)
        for name in (env.user.login, env.user.address.upper()):
            creds = APOPCredentials(APOP_MAGIC, name.encode(), digest)
            assert env.run(env.checker.requestAvatarId(creds)) == env.user.address

    def test_apop_refusals(self, env: CheckerEnv) -> None:
        """APOP with a wrong digest, another timestamp, or an unknown user is refused."""
        self._need_secrets(env)
        good = apop_digest(APOP_MAGIC, env.user.password)
        name = env.user.address.encode()
        self.refused(env, APOPCredentials(APOP_MAGIC, name, apop_digest(APOP_MAGIC, "wrong")))
        self.refused(env, APOPCredentials(b"<1.2@other.test>", name, good))
        self.refused(env, APOPCredentials(APOP_MAGIC, env.unknown_address.encode(), good))
        self.refused(env, APOPCredentials(APOP_MAGIC, name, b""))

    def test_cram_md5(self, env: CheckerEnv) -> None:
        """CRAM-MD5 (RFC 2195) with the right response logs in; a wrong one is refused."""
        self._need_secrets(env)
        creds = CramMD5Credentials(b"pop.conformance.test")
        challenge = creds.getChallenge()
        creds.setResponse(env.user.address.encode() + b" " + cram_md5_response(challenge, env.user.password))
        assert env.run(env.checker.requestAvatarId(creds)) == env.user.address
        bad = CramMD5Credentials(b"pop.conformance.test")
        bad.setResponse(env.user.address.encode() + b" " + cram_md5_response(bad.getChallenge(), "wrong"))
        self.refused(env, bad)

    def test_second_domain_secrets(self, env: CheckerEnv) -> None:
        """APOP uses each domain's own secret for the same local part."""
        self._need_secrets(env)
        other = env.second_domain_user
        if other is None:
            pytest.skip("this method cannot have the same name in two domains")
        ok = APOPCredentials(APOP_MAGIC, other.address.encode(), apop_digest(APOP_MAGIC, other.password))
        assert env.run(env.checker.requestAvatarId(ok)) == other.address
        cross = APOPCredentials(APOP_MAGIC, other.address.encode(), apop_digest(APOP_MAGIC, env.user.password))
        self.refused(env, cross)

    # -- the source failing

    def test_source_unavailable(self, env: CheckerEnv) -> None:
        """When the source cannot answer, a log-in fails with AuthUnavailable (a temporary
        failure), never a success nor a wrong-password refusal; the text holds no password."""
        if env.break_source is None:
            pytest.skip("this environment cannot break its source")
        env.break_source()
        with pytest.raises(AuthUnavailable) as info:
            self.login(env, env.user.address, env.user.password)
        assert env.user.password not in str(info.value)
        with pytest.raises(AuthUnavailable):
            env.run(env.checker.resolve_recipient(env.user.address))
