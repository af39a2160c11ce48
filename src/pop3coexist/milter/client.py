"""One connection to one milter (a Twisted protocol), and the option negotiation.

``MilterConnection.open(reactor, socket, timeouts)`` connects to ``inet:host:port`` or
``unix:/path`` within the connect timeout, sends ``SMFIC_OPTNEG`` (version 6, every action and
step ``codec`` offers) and keeps what the filter chose: the intersection of what it asks and
what we offer (``actions``, ``protocol``). ``ask(packets, timeout)`` writes packets and reads
the replies up to the one that ends the step (``SMFIR_PROGRESS`` restarts the timer);
``tell(packets)`` writes packets no reply follows. Any failure (refused connection, timeout,
closed connection, malformed packet) is ``MilterUnavailable``; the caller then applies the
milter's ``default_action``. No policy here: ``milter.conversation`` decides.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.logger import Logger

from pop3coexist.milter import codec

log = Logger(namespace="pop3coexist.milter")


class MilterUnavailable(Exception):
    """The milter cannot be used now: the text says why (for the log)."""


FINAL = {codec.ACCEPT, codec.CONTINUE, codec.DISCARD, codec.REJECT, codec.TEMPFAIL,
         codec.REPLYCODE, codec.SKIP, codec.CONN_FAIL, codec.SHUTDOWN}


def endpoint_for(reactor: Any, socket: str, timeout: float) -> Any:
    """A client endpoint for ``inet:host:port``, ``inet6:host:port`` or ``unix:/path``
    (Postfix's forms; Sendmail's ``inet:port@host`` is taken too). ValueError otherwise."""
    kind, _, rest = socket.partition(":")
    if kind == "unix" and rest:
        return UNIXClientEndpoint(reactor, rest, timeout=timeout)
    if kind in ("inet", "inet6") and rest:
        if "@" in rest:  # Sendmail: inet:port@host
            port, _, host = rest.partition("@")
        else:
            host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if not (port.isascii() and port.isdigit()) or not host or not 0 < int(port) < 65536:
            raise ValueError(f"{socket!r}: inet:host:port with a port from 1 to 65535")
        cls = TCP6ClientEndpoint if kind == "inet6" or ":" in host else TCP4ClientEndpoint
        return cls(reactor, host, int(port), timeout=timeout)
    raise ValueError(f"{socket!r} is not inet:host:port or unix:/path")


class Wire(protocol.Protocol):
    """Bytes in and out; whole packets are handed to the connection."""

    def __init__(self) -> None:
        self.decoder = codec.Decoder()
        self.packets: list[tuple[bytes, bytes]] = []
        self.waiter: defer.Deferred | None = None
        self.lost: str | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        try:
            self.packets.extend(self.decoder.feed(data))
        except codec.ProtocolError as e:
            self.lost = f"protocol error: {e}"
            self.transport.abortConnection()
        self._wake()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:  # noqa: N802
        if self.lost is None:
            self.lost = "the milter closed the connection"
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)


class MilterConnection:
    """An open, negotiated connection to one milter (see the module docstring)."""

    def __init__(self, wire: Wire, reactor: Any, name: str) -> None:
        self.wire = wire
        self.reactor = reactor
        self.name = name
        self.actions = 0
        self.protocol = 0
        self.version = codec.VERSION
        self.symlists: dict[bytes, list[str]] = {}  # command -> macro names it asked for
        self.closed = False

    @classmethod
    async def open(cls, reactor: Any, name: str, socket: str, connect_timeout: float,
                   command_timeout: float) -> MilterConnection:
        """Connect and negotiate; MilterUnavailable when the milter cannot be used."""
        try:
            endpoint = endpoint_for(reactor, socket, connect_timeout)
            factory = protocol.Factory.forProtocol(Wire)
            factory.noisy = False  # no "Starting factory" line per SMTP session
            d = endpoint.connect(factory)
            d.addTimeout(connect_timeout, reactor)
            wire = await d
        except defer.TimeoutError:
            raise MilterUnavailable(f"no connection within {connect_timeout:g} s") from None
        except Exception as e:
            raise MilterUnavailable(f"cannot connect to {socket}: {e}") from None
        return await cls.negotiate(wire, reactor, name, command_timeout)

    @classmethod
    async def negotiate(cls, wire: Wire, reactor: Any, name: str,
                        timeout: float) -> MilterConnection:
        """Option negotiation over a connected ``Wire``; MilterUnavailable on failure."""
        conn = cls(wire, reactor, name)
        replies = await conn.ask([codec.optneg()], timeout, until={codec.OPTNEG})
        reply = replies[-1]
        version, actions, proto = codec.parse_optneg(reply.body)
        if version < 2:
            conn.close()
            raise MilterUnavailable(f"protocol version {version} (2 to 6 are understood)")
        conn.version = min(version, codec.VERSION)
        conn.actions = actions & codec.ACTIONS_OFFERED
        conn.protocol = proto & codec.PROTOCOL_OFFERED
        if len(reply.body) > 12:  # version 6: the macros it wants, per stage
            conn._read_symlists(reply.body[12:])
        return conn

    def _read_symlists(self, data: bytes) -> None:
        """The macro lists (per step) a version 6 filter appends to its negotiation reply."""
        while len(data) >= 4:
            (where,) = struct.unpack("!I", data[:4])
            end = data.find(b"\0", 4)
            if end < 0:
                break
            names = data[4:end].decode("ascii", "replace").split()
            command = codec.MACRO_STAGES.get(where)
            if command is not None:
                self.symlists[command] = [n.strip() for n in names if n.strip()]
            data = data[end + 1:]

    def sends(self, command: bytes) -> bool:
        """False when the filter asked not to get ``command`` (SMFIP_NO*)."""
        flag = codec.NO_SEND.get(command, 0)
        return not (self.protocol & flag)

    def replies(self, command: bytes) -> bool:
        """False when the filter said it will not answer ``command`` (SMFIP_NR_*)."""
        flag = codec.NO_REPLY.get(command, 0)
        return not (self.protocol & flag)

    def may(self, action: int) -> bool:
        """True when the filter negotiated the modification ``action`` (SMFIF_*)."""
        return bool(self.actions & action)

    def tell(self, packets: list[bytes]) -> None:
        """Write packets that get no reply (macros, a step the filter does not answer)."""
        if self.closed or self.wire.lost:
            raise MilterUnavailable(self.wire.lost or "connection closed")
        self.wire.transport.write(b"".join(packets))

    async def ask(self, packets: list[bytes], timeout: float,
                  until: set[bytes] | None = None) -> list[codec.Reply]:
        """Write ``packets``, then read replies until one in ``until`` (default: a reply that
        ends a step); return them all, the final one last. SMFIR_PROGRESS restarts the timer."""
        self.tell(packets)
        final = until or FINAL
        out: list[codec.Reply] = []
        wire = self.wire
        while True:
            while wire.packets:
                code, data = wire.packets.pop(0)
                if code == codec.OPTNEG and codec.OPTNEG in final:
                    out.append(codec.Reply(code, body=data))
                    return out
                try:
                    reply = codec.parse_reply(code, data)
                except codec.ProtocolError as e:
                    self.close()
                    raise MilterUnavailable(f"protocol error: {e}") from None
                if reply.code == codec.PROGRESS:
                    continue
                out.append(reply)
                if reply.code in final:
                    return out
            if wire.lost:
                self.closed = True
                raise MilterUnavailable(wire.lost)
            waiter: defer.Deferred = defer.Deferred()
            wire.waiter = waiter
            waiter.addTimeout(timeout, self.reactor)
            try:
                await waiter
            except defer.TimeoutError:
                self.close()
                raise MilterUnavailable(f"no reply within {timeout:g} s") from None

    def close(self) -> None:
        """Say goodbye (SMFIC_QUIT) and close; idempotent."""
        if self.closed:
            return
        self.closed = True
        transport = self.wire.transport
        if not self.wire.lost and transport is not None:
            transport.write(codec.encode(codec.QUIT))
            transport.loseConnection()
