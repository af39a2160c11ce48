"""What a delivery attempt does to a queued recipient (store/envelope.py ``Recipient``): the
delivery runner's (smtp/outbound.py) state transitions, retry schedule and report notices.
No I/O but the log (one line per recipient and attempt).

- a 2xx reply: ``delivered``; a ``delivered`` notice for a local hop, a ``relayed`` one when the
  next hop did not take the DSN request on (NOTIFY=SUCCESS, RFC 3461 section 4.1);
- a 5xx reply: ``failed`` (Status 5.x.x) and a ``failed`` notice;
- a 4xx reply or none: ``deferred`` until the next of ``queue.retry_intervals`` (the last
  interval repeats; Status 4.x.x), or ``failed`` with ``4.4.7`` once ``queue.expiration`` has
  passed since arrival; one ``delayed`` notice once ``queue.delay_notification`` has passed.

Notices are set only where the recipient's NOTIFY asks for them (smtp/dsn.py ``wants_notice``).
"""

from __future__ import annotations

from pop3coexist.config import QueueConfig
from pop3coexist.events import DELIVERY_EVENT, FastLogger
from pop3coexist.policy import routing
from pop3coexist.smtp import client as smtp_client
from pop3coexist.smtp import dsn
from pop3coexist.store.envelope import Envelope, Notice, Recipient, State

# the line per recipient and attempt: events.FastLogger (its level check made once, issue 17)
log = FastLogger(namespace="pop3coexist.outbound")

EXPIRED = "4.4.7"  # RFC 3463: delivery time expired


def _fail_notice(r: Recipient) -> Notice | None:
    return Notice.FAILED if dsn.wants_notice(r, Notice.FAILED) else None


def expire(env: Envelope, r: Recipient, now: float, qcfg: QueueConfig) -> None:
    """Fail deferred ``r`` without another attempt: it has been queued longer than
    ``qcfg.expiration`` seconds (Status 4.4.7)."""
    r.state = State.FAILED
    r.status = EXPIRED
    r.notice = _fail_notice(r)
    if not env.sender:
        log.warn("{qid}: mail from <> to <{rcpt}> expired and is dropped (no report about "
                 "a report)", qid=env.id, rcpt=r.address)
    log.info(
        "{qid} to=<{rcpt}> state=failed reply=expired after {days:.1f} days in the queue "
        "(last reply: {reply})",
        qid=env.id, rcpt=r.address, days=qcfg.expiration / 86400.0,
        reply=r.last_reply or "none",
        mail_event="expired", queue_id=env.id, recipient=r.address, route="-",
    )


def apply_reply(env: Envelope, r: Recipient, rep: smtp_client.RecipientReply,
                result: smtp_client.TransactionResult, attempt: routing.Attempt,
                now: float, qcfg: QueueConfig) -> None:
    """Record the reply ``rep`` about ``r`` from ``attempt`` (its transaction ``result``) at
    ``now`` (Unix seconds): attempts, last reply, Remote-MTA, Status, the new state and the
    notice owed (module docstring)."""
    hop = attempt.hop
    arrival = float(env.arrival or now)
    r.attempts = int(r.attempts or 0) + 1
    r.last_attempt = now
    r.last_reply = rep.reply
    r.remote_mta = (result.remote_mta or None) if rep.remote else None
    r.diagnostic = None
    r.status = rep.enhanced
    if rep.delivered:
        r.state = State.DELIVERED
        r.next_attempt = None
        if dsn.wants_notice(r, Notice.RELAYED):
            if hop.local:
                r.notice = Notice.DELIVERED
            elif not result.dsn:
                r.notice = Notice.RELAYED
    elif rep.permanent:
        r.state = State.FAILED
        r.next_attempt = None
        if not r.status.startswith("5"):
            r.status = "5.0.0"
        r.notice = _fail_notice(r)
    elif now - arrival >= qcfg.expiration:
        r.state = State.FAILED
        r.next_attempt = None
        r.status = EXPIRED
        r.notice = _fail_notice(r)
    else:
        r.state = State.DEFERRED
        if not r.status.startswith("4"):
            r.status = "4.0.0"
        intervals = qcfg.retry_intervals
        step = intervals[min(r.attempts - 1, len(intervals) - 1)]
        r.next_attempt = now + step
        r.will_retry_until = arrival + qcfg.expiration
        if (
            not r.delay_notified
            and now - arrival >= qcfg.delay_notification
            and dsn.wants_notice(r, Notice.DELAYED)
            and not r.notice
        ):
            r.notice = Notice.DELAYED
            r.delay_notified = True
    log.info(
        "{qid} to=<{rcpt}> relay={relay} via=\"{via}\" delay={delay:.1f}s "
        "attempts={attempts} state={state} reply={reply}",
        qid=env.id, rcpt=r.address, via=attempt.via,
        relay=("local" if hop.local else (result.remote_mta or hop.key)),
        delay=max(0.0, now - arrival), attempts=r.attempts, state=str(r.state),
        reply=rep.reply,
        mail_event=DELIVERY_EVENT[str(r.state)], queue_id=env.id, recipient=r.address,
        route=hop.label,
    )
    if r.state == State.FAILED and not env.sender:
        log.warn("{qid}: mail from <> to <{rcpt}> failed and is dropped (no report about "
                 "a report)", qid=env.id, rcpt=r.address)
