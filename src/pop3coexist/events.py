"""The mail events: one vocabulary for the mail log and the metrics (no I/O).

Code where something happens to a session or a message emits an ordinary Twisted log event
with a stable ``mail_event`` field naming what happened, and the fields below::

    log.info("...", mail_event="accepted", queue_id=qid, sender=..., size=..., ...)

Observers (``pop3coexist.monitor``) turn the events into the mail log (``format_text``,
``format_json``) and into Prometheus metrics; the protocol code knows neither. A worker
process's events reach the main process's log (workers.py), where the one mail log is
written; each process updates its own metrics (prometheus_client's multi-process files).

Event names (``mail_event``) and their fields (every event may also carry ``protocol``:
``"smtp"`` or ``"pop3"``, ``listener``: the listener's role, ``client``: the peer address):

- ``connect``, ``disconnect``: a session opened or closed; ``disconnect`` of POP3 also has
  ``user`` and ``retr_octets`` (message octets sent by RETR and TOP);
- ``login``: ``method`` (``USER``, ``APOP``, ``PLAIN``, ...), ``user``, ``outcome``
  (``ok``, ``failed``, ``in_use``, ``unavailable``), ``delay`` (seconds the log-in throttle
  held the reply; more than zero is a throttle hit);
- ``accepted``: a message got its 250: ``queue_id``, ``sender``, ``size`` (octets),
  ``recipients`` (list), ``user`` (the log-in, or None);
- ``stored``: the message is durable in local mailboxes: ``queue_id``, ``mailboxes`` (the
  recipient addresses delivered here; the mail log writes one ``delivered`` line each);
- ``refused``: a MAIL, RCPT or end of DATA refused: ``command``, ``code``, ``enhanced``,
  ``reply``, ``sender``, ``recipient``, ``queue_id`` (None before DATA); ``reason`` is derived
  (``refusal_reason``);
- ``delivered``, ``deferred``, ``bounced``: one queued recipient's delivery attempt:
  ``queue_id``, ``recipient``, ``route`` (``local``, ``smarthost``, a configured next hop, or
  ``mx``), ``relay``, ``delay`` (seconds since arrival), ``attempts``, ``reply``;
- ``expired``: a deferred recipient given up: ``queue_id``, ``recipient``, ``reply``;
- ``worker_restart``: a worker process ended and is replaced: ``worker``, ``pid``, ``why``;
- ``milter``: reserved for milter verdicts: ``milter``, ``verdict``, ``queue_id``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger, LogLevel

FIELD = "mail_event"

CONNECT = "connect"
DISCONNECT = "disconnect"
LOGIN = "login"
ACCEPTED = "accepted"
STORED = "stored"
REFUSED = "refused"
DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"
EXPIRED = "expired"
WORKER_RESTART = "worker_restart"
MILTER = "milter"

NAMES = frozenset({CONNECT, DISCONNECT, LOGIN, ACCEPTED, STORED, REFUSED, DELIVERED, DEFERRED,
                   BOUNCED, EXPIRED, WORKER_RESTART, MILTER})

# the queue's recipient state after an attempt -> the event (store/envelope.py State values)
DELIVERY_EVENT = {"delivered": DELIVERED, "deferred": DEFERRED, "failed": BOUNCED,
                  "pending": DEFERRED}

# the fields a JSON line carries, in this order (others are left out: they are Twisted's)
_JSON_FIELDS = ("protocol", "listener", "client", "queue_id", "sender", "size", "recipients",
                "recipient", "mailboxes", "user", "method", "outcome", "delay", "command",
                "code", "enhanced", "reply", "reason", "route", "relay", "attempts",
                "retr_octets", "worker", "pid", "why", "milter", "verdict")
# every field the mail log reads from an event (a worker sends these to the main process)
EVENT_FIELDS = (FIELD, *_JSON_FIELDS)


def name_of(event: Mapping[str, Any]) -> str | None:
    """The event's ``mail_event`` name, or None for any other log event."""
    name = event.get(FIELD)
    return name if name in NAMES else None


