"""The recipient decisions as data: who may send where, and relay tricks.

Every decision runs through the very object the ESMTP server asks at RCPT: the avatar its
factory's realm gives (``policy.delivery.SMTPDelivery``: anonymous, or the account's after
AUTH), over the store, checker and config the server holds; the gateway branch runs the same
way (``test_gateway_matrix``). The matrix is {anonymous, authenticated} x {local mailbox,
unknown local user, relay domain, foreign domain} x {trusted network, untrusted}; the trick
table proves that no way of writing an address opens a relay for an untrusted anonymous client.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pop3coexist.errors import AuthUnavailable, MailError
from pop3coexist.interfaces import IDeliveryTransaction, IMessageDelivery, SMTPSession
from pop3coexist.policy.connections import ConnectionPolicy, ip_in_networks
from pop3coexist.policy.delivery import MailOptions, SMTPDelivery
from pop3coexist.policy.relay import (
    RelayPolicy,
    RoleAddresses,
    is_own_literal,
    parse_recipient,
)
from tests.support.fakes import FakeChecker, FakeMailStore, FakePasswordFileChecker
from tests.support.smtp_fakes import make_factory, smtp_config

TRUSTED = "192.0.2.10"
UNTRUSTED = "203.0.113.9"


def policy(authenticated_may_relay: bool = True, abuse: str = "",
           checker: type = FakeChecker):
    """The factory of an ESMTP server (relay domain exchange.northwindtraders.test, relay
    network 192.0.2.0/24, one local mailbox ted@ and the postmaster mailbox the service makes
    at start), as the server is built; the decisions come from its realm's avatars."""
    config = smtp_config()
    config = replace(config, relay=replace(config.relay, authenticated=authenticated_may_relay),
                     domains=replace(config.domains, abuse=abuse))
    store = FakeMailStore()
    store.add("ted@pop.contoso.test")
    store.add("postmaster@pop.contoso.test")  # service.py makes the role mailboxes at start
    factory, *_ = make_factory(config, store=store,
                               checker=checker({"ted@pop.contoso.test": "pw"}),
                               resolve_host=lambda name: [])
    return factory


def avatar(factory, authenticated: bool, user: str = "ted@pop.contoso.test") -> SMTPDelivery:
    """The avatar a session holds: anonymous, or ``user``'s after AUTH (through the realm)."""
    if not authenticated:
        return factory.realm.anonymous()
    return outcome(factory.realm.requestAvatar(user, None, IMessageDelivery))[1]


def outcome(d) -> object:
    """The result of a Deferred the synchronous fakes have fired already (a Failure raises)."""
    box: list = []
    d.addBoth(box.append)
    assert box, "the decision did not finish synchronously on the fakes"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def decide(factory, rcpt: str, ip: str, authenticated: bool, helo: str = "c.test",
           user: str = "ted@pop.contoso.test") -> str:
    """Run the avatar's validate_to as the server does; return 'local', 'queue', 'postmaster'
    (the role mailbox took it), 'role <target>' (a role address queued for its target),
    'queue <address>' (rewritten by the gateway) or the reply code."""
    session = SMTPSession(ip, helo, "127.0.0.1")
    try:
        decision = outcome(avatar(factory, authenticated, user).validate_to(session, rcpt, 0))
    except MailError as e:
        return f"{e.code} {e.enhanced}"
    except AuthUnavailable:
        return "451 4.4.3"
    if decision.mailbox is not None:
        return "postmaster" if decision.mailbox[1] == "postmaster" else "local"
    if decision.route.address.key != decision.given.key:
        assert decision.orcpt == f"rfc822;{decision.given}"  # the DSN names what was given
        role = decision.given.local.lower() in ("postmaster", "abuse")
        return f"{'role' if role else 'queue for'} {decision.route.address}"
    return "queue"


MATRIX = [
    # (authenticated, recipient, trusted, expected)
    (False, "ted@pop.contoso.test", False, "local"),
    (False, "ted@pop.contoso.test", True, "local"),
    (True, "ted@pop.contoso.test", False, "local"),
    (True, "ted@pop.contoso.test", True, "local"),
    (False, "nobody@pop.contoso.test", False, "550 5.1.1"),
    (False, "nobody@pop.contoso.test", True, "550 5.1.1"),
    (True, "nobody@pop.contoso.test", False, "550 5.1.1"),
    (True, "nobody@pop.contoso.test", True, "550 5.1.1"),
    (False, "bob@exchange.northwindtraders.test", False, "queue"),
    (False, "bob@exchange.northwindtraders.test", True, "queue"),
    (True, "bob@exchange.northwindtraders.test", False, "queue"),
    (True, "bob@exchange.northwindtraders.test", True, "queue"),
    (False, "someone@foreign.example", False, "554 5.7.1"),
    (False, "someone@foreign.example", True, "queue"),
    (True, "someone@foreign.example", False, "queue"),
    (True, "someone@foreign.example", True, "queue"),
]


