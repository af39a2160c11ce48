"""The test DNS server's port choice (tests/support/dnsserver.py ``listen_both``)."""

from __future__ import annotations

import pytest
from twisted.internet.error import CannotListenError

from tests.support.dnsserver import listen_both


class _Port:
    def __init__(self, number: int) -> None:
        self.number = number
        self.stopped = False

    def getHost(self) -> object:  # noqa: N802 (Twisted's name)
        return type("Addr", (), {"port": self.number})()

    def stopListening(self) -> None:  # noqa: N802 (Twisted's name)
        self.stopped = True


class _Reactor:
    """listenUDP hands out ports 5301, 5302, ...; listenTCP refuses the first ``taken``."""

    def __init__(self, taken: int) -> None:
        self.taken = taken
        self.udp: list[tuple[_Port, object]] = []
        self.tcp: list[int] = []

    def listenUDP(self, port: int, protocol: object, interface: str = "") -> _Port:  # noqa: N802
        assert port == 0 and interface == "127.0.0.1"
        assert all(protocol is not used for _, used in self.udp), "a protocol used twice"
        p = _Port(5301 + len(self.udp))
        self.udp.append((p, protocol))
        return p

    def listenTCP(self, port: int, factory: object, interface: str = "") -> None:  # noqa: N802
        if self.taken:
            self.taken -= 1
            raise CannotListenError(interface, port, OSError("in use"))
        self.tcp.append(port)


def test_a_taken_tcp_port_is_retried_with_a_new_protocol() -> None:
    """When TCP finds the UDP port's number taken, that UDP port is stopped and the next try
    listens with a new datagram protocol (reusing the stopped port's one made Twisted assert);
    UDP and TCP end on the same number."""
    reactor = _Reactor(taken=2)
    port = listen_both(reactor, object(), object)
    assert port == 5303 and reactor.tcp == [5303]
    assert [p.stopped for p, _ in reactor.udp] == [True, True, False]


def test_no_free_pair_ends_with_a_clear_message() -> None:
    """After every attempt failed the server exits naming the reason, not a traceback."""
    with pytest.raises(SystemExit, match="no port free"):
        listen_both(_Reactor(taken=99), object(), object, attempts=3)