def smtp_listener(mode: str) -> str:
    """The listener role of an SMTP factory ``mode`` (``mx`` is the ``smtp`` listener)."""
    return "smtp" if mode == "mx" else mode


def login_outcome(code: int | None, pop3_code: str | None = None) -> str:
    """A refused log-in's ``outcome`` from its reply: ``failed`` (535, ``[AUTH]``), ``in_use``
    (``[IN-USE]``), else ``unavailable`` (a temporary failure: 454, ``[SYS/TEMP]``)."""
    if code == 535 or pop3_code == "AUTH":
        return "failed"
    if pop3_code == "IN-USE":
        return "in_use"
    return "unavailable"


_REASONS = {
    ("RCPT", "5.1.1"): "unknown recipient",
    ("RCPT", "5.7.1"): "relay denied",
    ("RCPT", "5.2.2"): "over quota",
    ("DATA", "5.2.2"): "over quota",
    ("RCPT", "4.5.3"): "too many recipients",
    ("MAIL", "5.3.4"): "message too big",
    ("DATA", "5.3.4"): "message too big",
    ("MAIL", "5.7.1"): "wrong sender",
    ("MAIL", "5.7.0"): "AUTH required",
    ("DATA", "5.4.6"): "too many hops",
    ("MAIL", "4.4.3"): "directory unavailable",
    ("RCPT", "4.4.3"): "directory unavailable",
}


def refusal_reason(command: str, code: int, enhanced: str | None) -> str:
    """A short reason for a refusal, from the command and the reply codes (``relay denied``,
    ``over quota``, ``message too big``, ``wrong sender``, ``AUTH required`` ...)."""
    found = _REASONS.get((command, enhanced or ""))
    if found:
        return found
    if enhanced and enhanced.startswith("5.1.") or enhanced in ("5.6.7",):
        return "bad address"
    if enhanced == "5.5.2" or enhanced == "5.6.0":
        return "bad content"
    return "temporary failure" if 400 <= code < 500 else "refused"


def _when(event: Mapping[str, Any]) -> float:
    return float(event.get("log_time") or time.time())


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _addr(value: Any) -> str:
    return f"<{value or ''}>"


def _text_body(name: str, e: Mapping[str, Any]) -> str:
    """The part of a text line after the queue id (Postfix's maillog wording where it has one)."""
    client = f"[{e.get('client') or 'unknown'}]"
    proto = e.get("protocol") or "smtp"
    if name == CONNECT:
        return f"connect from {client} proto={proto} listener={e.get('listener') or '-'}"
    if name == DISCONNECT:
        extra = ""
        if proto == "pop3":
            extra = f" user={_addr(e.get('user')) if e.get('user') else '-'}" \
                    f" retr_octets={e.get('retr_octets') or 0}"
        return f"disconnect from {client} proto={proto} listener={e.get('listener') or '-'}{extra}"
    if name == LOGIN:
        return (f"login client={client} proto={proto} method={e.get('method') or '-'} "
                f"user={_addr(e.get('user'))} outcome={e.get('outcome')}"
                + (f" delay={float(e.get('delay') or 0):.2f}" if e.get("delay") else ""))
    if name == ACCEPTED:
        rcpts = ",".join(_addr(r) for r in e.get("recipients") or ())
        user = f" user={_addr(e.get('user'))}" if e.get("user") else ""
        return (f"accepted from={_addr(e.get('sender'))}, size={e.get('size')}, "
                f"nrcpt={len(e.get('recipients') or ())}, to={rcpts}, client={client}, "
                f"listener={e.get('listener') or '-'}{user}")
    if name == REFUSED:
        return (f"reject: {e.get('command')} from {client}: {e.get('code')} "
                f"{e.get('enhanced') or ''} {e.get('reply') or ''}; "
                f"reason=\"{e.get('reason') or ''}\" from={_addr(e.get('sender'))} "
                f"to={_addr(e.get('recipient'))} listener={e.get('listener') or '-'}")
    if name in (DELIVERED, DEFERRED, BOUNCED):
        status = {DELIVERED: "sent", DEFERRED: "deferred", BOUNCED: "bounced"}[name]
        return (f"to={_addr(e.get('recipient'))}, relay={e.get('relay') or e.get('route')}, "
                f"route={e.get('route')}, delay={float(e.get('delay') or 0):.1f}, "
                f"attempts={e.get('attempts') or 0}, status={status} ({e.get('reply') or ''})")
    if name == EXPIRED:
        return (f"to={_addr(e.get('recipient'))}, status=expired, returned to sender "
                f"(last reply: {e.get('reply') or 'none'})")
    if name == WORKER_RESTART:
        return f"worker {e.get('worker')} (pid {e.get('pid')}) ended ({e.get('why')}): restarted"
    if name == MILTER:
        return f"milter={e.get('milter')} verdict={e.get('verdict')}"
    return name