@pytest.mark.parametrize(("authenticated", "rcpt", "trusted", "expected"), MATRIX)
def test_matrix(authenticated: bool, rcpt: str, trusted: bool, expected: str) -> None:
    """Each cell of the relay matrix gets the decision CONTRACT section 6 and issue 3 name."""
    ip = TRUSTED if trusted else UNTRUSTED
    assert decide(policy(), rcpt, ip, authenticated) == expected
    # the password file's one-hop look-up gives the same answers
    assert decide(policy(checker=FakePasswordFileChecker), rcpt, ip, authenticated) == expected


def test_authenticated_relay_can_be_switched_off() -> None:
    """relay.authenticated = false: a logged-in client outside relay.networks cannot relay."""
    assert decide(policy(False), "someone@foreign.example", UNTRUSTED, True) == "554 5.7.1"
    assert decide(policy(False), "someone@foreign.example", TRUSTED, True) == "queue"


TRICKS = [
    # (recipient as written, expected for an untrusted anonymous client)
    ("someone%foreign.example@pop.contoso.test", "550 5.1.1"),  # percent hack stays local
    # a source route is ignored (RFC 5321 4.1.1.3): the Mailbox after it is judged
    ("@pop.contoso.test:someone@foreign.example", "554 5.7.1"),
    ("@pop.contoso.test,@exchange.northwindtraders.test:someone@foreign.example", "554 5.7.1"),
    ("@exchange.northwindtraders.test:someone@foreign.example", "554 5.7.1"),
    ("@foreign.example:ted@pop.contoso.test", "local"),
    ("@foreign.example:nobody@pop.contoso.test", "550 5.1.1"),
    ("@foreign.example:bob@exchange.northwindtraders.test", "queue"),
    ("@[127.0.0.1]:someone@foreign.example", "501 5.1.3"),  # a route names domains only
    ("@pop.contoso.test:", "501 5.1.3"),
    ("@pop.contoso.test someone@foreign.example", "501 5.1.3"),
    ("@pop.contoso.test,someone@foreign.example", "501 5.1.3"),
    ("@:someone@foreign.example", "501 5.1.3"),
    ("someone@foreign.example@pop.contoso.test", "501 5.1.3"),  # double @
    ('"someone@foreign.example"@pop.contoso.test', "550 5.1.1"),  # quoted local part
    ("foreign.example!someone@pop.contoso.test", "550 5.1.1"),  # bang path
    ("someone@[192.0.2.1]", "554 5.7.1"),  # a literal not ours is a foreign destination
    ("ted@[127.0.0.1]", "local"),  # a literal of this host is the primary domain (RFC 1123)
    ("someone", "501 5.1.3"),  # unqualified
    ("someone@foreign.example.", "501 5.1.3"),  # trailing dot
    ("ted@pop.contoso.test.", "501 5.1.3"),
    ("someone@FOREIGN.example", "554 5.7.1"),  # odd case is still foreign
    ("TED@POP.CONTOSO.TEST", "local"),  # odd case of a local mailbox
    ("bob@EXCHANGE.northwindtraders.test", "queue"),
    ("x@evil.exchange.northwindtraders.test", "554 5.7.1"),  # no suffix match
    ("x@exchange.northwindtraders.test.evil.example", "554 5.7.1"),
    ("x@pop.contoso.test.evil.example", "554 5.7.1"),
    ("someone@foreign.example ", "501 5.1.3"),
    ("some one@foreign.example", "501 5.1.3"),
    ("someone@foreign..example", "501 5.1.3"),
    ("someone@@pop.contoso.test", "501 5.1.3"),
    ("<someone@foreign.example>", "501 5.1.3"),
    ("someone@foreign.example%pop.contoso.test", "501 5.1.3"),
    ("PostMaster", "postmaster"),  # unqualified postmaster is local (RFC 5321 4.5.1)
    # issue 11 fault 2: the whole RFC 5321 Mailbox; quoting never changes the domain
    ('"ted"@pop.contoso.test', "local"),  # a quoted dot-atom is the same mailbox
    ('"TED"@POP.CONTOSO.TEST', "local"),
    ('"t\\ed"@pop.contoso.test', "local"),  # a quoted pair of an ordinary character
    ('"no such user"@pop.contoso.test', "550 5.1.1"),
    ('"someone%foreign.example"@pop.contoso.test', "550 5.1.1"),
    ('"foreign.example!someone"@pop.contoso.test', "550 5.1.1"),
    ('"@foreign.example:someone"@pop.contoso.test', "550 5.1.1"),
    ('"someone@foreign.example>"@pop.contoso.test', "550 5.1.1"),
    ('"a\\"b@foreign.example"@pop.contoso.test', "550 5.1.1"),
    ('"someone"@foreign.example', "554 5.7.1"),
    ('"ted@pop.contoso.test"@foreign.example', "554 5.7.1"),
    ('"some one"@foreign.example', "554 5.7.1"),
    ('"x"@[192.0.2.1]', "554 5.7.1"),
    ("someone@[IPv6:2001:db8::1]", "554 5.7.1"),
    ("someone@[ipv6:::ffff:192.0.2.1]", "554 5.7.1"),
    ("ted@[IPv6:::1]", "local"),
    ("ted@[IPv6:::ffff:127.0.0.1]", "local"),
    ("ted@[127.000.000.001]", "local"),
    ("nobody@[127.0.0.1]", "550 5.1.1"),
    ("postmaster@[127.0.0.1]", "postmaster"),
    ("someone@[x-tag:anything]", "553 5.7.1"),  # General-address-literal: policy
    ("someone@localhost", "553 5.7.1"),  # valid syntax, not fully qualified: policy
    ("someone@[192.0.2.1", "501 5.1.3"),
    ("someone@[300.0.2.1]", "501 5.1.3"),
    ("someone@[IPv6:fe80::1%eth0]", "501 5.1.3"),
    ("someone@[IPv6:2001:db8::g]", "501 5.1.3"),
    ("someone@[]", "501 5.1.3"),
    ('"unterminated@pop.contoso.test', "501 5.1.3"),
    ('"a"b@pop.contoso.test', "501 5.1.3"),
    ('"a"@foreign.example@pop.contoso.test', "501 5.1.3"),
    ('"a\tb"@pop.contoso.test', "501 5.1.3"),  # control character even inside quotes
    ("postmaster@pop.contoso.test", "postmaster"),
    ('"postmaster"@pop.contoso.test', "postmaster"),
    ("POSTMASTER@pop.contoso.test", "postmaster"),
    ("postmaster@foreign.example", "554 5.7.1"),  # not ours: no role redirection
    ("abuse@pop.contoso.test", "550 5.1.1"),  # abuse only when domains.abuse is set
    # an IP address written as a domain name: valid syntax, refused as policy (RFC 1123 2.1)
    ("someone@192.0.2.1", "553 5.7.1"),
    ("ted@127.0.0.1", "553 5.7.1"),
    ("someone@foreign.123", "553 5.7.1"),
    ("someone@123.example", "554 5.7.1"),  # digits in other labels are a name
    # SMTPUTF8 is not offered: a non-ASCII address is 553 5.6.7 (RFC 6531 3.5), never relayed
    ("t\u00e9d@pop.contoso.test", "553 5.6.7"),
    ("someone@b\u00fccher.example", "553 5.6.7"),
    ('"\u00e9"@foreign.example', "553 5.6.7"),
    ("@foreign.example:\u00e9@pop.contoso.test", "553 5.6.7"),
    ("someone@foreign.example\udce9", "553 5.6.7"),
    # IPv6 literal forms of this host, and malformed ones
    ("ted@[IPv6:0:0::1]", "local"),
    ("ted@[IPv6:0:0:0:0:0:0:0:1]", "local"),
    ("ted@[IPv6:::ffff:127.000.000.001]", "local"),  # Snum may have leading zeros (4.1.3)
    ("someone@[IPv6:::ffff:192.0.2.1]", "554 5.7.1"),
    ("someone@[IPv6:1::2::3]", "501 5.1.3"),
    ("someone@[IPv6:127.0.0.1]", "501 5.1.3"),
    ("someone@[IPv6:::ffff:1.2.3]", "501 5.1.3"),
    ("someone@[IPv6:1:2:3:4:5:6:7:8:9]", "501 5.1.3"),
    ("someone@[IPv4:192.0.2.1]", "553 5.7.1"),  # not a standardised tag: policy
    ("someone@[127.1]", "501 5.1.3"),
]


