"""A byte-exact dialogue runner for line protocols over StringTransport.

``run_dialogue(proto, rows)`` connects ``proto`` to a StringTransport, then for each row
``(client_bytes | None, expected_bytes)`` sends the client bytes (if any) and compares what the
server wrote since the previous row. On a mismatch the whole transcript is printed with arrows
(``C:`` client, ``S:`` server) so the failing exchange is obvious.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport


class DialogueMismatch(AssertionError):
    pass


def connect(proto, peer: str = "127.0.0.1", port: int = 40000, host_port: int = 110) -> StringTransport:
    """Attach a StringTransport with the given peer address and call makeConnection."""
    transport = StringTransport(
        peerAddress=IPv4Address("TCP", peer, port), hostAddress=IPv4Address("TCP", "127.0.0.1", host_port)
    )
    proto.makeConnection(transport)
    return transport


def take(transport: StringTransport) -> bytes:
    """Return and clear what the server has written so far."""
    data = transport.value()
    transport.clear()
    return data


def run_dialogue(
    proto,
    rows: Iterable[tuple[bytes | None, bytes | Callable[[bytes], bool]]],
    transport: StringTransport | None = None,
    pump: Callable[[], None] | None = None,
) -> StringTransport:
    """Play ``rows`` against ``proto``; raise DialogueMismatch with the transcript on failure.

    ``expected`` is bytes (compared exactly) or a predicate on the bytes written. ``pump`` is
    called after each client send (e.g. to advance a task.Clock or flush threads).
    """
    if transport is None:
        transport = connect(proto)
    transcript: list[str] = []
    for client, expected in rows:
        if client is not None:
            transcript.append(f"C: {client!r}")
            proto.dataReceived(client)
        if pump is not None:
            pump()
        got = take(transport)
        transcript.append(f"S: {got!r}")
        ok = expected(got) if callable(expected) else got == expected
        if not ok:
            transcript.append(f"   expected: {expected!r}" if not callable(expected) else "   (predicate failed)")
            raise DialogueMismatch("dialogue mismatch:\n" + "\n".join(transcript))
    return transport
