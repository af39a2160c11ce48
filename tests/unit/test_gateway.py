"""Unit tests for the gateway role: config keys, recipient resolution (policy/gateway.py),
connector routing and relay, and the ESMTP dialogue of a gateway on in-memory fakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from pop3coexist.address import parse_address
from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable, ConfigError, MailError
from pop3coexist.policy import routing
from pop3coexist.policy.gateway import FORWARD, LOCAL, GatewayPolicy, Peer, came_from
from pop3coexist.policy.relay import Client, RelayPolicy, RouteKind
from tests.support.dialogue import run_dialogue, take
from tests.support.fakes import FakeDirectoryChecker, FakeMailStore
from tests.support.smtp_fakes import make_factory, open_session

SHARED = "northwindtraders.test"
POP = "pop.northwindtraders.test"
INTERNET = Peer("203.0.113.9", "mx.example.test")
FROM_POP3 = Peer("127.0.0.1", POP)


def gateway_toml(tmp: Path, extra: str = "", gateway: str | None = None) -> str:
    secret = tmp / "bind.secret"
    secret.write_text("x\n")
    if gateway is None:
        gateway = f"""
[gateway]
authoritative_domains = ["{SHARED}"]
non_authoritative_domains = ["legacy.northwindtraders.test"]

[[gateway.connectors]]
name = "pop3"
address_spaces = ["{POP}", "legacy.northwindtraders.test"]
next_hops = ["[127.0.0.1]:2526"]
allow_relay = true
peer_hostname = "{POP}"
"""
    return f"""
[server]
hostname = "gw.{SHARED}"
state_dir = "{tmp / 'var'}"
[auth]
method = "directory"
apop = false
[auth.directory]
base_dn = "dc=northwindtraders,dc=test"
bind_dn = "cn=svc,dc=northwindtraders,dc=test"
bind_password_file = "{secret}"
[domains]
local = ["{SHARED}"]
{gateway}
{extra}
"""


def load(tmp: Path, **kw) -> object:
    return parse_config(gateway_toml(tmp, **kw), tmp / "gw.toml")


DIRECTORY = {
    # a POP3 user, mail-enabled: target in the POP3 domain, shared address as a secondary
    f"ted@{SHARED}": {"dn": "cn=Ted", "target_address": f"ted@{POP}", "mailbox": f"ted@{SHARED}"},
    f"ted@{POP}": {"dn": "cn=Ted", "target_address": f"ted@{POP}", "mailbox": f"ted@{SHARED}"},
    # an Exchange user with a mailbox on the gateway
    f"alice@{SHARED}": {"dn": "cn=Alice", "target_address": None, "mailbox": f"alice@{SHARED}"},
    # a contact whose target is external
    f"ext@{SHARED}": {"dn": "cn=Ext", "target_address": "ext.person@external.test", "mailbox": None},
    # two contacts pointing at each other
    f"a@{SHARED}": {"dn": "cn=A", "target_address": f"b@{SHARED}", "mailbox": None},
    f"b@{SHARED}": {"dn": "cn=B", "target_address": f"a@{SHARED}", "mailbox": None},
    # a contact whose target is itself, in the authoritative domain: loops
    f"self@{SHARED}": {"dn": "cn=Self", "target_address": f"self@{SHARED}", "mailbox": None},
    # known in a non-authoritative domain
    "kim@legacy.northwindtraders.test": {"dn": "cn=Kim", "target_address": f"kim@{POP}",
                                         "mailbox": None},
}


def fake_lookup(key: str) -> defer.Deferred:
    return defer.succeed(DIRECTORY.get(key.lower()))


def decide(policy: GatewayPolicy, address: str, peer: Peer = INTERNET):
    d = policy.decide(parse_address(address), peer)
    box: list = []
    d.addBoth(box.append)
    assert box, "decide did not finish synchronously with a synchronous lookup"
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


@pytest.fixture
def policy(tmp_path: Path) -> GatewayPolicy:
    return GatewayPolicy(load(tmp_path), fake_lookup)


def test_target_address_redirects_shared_address_to_pop3_domain(policy) -> None:
    """Mail for ted@northwindtraders.test goes to his targetAddress ted@pop.northwindtraders.test
    (the target wins over a mailbox the secondary address would give him here)."""
    d = decide(policy, f"Ted@{SHARED}")
    assert (d.kind, str(d.address), d.rewritten) == (FORWARD, f"ted@{POP}", True)
    assert str(d.original) == f"Ted@{SHARED}"


def test_gateway_user_is_delivered_to_its_own_mailbox(policy) -> None:
    """An object without a target and with a mailbox in a local domain is delivered here."""
    d = decide(policy, f"alice@{SHARED}")
    assert (d.kind, d.mailbox) == (LOCAL, f"alice@{SHARED}")


def test_unknown_recipient_of_authoritative_domain_is_550_511(policy) -> None:
    """Authoritative domain: an address the directory does not know gets 550 5.1.1."""
    with pytest.raises(MailError) as e:
        decide(policy, f"nobody@{SHARED}")
    assert (e.value.code, e.value.enhanced) == (550, "5.1.1")


def test_contact_goes_to_external_target(policy) -> None:
    """A contact's external targetAddress is where its mail goes."""
    d = decide(policy, f"ext@{SHARED}")
    assert (d.kind, str(d.address)) == (FORWARD, "ext.person@external.test")


