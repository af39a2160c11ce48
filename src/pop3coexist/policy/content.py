"""What the content check does with a content filter's verdict (no sockets, no file formats).

The conversation with the milters (``interfaces.IContentFilter``, pop3coexist.milter) runs the
message steps and returns a ``FilterResult``; ``FilterOutcomes.apply`` turns it into the stage's
``Verdict`` (policy/stages.py):

- ``continue`` / ``accept``: the message goes on to the next stages (the milters' header and
  body changes are already in it); recipients a milter deleted leave the message, recipients
  it added join it (local ones as mailboxes, others through the queue; no relay check: the
  filter is trusted as Postfix trusts it);
- ``reject`` / ``tempfail``: the whole message is refused with the milter's reply (5xx / 4xx);
- ``discard``: the client gets 250, nothing is stored;
- ``quarantine``: the client gets 250, the message is kept in the quarantine
  (``interfaces.IQuarantine``, ``<state_dir>/quarantine/``) and not delivered until
  ``pop3coexist-admin quarantine release ID``.

Every verdict other than continue/accept is logged as a structured event with
``mail_event="milter_verdict"`` (fields: ``queue_id``, ``milter``, ``verdict``, ``reply``,
``sender``, ``recipients``, ``virus``), which the metrics count. When the milter that gave a
reject, discard or quarantine is a virus scanner (``[[milter]] virus_scanner = true``) the
postmaster gets an "infected mail" notice naming the sender, the recipients, the verdict and
the queue id (from ``<>``, through the outbound queue, which delivers locally too).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger

from pop3coexist.errors import MailError

log = Logger(namespace="pop3coexist.milter")

CONTINUE = "continue"
ACCEPT = "accept"
REJECT = "reject"
TEMPFAIL = "tempfail"
DISCARD = "discard"
QUARANTINE = "quarantine"


@dataclass
class FilterResult:
    """The content filters' word on one message.

    ``action``: one of CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE; ``error``: the
    reply of a REJECT or TEMPFAIL; ``milter``: the name of the filter that decided (or the
    one that quarantined); ``reason``: the quarantine reason or the reply text; ``virus``: that
    filter is a virus scanner; ``added`` / ``removed``: recipient addresses the filters added
    or deleted (as they wrote them, angle brackets taken off); ``unscanned``: filters that
    could not be asked and were passed by their ``default_action = "accept"``."""

    action: str = CONTINUE
    error: MailError | None = None
    milter: str = ""
    reason: str = ""
    virus: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unscanned: list[str] = field(default_factory=list)


def notice_message(hostname: str, postmaster: str, queue_id: str, sender: str,
                   recipients: list[str], result: FilterResult, client: str,
                   now: float | None = None) -> bytes:
    """The infected-mail notice to the postmaster (RFC 5322, text/plain, LF line ends)."""
    now = time.time() if now is None else now
    verdict = {REJECT: "rejected", DISCARD: "discarded", QUARANTINE: "quarantined",
               TEMPFAIL: "deferred"}.get(result.action, result.action)
    detail = result.error.reply() if result.error is not None else result.reason
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{postmaster}>",
        f"Subject: Infected mail {verdict}: queue id {queue_id}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: {make_msgid('virus', domain=hostname)}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"The content filter {result.milter!r} found a virus in a message; it was {verdict}.",
        "",
        f"Queue id:   {queue_id}",
        f"Sender:     <{sender}>",
        f"Recipients: {', '.join(f'<{r}>' for r in recipients)}",
        f"Verdict:    {verdict}: {detail}",
        f"Client:     {client}",
        "",
    ]
    if result.action == QUARANTINE:
        lines += ["The message is held: pop3coexist-admin quarantine list | release "
                  f"{queue_id} | delete {queue_id}", ""]
    return "\n".join(lines).encode("utf-8", "replace")


Resolver = Callable[[str], Awaitable[Any]]


class FilterOutcomes:
    """Applies a FilterResult to a ``policy.stages.Message`` (see the module docstring).

    ``quarantine``: an ``interfaces.IQuarantine`` (None: a quarantine verdict holds the message
    as a tempfail, nothing is lost); ``queue``: the outbound queue (``enqueue_bytes``) for the
    postmaster notice; ``postmaster``: async, gives the notice's recipient address;
    ``resolve_added``: async, gives a ``policy.stages.Recipient`` for an address a milter
    added, or None when it cannot receive mail here.
    """

    def __init__(self, hostname: str, quarantine: Any, queue: Any,
                 postmaster: Callable[[], Awaitable[str | None]],
                 resolve_added: Resolver) -> None:
        self.hostname = hostname
        self.quarantine = quarantine
        self.queue = queue
        self.postmaster = postmaster
        self.resolve_added = resolve_added

    async def apply(self, message: Any, result: FilterResult) -> Any:
        from pop3coexist.policy.stages import ACCEPT as STAGE_ACCEPT
        from pop3coexist.policy.stages import CONTINUE as STAGE_CONTINUE
        from pop3coexist.policy.stages import Verdict

        everyone = [r.address for r in message.recipients]
        if result.unscanned:
            log.warn("milter {id}: not scanned by {names} (unavailable; default_action accept)",
                     id=message.queue_id, names=", ".join(result.unscanned))
        if result.action in (CONTINUE, ACCEPT):
            await self._recipients(message, result)
            if not message.recipients:  # the milters deleted every recipient: nothing to do
                log.info("milter {id}: no recipient left; the message is dropped",
                         id=message.queue_id)
                message.spool.abort()
                return STAGE_ACCEPT
            return STAGE_CONTINUE
        self._log(message, result, everyone)
        if result.action in (REJECT, TEMPFAIL):
            assert result.error is not None
            if result.action == REJECT and result.virus:
                await self._notify(message, result, everyone)
            return Verdict.refusal(result.error)
        if result.action == QUARANTINE:
            if self.quarantine is None:
                return Verdict.refusal(MailError(451, "4.7.1", "Message held, try again later"))
            await self._recipients(message, result)
            data = await message.content()
            envelope, info = self._entry(message, result)
            entry = await threads.deferToThread(self.quarantine.put, data, envelope, info)
            log.info("milter {id}: quarantined as {entry} by {milter}: {reason}",
                     id=message.queue_id, entry=entry, milter=result.milter, reason=result.reason)
        else:
            log.info("milter {id}: discarded by {milter}", id=message.queue_id,
                     milter=result.milter)
        message.spool.abort()
        if result.virus:
            await self._notify(message, result, everyone)
        return STAGE_ACCEPT

    def _log(self, message: Any, result: FilterResult, everyone: list[str]) -> None:
        log.info(
            "milter {queue_id}: {verdict} by {milter} ({reply}); sender <{sender}>, "
            "recipients {recipients}",
            mail_event="milter_verdict", queue_id=message.queue_id, milter=result.milter,
            verdict=result.action, virus=result.virus,
            reply=result.error.reply() if result.error is not None else result.reason,
            sender=message.sender, recipients=everyone,
        )

    def _entry(self, message: Any, result: FilterResult) -> tuple[dict, dict]:
        rcpts = []
        for r in message.recipients:
            entry = dict(r.entry)
            if r.mailbox is not None:
                domain, box = r.mailbox
                if entry.get("address", "").lower() != f"{box}@{domain}":
                    entry["orcpt"] = entry.get("orcpt") or f"rfc822;{entry['address']}"
                entry["address"] = f"{box}@{domain}"
            rcpts.append(entry)
        envelope = {
            "sender": message.sender, "recipients": rcpts, "ret": message.ret,
            "envid": message.envid, "body": message.body,
            "received_from": message.received_from, "arrival": message.arrival,
            "hops": message.hops,
        }
        info = {"queue_id": message.queue_id, "milter": result.milter, "reason": result.reason,
                "virus": result.virus, "client": message.received_from}
        return envelope, info

    async def _recipients(self, message: Any, result: FilterResult) -> None:
        if result.removed:
            gone = {a.lower() for a in result.removed}
            kept = [r for r in message.recipients if r.address.lower() not in gone]
            log.info("milter {id}: recipients removed by a milter: {addrs}",
                     id=message.queue_id, addrs=", ".join(sorted(gone)))
            message.recipients = kept
        for address in result.added:
            if any(r.address.lower() == address.lower() for r in message.recipients):
                continue
            recipient = await self.resolve_added(address)
            if recipient is None:
                log.warn("milter {id}: recipient <{a}> added by a milter cannot receive mail; "
                         "left out", id=message.queue_id, a=address)
                continue
            log.info("milter {id}: recipient <{a}> added by a milter", id=message.queue_id,
                     a=address)
            message.recipients.append(recipient)

    async def _notify(self, message: Any, result: FilterResult, everyone: list[str]) -> None:
        """Queue the infected-mail notice; a failure is logged (the verdict stands)."""
        try:
            postmaster = await self.postmaster()
            if postmaster is None or self.queue is None:
                log.warn("milter {id}: no postmaster to tell of infected mail", id=message.queue_id)
                return
            data = notice_message(self.hostname, postmaster, message.queue_id, message.sender,
                                  everyone, result, message.received_from)
            envelope = {
                "sender": "", "recipients": [{"address": postmaster, "orcpt": None,
                                              "notify": ["NEVER"]}],
                "ret": None, "envid": None,
                "received_from": f"infected-mail notice for queue id {message.queue_id}",
                "arrival": time.time(), "hops": 0,
            }
            notice_id = await threads.deferToThread(self.queue.enqueue_bytes, data, envelope)
            self.queue.wake()
            log.info("milter {id}: infected-mail notice queued as {nid} to <{pm}>",
                     id=message.queue_id, nid=notice_id, pm=postmaster)
        except Exception:
            log.failure("milter {id}: cannot queue the infected-mail notice", id=message.queue_id)
