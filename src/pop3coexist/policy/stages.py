"""The declared stages a message passes after DATA, and their one outcome vocabulary.

When the client's DATA has ended and the message is in its spool file, the delivery
transaction (policy/delivery.py) runs these stages, in this order, over one ``Message``:

1. **recipient expansion** (``ExpandRecipients``): replaces each recipient that RCPT accepted
   as an alias, list or directory group (``Recipient.expand``) by the mailboxes and outside
   addresses it stands for (``policy.expansion``), each mailbox and address once per message;
   a list's members get the list copy (``Recipient.copy``: List-Id, the owner as envelope
   sender). A message left with no recipient (an empty list) is accepted and dropped.
2. **sender authentication** (``CheckAuthentication``): for mail from outside (neither logged
   in nor from ``relay.networks``), SPF, DKIM and DMARC through an ``ISenderVerifier``
   (mailauth/verify.py does the DNS look-ups); removes the ``Authentication-Results`` fields
   that carry our authserv-id and adds ours on top (RFC 8601 sections 5 and 7); refuses the
   message with ``550 5.7.1`` when DMARC fails under the sender domain's ``p=reject`` and
   ``sender_authentication.dmarc_reject = "reject"``. Continues at once when
   ``[sender_authentication]`` is off.
3. **content check** (``CheckContent``): the milters' message steps (``interfaces.IContentFilter``:
   DATA, headers, end of headers, body, end of message) and what their verdict asks
   (``policy.content.FilterOutcomes``): refuse or defer the whole message, accept it while
   dropping it (discard) or holding it (quarantine), edit its header section and body, add or
   delete recipients. Empty when no milter is configured for the listener.
4. **per-recipient rules** (``RecipientRules``): each mailbox's Sieve script
   (``policy.rules``): may refuse single recipients (reject), drop them (discard: accepted,
   not stored), queue copies (redirect, vacation); ACCEPT when nothing is left to store.
5. **commit** (``CommitStage``): makes the message durable in its local mailboxes and the
   outbound queue through an ``ICommitter`` (``smtp.incoming.GroupCommitter``: batches, hard
   links, the quota check under flock, Return-Path, the delivery reports of full mailboxes).
   It always runs last and is the stage that accepts. The queue's envelope says whether the
   message comes from inside (``"inside"``): only such mail is DKIM-signed when it is
   queued (policy/dkimsign.py). A list copy is another spool file (``ICopyCommitter.copy``:
   its Return-Path and List-Id in front) committed beside the message; while list copies
   exist, a full mailbox (of a member or not) never refuses the whole message: its "failed"
   report goes to that copy's envelope sender.

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

What a stage may change: the recipients (expansion only adds or replaces; the content check
adds and deletes what a milter asks; later stages only refuse; a store or queue failure after
some copies were stored is a 451 for the whole message, so a retry may store a copy twice,
never lose one), each recipient's DSN entry (``address``, ``orcpt``, ``notify``), and the message's
header section and body through ``Message``'s edit methods (``content``, ``prepend_header``,
``add_header``, ``insert_header``, ``change_header``, ``remove_headers``, ``replace_body``,
``replace_content``; pure edits in ``pop3coexist.headers``): each edit rewrites the spool file
at once (the local-only ``Return-Path`` stays in front), so the next stage and the commit see
it, and ``size`` follows. A stage that edits should batch its edits into one
``replace_content`` when it makes several (a milter's end-of-message actions). The sender and
the queue id never change. The list copies are made from the spool file at commit time, so
they carry every edit of the earlier stages.

``run_stages`` returns the per-recipient results: ``{recipient address: Verdict}``.
``start_stages`` gives them as a Deferred: when every stage before the commit is idle for the
message (each stage's ``idle``), the commit's Deferred carries the run with plain callbacks
through the same steps, else ``run_stages`` runs as a coroutine (issue 17: CPU per message).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from pop3coexist import headers
from pop3coexist.errors import (
    AuthUnavailable,
    DirectoryUnavailable,
    MailError,
    QuotaExceeded,
    StorageFull,
    disk_full,
)
from pop3coexist.events import FastLogger
from pop3coexist.interfaces import (
    Distribution,
    ICopyCommitter,
    IIdleRules,
    LocalNotes,
    SMTPSession,
)
from pop3coexist.policy import authresults
from pop3coexist.policy.expansion import ListCopy

log = FastLogger(namespace="pop3coexist.smtp.server")


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
    outbound queue, and the verdict stages gave it. ``expand``: the alias, list or group RCPT
    accepted (the expansion stage replaces it); ``copy``: the list copy this recipient gets,
    or None for the message as it came."""

    entry: dict
    mailbox: tuple[str, str] | None = None
    verdict: Verdict = CONTINUE
    expand: Distribution | None = None
    copy: ListCopy | None = None

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
    session: SMTPSession | None = None  # the client's address, EHLO name, listener
    user: str | None = None  # the account the client logged in as (SMTP AUTH), or None

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
    """Stage 1: recipient expansion (module docstring). ``expander``: a
    ``policy.expansion.Expander``; None expands nothing (no aliases anywhere)."""

    name = "recipient expansion"

    def __init__(self, expander: Any = None) -> None:
        self.expander = expander

    def idle(self, message: Message) -> bool:
        """True when this stage would CONTINUE at once, touching nothing (no recipient to
        expand)."""
        return self.expander is None or all(r.expand is None for r in message.recipients)

    async def __call__(self, message: Message) -> Verdict:
        if self.idle(message):
            return CONTINUE
        kept = [r for r in message.recipients if r.expand is None]
        boxes = {r.mailbox for r in kept if r.mailbox is not None}
        remote = {r.address.lower() for r in kept if r.mailbox is None}
        added: list[Recipient] = []
        try:
            domains = await self.expander.domains()
            for r in message.recipients:
                if r.expand is None:
                    continue
                parts = await self.expander.expand(r.expand, domains)
                n = 0
                for part in parts:
                    if part.copy is None:  # an alias: the DSN entry of the RCPT goes along
                        extra = {"orcpt": r.entry.get("orcpt") or f"rfc822;{r.address}",
                                 "notify": r.entry.get("notify")}
                    else:  # a list copy: a new envelope (RFC 3461 section 6.2.7.2)
                        extra = {"orcpt": None, "notify": None}
                    for domain, box, named in part.local:
                        if (domain, box) in boxes:
                            continue
                        boxes.add((domain, box))
                        added.append(Recipient({"address": named, **extra}, (domain, box),
                                               copy=part.copy))
                        n += 1
                    for address in part.remote:
                        if address in remote:
                            continue
                        remote.add(address)
                        added.append(Recipient({"address": address, **extra}, copy=part.copy))
                        n += 1
                log.info("SMTP {id}: <{a}> ({kind}) expanded to {n} recipient(s)",
                         id=message.queue_id, a=r.expand.address, kind=r.expand.kind, n=n)
        except AuthUnavailable:
            raise DirectoryUnavailable() from None
        message.recipients = kept + added
        if not message.recipients:
            log.info("SMTP {id}: nobody to deliver to after expansion (an empty list); dropped",
                     id=message.queue_id)
            message.spool.abort()
            return ACCEPT
        return CONTINUE