def test_target_loops_are_554_546(policy) -> None:
    """Targets pointing at each other, or at themselves in an authoritative domain, are 5.4.6."""
    for addr in (f"a@{SHARED}", f"self@{SHARED}"):
        with pytest.raises(MailError) as e:
            decide(policy, addr)
        assert (e.value.code, e.value.enhanced) == (554, "5.4.6"), addr


def test_non_authoritative_known_is_resolved_unknown_is_forwarded(policy) -> None:
    """Non-authoritative: a known recipient follows its target; an unknown one is forwarded
    unchanged (through the connector), not refused."""
    d = decide(policy, "kim@legacy.northwindtraders.test")
    assert str(d.address) == f"kim@{POP}"
    d = decide(policy, "stranger@legacy.northwindtraders.test")
    assert (d.kind, str(d.address), d.rewritten) == (FORWARD, "stranger@legacy.northwindtraders.test",
                                                     False)


def test_unknown_recipient_never_goes_back_where_it_came_from(policy) -> None:
    """An unknown recipient of a connector or non-authoritative domain that arrives from that
    connector's own next hop is refused with 554 5.4.6 (it could only loop)."""
    for addr in (f"x@{POP}", "stranger@legacy.northwindtraders.test"):
        with pytest.raises(MailError) as e:
            decide(policy, addr, FROM_POP3)
        assert (e.value.code, e.value.enhanced) == (554, "5.4.6")
        assert "came from" in e.value.text
    # a directory-resolved target to the same server is not a loop (a POP3 user writing to a
    # colleague's shared address)
    assert str(decide(policy, f"ted@{SHARED}", FROM_POP3).address) == f"ted@{POP}"
    # the Internet on the same address but with another name is not that server
    assert decide(policy, f"x@{POP}", Peer("127.0.0.1", "mx.example.test")).kind == FORWARD


def test_directory_down_passes_through(tmp_path: Path) -> None:
    """AuthUnavailable from the directory is not turned into a refusal."""
    policy = GatewayPolicy(load(tmp_path), lambda key: defer.fail(AuthUnavailable("down")))
    with pytest.raises(AuthUnavailable):
        decide(policy, f"alice@{SHARED}")


