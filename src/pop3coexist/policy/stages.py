"""The declared stages a message passes after DATA, and their one outcome vocabulary.

When the client's DATA has ended and the message is in its spool file, the delivery
transaction (policy/delivery.py) runs these stages, in this order, over one ``Message``:

1. **recipient expansion** (``ExpandRecipients``): may replace a recipient by others (aliases,
   distribution lists) or add recipients. Empty for now.
2. **content check** (``CheckContent``): may refuse or defer the whole message, or refuse
   single recipients (milters, virus and spam checks). Empty for now.
3. **per-recipient rules** (``RecipientRules``): may refuse or defer single recipients
   (per-mailbox rules). Empty for now.
4. **commit** (``CommitStage``): makes the message durable in its local mailboxes and the
   outbound queue through an ``ICommitter`` (``smtp.incoming.GroupCommitter``: batches, hard
   links, the quota check under flock, Return-Path, the delivery reports of full mailboxes).
   It always runs last and is the stage that accepts.

Outcomes (Haraka's small vocabulary), returned by a stage for the whole message as a
``Verdict``, or set on one ``Recipient`` (``Message.decide``):

- ``CONTINUE``: no objection; the next stage runs;
- ``ACCEPT``: the message is taken (stored, queued, or deliberately dropped); no later stage
  runs, the client gets 250. Only the commit stage accepts today;
- ``REFUSE``: refused permanently (5xx); ``DEFER``: refused temporarily (4xx, try again).

Failure semantics: a whole-message REFUSE or DEFER ends the run at once; nothing is stored (the
spool file is removed) and the client gets that verdict's reply. A recipient refused or deferred
by a stage before the commit leaves the message and is not delivered; when none is left, the
message gets the first such verdict's reply. A stage that raises ``MailError`` gives that
reply (REFUSE or DEFER by its code); any other exception is logged and is a DEFER with
``451 4.3.0``. The commit stage answers ``552 5.2.2`` when every local mailbox is full and
nothing else was stored (``errors.QuotaExceeded``), ``451 4.3.0`` when the store or the queue
failed; a mailbox whose quota refused the message while others got it is a per-recipient
REFUSE (552 5.2.2), its delivery report already queued.

What a stage may change: the recipients (expansion only adds or replaces; later stages only
refuse), each recipient's DSN entry (``address``, ``orcpt``, ``notify``), and the message's
header section and body through ``Message``'s edit methods (``content``, ``prepend_header``,
``add_header``, ``insert_header``, ``change_header``, ``remove_headers``, ``replace_body``,
``replace_content``; pure edits in ``pop3coexist.headers``): each edit rewrites the spool file
at once (the local-only ``Return-Path`` stays in front), so the next stage and the commit see
it, and ``size`` follows. A stage that edits should batch its edits into one
``replace_content`` when it makes several (a milter's end-of-message actions). The sender and
the queue id never change.

``run_stages`` returns the per-recipient results: ``{recipient address: Verdict}``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import threads
from twisted.logger import Logger

from pop3coexist import headers
from pop3coexist.errors import MailError, QuotaExceeded, StorageFull, disk_full
from pop3coexist.interfaces import LocalNotes

log = Logger(namespace="pop3coexist.smtp.server")


class Outcome(enum.Enum):
    """What a stage says of the message or of one recipient (Haraka's vocabulary)."""

    ACCEPT = "accept"
    REFUSE = "refuse"  # permanently: 5xx
    DEFER = "defer"  # temporarily: 4xx
    CONTINUE = "continue"


@dataclass(frozen=True)
class Verdict:
    """An outcome; ``error`` is the reply of a REFUSE or DEFER."""

    outcome: Outcome
    error: MailError | None = None

    @classmethod
    def refusal(cls, error: MailError) -> Verdict:
        """REFUSE or DEFER, as ``error``'s code says (4xx: DEFER)."""
        return cls(Outcome.DEFER if error.temporary else Outcome.REFUSE, error)

    @property
    def refused(self) -> bool:
        return self.outcome in (Outcome.REFUSE, Outcome.DEFER)


CONTINUE = Verdict(Outcome.CONTINUE)
ACCEPT = Verdict(Outcome.ACCEPT)
BIG_MESSAGE = 1 << 20  # octets: a message bigger than this is read and rewritten in a thread
LOCAL_ERROR = "Local error in processing; message not accepted, try again later"


@dataclass
class Recipient:
    """One recipient of the message: its DSN entry ``{"address", "orcpt", "notify"}`` (as the
    queue and the delivery reports keep it), its mailbox ``(domain, box)`` here or None for the
    outbound queue, and the verdict stages gave it."""

    entry: dict
    mailbox: tuple[str, str] | None = None
    verdict: Verdict = CONTINUE

    @property
    def address(self) -> str:
        return str(self.entry["address"])


@dataclass
class Message:
    """What the stages see: the envelope, the spool file (``smtp.incoming.SpoolWriter``) and
    what the queue and the reports need (``hops``: Received fields + 1; ``arrival``: unix
    time; ``received_from``: ``"helo ([ip])"``)."""

    queue_id: str
    spool: Any
    sender: str  # "" for <>
    recipients: list[Recipient]
    size: int = 0
    hops: int = 1
    arrival: float = 0.0
    received_from: str = ""
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    reporting_mta: str = ""
    dropped: list[Recipient] = field(default_factory=list)  # refused by a stage

    def decide(self, recipient: Recipient, verdict: Verdict) -> None:
        """Give one recipient a verdict (a REFUSE or DEFER takes it out after the stage)."""
        recipient.verdict = verdict

    # -- the message's bytes (the spool provides ``interfaces.ISpool``)

    async def content(self) -> bytes:
        """The message as it stands now (LF line ends, without the local-only Return-Path);
        a message already on disk is read in a thread. Raises OSError."""
        if self.spool.size > BIG_MESSAGE:
            return await threads.deferToThread(self.spool.read)
        return self.spool.read()

    async def replace_content(self, data: bytes) -> None:
        """Make ``data`` the message (LF line ends); ``size`` follows. Raises OSError."""
        if len(data) > BIG_MESSAGE or self.spool.size > BIG_MESSAGE:
            await threads.deferToThread(self.spool.replace, data)
        else:
            self.spool.replace(data)
        self.size = len(data) + data.count(b"\n") - data.count(b"\r\n")  # CRLF octets

    async def _edit(self, change: Callable[[bytes], bytes]) -> None:
        data = await self.content()
        edited = change(data)
        if edited != data:
            await self.replace_content(edited)

    async def prepend_header(self, name: str, value: str) -> None:
        """Add a field at the top (trace fields, RFC 8601 ``Authentication-Results``)."""
        await self._edit(lambda m: headers.prepend_header(m, name, value))

    async def add_header(self, name: str, value: str) -> None:
        """Add a field after the last one (milter add header)."""
        await self._edit(lambda m: headers.add_header(m, name, value))

    async def insert_header(self, index: int, name: str, value: str) -> None:
        """Add a field at position ``index`` from 0 (milter insert header)."""
        await self._edit(lambda m: headers.insert_header(m, index, name, value))

    async def change_header(self, name: str, occurrence: int, value: str | None) -> None:
        """Set (or, with None, delete) the ``occurrence``-th field ``name``, from 1 (milter
        change header)."""
        await self._edit(lambda m: headers.change_header(m, name, occurrence, value))

    async def remove_headers(self, name: str,
                             where: Callable[[str], bool] | None = None) -> None:
        """Remove the fields ``name`` whose unfolded value ``where`` accepts (all: None)."""
        await self._edit(lambda m: headers.remove_headers(m, name, where))

    async def replace_body(self, body: bytes) -> None:
        """Keep the header section, replace the body (milter replace body)."""
        await self._edit(lambda m: headers.replace_body(m, body))


class Stage(Protocol):
    """One stage: ``name`` for the logs; called with the message, returns its Verdict."""

    name: str

    async def __call__(self, message: Message) -> Verdict: ...


class ExpandRecipients:
    """Stage 1: recipient expansion (aliases and lists join here). Empty for now."""

    name = "recipient expansion"

    async def __call__(self, message: Message) -> Verdict:
        return CONTINUE


class CheckContent:
    """Stage 2: content check (milters join here). Empty for now."""

    name = "content check"

    async def __call__(self, message: Message) -> Verdict:
        return CONTINUE


class RecipientRules:
    """Stage 3: per-recipient rules. Empty for now."""

    name = "per-recipient rules"

    async def __call__(self, message: Message) -> Verdict:
        return CONTINUE


class CommitStage:
    """Stage 4: durable in the local mailboxes and the outbound queue (an ``ICommitter``)."""

    name = "commit"

    def __init__(self, committer: Any) -> None:
        self.committer = committer

    async def __call__(self, message: Message) -> Verdict:
        local = [r for r in message.recipients if r.mailbox is not None]
        remote = [r.entry for r in message.recipients if r.mailbox is None]
        envelope = None
        if remote:
            envelope = {
                "sender": message.sender,
                "recipients": remote,
                "ret": message.ret,
                "envid": message.envid,
                "body": message.body,
                "received_from": message.received_from,
                "arrival": message.arrival,
                "hops": message.hops,
            }
        notes = LocalNotes(
            sender=message.sender,
            recipients={r.mailbox: r.entry for r in local},  # type: ignore[misc]
            reporting_mta=message.reporting_mta,
            ret=message.ret,
            envid=message.envid,
            arrival=message.arrival,
            received_from=message.received_from,
        )
        try:
            refused = await self.committer.commit(  # group commit
                message.spool, [r.mailbox for r in local], envelope, notes)
        except QuotaExceeded as e:
            # every recipient's mailbox is full: nothing was stored (RFC 3463 5.2.2)
            log.info("SMTP {id} refused: {why}", id=message.queue_id, why=str(e))
            return Verdict.refusal(e)
        except Exception as e:
            if disk_full(e):  # 452 4.3.1: the client tries again later (issue 16 item 2)
                log.error("SMTP {id} not stored: the state file system is full ({why})",
                          id=message.queue_id, why=str(e))
                return Verdict.refusal(StorageFull(str(e)))
            log.failure("SMTP {id}: could not store the message", id=message.queue_id)
            return Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))
        full = set(refused or ())
        for r in local:
            if r.mailbox in full:  # its "failed" delivery report is queued
                message.decide(r, Verdict.refusal(QuotaExceeded()))
        return ACCEPT


