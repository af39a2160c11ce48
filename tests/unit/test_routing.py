"""Routing: the next hop per recipient domain and loop detection (policy/routing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.config import parse_config
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
