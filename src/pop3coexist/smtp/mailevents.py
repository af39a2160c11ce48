"""The mail events (``pop3coexist.events``) of an ESMTP session: connect, disconnect and
refusals of MAIL, RCPT and the end of DATA, each one log event that the mail log and the
metrics observe. The session calls these in one line each; nothing here decides anything.
"""

from __future__ import annotations

import re
from typing import Any

from pop3coexist import events
from pop3coexist.errors import MailError
from pop3coexist.events import FastLogger

log = FastLogger(namespace="pop3coexist.smtp.server")

_PATH_RE = re.compile(r"<([^>]*)>")
# replies that say the client misspoke, not that mail was refused (syntax, sequence)
_NOT_REFUSALS = frozenset({500, 501, 502, 503, 504, 555})


def _listener(session: Any) -> str:
    return events.smtp_listener(session.factory.mode)


def connected(session: Any) -> None:
    """A session opened (``connect``)."""
    log.info("SMTP connect from {client} ({listener})", mail_event=events.CONNECT,
             protocol="smtp", listener=_listener(session), client=session.client_ip)


def disconnected(session: Any) -> None:
    """A session closed (``disconnect``)."""
    log.info("SMTP disconnect from {client} ({listener})", mail_event=events.DISCONNECT,
             protocol="smtp", listener=_listener(session), client=session.client_ip)


def refused(session: Any, error: MailError, command: str, argument: str,
            queue_id: str | None = None) -> None:
    """A MAIL or RCPT (``command``, with its ``argument``) or the end of DATA got the refusal
    ``error`` (``refused``); syntax and sequence errors are not mail refusals and are left
    out, as is any other command."""
    if command not in ("MAIL", "RCPT", "DATA") or error.code in _NOT_REFUSALS:
        return
    txn = session._txn
    sender = str(txn.sender) if txn is not None and txn.sender else ""
    recipient = None
    if command == "RCPT":
        m = _PATH_RE.search(argument)
        recipient = m.group(1) if m else argument[:200]
    elif command == "MAIL":
        m = _PATH_RE.search(argument)
        sender = m.group(1) if m else argument[:200]
    log.info("SMTP {queue_id} {command} from {client} refused: {code} {enhanced} {reply}"
             " (from=<{sender}> to=<{recipient}>)",
             mail_event=events.REFUSED, protocol="smtp", listener=_listener(session),
             client=session.client_ip, queue_id=queue_id, command=command, code=error.code,
             enhanced=error.enhanced, reply=error.text, sender=sender,
             recipient=recipient or "", user=session.user)


def accepted_event(session: Any, txn: Any, queue_id: str) -> dict[str, Any]:
    """The fields that make the session's "accepted" log line (which gives ``size``) the
    ``accepted`` event."""
    return {"mail_event": events.ACCEPTED, "protocol": "smtp", "listener": _listener(session),
            "client": session.client_ip, "queue_id": queue_id,
            "sender": str(txn.sender) if txn.sender else "",
            "recipients": list(txn.recipients), "user": session.user}


def login_fields(session: Any, outcome: str, user: str | None, method: str,
                 delay: float = 0.0) -> dict[str, Any]:
    """The fields that make an AUTH log line the ``login`` event (never the password)."""
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    return {"mail_event": events.LOGIN, "protocol": "smtp", "listener": _listener(session),
            "client": session.client_ip, "user": user, "method": method,
            "outcome": outcome, "delay": delay}