def from_inside(message: Message, trusted: Callable[[str], bool] | None) -> bool:
    """True when ``message`` comes from inside: a logged-in client, or a client address that
    ``trusted`` accepts (``relay.networks``). Without a session (a test's message) it is
    outside only when ``trusted`` is given."""
    if message.user is not None:
        return True
    if message.session is None or trusted is None:
        return trusted is None
    return bool(trusted(message.session.client_ip))


class CheckAuthentication:
    """Stage 2: sender authentication (module docstring). ``verifier`` provides
    ``interfaces.ISenderVerifier``; ``trusted(ip)`` says whether a client address is inside;
    ``authserv_id`` names us in the field; ``dmarc_reject``: ``"reject"`` or ``"mark"``."""

    name = "sender authentication"

    def __init__(self, verifier: Any, trusted: Callable[[str], bool], authserv_id: str,
                 dmarc_reject: str = "reject") -> None:
        self.verifier = verifier
        self.trusted = trusted
        self.authserv_id = authserv_id
        self.dmarc_reject = dmarc_reject

    def idle(self, message: Message) -> bool:
        """True when this stage would CONTINUE at once, touching nothing (mail from inside)."""
        return message.session is None or from_inside(message, self.trusted)

    async def __call__(self, message: Message) -> Verdict:
        session = message.session
        if session is None or from_inside(message, self.trusted):
            return CONTINUE
        data = await message.content()
        found = await self.verifier.verify(data, session.client_ip, session.helo,
                                           message.sender)
        ours = authresults.format_value(self.authserv_id, found)
        edited = headers.remove_headers(
            data, authresults.FIELD, lambda v: authresults.names_us(v, self.authserv_id))
        if edited != data:
            log.info("SMTP {id}: removed an Authentication-Results field naming us from "
                     "outside", id=message.queue_id)
        await message.replace_content(headers.prepend_header(edited, authresults.FIELD, ours))
        log.info("SMTP {id}: {results}", id=message.queue_id,
                 results="; ".join(authresults.resinfo(r)
                                   for r in (found.spf, *found.dkim, found.dmarc)))
        if (found.dmarc.result == "fail" and found.dmarc_policy == "reject"
                and self.dmarc_reject == "reject"):
            return Verdict.refusal(MailError(
                550, "5.7.1", f"Message rejected: the DMARC policy of {found.dmarc_domain} "
                "asks to reject mail that fails its checks"))
        return CONTINUE