def test_came_from_by_name_and_address(tmp_path: Path) -> None:
    """came_from matches [address] next hops by client address and named ones by EHLO name."""
    cfg = load(tmp_path).gateway
    conn = cfg.connectors[0]
    assert came_from(conn, Peer("127.0.0.1", POP))
    assert not came_from(conn, Peer("127.0.0.2", POP))
    assert not came_from(conn, Peer("127.0.0.1", "other.test"))


# --------------------------------------------------------------------------- config


def test_config_keys_and_defaults(tmp_path: Path) -> None:
    """[gateway] turns the role on; connectors keep their address spaces and costs."""
    cfg = load(tmp_path)
    gw = cfg.gateway
    assert gw.enabled and gw.authoritative_domains == (SHARED,)
    assert gw.connectors[0].address_spaces[0].domain == POP
    assert gw.connectors[0].address_spaces[0].cost == 1
    assert gw.connectors[0].allow_relay
    assert not load(tmp_path, gateway="").gateway.enabled


@pytest.mark.parametrize("space", ['"*"', '"*.test"', '"."', '{domain = "*", cost = 1}'])
def test_wildcard_address_space_is_refused(tmp_path: Path, space: str) -> None:
    """A connector address space of * (any wildcard) is an open relay: refused, naming the key."""
    gw = f"""
[gateway]
[[gateway.connectors]]
name = "bad"
address_spaces = [{space}]
next_hops = ["[127.0.0.1]:25"]
allow_relay = true
"""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, gateway=gw)
    assert "open relay" in str(e.value) and "gateway.connectors.address_spaces" in str(e.value)


