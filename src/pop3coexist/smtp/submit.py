"""In-process submission: a message written in web mail enters the SMTP submission path as if
its user had logged in with SMTP AUTH on the submission port. Implements
``interfaces.IMessageSubmission``.

``Submitter(factory)`` takes an ``SMTPServerFactory`` of mode ``"submission"`` (service.py
builds it with the same store, checker, queue (masquerading and DKIM signing wrapped around
it), Sieve rules, sender verifier and submission milters as the submission listener), and for
each message walks the same steps a client's dialogue does, through the same objects:

1. the avatar of the logged-in account (``DeliveryRealm.requestAvatar``: a locked mailbox or
   domain is refused);
2. MAIL: ``validate_from`` (``smtp.sender_must_match_login``: the sender must be the user's
   own address or one the checker says is theirs, else 553 5.7.1) and the milters' MAIL step;
3. RCPT for each recipient: ``validate_to`` (relay rules, unknown users, quotas); a refused
   recipient is reported, the others go on (as a client would continue);
4. DATA: a spool file with Return-Path (local delivery) and our Received field (protocol
   keyword ``ESMTPA``, client ``[address]`` of the browser, ``helo`` "webmail"),
   the message bytes through ``incoming.MessageReader`` (size and hop limits, line rules), then
   ``commit``: the stages of policy/stages.py and the group commit; the result is durable when
   this returns.

The message is logged with the "accepted" mail event like an SMTP one (listener "web").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist import events
from pop3coexist.errors import MailError
from pop3coexist.interfaces import IMessageDelivery, IMessageSubmission, SMTPSession
from pop3coexist.policy.delivery import MailOptions
from pop3coexist.policy.relay import parse_sender
from pop3coexist.smtp.incoming import MessageReader, SpoolWriter, new_queue_id
from pop3coexist.smtp.received import received_header, return_path_field

log = Logger()


@dataclass
class SubmissionResult:
    """``queue_id`` of the accepted message; ``refused``: recipient -> reply text for the
    recipients RCPT or the stages refused (the others got the message)."""

    queue_id: str
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def _reply_text(error: Any) -> str:
    if isinstance(error, MailError):
        return f"{error.code} {error.enhanced} {error.text}".strip()
    return str(error)


def dot_stuff(data: bytes) -> bytes:
    """``data`` as DATA would carry it: CRLF line ends, leading dots doubled, the end marker."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + b"\r\n.\r\n"


@implementer(IMessageSubmission)
class Submitter:
    """See the module docstring and ``IMessageSubmission``."""

    def __init__(self, factory: Any, helo: str = "webmail") -> None:
        self.factory = factory
        self.helo = helo

    def submit(self, user: str, sender: str, recipients: list, data: bytes,
               client_ip: str) -> defer.Deferred:
        """See IMessageSubmission."""
        return defer.ensureDeferred(self._submit(user, sender, list(recipients), data,
                                                 client_ip))

    async def _submit(self, user: str, sender_text: str, recipients: list[str], data: bytes,
                      client_ip: str) -> SubmissionResult:
        f = self.factory
        cfg = f.config.smtp
        if not recipients:
            raise MailError(554, "5.5.1", "No valid recipients")
        if 0 < cfg.max_message_size < len(data):
            raise MailError(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if len(recipients) > cfg.max_recipients:
            raise MailError(452, "4.5.3", "Too many recipients")
        _iface, avatar, _logout = await f.realm.requestAvatar(user, None, IMessageDelivery)
        session = SMTPSession(client_ip=client_ip, helo=self.helo, listener_ip="127.0.0.1",
                              auth_type="web")
        sender = parse_sender(sender_text) if sender_text else None
        options = MailOptions(size=len(data))
        await avatar.validate_from(session, sender, options)
        txn = avatar.begin(session, sender, options)
        result = SubmissionResult("")
        try:
            for rcpt in recipients:
                try:
                    decision = await avatar.validate_to(session, rcpt, len(data), sender)
                except MailError as e:
                    result.refused[rcpt] = _reply_text(e)
                    continue
                except Exception:
                    log.failure("web submission: RCPT {rcpt} failed", rcpt=rcpt)
                    result.refused[rcpt] = "451 4.3.0 Local error, try again later"
                    continue
                txn.add_recipient(decision, None, None)
                result.accepted.append(rcpt)
            if not txn.recipients:
                first = next(iter(result.refused.values()), "No valid recipients")
                raise MailError(554, "5.5.1", f"No recipient was accepted: {first}")
            queue_id = new_queue_id()
            result.queue_id = queue_id
            arrival = time.time()
            spool = SpoolWriter(f.store.spool_dir(), queue_id, lazy=True)
            if txn.local_delivery:
                spool.write_local_prefix(return_path_field(str(sender) if sender else ""))
            spool.write(received_header(
                helo=self.helo, client_ip=client_ip, hostname=f.config.server.hostname,
                protocol="ESMTPA", queue_id=queue_id,
                recipient=txn.recipients[0] if len(txn.recipients) == 1 else None,
                when=arrival))
            reader = MessageReader(spool, cfg.max_message_size, cfg.max_hop_count,
                                   allow_bare_lf=True)
            reader.feed(dot_stuff(data))
            if reader.error is not None:
                raise reader.error
            if not reader.done:
                raise MailError(554, "5.6.0", "the message could not be read")
            txn.body(reader.sink, reader.size, reader.hops.count + 1, arrival,
                     f"{self.helo} ([{client_ip}])")
            verdicts = await txn.commit()
        except BaseException:
            txn.abort()
            raise
        for rcpt, verdict in (verdicts or {}).items():
            if verdict.refused and verdict.error is not None:
                result.refused[rcpt] = _reply_text(verdict.error)
        log.info("web {id} accepted from {ip}: {size} octets, {n} recipients", id=queue_id,
                 ip=client_ip, size=reader.size, n=len(txn.recipients),
                 mail_event=events.ACCEPTED, protocol="smtp", listener="web",
                 client=client_ip, queue_id=queue_id, sender=str(sender) if sender else "",
                 recipients=list(txn.recipients), user=user)
        return result
