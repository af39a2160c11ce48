"""Routing: the next hop per recipient domain and loop detection (policy/routing.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pop3coexist.config import AddressSpace, ConnectorConfig, GatewayConfig, parse_config
from pop3coexist.errors import ConfigError
from pop3coexist.policy import routing


def _config(tmp_path: Path, extra: str = "", smarthost: str = "") -> object:
    text = f"""
[server]
hostname = "pop.contoso.test"
state_dir = "{tmp_path}"
[smtp]
listen = ["tcp:2525:interface=127.0.0.1", "tcp:2526"]
[domains]
local = ["pop.contoso.test"]
[[domains.remote]]
name = "exchange.northwindtraders.test"
route = "[192.0.2.7]:2526"
[[domains.remote]]
name = "other.test"
[smarthost]
host = "{smarthost}"
{extra}
"""
    return parse_config(text)


def test_bracketed_next_hop_is_literal_and_skips_lookup() -> None:
    """`[address]:port` parses to a literal hop (no DNS) with that port."""
    hop = routing.parse_next_hop("[127.0.0.1]:2526")
    assert hop.literal and hop.host == "127.0.0.1" and hop.port == 2526
    assert hop.key == "[127.0.0.1]:2526"


def test_named_next_hop_is_looked_up_and_defaults_to_port_25() -> None:
    """`name` and `name:port` are hops to look up (MX then A); the port defaults to 25."""
    hop = routing.parse_next_hop("Relay.Example.COM")
    assert not hop.literal and hop.host == "relay.example.com" and hop.port == 25
    assert routing.parse_next_hop("relay.example.com:587").port == 587


def test_route_beats_smarthost_beats_mx(tmp_path: Path) -> None:
    """A remote domain's route wins; otherwise the smart host; otherwise the domain's MX."""
    cfg = _config(tmp_path, smarthost="[198.51.100.1]:25")
    assert routing.next_hop("exchange.northwindtraders.test", cfg).host == "192.0.2.7"
    sh = routing.next_hop("example.org", cfg)
    assert sh.host == "198.51.100.1" and sh.smarthost
    assert routing.next_hop("other.test", cfg).smarthost  # remote without route: smart host
    direct = routing.next_hop("Example.ORG", _config(tmp_path))
    assert direct == routing.NextHop(host="example.org", port=25)
    assert not direct.smarthost and not direct.literal


def test_address_literal_domain_goes_to_that_address(tmp_path: Path) -> None:
    """A recipient domain [192.0.2.9] / [IPv6:2001:db8::9] (relayed for a trusted client) goes
    to that address on port 25 without a DNS lookup; a smart host still takes everything."""
    cfg = _config(tmp_path)
    assert routing.next_hop("[192.0.2.9]", cfg) == routing.NextHop("192.0.2.9", 25, literal=True)
    assert routing.next_hop(routing.domain_of('"a b"@[IPv6:2001:db8::9]'), cfg) == \
        routing.NextHop("2001:db8::9", 25, literal=True)
    assert routing.next_hop("[192.0.2.9]", _config(tmp_path, smarthost="[198.51.100.1]:25")).smarthost


def test_route_to_remote_is_not_the_smarthost(tmp_path: Path) -> None:
    """Credentials belong to the smart host only: a per-domain route is not marked smarthost."""
    cfg = _config(tmp_path, smarthost="[198.51.100.1]:25")
    assert not routing.next_hop("exchange.northwindtraders.test", cfg).smarthost


def test_local_domains_go_to_the_store_unless_there_is_none(tmp_path: Path) -> None:
    """A local domain routes to LOCAL; without a store it is routed like any other domain."""
    cfg = _config(tmp_path, smarthost="[198.51.100.1]:25")
    assert routing.next_hop("POP.contoso.test", cfg) is routing.LOCAL
    assert routing.next_hop("pop.contoso.test", cfg, local_delivery=False).smarthost


def test_recipients_sharing_a_hop_are_grouped_in_order(tmp_path: Path) -> None:
    """Recipients with the same next hop share one group (one SMTP transaction)."""
    cfg = _config(tmp_path)
    groups = routing.group_by_hop(
        ["a@example.org", "b@exchange.northwindtraders.test", "c@EXAMPLE.org", "d@example.net"], cfg
    )
    keys = [h.key for h in groups]
    assert keys == ["example.org:25", "[192.0.2.7]:2526", "example.net:25"]
    assert groups[routing.NextHop("example.org")] == ["a@example.org", "c@EXAMPLE.org"]


@pytest.mark.parametrize(
    ("name", "ip", "port", "loops"),
    [
        ("pop.contoso.test", "203.0.113.9", 25, True),  # our own host name
        ("mx.example", "127.0.0.1", 2525, True),  # our listener
        ("mx.example", "127.0.0.1", 2526, True),  # wildcard listener, loopback address
        ("mx.example", "127.0.0.2", 2525, False),  # other address, same port
        ("mx.example", "127.0.0.1", 25, False),  # other port
        ("mx.example", "192.0.2.1", 2526, False),  # wildcard listener but not a local address
    ],
)
def test_loop_detection(tmp_path: Path, name: str, ip: str, port: int, loops: bool) -> None:
    """A hop that is this server (host name or a listening address) is recognised."""
    own = routing.own_addresses(_config(tmp_path))
    assert own.is_self(name, ip, port) is loops


def test_bound_ports_count_as_own(tmp_path: Path) -> None:
    """Ports really bound (listeners.json, e.g. port 0 listeners) are this server too."""
    own = routing.own_addresses(_config(tmp_path), bound_ports=[40123])
    assert own.is_self("x.example", "127.0.0.1", 40123)


# --------------------------------------------------------------------------- fault 13: fall-back


def _gateway(*connectors: tuple[str, int, tuple[str, ...]]) -> GatewayConfig:
    """A gateway with connectors (name, cost, next hops), all for the domain d.test."""
    return GatewayConfig(enabled=True, connectors=tuple(
        ConnectorConfig(name=name, address_spaces=(AddressSpace("d.test", cost),), next_hops=hops)
        for name, cost, hops in connectors
    ))


def _keys(route: routing.Route | None) -> list[str]:
    assert route is not None
    return [a.hop.key for a in route.attempts]


def test_connector_route_is_every_connector_by_cost_each_hop_in_order() -> None:
    """Pure selection: every connector for the domain, lowest cost first (config order does not
    matter); each connector's next hops in the order written (primary, then fall-backs); a hop
    already on the route is not repeated; a domain without a connector has no connector route."""
    gw = _gateway(("expensive", 9, ("[192.0.2.9]:25",)),
                  ("cheap", 1, ("[192.0.2.1]:25", "[192.0.2.2]:25", "[192.0.2.3]:25")),
                  ("middle", 5, ("[192.0.2.5]:25", "[192.0.2.1]:25")))
    route = routing.connector_route(gw, "D.test")
    assert _keys(route) == ["[192.0.2.1]:25", "[192.0.2.2]:25", "[192.0.2.3]:25",
                            "[192.0.2.5]:25", "[192.0.2.9]:25"]
    assert [a.via for a in route.attempts] == [
        "connector 'cheap' cost 1, next hop 1 of 3", "connector 'cheap' cost 1, next hop 2 of 3",
        "connector 'cheap' cost 1, next hop 3 of 3", "connector 'middle' cost 5, next hop 1 of 2",
        "connector 'expensive' cost 9, next hop 1 of 1"]
    assert all(a.hop.configured and not a.hop.smarthost for a in route.attempts)
    assert routing.connector_route(gw, "other.test") is None


def test_a_connector_listing_the_domain_twice_counts_with_its_lowest_cost() -> None:
    """Two address spaces for one domain in one connector: the lower cost decides its place."""
    gw = GatewayConfig(enabled=True, connectors=(
        ConnectorConfig("b", (AddressSpace("d.test", 3),), ("[192.0.2.2]:25",)),
        ConnectorConfig("a", (AddressSpace("d.test", 8), AddressSpace("d.test", 2)),
                        ("[192.0.2.1]:25",)),
    ))
    assert [(cost, c.name) for cost, c in routing.connectors_for(gw, "d.test")] == [(3, "b"), (2, "a")]
    assert _keys(routing.connector_route(gw, "d.test")) == ["[192.0.2.1]:25", "[192.0.2.2]:25"]


def test_equal_costs_rotate_per_message_and_stay_put_within_one() -> None:
    """Connectors of equal cost take turns being first (rotation by the message's spread key),
    the cheaper ones always before the dearer; the same key always gives the same order."""
    gw = _gateway(("backup", 7, ("[192.0.2.9]:25",)), ("a", 2, ("[192.0.2.1]:25",)),
                  ("b", 2, ("[192.0.2.2]:25",)), ("c", 2, ("[192.0.2.3]:25",)))
    firsts = []
    for spread in range(300):
        keys = _keys(routing.connector_route(gw, "d.test", spread=spread))
        assert keys == _keys(routing.connector_route(gw, "d.test", spread=spread))
        assert sorted(keys[:3]) == ["[192.0.2.1]:25", "[192.0.2.2]:25", "[192.0.2.3]:25"]
        assert keys[3] == "[192.0.2.9]:25"
        firsts.append(keys[0])
    assert {k: firsts.count(k) for k in set(firsts)} == {
        "[192.0.2.1]:25": 100, "[192.0.2.2]:25": 100, "[192.0.2.3]:25": 100}
    assert _keys(routing.connector_route(gw, "d.test", spread=1))[:3] == [
        "[192.0.2.2]:25", "[192.0.2.3]:25", "[192.0.2.1]:25"]


def test_spread_key_is_stable_and_spreads() -> None:
    """The rotation key of a queue id is the same in every process (not Python's salted
    hash) and differs between ids."""
    assert routing.spread_key("1700000000.M1P2.pop.contoso.test") == 3065121305  # CRC-32
    keys = {routing.spread_key(f"id{i}") % 2 for i in range(20)}
    assert keys == {0, 1}


def test_remote_route_list_is_tried_in_order(tmp_path: Path) -> None:
    """`[[domains.remote]] route` may be a list: the first is the primary, the others are
    fall-backs in order; a single route stays one attempt; neither falls back to the smart host."""
    cfg = _config(tmp_path, smarthost="[198.51.100.1]:25", extra="""
[[domains.remote]]
name = "two.test"
route = ["[192.0.2.21]:25", "relay.two.test:2526"]
""")
    route = routing.route_for("two.test", cfg)
    assert _keys(route) == ["[192.0.2.21]:25", "relay.two.test:2526"]
    assert [a.via for a in route.attempts] == ["route of two.test, next hop 1 of 2",
                                               "route of two.test, next hop 2 of 2"]
    assert all(a.hop.configured and not a.hop.smarthost for a in route.attempts)
    assert cfg.domains.remote[2].route == "[192.0.2.21]:25"
    assert _keys(routing.route_for("exchange.northwindtraders.test", cfg)) == ["[192.0.2.7]:2526"]
    assert [a.via for a in routing.route_for("example.org", cfg).attempts] == ["smart host"]


@pytest.mark.parametrize("route", ['["[192.0.2.1]:25", ""]', '["no way"]', "[1]"])
def test_a_bad_route_list_is_a_config_error(tmp_path: Path, route: str) -> None:
    """Every entry of a route list is checked like a single route; the error names the key."""
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, extra=f'[[domains.remote]]\nname = "two.test"\nroute = {route}\n')
    assert "route" in str(e.value)


@pytest.mark.parametrize("mx_port", [None, 2526])
def test_mx_port_is_the_port_of_direct_delivery(tmp_path: Path, mx_port: int | None) -> None:
    """smarthost.mx_port (default 25) is the port of direct delivery: a domain's MX hosts and
    an address literal. A route or a smart host keeps its own port (25 when it names none)."""
    extra = f"mx_port = {mx_port}" if mx_port else ""
    cfg = _config(tmp_path, extra=extra)
    port = mx_port or 25
    mx = routing.next_hop("example.net", cfg)
    assert (mx.host, mx.port, mx.literal) == ("example.net", port, False)
    literal = routing.next_hop("[192.0.2.9]", cfg)
    assert (literal.host, literal.port, literal.literal) == ("192.0.2.9", port, True)
    assert routing.next_hop("exchange.northwindtraders.test", cfg).port == 2526
    with_sh = _config(tmp_path, extra=extra, smarthost="relay.example.net")
    assert routing.next_hop("example.net", with_sh).port == 25
    assert routing.next_hop("example.net", _config(
        tmp_path, extra=extra, smarthost="[192.0.2.1]:587")).port == 587


def test_mx_port_other_than_25_is_a_warning(tmp_path: Path) -> None:
    """Another MX port is legal (tests, networks that block 25) but unusual: a warning naming
    the key, none for 25 or when it is not set; a port outside 1-65535 is an error."""
    assert not [w for w in _config(tmp_path, extra="mx_port = 25").warnings if "mx_port" in w]
    [warning] = [w for w in _config(tmp_path, extra="mx_port = 2525").warnings if "mx_port" in w]
    assert "[smarthost.mx_port] direct delivery goes to port 2525" in warning
    for bad in ("0", "65536", '"25"'):
        with pytest.raises(ConfigError, match=r"\[smarthost.mx_port\]"):
            _config(tmp_path, extra=f"mx_port = {bad}")


def test_is_self_answers_stay_right_when_kept_per_address(tmp_path: Path) -> None:
    """The per-address answer kept by ``is_self`` (issue 17: no address parse per message)
    belongs to its own listeners: a server with other listeners asked about the same
    address and port gets its own answer, and asking again gives the same answer."""
    own = routing.own_addresses(_config(tmp_path))
    other = routing.OwnAddresses(hostname="other.example",
                                 endpoints=frozenset({("127.0.0.9", 2525)}))
    for _ in range(2):
        assert own.is_self("mx.example", "127.0.0.1", 2525)
        assert not other.is_self("mx.example", "127.0.0.1", 2525)
        assert other.is_self("mx.example", "127.0.0.9", 2525)
        assert not own.is_self("mx.example", "not-an-address", 2525)


def test_kept_next_hop_parses_are_per_spec_and_errors_are_not_kept() -> None:
    """``parse_next_hop`` keeps its answers (issue 17: the smart host is not parsed per
    message): the same spec gives an equal, immutable NextHop, the ``smarthost`` flag is
    part of the key (a route to the same host never gets the smart host's credentials), and
    a bad spec raises ValueError every time."""
    a = routing.parse_next_hop("[127.0.0.1]:2526", smarthost=True)
    b = routing.parse_next_hop("[127.0.0.1]:2526")
    assert a.smarthost and a.configured and not b.smarthost
    assert routing.parse_next_hop("[127.0.0.1]:2526", smarthost=True) == a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 25  # type: ignore[misc]
    for _ in range(2):
        with pytest.raises(ValueError):
            routing.parse_next_hop("no such:form")
