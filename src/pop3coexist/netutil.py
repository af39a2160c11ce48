"""``send_now``: write to a Twisted TCP transport without waiting for the next reactor turn.

Twisted's ``transport.write`` only queues: the bytes go out on the reactor's next turn, after
two ``epoll_ctl`` calls (start and stop watching for writability) and a ``doWrite`` call. For
a mail server that answers one short reply per command, that turn costs more than the reply.
``send_now`` sends at once when the transport is a plain TCP connection with nothing queued,
and queues only what the kernel did not take (or everything, for TLS and other transports),
so the order of bytes on the wire is always the order of the calls. ``nothing_queued`` says
whether a transport is such a connection with nothing waiting to go out (a caller may then
write a bounded amount without a producer: at most that much can end up queued).
``QuickCloseServer`` is a ``tcp.Server`` that closes at once after a ``loseConnection`` made
while handling input with nothing queued (issue 17).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol


class QuickCloseServer(tcp.Server):
    """The transport of a connection accepted by a shared port (``service.share_accepts``):
    Twisted's ``tcp.Server``, but a ``loseConnection`` made while the protocol handles input
    (QUIT, a 421 hang-up) with nothing left to send closes the socket as soon as that input
    is handled, in the same reactor turn, instead of registering for writability, waking up
    again and sending 0 bytes first (issue 17: per connection three ``epoll_ctl`` calls, one
    ``sendto`` and one reactor turn fewer). Anything written meanwhile, a producer or TLS takes Twisted's way:
    the bytes are sent before the socket closes. The protocol's ``connectionLost`` gets the
    same ``ConnectionDone`` either way."""

    _in_read = False
    _close_after_read = False
    # the listening port's own address when it is bound to one (not a wildcard): then it is
    # this connection's local address too, and getHost needs no getsockname (issue 17)
    local_address: Any = None

    def getHost(self):  # noqa: ANN201, N802 (Twisted's name)
        return self.local_address or tcp.Server.getHost(self)

    def doRead(self):  # noqa: ANN201, N802 (Twisted's name)
        self._in_read = True
        try:
            why = tcp.Server.doRead(self)
        finally:
            self._in_read = False
        if self._close_after_read:
            self._close_after_read = False
            if why is None and not self._aborting:  # abortConnection closes its own way
                if (self.dataBuffer or self._tempDataBuffer or self.producer is not None
                        or not self.connected):
                    self.stopReading()  # Twisted's way: written first, then closed
                    self.startWriting()
                    return None
                return _CONNECTION_DONE
        return why

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        # (a half-closeable protocol would be told of the end of input only, not closed)
        if (self._in_read and not self.TLS and self.connected and not self.disconnecting
                and not self._writeDisconnected
                and not IHalfCloseableProtocol.providedBy(self.protocol)):
            self.disconnecting = True
            self._close_after_read = True
            return
        tcp.Server.loseConnection(self)


_CONNECTION_DONE = error.ConnectionDone()


_DIRECT = (tcp.Server, QuickCloseServer, tcp.Client)  # a client too: smtp/client.py


def nothing_queued(transport: Any) -> bool:
    """True when ``transport`` is a plain (not TLS), open TCP connection with no bytes queued
    in Twisted's buffers (so ``send_now`` goes straight to the socket)."""
    return (
        type(transport) in _DIRECT
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: directly to the socket when nothing is queued ahead of
    it on a plain (not TLS) TCP connection, else by ``transport.write``."""
    if data and nothing_queued(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, or an error the normal path will find and report
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
