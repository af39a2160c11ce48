"""netutil.QuickCloseServer (the transport of a shared port's connections, issue 17): a
``loseConnection`` made while the protocol handles input, with nothing queued, closes the
socket at the end of that input (doRead returns ConnectionDone: the reactor tears it down
in the same turn, never watching for writability); bytes queued meanwhile, a producer, or a
``loseConnection`` from outside input keep Twisted's way (written first, then closed).
The sockets are a real connected pair; the reactor is a memory reactor that is never run."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import error, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from pop3coexist.netutil import QuickCloseServer, send_now


class _Session(protocol.Protocol):
    """Answers each input with ``reply`` (sent at once by send_now, or queued by write) and
    closes when ``close`` is set; remembers how its connection ended."""

    def __init__(self, reply: bytes = b"221 bye\r\n", close: bool = True, queue: bool = False,
                 extra: bytes = b"") -> None:
        self.reply, self.close, self.queue, self.extra = reply, close, queue, extra
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.queue:
            self.transport.write(self.reply)
        else:
            send_now(self.transport, self.reply)
        if self.close:
            self.transport.loseConnection()
        if self.extra:
            self.transport.write(self.extra)  # written after the close was asked

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.append(reason)


def _connection(proto: _Session) -> tuple[QuickCloseServer, socket.socket, MemoryReactorClock]:
    ours, peer = socket.socketpair()
    reactor = MemoryReactorClock()
    transport = QuickCloseServer(ours, proto, ("127.0.0.1", 2525), None, 1, reactor)
    proto.makeConnection(transport)
    peer.settimeout(5)
    return transport, peer, reactor


def _read_all(peer: socket.socket) -> bytes:
    out = b""
    while chunk := peer.recv(4096):
        out += chunk
    return out


def test_a_close_while_handling_input_with_nothing_queued_ends_in_the_same_turn() -> None:
    """QUIT answered straight to the socket, then loseConnection: doRead returns
    ConnectionDone (the reactor's cue to tear the connection down now) without ever asking
    for writability; after the teardown the client reads the whole reply, then EOF, and the
    protocol's connectionLost gets ConnectionDone, as on Twisted's way."""
    proto = _Session()
    transport, peer, reactor = _connection(proto)
    peer.sendall(b"QUIT\r\n")
    why = transport.doRead()
    assert isinstance(why, error.ConnectionDone)
    assert transport not in reactor.getWriters()
    reactor.removeReader(transport)  # what the reactor's _disconnectSelectable does
    transport.readConnectionLost(Failure(why))
    assert _read_all(peer) == b"221 bye\r\n"
    assert len(proto.lost) == 1 and proto.lost[0].check(error.ConnectionDone)


def test_bytes_queued_before_or_after_the_close_are_written_first() -> None:
    """A reply left in Twisted's buffer (queued, or written after loseConnection) keeps
    Twisted's way: doRead returns nothing, reading stops, the transport waits for
    writability and writes everything before it closes."""
    for proto in (_Session(queue=True), _Session(extra=b"more\r\n")):
        transport, peer, reactor = _connection(proto)
        peer.sendall(b"QUIT\r\n")
        assert transport.doRead() is None
        assert transport.disconnecting
        assert transport not in reactor.getReaders() and transport in reactor.getWriters()
        why = transport.doWrite()
        assert isinstance(why, error.ConnectionDone)
        reactor.removeWriter(transport)
        transport.connectionLost(Failure(why))
        assert _read_all(peer) == proto.reply + proto.extra
        assert proto.lost[0].check(error.ConnectionDone)


def test_a_close_asked_outside_input_handling_takes_twisteds_way() -> None:
    """loseConnection from a timer or a Deferred (not inside doRead): Twisted's own way,
    unchanged (stop reading, wait for writability)."""
    proto = _Session(close=False)
    transport, peer, reactor = _connection(proto)
    transport.loseConnection()
    assert transport.disconnecting
    assert transport not in reactor.getReaders() and transport in reactor.getWriters()
    peer.close()


def test_input_without_a_close_leaves_the_connection_open() -> None:
    """An ordinary command: doRead returns nothing, the connection stays registered for
    reading and is not closing."""
    proto = _Session(reply=b"250 ok\r\n", close=False)
    transport, peer, reactor = _connection(proto)
    peer.sendall(b"NOOP\r\n")
    assert transport.doRead() is None
    assert not transport.disconnecting and transport in reactor.getReaders()
    assert peer.recv(100) == b"250 ok\r\n"
    peer.close()


class _Factory(protocol.ServerFactory):
    limiter = None  # not shared: the port never leaves a connection to another process

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.built: list[_Session] = []

    def buildProtocol(self, addr: Any) -> _Session | None:  # noqa: N802
        if self.refuse:
            return None
        p = _Session(close=False)
        p.factory = self
        self.built.append(p)
        return p


def _shared_port(factory: _Factory) -> Any:
    from twisted.internet import tcp

    from pop3coexist import service

    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=MemoryReactorClock())
    port.startListening()
    service.share_accepts(port)
    return port


def test_a_shared_port_accepts_one_connection_per_wake_up_onto_a_quick_close_transport() -> None:
    """Each wake-up of a shared port accepts exactly one waiting client (the next one waits
    for the next wake-up), builds its protocol and connects it over a QuickCloseServer
    whose peer is the client's address; with no client waiting, a wake-up does nothing."""
    factory = _Factory()
    port = _shared_port(factory)
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
    try:
        port.doRead()
        assert len(factory.built) == 1
        transport = factory.built[0].transport
        assert type(transport) is QuickCloseServer
        assert transport.getPeer().port == clients[0].getsockname()[1]
        # the port is bound to 127.0.0.1: the local address is the port's, no getsockname
        assert transport.local_address is not None
        assert (transport.getHost().host, transport.getHost().port) == transport.socket.getsockname()
        port.doRead()
        port.doRead()  # nothing waiting: Twisted's accept loop finds EAGAIN and returns
        assert len(factory.built) == 2
        assert port.logPrefix() == f"{_Factory.__module__}._Factory"  # made once, same text
    finally:
        for c in clients:
            c.close()
        port.socket.close()


def test_a_port_on_all_addresses_asks_each_connection_its_local_address() -> None:
    """Bound to the wildcard address, the local address depends on the connection: getHost
    asks the socket (getsockname), as Twisted does."""
    from twisted.internet import tcp

    from pop3coexist import service

    factory = _Factory()
    port = tcp.Port(0, factory, interface="0.0.0.0", reactor=MemoryReactorClock())
    port.startListening()
    service.share_accepts(port)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        port.doRead()
        transport = factory.built[0].transport
        assert transport.local_address is None
        assert transport.getHost().host == "127.0.0.1"
    finally:
        client.close()
        port.socket.close()


def test_a_refused_connection_is_closed_at_once() -> None:
    """A factory that builds no protocol: the accepted socket is closed (the client reads
    EOF), and the port goes on accepting."""
    port = _shared_port(_Factory(refuse=True))
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.settimeout(5)
    try:
        port.doRead()
        assert client.recv(10) == b""
    finally:
        client.close()
        port.socket.close()


def test_a_half_closeable_protocol_takes_twisteds_way() -> None:
    """A protocol that handles the end of input itself (IHalfCloseableProtocol) would only
    be told that input ended: its close takes Twisted's way (wait for writability, then
    close), so it is closed, not half-closed."""
    from zope.interface import implementer

    @implementer(IHalfCloseableProtocol)
    class _HalfCloseable(_Session):
        def readConnectionLost(self) -> None:  # noqa: N802
            raise AssertionError("closed, not half-closed")

        def writeConnectionLost(self) -> None:  # noqa: N802
            pass

    proto = _HalfCloseable()
    transport, peer, reactor = _connection(proto)
    peer.sendall(b"QUIT\r\n")
    assert transport.doRead() is None
    assert transport.disconnecting and transport in reactor.getWriters()
    peer.close()