class CheckContent:
    """Stage 3: content check. ``content_filter``: the session's ``IContentFilter`` (the
    milters), None for none; ``outcomes``: a ``policy.content.FilterOutcomes`` that applies
    its verdict."""

    name = "content check"

    def __init__(self, content_filter: Any = None, outcomes: Any = None) -> None:
        self.content_filter = content_filter
        self.outcomes = outcomes

    def idle(self, message: Message) -> bool:
        """True when this stage would CONTINUE at once, touching nothing (no milter)."""
        return self.content_filter is None

    async def __call__(self, message: Message) -> Verdict:
        if self.content_filter is None:
            return CONTINUE
        result = await self.content_filter.check(message)
        return await self.outcomes.apply(message, result)


class RecipientRules:
    """Stage 4: per-recipient rules: each mailbox's Sieve script (``policy.rules.SieveRules``,
    an ``IMailboxRules``; None: no rules). It may refuse single recipients (reject), take
    them out of the message (discard: they count as accepted), queue copies (redirect,
    vacation), or ACCEPT when nothing is left to store."""

    name = "per-recipient rules"

    def __init__(self, rules: Any = None) -> None:
        self.rules = rules

    def idle(self, message: Message) -> bool:
        """True when this stage would CONTINUE at once, touching nothing: no rules, or rules
        that say so for ``message`` (``IIdleRules``: no local recipient, or only mailboxes
        known to have no script)."""
        rules = self.rules
        return rules is None or (IIdleRules.providedBy(rules) and rules.idle(message))

    async def __call__(self, message: Message) -> Verdict:
        if self.rules is None:
            return CONTINUE
        return await self.rules.apply(message)