@pytest.mark.parametrize(("rcpt", "expected"), TRICKS)
def test_relay_tricks_never_open_a_relay(rcpt: str, expected: str) -> None:
    """Every classic way of hiding a foreign recipient is refused or stays a local lookup."""
    assert decide(policy(), rcpt, UNTRUSTED, False) == expected


def test_abuse_goes_to_its_configured_address_only_when_set() -> None:
    """domains.abuse set: abuse@ every authoritative domain is taken (RFC 2142); a foreign
    abuse@ is still a relay question, and a real mailbox would come first (server side)."""
    server = policy(abuse="security@corp.example")
    assert decide(server, "abuse@pop.contoso.test", UNTRUSTED, False) == \
        "role security@corp.example"
    assert decide(server, "Abuse@pop.contoso.test", UNTRUSTED, False) == \
        "role security@corp.example"
    assert decide(server, "abuse@foreign.example", UNTRUSTED, False) == "554 5.7.1"
    assert RoleAddresses().postmaster_for(None) is None
    assert str(RoleAddresses().postmaster_for("pop.contoso.test")) == "postmaster@pop.contoso.test"


@pytest.mark.parametrize(("ip", "own", "expected"), [
    ("127.0.0.1", (), True),
    ("127.1.2.3", (), True),
    ("::1", (), True),
    ("::ffff:127.0.0.1", (), True),
    ("0.0.0.0", (), True),
    ("192.0.2.1", (), False),
    ("192.0.2.1", ("192.0.2.1",), True),
    ("::ffff:192.0.2.1", ("192.0.2.1",), True),
    ("192.0.2.1", ("::ffff:192.0.2.1",), True),
    ("2001:db8::1", ("2001:db8::1%eth0",), True),
    ("192.0.2.2", ("192.0.2.1", "not an address"), False),
])
def test_own_literal(ip: str, own: tuple[str, ...], expected: bool) -> None:
    """RFC 1123 5.2.17: loopback, unspecified and this host's own addresses name this host."""
    assert is_own_literal(ipaddress.ip_address(ip), own) is expected


