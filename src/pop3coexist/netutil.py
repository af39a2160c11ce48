"""``send_now``: write to a Twisted TCP transport without waiting for the next reactor turn.

Twisted's ``transport.write`` only queues: the bytes go out on the reactor's next turn, after
two ``epoll_ctl`` calls (start and stop watching for writability) and a ``doWrite`` call. For
a mail server that answers one short reply per command, that turn costs more than the reply.
``send_now`` sends at once when the transport is a plain TCP connection with nothing queued,
and queues only what the kernel did not take (or everything, for TLS and other transports),
so the order of bytes on the wire is always the order of the calls. ``nothing_queued`` says
whether a transport is such a connection with nothing waiting to go out (a caller may then
write a bounded amount without a producer: at most that much can end up queued).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_DIRECT = (tcp.Server,)


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