@pytest.mark.parametrize(("gw", "words"), [
    ('[gateway]\nbogus = 1\n', "unknown key"),
    ('[gateway]\n[[gateway.connectors]]\naddress_spaces = ["a.test"]\nnext_hops = []\n', "next hop"),
    ('[gateway]\n[[gateway.connectors]]\naddress_spaces = ["a.test"]\nnext_hops = ["x y"]\n',
     "name[:port]"),
    ('[gateway]\n[[gateway.connectors]]\naddress_spaces = [{domain = "a.test", cost = 101}]\n'
     'next_hops = ["[127.0.0.1]"]\n', "1 to 100"),
    (f'[gateway]\n[[gateway.connectors]]\naddress_spaces = ["{SHARED}"]\nnext_hops = ["[127.0.0.1]"]\n',
     "authoritative"),
    ('[gateway]\nauthoritative_domains = ["a.test"]\nnon_authoritative_domains = ["a.test"]\n',
     "also an authoritative"),
    ('[gateway]\n[[gateway.connectors]]\naddress_spaces = ["a.test"]\nnext_hops = ["[127.0.0.1]"]\n'
     'colour = "red"\n', "unknown key"),
    ('[gateway]\n[[gateway.recipient_policies]]\nname = "p"\nprimary = "%q@a.test"\n', "%m"),
    ('[gateway]\n[[gateway.recipient_policies]]\nname = "p"\nfilter = "(((("\nprimary = "@a.test"\n',
     "LDAP filter"),
    ('[gateway]\n[[gateway.recipient_policies]]\nname = "p"\n', "no address"),
])
def test_config_errors(tmp_path: Path, gw: str, words: str) -> None:
    """Bad gateway settings are errors that say what is wrong."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, gateway=gw)
    assert words in str(e.value)


def test_gateway_needs_the_directory(tmp_path: Path) -> None:
    """The gateway resolves recipients in the directory: another auth.method is refused."""
    text = gateway_toml(tmp_path).replace('method = "directory"', 'method = "passwordfile"')
    text = text.replace("apop = false", "apop = true")
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path / "gw.toml")
    assert "auth.method" in str(e.value)


def test_connectors_are_tried_by_cost_and_equal_costs_rotate(tmp_path: Path) -> None:
    """The route of a connector domain holds every connector for it, cheapest first and the
    cost-50 backup last (fault 13: cost is a fall-back order, not only a sort key); the two
    cost-10 connectors change places from one message to the next (a stable rotation by the
    message's spread key), never randomly within one message."""
    gw = f"""
[gateway]
[[gateway.connectors]]
name = "backup"
address_spaces = [{{domain = "{POP}", cost = 50}}]
next_hops = ["[127.0.0.9]:25"]
[[gateway.connectors]]
name = "main-a"
address_spaces = [{{domain = "{POP}", cost = 10}}]
next_hops = ["[127.0.0.1]:2526"]
allow_relay = true
[[gateway.connectors]]
name = "main-b"
cost = 10
address_spaces = ["{POP}"]
next_hops = ["[127.0.0.2]:2526"]
"""
    cfg = load(tmp_path, gateway=gw)

    def hops(spread: int) -> list[str]:
        return [a.hop.key for a in routing.route_for(POP, cfg, spread=spread).attempts]

    assert hops(0) == ["[127.0.0.1]:2526", "[127.0.0.2]:2526", "[127.0.0.9]:25"]
    assert hops(1) == ["[127.0.0.2]:2526", "[127.0.0.1]:2526", "[127.0.0.9]:25"]
    assert hops(2) == hops(0) and hops(7) == hops(1)
    assert routing.route_for(POP, cfg, spread=5).attempts[2].via == (
        "connector 'backup' cost 50, next hop 1 of 1")
    assert [a.hop.key for a in routing.route_for("example.org", cfg).attempts] == [
        "example.org:25"]  # not a connector domain: the MX


def test_relay_policy_knows_connector_domains(tmp_path: Path) -> None:
    """allow_relay connector domains are accepted from anyone; other connector domains only
    from clients that may relay; anything else stays 554 5.7.1."""
    gw = """
[gateway]
[[gateway.connectors]]
name = "open"
address_spaces = ["relay.test"]
next_hops = ["[127.0.0.1]:2526"]
allow_relay = true
[[gateway.connectors]]
name = "closed"
address_spaces = ["closed.test"]
next_hops = ["[127.0.0.1]:2527"]
"""
    policy = RelayPolicy.from_config(load(tmp_path, gateway=gw))
    anon = Client("203.0.113.1")
    assert policy.route(parse_address("a@relay.test"), [SHARED], anon).kind is RouteKind.RELAY_DOMAIN
    for addr in ("a@closed.test", "a@example.org"):
        with pytest.raises(MailError) as e:
            policy.route(parse_address(addr), [SHARED], anon)
        assert e.value.code == 554
    authed = Client("203.0.113.1", authenticated=True)
    assert policy.route(parse_address("a@closed.test"), [SHARED], authed).kind is RouteKind.RELAY


# --------------------------------------------------------------------------- ESMTP dialogue


class FakeDirectory(FakeDirectoryChecker):
    """A FakeChecker with the directory's ``lookup`` (the gateway's resolver)."""

    def lookup(self, address: str) -> defer.Deferred:
        return fake_lookup(address)


def gateway_factory(tmp_path: Path):
    store = FakeMailStore()
    store.add(f"alice@{SHARED}")
    checker = FakeDirectory({f"alice@{SHARED}": "pw"}, local_domains=(SHARED,))
    return make_factory(load(tmp_path), store=store, checker=checker)


def test_gateway_dialogue(tmp_path: Path) -> None:
    """Over the wire: a redirected recipient is accepted under the address the client gave and
    queued for its target with ORCPT; a gateway user is stored locally; unknown is 550 5.1.1;
    a foreign domain is 554 5.7.1 (no open relay); an unknown POP3-domain address from the POP3
    server itself is 554 5.4.6."""
    factory, store, _, queue, _ = gateway_factory(tmp_path)
    proto, t = open_session(factory, peer="203.0.113.5")
    take(t)
    run_dialogue(proto, [
        (b"EHLO mx.example.test\r\n", lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<someone@example.org>\r\n", b"250 2.1.0 Sender <someone@example.org> OK\r\n"),
        (f"RCPT TO:<ted@{SHARED}>\r\n".encode(), f"250 2.1.5 Recipient <ted@{SHARED}> OK\r\n".encode()),
        (f"RCPT TO:<alice@{SHARED}>\r\n".encode(), f"250 2.1.5 Recipient <alice@{SHARED}> OK\r\n".encode()),
        (f"RCPT TO:<x@{POP}>\r\n".encode(), f"250 2.1.5 Recipient <x@{POP}> OK\r\n".encode()),
        (f"RCPT TO:<nobody@{SHARED}>\r\n".encode(),
         f"550 5.1.1 <nobody@{SHARED}>: no such user here\r\n".encode()),
        (b"RCPT TO:<victim@example.org>\r\n",
         b"554 5.7.1 Relay access denied for <victim@example.org>\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: hi\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok")),
    ], transport=t)
    assert len(store.messages(f"alice@{SHARED}")) == 1
    [(_, env)] = queue.items
    assert env["recipients"] == [
        {"address": f"ted@{POP}", "orcpt": f"rfc822;ted@{SHARED}", "notify": None},
        {"address": f"x@{POP}", "orcpt": None, "notify": None},
    ]

    proto, t = open_session(factory, peer="127.0.0.1")
    take(t)
    run_dialogue(proto, [
        (f"EHLO {POP}\r\n".encode(), lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
        (f"RCPT TO:<x@{POP}>\r\n".encode(), lambda got: got.startswith(b"554 5.4.6 ")),
    ], transport=t)


def test_gateway_dialogue_directory_down_is_451(tmp_path: Path) -> None:
    """A directory that cannot answer gives 451 4.4.3 at RCPT, never a false 550."""
    factory, *_ = gateway_factory(tmp_path)
    factory.context.gateway._lookup = lambda key: defer.fail(AuthUnavailable("down"))
    proto, t = open_session(factory)
    take(t)
    run_dialogue(proto, [
        (b"EHLO mx.example.test\r\n", lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (f"RCPT TO:<ted@{SHARED}>\r\n".encode(),
         b"451 4.4.3 Directory lookup failed, try again later\r\n"),
    ], transport=t)


# --------------------------------------------------------------------------- check-config


def test_check_pair_names_the_seed_rule(tmp_path: Path) -> None:
    """A POP3 server whose local domain is the gateway's authoritative shared domain is refused
    (either order of the two configs), naming the seed's rule; a proper pair passes."""
    from pop3coexist.policy.gateway import check_pair

    gw = load(tmp_path)
    ok = parse_config(f'[server]\nhostname = "{POP}"\nstate_dir = "{tmp_path}"\n'
                      f'[domains]\nlocal = ["{POP}"]\n')
    bad = parse_config(f'[server]\nhostname = "{POP}"\nstate_dir = "{tmp_path}"\n'
                       f'[domains]\nlocal = ["{SHARED}"]\n')
    assert check_pair(ok, gw) is None and check_pair(gw, ok) is None
    for a, b in ((bad, gw), (gw, bad)):
        problem = check_pair(a, b)
        assert problem is not None
        assert "authoritative shared domain" in problem and "must not share a mail domain" in problem
        assert "You cannot configure a server running the Windows Server POP3 service" in problem


def test_check_connectors_refuses_a_next_hop_that_is_myself(tmp_path: Path) -> None:
    """check-config refuses a connector whose next hop is one of the server's own listeners."""
    from pop3coexist.policy.gateway import check_connectors

    mine = load(tmp_path, extra='[smtp]\nlisten = ["tcp:25:interface=127.0.0.1"]\n')
    assert check_connectors(mine) is None  # the connector goes to port 2526, we listen on 25
    selfish = load(tmp_path, extra='[smtp]\nlisten = ["tcp:2526:interface=0.0.0.0"]\n')
    problem = check_connectors(selfish)
    assert problem is not None and "'pop3'" in problem and "loop back to myself" in problem