def test_ipv4_mapped_ipv6_client_is_matched_as_ipv4() -> None:
    """A dual-stack listener reports ::ffff:192.0.2.10: it is in 192.0.2.0/24."""
    nets = (ipaddress.ip_network("192.0.2.0/24"),)
    assert ip_in_networks("::ffff:192.0.2.10", nets)
    assert not ip_in_networks("::ffff:203.0.113.9", nets)
    assert not ip_in_networks("unix", nets)


def test_quota_outcome() -> None:
    """An existing mailbox over quota is refused with 552 5.2.2."""
    address = parse_recipient("ted@pop.contoso.test")
    with pytest.raises(MailError) as e:
        RelayPolicy.local_outcome(address, True, over_quota=True)
    assert e.value.reply().startswith("552 5.2.2")


@pytest.mark.parametrize(
    ("allow", "deny", "ip", "ok"),
    [
        ((), (), "203.0.113.9", True),
        (("192.0.2.0/24",), (), "192.0.2.3", True),
        (("192.0.2.0/24",), (), "203.0.113.9", False),
        ((), ("203.0.113.0/24",), "203.0.113.9", False),
        ((), ("203.0.113.0/24",), "192.0.2.3", True),
        (("192.0.2.0/24",), ("192.0.2.3/32",), "192.0.2.3", False),
        (("192.0.2.0/24",), ("192.0.2.3/32",), "192.0.2.4", True),
    ],
)
def test_connection_policy(allow: tuple, deny: tuple, ip: str, ok: bool) -> None:
    """client_allow is "only the list below", client_deny "all except"; refusal is 554 5.7.1."""
    pol = ConnectionPolicy([ipaddress.ip_network(a) for a in allow],
                           [ipaddress.ip_network(d) for d in deny])
    result = pol.check(ip)
    if ok:
        assert result is None
    else:
        assert result is not None and result.reply().startswith("554 5.7.1")


# --------------------------------------------------------------------------- the gateway branch


def gateway_server(tmp_path: Path):
    """The factory of a gateway (tests/unit/test_gateway.py's config and directory): alice has
    a mailbox here, ted@ the shared domain is redirected to the POP3 domain."""
    from tests.unit.test_gateway import SHARED, FakeDirectory, load

    store = FakeMailStore()
    store.add(f"alice@{SHARED}")
    store.add(f"postmaster@{SHARED}")
    factory, *_ = make_factory(load(tmp_path), store=store,
                               checker=FakeDirectory({f"alice@{SHARED}": "pw"},
                                                     local_domains=(SHARED,)),
                               resolve_host=lambda name: [])
    return factory