def expand(event: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The mail log entries of one event, as ``(name, fields)``: one, except ``stored``,
    which is one ``delivered`` entry per local mailbox (route ``local``); a ``refused`` entry
    gets its ``reason``."""
    name = name_of(event)
    if name is None:
        return []
    fields = {k: event[k] for k in _JSON_FIELDS if k in event and event[k] is not None}
    if isinstance(fields.get("delay"), float):
        fields["delay"] = round(fields["delay"], 3)
    if event.get("queue_id"):
        fields["queue_id"] = event["queue_id"]
    if name == STORED:
        out = []
        for box in event.get("mailboxes") or ():
            out.append((DELIVERED, {"queue_id": event.get("queue_id"), "recipient": box,
                                    "route": "local", "relay": "local", "delay": 0.0,
                                    "attempts": 1, "reply": "250 2.0.0 delivered to mailbox"}))
        return out
    if name == REFUSED:
        fields["reason"] = refusal_reason(str(event.get("command") or ""),
                                          int(event.get("code") or 0), event.get("enhanced"))
    return [(name, fields)]


HOST = socket.gethostname()


def format_text(name: str, fields: Mapping[str, Any], when: float, pid: int | None = None) -> str:
    """One text line, greppable as Postfix's maillog: time, host, ``pop3coexist[pid]:``, the
    queue id (``NOQUEUE`` when there is none yet), then the event."""
    qid = fields.get("queue_id") or "NOQUEUE"
    proc = f"pop3coexist[{pid}]" if pid else "pop3coexist"
    return f"{_iso(when)} {HOST} {proc}: {qid}: {_text_body(name, fields)}"


def format_json(name: str, fields: Mapping[str, Any], when: float, pid: int | None = None) -> str:
    """One JSON object on one line: ``time`` (ISO 8601 UTC), ``event``, ``queue_id``, and the
    event's fields (``recipients`` a list, numbers as numbers)."""
    record: dict[str, Any] = {"time": _iso(when), "host": HOST, "event": name}
    if pid:
        record["pid"] = pid
    record["queue_id"] = fields.get("queue_id")
    for k, v in fields.items():
        if k != "queue_id":
            record[k] = list(v) if isinstance(v, (list, tuple)) else v
    return json.dumps(record, separators=(",", ":"), default=str)


def event_time(event: Mapping[str, Any]) -> float:
    """The event's time (Unix seconds): ``log_time``, or now."""
    return _when(event)


# ------------------------------------------------------------------ a cheaper Logger (issue 17)

_LEVELS = frozenset(LogLevel.iterconstants())


class FastLogger(Logger):
    """``twisted.logger.Logger`` for the loggers every SMTP session and message use (session,
    mail events, delivery stages): the same events to the same observer, but ``emit`` checks
    the level against a set made once, where Twisted's sorts ``LogLevel``'s constants at each
    call (3.5 -> 1.6 us per event). An unknown level takes Twisted's own ``emit`` (which
    reports it)."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:  # noqa: A002
        """See ``twisted.logger.Logger.emit``."""
        if level not in _LEVELS:
            Logger.emit(self, level, format, **kwargs)
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)
