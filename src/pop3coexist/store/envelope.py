"""The outbound queue's typed state: ``Envelope``, ``Recipient``, the recipient ``State`` and the
``Notice`` a recipient is still owed, and their JSON form (``queue/env/<id>.json``, written and
read by store/queue.py). No I/O.

The JSON form (``version`` 1) is an object with ``id``, ``sender`` (``""`` for the null sender),
``ret``, ``envid``, ``body`` (the ESMTP parameters, RFC 3461 / RFC 6152), ``received_from``,
``arrival`` and ``queued`` (Unix seconds), ``hops``, ``size`` (octets of the stored body) and
``recipients``: objects with ``address``, ``orcpt``, ``notify`` (upper-case NOTIFY keywords or
null), ``state``, ``attempts``, ``last_reply``, ``last_attempt``, ``next_attempt``,
``remote_mta``, ``status`` (RFC 3463), ``notice``, ``delay_notified`` and, from the first
delivery attempt on, ``diagnostic`` and ``will_retry_until``.

The JSON is the one the queue wrote before it had types, key for key, so that files written
before load and files written now are read by either: loading a file and saving it again
changes no byte. To that end keys the types do not know are kept (``extra``) and written back;
a key absent from a file stays absent until it is assigned; values are kept as read (an integer
time stays an integer) and converted where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

ENVELOPE_VERSION = 1


class State(StrEnum):
    """Where a recipient stands. ``pending``: not tried yet; ``deferred``: a temporary failure,
    waiting for ``next_attempt``; ``delivered`` and ``failed`` are final."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (State.DELIVERED, State.FAILED)


class Notice(StrEnum):
    """The delivery report (RFC 3464 ``Action``) still to be queued for a recipient; cleared
    once the report is itself queued."""

    FAILED = "failed"
    DELAYED = "delayed"
    RELAYED = "relayed"
    DELIVERED = "delivered"


class _Record:
    """Tracks which modelled keys a record's JSON lacks, so that saving writes them only once
    they were assigned (see the module docstring)."""

    _LATE: ClassVar[tuple[str, ...]] = ()  # keys a new record leaves out until assigned
    _absent: set[str]

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        absent = self.__dict__.get("_absent")
        if absent is not None:
            absent.discard(name)

    def _start_tracking(self, absent: set[str]) -> None:
        object.__setattr__(self, "_absent", absent)

    def _json_fields(self, names: tuple[str, ...]) -> dict[str, Any]:
        out = dict(self.extra)  # type: ignore[attr-defined]
        for name in names:
            if name not in self._absent:
                out[name] = getattr(self, name)
        return out


_RCPT_KEYS = ("address", "orcpt", "notify", "state", "attempts", "last_reply", "last_attempt",
              "next_attempt", "remote_mta", "status", "notice", "delay_notified", "diagnostic",
              "will_retry_until")


@dataclass(eq=True)
class Recipient(_Record):
    """One recipient of a queued message and its delivery state.

    ``orcpt``: the ORCPT as the ESMTP server stores it (``type;address``, decoded);
    ``notify``: NOTIFY keywords (RFC 3461 section 4.1) or None (not given);
    ``attempts``: delivery attempts so far; ``last_reply``: the last reply line about it
    (``"451 4.3.0 ..."``); ``last_attempt`` / ``next_attempt``: Unix seconds (``next_attempt``
    is None once final); ``remote_mta``: the host that gave the last reply (None when the reply
    is ours); ``status``: its RFC 3463 code; ``diagnostic``: a DSN Diagnostic-Code that
    replaces the one derived from ``last_reply``; ``will_retry_until``: Unix seconds, for a
    delay report.
    """

    address: str
    orcpt: str | None = None
    notify: list[str] | None = None
    state: State = State.PENDING
    attempts: int = 0
    last_reply: str | None = None
    last_attempt: float | None = None
    next_attempt: float | None = 0.0
    remote_mta: str | None = None
    status: str | None = None
    notice: Notice | None = None
    delay_notified: bool = False
    diagnostic: str | None = None
    will_retry_until: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    _LATE: ClassVar[tuple[str, ...]] = ("diagnostic", "will_retry_until")

    def __post_init__(self) -> None:
        self._start_tracking({k for k in self._LATE if getattr(self, k) is None})

    @property
    def due(self) -> bool:
        """Not final yet: pending or deferred."""
        return self.state in (State.PENDING, State.DEFERRED)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (enums as their strings)."""
        out = self._json_fields(_RCPT_KEYS)
        out["state"] = str(self.state)
        if "notice" in out and out["notice"] is not None:
            out["notice"] = str(self.notice)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Recipient:
        """A recipient from its JSON object; ValueError if it is not one (no address, an
        unknown state or notice)."""
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise ValueError(f"bad recipient {data!r}")
        try:
            state = State(data.get("state"))
            notice = None if data.get("notice") is None else Notice(data["notice"])
        except ValueError as e:
            raise ValueError(f"recipient {data['address']}: {e}") from None
        known = {k: data[k] for k in _RCPT_KEYS if k in data}
        known.update(state=state, notice=notice)
        rcpt = cls(**known, extra={k: v for k, v in data.items() if k not in _RCPT_KEYS})
        rcpt._start_tracking({k for k in _RCPT_KEYS if k not in data})
        return rcpt


_ENV_KEYS = ("version", "id", "sender", "ret", "envid", "body", "received_from", "arrival",
             "queued", "hops", "size", "recipients")


@dataclass(eq=True)
class Envelope(_Record):
    """A queued message: who sent it, its ESMTP parameters and its recipients.

    ``ret`` (``FULL`` / ``HDRS``), ``envid`` (RFC 3461), ``body`` (``7BIT`` / ``8BITMIME``,
    RFC 6152) as given at MAIL FROM, or None; ``received_from``: the client, for reports;
    ``arrival``: when the message was received and ``queued``: when it was queued (Unix
    seconds); ``hops``: Received fields counted; ``size``: octets of the stored body.
    """

    id: str
    sender: str
    recipients: list[Recipient]
    version: int = ENVELOPE_VERSION
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    received_from: str = ""
    arrival: float = 0.0
    queued: float = 0.0
    hops: int = 0
    size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._start_tracking(set())

    def due_time(self) -> float | None:
        """When this message next needs work (Unix seconds; 0.0: now), or None when it is
        finished: a report still owed is due now, a pending recipient too, a deferred one at
        its ``next_attempt``."""
        times = []
        for r in self.recipients:
            if r.notice:
                return 0.0
            if r.state == State.PENDING:
                times.append(0.0)
            elif r.state == State.DEFERRED:
                times.append(float(r.next_attempt or 0.0))
        return min(times) if times else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out = self._json_fields(_ENV_KEYS)
        if "recipients" in out:
            out["recipients"] = [r.to_json() for r in self.recipients]
        return out

    @classmethod
    def from_json(cls, data: Any) -> Envelope:
        """An envelope from its JSON object; ValueError if it is not one (no id, no sender, a
        bad recipient)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if not isinstance(data.get("id"), str):
            raise ValueError("no id")
        if not isinstance(data.get("sender"), str):
            raise ValueError("no sender")
        if not isinstance(data.get("recipients"), list):
            raise ValueError("no recipients")
        known = {k: data[k] for k in _ENV_KEYS if k in data}
        known["recipients"] = [Recipient.from_json(r) for r in data["recipients"]]
        env = cls(**known, extra={k: v for k, v in data.items() if k not in _ENV_KEYS})
        env._start_tracking({k for k in _ENV_KEYS if k not in data})
        return env