GATEWAY_MATRIX = [
    # (recipient, client ip, EHLO name, authenticated, expected)
    ("alice@northwindtraders.test", UNTRUSTED, "mx.example.test", False, "local"),
    ("Ted@northwindtraders.test", UNTRUSTED, "mx.example.test", False,
     "queue for ted@pop.northwindtraders.test"),
    ("ext@northwindtraders.test", UNTRUSTED, "mx.example.test", False,
     "queue for ext.person@external.test"),
    ("nobody@northwindtraders.test", UNTRUSTED, "mx.example.test", False, "550 5.1.1"),
    ("postmaster@northwindtraders.test", UNTRUSTED, "mx.example.test", False, "postmaster"),
    ("a@northwindtraders.test", UNTRUSTED, "mx.example.test", False, "554 5.4.6"),
    ("self@northwindtraders.test", UNTRUSTED, "mx.example.test", False, "554 5.4.6"),
    ("x@pop.northwindtraders.test", UNTRUSTED, "mx.example.test", False, "queue"),
    ("x@pop.northwindtraders.test", "127.0.0.1", "pop.northwindtraders.test", False, "554 5.4.6"),
    ("kim@legacy.northwindtraders.test", UNTRUSTED, "mx.example.test", False,
     "queue for kim@pop.northwindtraders.test"),
    ("who@legacy.northwindtraders.test", UNTRUSTED, "mx.example.test", False, "queue"),
    ("victim@example.org", UNTRUSTED, "mx.example.test", False, "554 5.7.1"),
    ("victim@example.org", TRUSTED, "mx.example.test", False, "554 5.7.1"),  # no relay.networks
    ("victim@example.org", UNTRUSTED, "mx.example.test", True, "queue"),
]


@pytest.mark.parametrize(("rcpt", "ip", "helo", "authenticated", "expected"), GATEWAY_MATRIX)
def test_gateway_matrix(tmp_path: Path, rcpt: str, ip: str, helo: str, authenticated: bool,
                        expected: str) -> None:
    """The gateway branch through the same avatar the server asks: directory redirections,
    mailboxes here, loops (554 5.4.6), no return to the POP3 server, no open relay."""
    factory = gateway_server(tmp_path)
    assert decide(factory, rcpt, ip, authenticated, helo, "alice@northwindtraders.test") == expected


def test_gateway_directory_down_is_unavailable(tmp_path: Path) -> None:
    """A directory that cannot answer is AuthUnavailable (the server's 451 4.4.3)."""
    from twisted.internet import defer

    factory = gateway_server(tmp_path)
    factory.context.gateway._lookup = lambda key: defer.fail(AuthUnavailable("down"))
    assert decide(factory, "ted@northwindtraders.test", UNTRUSTED, False) == "451 4.4.3"


def test_the_avatar_and_its_transaction_are_what_the_interfaces_declare() -> None:
    """verifyObject: the realm's avatars provide IMessageDelivery, begin() an
    IDeliveryTransaction; the anonymous avatar has no user, the logged-in one its account."""
    factory = policy()
    anonymous, ted = avatar(factory, False), avatar(factory, True)
    for a in (anonymous, ted):
        verifyObject(IMessageDelivery, a)
        txn = a.begin(SMTPSession(UNTRUSTED), None, MailOptions())
        verifyObject(IDeliveryTransaction, txn)
    assert anonymous.user is None and ted.user == "ted@pop.contoso.test"


def test_trust_kept_per_address_is_per_policy_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``is_trusted`` keeps its answer per client address (issue 17: one parse per client,
    not per RCPT): asking again answers the same, another policy (a reload with other
    ``relay.networks``) answers from its own networks, and the kept answers are cleared
    when there are ``TRUSTED_CACHE`` of them, never growing past it."""
    import pop3coexist.policy.relay as relay_mod

    monkeypatch.setattr(relay_mod, "TRUSTED_CACHE", 3)
    policy = RelayPolicy(networks=[ipaddress.ip_network("192.0.2.0/24")])
    reloaded = RelayPolicy(networks=[ipaddress.ip_network("203.0.113.0/24")])
    for _ in range(2):
        assert policy.is_trusted(TRUSTED) and not policy.is_trusted(UNTRUSTED)
        assert reloaded.is_trusted(UNTRUSTED) and not reloaded.is_trusted(TRUSTED)
    for n in range(10):
        assert not policy.is_trusted(f"198.51.100.{n}")
        assert len(policy._trusted) <= 3
    assert policy.is_trusted(TRUSTED) and not policy.is_trusted("unix-socket")
