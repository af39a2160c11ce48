"""DirectoryChecker (identity/directory.py) against a scripted in-memory LDAP client.

No sockets and no sleeps: the fake client answers binds and searches at once (or never, for
the timeout cases, with time from task.Clock). Proves the order of operations (no bind with an
empty password, searches as the service account, user binds on another connection), the
mailbox mapping, disabled / locked / group rules, reconnection and the temporary failures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ldaptor.protocols import pureldap
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.identity.directory import DirectoryChecker, normalise_dn
from pop3coexist.interfaces import IAccountChecker

BASE = "dc=northwindtraders,dc=test"
SERVICE = f"cn=svc,{BASE}"
SERVICE_PW = "service-pw"
GROUP = f"cn=POP3 Users,ou=groups,{BASE}"


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


class FakeDirectory:
    """Entries, passwords and a log of every operation the checker sends."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, list[str]]] = {}
        self.passwords: dict[str, bytes] = {SERVICE: SERVICE_PW.encode()}
        self.ops: list[tuple[int, str, str]] = []  # (connection number, op, detail)
        self.hang = False
        self.refuse_connect = False
        self.clients: list[FakeClient] = []

    def add(self, cn: str, password: str | None, **attrs: list[str] | str) -> str:
        dn = f"cn={cn},ou=people,{BASE}"
        self.entries[dn] = {
            k.lower(): (v if isinstance(v, list) else [v]) for k, v in attrs.items()
        } | {"objectclass": ["top", "person", "user"]}
        if password is not None:
            self.passwords[dn] = password.encode()
        return dn

    def connect(self) -> defer.Deferred:
        if self.refuse_connect:
            return defer.fail(ConnectionLost("connection refused"))
        client = FakeClient(self, len(self.clients))
        self.clients.append(client)
        return defer.succeed(client)

    def drop_all(self) -> None:
        for c in self.clients:
            c.lose()

    def binds(self) -> list[tuple[int, str]]:
        return [(n, d) for n, op, d in self.ops if op == "bind"]

    # -- filter evaluation (enough for what the checker sends)
    def match(self, f, attrs: dict[str, list[str]]) -> bool:
        if isinstance(f, pureldap.LDAPFilter_and):
            return all(self.match(x, attrs) for x in f)
        if isinstance(f, pureldap.LDAPFilter_or):
            return any(self.match(x, attrs) for x in f)
        if isinstance(f, pureldap.LDAPFilter_not):
            return not self.match(f.value, attrs)
        if isinstance(f, pureldap.LDAPFilter_present):
            return _text(f.value).lower() in attrs
        if isinstance(f, pureldap.LDAPFilter_equalityMatch):
            name = _text(f.attributeDesc.value).lower()
            want = _text(f.assertionValue.value).lower()
            return any(v.lower() == want for v in attrs.get(name, []))
        raise AssertionError(f"unexpected filter {f!r}")


class FakeTransport:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def abortConnection(self) -> None:
        self.client.lose()

    loseConnection = abortConnection


