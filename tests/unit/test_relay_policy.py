"""The recipient decisions of policy/relay.py as data: who may send where, and relay tricks.

The matrix is {anonymous, authenticated} x {local mailbox, unknown local user, relay domain,
foreign domain} x {trusted network, untrusted}; the trick table proves that no way of writing
an address opens a relay for an untrusted anonymous client.
"""

from __future__ import annotations

import ipaddress

import pytest

from pop3coexist.errors import MailError
from pop3coexist.policy.connections import ConnectionPolicy, ip_in_networks
from pop3coexist.policy.relay import Client, RelayPolicy, RouteKind, parse_recipient

LOCAL = ("pop.contoso.test",)
MAILBOXES = {"ted@pop.contoso.test"}
TRUSTED = "192.0.2.10"
UNTRUSTED = "203.0.113.9"


def policy(authenticated_may_relay: bool = True) -> RelayPolicy:
    return RelayPolicy(
        {"exchange.northwindtraders.test": "[127.0.0.1]:2526"},
        (ipaddress.ip_network("192.0.2.0/24"),),
        authenticated_may_relay,
    )


def decide(pol: RelayPolicy, rcpt: str, ip: str, authenticated: bool) -> str:
    """Run the whole decision as the server does; return 'local', 'queue' or the reply code."""
    try:
        address = parse_recipient(rcpt, "pop.contoso.test")
        route = pol.route(address, LOCAL, Client(ip, authenticated))
        if route.kind is RouteKind.LOCAL:
            pol.local_outcome(address, address.key in MAILBOXES)
            return "local"
        return "queue"
    except MailError as e:
        return f"{e.code} {e.enhanced}"


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


def test_authenticated_relay_can_be_switched_off() -> None:
    """relay.authenticated = false: a logged-in client outside relay.networks cannot relay."""
    assert decide(policy(False), "someone@foreign.example", UNTRUSTED, True) == "554 5.7.1"
    assert decide(policy(False), "someone@foreign.example", TRUSTED, True) == "queue"


TRICKS = [
    # (recipient as written, expected for an untrusted anonymous client)
    ("someone%foreign.example@pop.contoso.test", "550 5.1.1"),  # percent hack stays local
    ("@pop.contoso.test:someone@foreign.example", "501 5.1.3"),  # source route
    ("@foreign.example:ted@pop.contoso.test", "501 5.1.3"),
    ("someone@foreign.example@pop.contoso.test", "501 5.1.3"),  # double @
    ('"someone@foreign.example"@pop.contoso.test', "550 5.1.1"),  # quoted local part
    ("foreign.example!someone@pop.contoso.test", "550 5.1.1"),  # bang path
    ("someone@[192.0.2.1]", "501 5.1.3"),  # address literal
    ("ted@[127.0.0.1]", "501 5.1.3"),
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
    ("PostMaster", "550 5.1.1"),  # unqualified postmaster is local (RFC 5321 4.5.1)
]


@pytest.mark.parametrize(("rcpt", "expected"), TRICKS)
def test_relay_tricks_never_open_a_relay(rcpt: str, expected: str) -> None:
    """Every classic way of hiding a foreign recipient is refused or stays a local lookup."""
    assert decide(policy(), rcpt, UNTRUSTED, False) == expected


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
