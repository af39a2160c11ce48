"""send_now: direct socket sends only when nothing is queued ahead (bytes keep their order),
the remainder of a partial send is queued, and TLS or other transports always queue."""

from __future__ import annotations

import pytest
from twisted.internet import tcp

from pop3coexist import netutil

REAL_DIRECT = netutil._DIRECT  # before the fixture below swaps in the stand-in

class _Sock:
    def __init__(self, takes: int | None = None, error: OSError | None = None) -> None:
        self.takes = takes
        self.error = error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        n = len(data) if self.takes is None else min(self.takes, len(data))
        self.sent.append(bytes(data[:n]))
        return n


class _Transport:
    """The attributes send_now reads from twisted.internet.tcp.Server."""

    def __init__(self, sock: _Sock) -> None:
        self.socket = sock
        self.TLS = False
        self.connected = True
        self.disconnecting = False
        self._writeDisconnected = False
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self._tempDataBuffer.append(bytes(data))


@pytest.fixture(autouse=True)
def _direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netutil, "_DIRECT", (_Transport,))


def test_nothing_queued_goes_straight_to_the_socket() -> None:
    """An empty queue: one send, nothing left for the reactor."""
    t = _Transport(_Sock())
    netutil.send_now(t, b"+OK\r\n")
    assert t.socket.sent == [b"+OK\r\n"] and t.written == []


def test_a_partial_send_queues_the_rest_and_later_writes_queue_behind_it() -> None:
    """The kernel took 3 bytes: the rest is queued; the next call finds the queue non-empty
    and queues too, so the bytes keep their order."""
    t = _Transport(_Sock(takes=3))
    netutil.send_now(t, b"abcdef")
    netutil.send_now(t, b"ghi")
    assert t.socket.sent == [b"abc"] and t.written == [b"def", b"ghi"]


@pytest.mark.parametrize("attr,value", [("TLS", True), ("connected", False), ("disconnecting", True),
                                        ("dataBuffer", b"pending")])
def test_tls_closing_or_busy_transports_always_queue(attr: str, value: object) -> None:
    """TLS (bytes must pass the TLS layer), a closing connection or queued bytes: write()."""
    t = _Transport(_Sock())
    setattr(t, attr, value)
    netutil.send_now(t, b"x")
    assert t.socket.sent == [] and t.written == [b"x"]


def test_a_socket_error_leaves_the_bytes_to_the_normal_path() -> None:
    """EAGAIN or a reset while sending: everything is queued; the reactor reports errors."""
    t = _Transport(_Sock(error=BlockingIOError()))
    netutil.send_now(t, b"data")
    assert t.written == [b"data"]


def test_other_transports_are_left_alone() -> None:
    """Anything that is not a plain TCP server connection (test doubles, TLS wrappers) only
    sees write()."""

    class Other:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    o = Other()
    netutil.send_now(o, b"y")
    assert o.written == [b"y"]


@pytest.mark.parametrize("cls", [tcp.Server, tcp.Client])
def test_plain_tcp_servers_and_clients_are_sent_to_directly(cls: type,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted's plain TCP server and client connections (the outbound SMTP client's, too)
    qualify for the direct send; the same connection with TLS started does not."""
    monkeypatch.setattr(netutil, "_DIRECT", REAL_DIRECT)
    t = cls.__new__(cls)
    for name, value in vars(_Transport(_Sock())).items():
        if name not in ("written", "TLS"):
            setattr(t, name, value)
    t.TLS = False
    assert netutil.nothing_queued(t)
    t.TLS = True
    assert not netutil.nothing_queued(t)