class FakeClient:
    """The part of ldaptor's LDAPClient the checker uses."""

    def __init__(self, directory: FakeDirectory, number: int) -> None:
        self.directory = directory
        self.number = number
        self.connected = 1
        self.transport = FakeTransport(self)
        self.pending: list[defer.Deferred] = []

    def lose(self) -> None:
        if not self.connected:
            return
        self.connected = 0
        pending, self.pending = self.pending, []
        for d in pending:
            if not d.called:
                d.errback(Failure(ConnectionLost("gone")))

    def _later(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def send(self, op):
        if not self.connected:
            raise RuntimeError("not connected")
        if isinstance(op, pureldap.LDAPBindRequest):
            self.directory.ops.append((self.number, "bind", op.dn))
            if self.directory.hang:
                return self._later()
            ok = op.auth and self.directory.passwords.get(op.dn) == bytes(op.auth)
            return defer.succeed(pureldap.LDAPBindResponse(resultCode=0 if ok else 49))
        raise AssertionError(f"unexpected op {op!r}")

    def send_multiResponse(self, op, handler):
        if not self.connected:
            raise RuntimeError("not connected")
        assert isinstance(op, pureldap.LDAPSearchRequest)
        self.directory.ops.append((self.number, "search", op.baseObject))
        d = self._later()
        if self.directory.hang:
            return d
        found = [(dn, a) for dn, a in self.directory.entries.items() if self.directory.match(op.filter, a)]
        for dn, attrs in found[: op.sizeLimit or None]:
            handler(pureldap.LDAPSearchResultEntry(dn.encode(), [(k.encode(), [v.encode() for v in vs]) for k, vs in attrs.items()]))
        code = 4 if op.sizeLimit and len(found) > op.sizeLimit else 0
        handler(pureldap.LDAPSearchResultDone(resultCode=code))
        return d


def make_config(tmp_path: Path, domains=("pop.contoso.test",), extra: str = "") -> object:
    secret = tmp_path / "bind.secret"
    secret.write_text(SERVICE_PW + "\n")
    dom = ", ".join(f'"{d}"' for d in domains)
    return parse_config(
        f'[server]\nhostname = "pop.contoso.test"\nstate_dir = "{tmp_path}"\n'
        '[auth]\nmethod = "directory"\napop = false\n'
        f'[auth.directory]\nurl = "ldap://127.0.0.1:3389"\nbase_dn = "{BASE}"\nbind_dn = "{SERVICE}"\n'
        f'bind_password_file = "{secret}"\ntimeout = "10s"\n{extra}'
        f"[domains]\nlocal = [{dom}]\n"
    )


@pytest.fixture
def directory() -> FakeDirectory:
    d = FakeDirectory()
    d.add("Ted", "ted-pw", sAMAccountName="ted", userPrincipalName="ted@northwindtraders.test",
          mail="ted@pop.contoso.test",
          proxyAddresses=["SMTP:Ted@pop.contoso.test", "smtp:theodore@pop.contoso.test"],
          userAccountControl="512", memberOf=[GROUP])
    d.add("Kim", "kim-pw", sAMAccountName="kim", mail="kim@northwindtraders.test",
          proxyAddresses=["smtp:kim.a@fabrikam.test", "smtp:kim@pop.contoso.test", "X400:c=US;"],
          userAccountControl="512")
    d.add("Dora", "dora-pw", sAMAccountName="dora", mail="dora@pop.contoso.test", userAccountControl="514",
          memberOf=[GROUP])
    d.add("Lou", "lou-pw", sAMAccountName="lou", mail="lou@pop.contoso.test", userAccountControl="528")
    return d


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


def make_checker(tmp_path, directory, clock, **kw) -> DirectoryChecker:
    return DirectoryChecker(make_config(tmp_path, **kw), clock, connector=directory.connect)


def outcome(d: defer.Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def login(checker, name, password):
    result = outcome(checker.requestAvatarId(UsernamePassword(name, password)))
    if isinstance(result, Failure):
        return result.type
    return result


def test_provides_interface(tmp_path, directory, clock) -> None:
    """DirectoryChecker provides IAccountChecker and offers no secrets (no APOP/CRAM)."""
    checker = make_checker(tmp_path, directory, clock)
    assert verifyObject(IAccountChecker, checker)
    assert checker.offers_secrets is False


def test_search_as_service_then_bind_as_user(tmp_path, directory, clock) -> None:
    """The service account binds and searches on one connection; the user's password is
    checked by a bind as the user's DN on another."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"
    assert directory.ops[0] == (0, "bind", SERVICE)
    assert directory.ops[1] == (0, "search", BASE)
    assert directory.ops[2] == (1, "bind", f"cn=Ted,ou=people,{BASE}")


def test_connections_reused(tmp_path, directory, clock) -> None:
    """Later log-ins reuse both connections: one service bind in all, no new connections."""
    checker = make_checker(tmp_path, directory, clock)
    for _ in range(3):
        assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"
    assert len(directory.clients) == 2
    assert [d for _, d in directory.binds()].count(SERVICE) == 1


def test_empty_password_never_binds(tmp_path, directory, clock) -> None:
    """An empty password is refused before anything is sent to the directory."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "") is UnauthorizedLogin
    assert login(checker, "ted@pop.contoso.test", b"") is UnauthorizedLogin
    assert directory.ops == []


def test_wrong_password(tmp_path, directory, clock) -> None:
    """A bind refused with invalidCredentials (49) is UnauthorizedLogin."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "nope") is UnauthorizedLogin


@pytest.mark.parametrize("name", ["TED@POP.CONTOSO.TEST", "theodore@pop.contoso.test",
                                  "ted@northwindtraders.test", "ted", "Ted"])
def test_login_names(tmp_path, directory, clock, name) -> None:
    """Mail, any proxy address, the UPN (any case) and, with one local domain, the
    sAMAccountName all log in to the same mailbox."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, name, "ted-pw") == "ted@pop.contoso.test"


def test_short_form_needs_one_domain(tmp_path, directory, clock) -> None:
    """With two local domains the bare name is refused without asking the directory, and one
    info line says why (issue 11 fault 20), without the password."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        checker = make_checker(tmp_path, directory, clock,
                               domains=("pop.contoso.test", "fabrikam.test"))
        assert login(checker, "ted", "ted-pw") is UnauthorizedLogin
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert directory.ops == []
    lines = [formatEvent(e) for e in events]
    why = [line for line in lines if "'ted'" in line and "bare name" in line]
    assert len(why) == 1, lines
    assert "exactly one local domain" in why[0] and "fabrikam.test, pop.contoso.test" in why[0]
    assert "'ted@fabrikam.test'" in why[0]
    assert not any("ted-pw" in line for line in lines)


def test_mailbox_is_primary_local_address(tmp_path, directory, clock) -> None:
    """The mailbox is the first local-domain address in the order: primary SMTP proxy, mail,
    secondary proxies by configured domain order (kim has no primary; mail is not local)."""
    checker = make_checker(tmp_path, directory, clock, domains=("pop.contoso.test", "fabrikam.test"))
    assert login(checker, "kim@pop.contoso.test", "kim-pw") == "kim@pop.contoso.test"
    checker = make_checker(tmp_path, directory, clock, domains=("fabrikam.test", "pop.contoso.test"))
    assert login(checker, "kim@pop.contoso.test", "kim-pw") == "kim.a@fabrikam.test"


@pytest.mark.parametrize("name", ["far@northwindtraders.test", "FAR@elsewhere.test",
                                  "faraway@other.test"])
def test_no_local_address_still_logs_in(tmp_path, directory, clock, name) -> None:
    """Issue 11 fault 14/15: a user without any address in a local domain has no mailbox here
    but still logs in (SMTP AUTH needs an account): the avatar id is its first address in any
    domain (primary SMTP proxy, mail, secondary proxies, UPN), never a local mailbox."""
    directory.add("Far", "far-pw", sAMAccountName="far", mail="far@elsewhere.test",
                  proxyAddresses=["smtp:faraway@other.test", "SMTP:Far@Elsewhere.test"],
                  userPrincipalName="far@northwindtraders.test", userAccountControl="512")
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, name, "far-pw") == "far@elsewhere.test"
    assert login(checker, name, "wrong") is UnauthorizedLogin


def test_account_with_upn_only_logs_in(tmp_path, directory, clock) -> None:
    """A service account with only a userPrincipalName (the POP3 server's relay account) logs
    in with it; an enabled account without any address at all is refused (nothing to name
    it by), and a disabled one stays refused."""
    directory.add("Relay", "relay-pw", sAMAccountName="pop3relay",
                  userPrincipalName="pop3relay@northwindtraders.test", userAccountControl="512")
    directory.add("NoAddr", "noaddr-pw", sAMAccountName="noaddr", userAccountControl="512")
    directory.add("Off", "off-pw", userPrincipalName="off@northwindtraders.test",
                  userAccountControl="514")
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "pop3relay@northwindtraders.test", "relay-pw") == "pop3relay@northwindtraders.test"
    assert login(checker, "noaddr", "noaddr-pw") is UnauthorizedLogin
    assert login(checker, "off@northwindtraders.test", "off-pw") is UnauthorizedLogin


def test_sender_owner_any_domain(tmp_path, directory, clock) -> None:
    """sender_owner names the account (its avatar id) for mail and every SMTP proxy address,
    in any domain, so the sender-matches-login rule can check proxyAddresses; an address of
    nobody, a non-SMTP proxy and a malformed one give None."""
    checker = make_checker(tmp_path, directory, clock)
    assert outcome(checker.sender_owner("kim@northwindtraders.test")) == "kim@pop.contoso.test"
    assert outcome(checker.sender_owner("Kim.A@fabrikam.test")) == "kim@pop.contoso.test"
    assert outcome(checker.sender_owner("theodore@pop.contoso.test")) == "ted@pop.contoso.test"
    assert outcome(checker.sender_owner("ted@northwindtraders.test")) is None  # a UPN only
    assert outcome(checker.sender_owner("nobody@elsewhere.test")) is None
    assert outcome(checker.sender_owner("c=US;@pop.contoso.test")) is None
    assert outcome(checker.sender_owner("not an address")) is None
    directory.refuse_connect = True
    assert outcome(make_checker(tmp_path, directory, clock).sender_owner(
        "kim@northwindtraders.test")).type is AuthUnavailable


@pytest.mark.parametrize("name", ["dora", "lou"])
def test_disabled_and_locked_refused_before_bind(tmp_path, directory, clock, name) -> None:
    """userAccountControl 0x2 (disabled) and 0x10 (locked out) refuse the right password;
    the user's password is not even tried."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, name, f"{name}-pw") is UnauthorizedLogin
    assert all(dn == SERVICE for _, dn in directory.binds())


def test_required_group(tmp_path, directory, clock) -> None:
    """With required_group, only members (memberOf, DN compared without case or spacing)
    log in."""
    extra = f'required_group = "CN=pop3 users, OU=Groups,{BASE.upper()}"\n'
    checker = make_checker(tmp_path, directory, clock, extra=extra)
    assert login(checker, "ted", "ted-pw") == "ted@pop.contoso.test"
    assert login(checker, "kim", "kim-pw") is UnauthorizedLogin


def test_ambiguous_login_refused(tmp_path, directory, clock) -> None:
    """Two entries answering one log-in name: refused, never the first one picked."""
    directory.add("Ted2", "ted-pw", sAMAccountName="ted2", mail="ted@pop.contoso.test", userAccountControl="512")
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") is UnauthorizedLogin


def test_resolve_recipient(tmp_path, directory, clock) -> None:
    """mail and every SMTP proxy address (any case) resolve to the user's mailbox; other
    addresses, non-local domains and non-SMTP proxies give None."""
    checker = make_checker(tmp_path, directory, clock)
    assert outcome(checker.resolve_recipient("THEODORE@pop.contoso.test")) == "ted@pop.contoso.test"
    assert outcome(checker.resolve_recipient("<ted@pop.contoso.test>")) == "ted@pop.contoso.test"
    assert outcome(checker.resolve_recipient("kim@pop.contoso.test")) == "kim@pop.contoso.test"
    assert outcome(checker.resolve_recipient("nobody@pop.contoso.test")) is None
    assert outcome(checker.resolve_recipient("kim@northwindtraders.test")) is None
    assert outcome(checker.resolve_recipient("c=US;@pop.contoso.test")) is None


def test_resolve_disabled_still_receives(tmp_path, directory, clock) -> None:
    """A disabled account still receives mail, as a locked mailbox does."""
    checker = make_checker(tmp_path, directory, clock)
    assert outcome(checker.resolve_recipient("dora@pop.contoso.test")) == "dora@pop.contoso.test"


def test_lookup(tmp_path, directory, clock) -> None:
    """lookup gives the entry's attributes for the gateway role."""
    checker = make_checker(tmp_path, directory, clock)
    info = outcome(checker.lookup("Theodore@pop.contoso.test"))
    assert info["dn"] == f"cn=Ted,ou=people,{BASE}"
    assert info["primary_address"] == "Ted@pop.contoso.test"
    assert "smtp:theodore@pop.contoso.test" in info["proxy_addresses"]
    assert info["mailbox"] == "ted@pop.contoso.test"
    assert info["disabled"] is False
    assert outcome(checker.lookup("nobody@pop.contoso.test")) is None


def test_directory_down_is_temporary(tmp_path, directory, clock) -> None:
    """A directory that refuses connections gives AuthUnavailable for log-ins and lookups."""
    directory.refuse_connect = True
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") is AuthUnavailable
    assert outcome(checker.resolve_recipient("ted@pop.contoso.test")).type is AuthUnavailable


def test_timeout_is_temporary_and_drops_connection(tmp_path, directory, clock) -> None:
    """No answer within auth.directory.timeout: AuthUnavailable, and the connection is
    dropped so a late answer cannot be taken for a new request's."""
    checker = make_checker(tmp_path, directory, clock)
    directory.hang = True
    d = checker.requestAvatarId(UsernamePassword("ted@pop.contoso.test", "ted-pw"))
    assert not d.called
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.2)
    assert outcome(d).type is AuthUnavailable
    assert not directory.clients[0].connected
    directory.hang = False
    assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"


def test_reconnects_after_drop(tmp_path, directory, clock) -> None:
    """Connections the server closed are noticed and re-established on the next request,
    without a failure for the client (a stale connection is retried once)."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"
    directory.drop_all()
    assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"
    assert len(directory.clients) == 4


def test_lost_mid_request_is_temporary(tmp_path, directory, clock) -> None:
    """A connection lost while a request is on the wire, with the server then unreachable,
    gives AuthUnavailable (never success)."""
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") == "ted@pop.contoso.test"
    directory.hang = True
    d = checker.requestAvatarId(UsernamePassword("ted@pop.contoso.test", "ted-pw"))
    directory.refuse_connect = True
    directory.drop_all()
    assert outcome(d).type is AuthUnavailable


def test_wrong_service_password_is_temporary(tmp_path, directory, clock) -> None:
    """A service account the directory refuses is a server problem: AuthUnavailable."""
    directory.passwords[SERVICE] = b"changed"
    checker = make_checker(tmp_path, directory, clock)
    assert login(checker, "ted@pop.contoso.test", "ted-pw") is AuthUnavailable


def test_service_secret_reread_on_reconnect(tmp_path, directory, clock) -> None:
    """The bind password file is read at each (re)connect: a rotated secret is picked up."""
    checker = make_checker(tmp_path, directory, clock)
    directory.passwords[SERVICE] = b"rotated"
    (tmp_path / "bind.secret").write_text("rotated\n")
    assert login(checker, "ted", "ted-pw") == "ted@pop.contoso.test"


def test_failures_hold_no_secret(tmp_path, directory, clock) -> None:
    """Neither the user's nor the service's password appears in a failure's text or repr."""
    directory.refuse_connect = True
    checker = make_checker(tmp_path, directory, clock)
    f = outcome(checker.requestAvatarId(UsernamePassword("ted", "ted-pw")))
    for secret in ("ted-pw", SERVICE_PW):
        assert secret not in str(f.value) and secret not in repr(f.value) and secret not in repr(checker)


def test_check(tmp_path, directory, clock) -> None:
    """check() refuses an empty bind password file and a bad user_filter (ConfigError)."""
    checker = make_checker(tmp_path, directory, clock)
    checker.check()
    (tmp_path / "bind.secret").write_text("\n")
    with pytest.raises(ConfigError):
        checker.check()
    with pytest.raises(ConfigError):
        make_checker(tmp_path, directory, clock, extra='user_filter = "(objectClass=user"\n')


def test_normalise_dn() -> None:
    """DNs compare without case and spaces around separators; escaped commas stay inside."""
    assert normalise_dn("CN=POP3 Users , OU=Groups,DC=x") == normalise_dn("cn=pop3 users,ou=groups,dc=x")
    assert normalise_dn("cn=a\\,b,dc=x") != normalise_dn("cn=a,b,dc=x")


def _searches(directory: FakeDirectory) -> int:
    return sum(1 for _, op, _ in directory.ops if op == "search")


@pytest.fixture
def with_group(directory: FakeDirectory) -> FakeDirectory:
    """The directory above with a group sales@ whose one member is Ted."""
    directory.entries[f"cn=Sales,ou=groups,{BASE}"] = {
        "objectclass": ["top", "group"], "mail": ["sales@pop.contoso.test"],
        "member": [f"cn=Ted,ou=people,{BASE}"]}
    return directory


@pytest.mark.parametrize(("address", "searches", "mailbox", "group_members"), [
    # nothing has the address: one search answers both questions (was two)
    ("nobody@pop.contoso.test", 1, None, None),
    # a user: one search, no group look-up needed (the caller stops at the mailbox)
    ("theodore@pop.contoso.test", 1, "ted@pop.contoso.test", None),
    # a group: one search for the address, then one read per member (was two searches first)
    ("sales@pop.contoso.test", 2, None, ["ted@pop.contoso.test"]),
])
def test_a_recipient_costs_one_search(tmp_path, with_group, clock, address, searches, mailbox,
                                      group_members) -> None:
    """The RCPT look-up as delivery and expansion make it: the account, then (no mailbox) the
    group with the address. The recipient search finds accounts and groups at once, so an
    unknown address costs one LDAP search, not a second one for groups."""
    checker = make_checker(tmp_path, with_group, clock)
    assert outcome(checker.resolve_recipient(address)) == mailbox
    if mailbox is None:
        group = outcome(checker.group(address))
        assert (group and list(group.targets)) == (group_members or None)
    assert _searches(with_group) == searches


def test_the_group_answer_of_a_recipient_search_is_used_once_and_briefly(
        tmp_path, with_group, clock) -> None:
    """The groups a recipient search found are used by the next group look-up of that address
    only, and only within seconds: a later or second look-up searches again (a group added in
    the meantime is found)."""
    checker = make_checker(tmp_path, with_group, clock)
    address = "new-group@pop.contoso.test"
    assert outcome(checker.resolve_recipient(address)) is None
    with_group.entries[f"cn=New,ou=groups,{BASE}"] = {
        "objectclass": ["group"], "mail": [address], "member": []}
    assert outcome(checker.group(address)) is None  # the search's answer, taken
    assert _searches(with_group) == 1
    assert outcome(checker.group(address)) is not None  # searched again: found
    assert _searches(with_group) == 2
    assert outcome(checker.resolve_recipient(address)) is None
    clock.advance(6)  # past the hint's few seconds
    assert outcome(checker.group(address)) is not None
    assert _searches(with_group) == 4


def test_a_group_entry_is_not_a_mailbox_even_when_the_user_filter_takes_it(
        tmp_path, with_group, clock) -> None:
    """With a user_filter that also matches groups, a group's address is still a group, never
    a mailbox (the one search tells them apart by objectClass)."""
    checker = make_checker(tmp_path, with_group, clock,
                           extra='user_filter = "(objectClass=*)"\n')
    assert outcome(checker.resolve_recipient("sales@pop.contoso.test")) is None
    assert list(outcome(checker.group("sales@pop.contoso.test")).targets) == [
        "ted@pop.contoso.test"]