class CommitStage:
    """Stage 5: durable in the local mailboxes and the outbound queue (an ``ICommitter``).
    ``trusted(ip)`` (``relay.networks``) decides the envelope's ``"inside"``."""

    name = "commit"

    def __init__(self, committer: Any, trusted: Callable[[str], bool] | None = None) -> None:
        self.committer = committer
        self.trusted = trusted

    def _envelope(self, message: Message, sender: str,
                  rcpts: list[Recipient]) -> tuple[dict | None, LocalNotes]:
        """The queue envelope (None: no outside recipient) and the report notes of one copy."""
        local = [r for r in rcpts if r.mailbox is not None]
        remote = [r.entry for r in rcpts if r.mailbox is None]
        envelope = None
        if remote:
            envelope = {
                "sender": sender,
                "recipients": remote,
                "ret": message.ret,
                "envid": message.envid,
                "body": message.body,
                "received_from": message.received_from,
                "arrival": message.arrival,
                "hops": message.hops,
                "inside": from_inside(message, self.trusted),
                "id": message.queue_id,  # the queue keeps the id the client was told
            }
        notes = LocalNotes(
            sender=sender,
            recipients={r.mailbox: r.entry for r in local},  # type: ignore[misc]
            reporting_mta=message.reporting_mta,
            ret=message.ret,
            envid=message.envid,
            arrival=message.arrival,
            received_from=message.received_from,
        )
        return envelope, notes

    async def __call__(self, message: Message) -> Verdict:
        if any(r.copy is not None for r in message.recipients):
            return await self._with_copies(message)
        local, d = self._begin(message)
        try:
            refused = await d
        except Exception:
            return self._failed(Failure(), message)
        return self._stored(refused, message, local)

    def _begin(self, message: Message) -> tuple[list[Recipient], defer.Deferred]:
        """Hand the message (no list copies) to the group commit: (its local recipients, the
        committer's Deferred; a commit that raised at once is that Deferred's failure)."""
        local = [r for r in message.recipients if r.mailbox is not None]
        envelope, notes = self._envelope(message, message.sender, message.recipients)
        try:
            d = self.committer.commit(  # group commit
                message.spool, [r.mailbox for r in local], envelope, notes)
        except Exception:
            d = defer.fail()
        return local, d

    def _failed(self, failure: Failure, message: Message) -> Verdict:
        """The verdict of a commit that failed with ``failure``."""
        e = failure.value
        if isinstance(e, QuotaExceeded):
            # every recipient's mailbox is full: nothing was stored (RFC 3463 5.2.2)
            log.info("SMTP {id} refused: {why}", id=message.queue_id, why=str(e))
            return Verdict.refusal(e)
        if not isinstance(e, Exception):  # as ``except Exception``: not ours to answer
            failure.raiseException()
        if disk_full(e):  # 452 4.3.1: the client tries again later (issue 16 item 2)
            log.error("SMTP {id} not stored: the state file system is full ({why})",
                      id=message.queue_id, why=str(e))
            return Verdict.refusal(StorageFull(str(e)))
        log.failure("SMTP {id}: could not store the message", failure, id=message.queue_id)
        return Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))

    def _stored(self, refused: Any, message: Message, local: list[Recipient]) -> Verdict:
        """The verdict once the committer stored the message (``refused``: the full local
        mailboxes, whose delivery reports are queued)."""
        full = set(refused or ())
        if local:  # a message only relayed is stored in no mailbox: no line (issue 17)
            log.debug("SMTP {queue_id} stored in {mailboxes}", mail_event="stored", queue_id=message.queue_id, arrival=message.arrival, mailboxes=[r.address for r in local if r.mailbox not in full])  # noqa: E501
        for r in local:
            if r.mailbox in full:  # its "failed" delivery report is queued
                message.decide(r, Verdict.refusal(QuotaExceeded()))
        return ACCEPT

    async def _with_copies(self, message: Message) -> Verdict:
        """The message and its list copies: every copy's spool file is made first (from the
        message's), then all are committed together; a full mailbox is reported, never a
        whole-message refusal (``ICopyCommitter.commit_copy``)."""
        committer = self.committer
        if not ICopyCommitter.providedBy(committer):
            log.error("SMTP {id}: list copies need an ICopyCommitter", id=message.queue_id)
            message.spool.abort()
            return Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))
        groups: dict[ListCopy | None, list[Recipient]] = {}
        for r in message.recipients:
            groups.setdefault(r.copy, []).append(r)
        jobs = []
        made: list[Any] = []
        try:
            for copy, rcpts in groups.items():
                if copy is None:
                    continue
                spool = await committer.copy(message.spool, copy.sender, copy.header)
                made.append(spool)
                envelope, notes = self._envelope(message, copy.sender, rcpts)
                jobs.append((rcpts, committer.commit_copy(
                    spool, [r.mailbox for r in rcpts if r.mailbox is not None], envelope, notes)))
            main = groups.get(None)
            if main:
                envelope, notes = self._envelope(message, message.sender, main)
                jobs.append((main, committer.commit_copy(
                    message.spool, [r.mailbox for r in main if r.mailbox is not None],
                    envelope, notes)))
            else:
                message.spool.abort()
            results = await defer.gatherResults([d for _, d in jobs], consumeErrors=True)
        except Exception:
            log.failure("SMTP {id}: could not store the message and its list copies",
                        id=message.queue_id)
            for spool in (message.spool, *made):
                spool.abort()
            return Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))
        for (rcpts, _), refused in zip(jobs, results, strict=True):
            full = set(refused or ())
            for r in rcpts:
                if r.mailbox in full:  # its "failed" report is queued to the copy's sender
                    message.decide(r, Verdict.refusal(QuotaExceeded()))
        return ACCEPT