def default_stages(committer: Any) -> list[Stage]:
    """The stages in their declared order (see the module docstring)."""
    return [ExpandRecipients(), CheckContent(), RecipientRules(), CommitStage(committer)]


async def run_stages(message: Message, stages: Sequence[Stage]) -> dict[str, Verdict]:
    """Run ``stages`` over ``message`` (see the module docstring); return the per-recipient
    results, or raise the MailError of a whole-message refusal (nothing is stored then)."""
    everyone = list(message.recipients)
    for stage in stages:
        try:
            verdict = await stage(message)
        except MailError as e:
            verdict = Verdict.refusal(e)
        except Exception:
            log.failure("SMTP {id}: stage {stage} failed", id=message.queue_id, stage=stage.name)
            verdict = Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))
        if verdict.outcome is Outcome.ACCEPT:
            break
        gone = [r for r in message.recipients if r.verdict.refused]
        if gone:
            message.dropped.extend(gone)
            message.recipients = [r for r in message.recipients if not r.verdict.refused]
        if verdict.refused or not message.recipients:
            message.spool.abort()
            error = verdict.error if verdict.refused else message.dropped[0].verdict.error
            assert error is not None
            raise error
    return {r.address: (r.verdict if r.verdict.refused else ACCEPT) for r in everyone}
