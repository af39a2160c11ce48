"""The mail events (``pop3coexist.events``) of a POP3 session: connect and disconnect (with
the message octets RETR and TOP sent), each one log event that the mail log and the metrics
observe. The session calls these in one line each; log-ins are events of their own log lines.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from pop3coexist import events

log = Logger(namespace="pop3coexist.pop3")


def listener(session: Any) -> str:
    """The session's listener role: ``pop3s`` (TLS from the first byte) or ``pop3``."""
    return "pop3s" if session.factory.implicit_tls else "pop3"


def connected(session: Any) -> None:
    """A session opened (``connect``)."""
    log.info("POP3 connect from {client} ({listener})", mail_event=events.CONNECT,
             protocol="pop3", listener=listener(session), client=session._peer)


def disconnected(session: Any, octets: int) -> None:
    """A session closed (``disconnect``) after sending ``octets`` of messages."""
    box = session._mailbox
    user = getattr(box, "address", "?") if box is not None else None
    log.info("POP3 disconnect from {client} ({listener}): {retr_octets} octets of mail sent",
             mail_event=events.DISCONNECT, protocol="pop3", listener=listener(session),
             client=session._peer, retr_octets=octets,
             user=user)


def login_fields(session: Any, outcome: str, user: str, method: str,
                 delay: float = 0.0) -> dict[str, Any]:
    """The fields that make a log-in log line the ``login`` event."""
    return {"mail_event": events.LOGIN, "protocol": "pop3", "listener": listener(session),
            "client": session._peer, "user": user, "method": method,
            "outcome": outcome, "delay": delay}