def default_stages(committer: Any, *, expander: Any = None,
                   authentication: CheckAuthentication | None = None,
                   trusted: Callable[[str], bool] | None = None,
                   rules: Any = None, content_filter: Any = None,
                   outcomes: Any = None) -> list[Stage]:
    """The stages in their declared order (see the module docstring); ``expander``: the
    ``policy.expansion.Expander`` of the recipient-expansion stage; ``authentication``:
    the sender-authentication stage (None: ``[sender_authentication]`` is off); ``rules``:
    the ``IMailboxRules`` of the per-recipient rules stage, or None; ``content_filter`` and
    ``outcomes`` as for ``CheckContent``."""
    stages: list[Stage] = [ExpandRecipients(expander)]
    if authentication is not None:
        stages.append(authentication)
    return [*stages, CheckContent(content_filter, outcomes), RecipientRules(rules),
            CommitStage(committer, trusted)]


async def run_stages(message: Message, stages: Sequence[Stage]) -> dict[str, Verdict]:
    """Run ``stages`` over ``message`` (see the module docstring); return the per-recipient
    results, or raise the MailError of a whole-message refusal (nothing is stored then)."""
    everyone = list(message.recipients)
    for stage in stages:
        try:
            verdict = await stage(message)
        except Exception:
            verdict = _stage_failed(Failure(), message, stage)
        if _after_stage(message, verdict):
            break
    return _results(everyone)


def _stage_failed(failure: Failure, message: Message, stage: Stage) -> Verdict:
    """The verdict of a stage that raised: its MailError's reply, else a logged 451."""
    if isinstance(failure.value, MailError):
        return Verdict.refusal(failure.value)
    if not isinstance(failure.value, Exception):
        failure.raiseException()
    log.failure("SMTP {id}: stage {stage} failed", failure, id=message.queue_id,
                stage=stage.name)
    return Verdict.refusal(MailError(451, "4.3.0", LOCAL_ERROR))


def _after_stage(message: Message, verdict: Verdict) -> bool:
    """After one stage: True when it accepted (no later stage runs); the recipients it refused
    leave the message; raises the reply of a refusal of the whole message, or of the first
    recipient's refusal when none is left (the spool file is removed then)."""
    if verdict.outcome is Outcome.ACCEPT:
        return True
    gone = [r for r in message.recipients if r.verdict.refused]
    if gone:
        message.dropped.extend(gone)
        message.recipients = [r for r in message.recipients if not r.verdict.refused]
    if verdict.refused or not message.recipients:
        message.spool.abort()
        error = verdict.error if verdict.refused else message.dropped[0].verdict.error
        assert error is not None
        raise error
    return False


def _results(everyone: list[Recipient]) -> dict[str, Verdict]:
    """The per-recipient results of a run that accepted the message."""
    return {r.address: (r.verdict if r.verdict.refused else ACCEPT) for r in everyone}


IDLE_ABLE = (ExpandRecipients, CheckAuthentication, CheckContent, RecipientRules)


def start_stages(message: Message, stages: Sequence[Stage]) -> defer.Deferred:
    """``run_stages`` as a Deferred (issue 17: CPU per message). When every stage before the
    commit is idle for ``message`` (``idle``: it would CONTINUE at once, touching nothing), no
    recipient is refused yet and there is no list copy, the commit's Deferred carries the run
    with plain callbacks through the same steps (``CommitStage._begin``, ``_stored`` or
    ``_failed``, ``_stage_failed``, ``_after_stage``; an idle stage's CONTINUE changes nothing
    then); otherwise ``run_stages`` runs under ``defer.ensureDeferred``."""
    if not stages:
        return defer.ensureDeferred(run_stages(message, stages))
    *before, last = stages
    recipients = message.recipients
    if not (isinstance(last, CommitStage) and recipients
            and all(r.copy is None and not r.verdict.refused for r in recipients)
            and all(isinstance(s, IDLE_ABLE) and s.idle(message) for s in before)):
        return defer.ensureDeferred(run_stages(message, stages))
    everyone = list(recipients)
    try:
        local, d = last._begin(message)
        d.addCallbacks(last._stored, last._failed, (message, local), None, (message,))
    except Exception:
        d = defer.fail()
    return d.addErrback(_stage_failed, message, last).addCallback(_accepted, message, everyone)


def _accepted(verdict: Verdict, message: Message, everyone: list[Recipient]) -> dict[str, Verdict]:
    """``start_stages``' end: the commit's verdict as ``run_stages`` takes it."""
    _after_stage(message, verdict)
    return _results(everyone)
