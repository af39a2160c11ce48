"""``pop3coexist-admin queue delete ID --bounce``: fail what is left of a queued message and
report it to its sender.

The store (store/queue.py) only keeps and forgets messages; the decision to fail recipients and
the delivery report (dsn.py, RFC 3464) belong to the delivery side, here. Every recipient not
yet delivered (``pending`` or ``deferred``) is failed with ``5.0.0`` and reported (as NOTIFY
allows, RFC 3461 section 4.1) in one failure report to the envelope sender, never to the null
sender ``<>``; the report is queued durably before the message is removed.
"""

from __future__ import annotations

from twisted.logger import Logger

from pop3coexist.smtp import dsn
from pop3coexist.store.queue import FileQueue, Notice, State

log = Logger()

DIAGNOSTIC = "X-Pop3coexist; deleted from the queue by the administrator"


def delete_with_report(queue: FileQueue, qid: str) -> None:
    """Remove ``qid`` from ``queue`` after queueing one failure report (from ``<>``, signed with
    the queue's hostname) to its sender for every recipient not yet delivered. KeyError if
    ``qid`` is unknown or malformed (nothing is changed then)."""
    env = queue.load(qid)
    if env is None:
        raise KeyError(qid)
    now = queue.clock()
    failed = []
    for r in env.recipients:
        if r.due:
            r.state = State.FAILED
            r.status = "5.0.0"
            r.diagnostic = DIAGNOSTIC
            r.last_attempt = now
            if dsn.wants_notice(r, Notice.FAILED):
                failed.append(r)
    if failed and env.sender:
        original = dsn.read_original(queue.body_path(qid), dsn.include_full(env, Notice.FAILED))
        report = dsn.build_report(Notice.FAILED, env, failed, queue.hostname, original, now)
        queue.enqueue_bytes(report, dsn.report_envelope(env, now))
    elif failed:
        log.info("queue: {qid} deleted; no report to the null sender", qid=qid)
    queue.remove(qid)
    queue.request_rescan()
