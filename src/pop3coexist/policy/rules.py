"""Per-mailbox Sieve rules in the per-recipient rules stage: implements
``interfaces.IMailboxRules`` (``policy.stages.RecipientRules`` calls it).

For each local recipient whose mailbox has an active script (``ISieveScripts``), off the
reactor in one thread hop for the whole message (a mailbox found without one is not looked
at again for ``NO_SCRIPT_TTL`` seconds, so mail for mailboxes without rules costs no thread
hop; a script activated meanwhile, by any process through ``ISieveScripts.set_active``,
applies to the next message: the store's change marker, one ``stat`` per message, ends the
cache; a link made by hand, from the next second on):

1. the script is parsed (``policy.sieve``; cached by its version) and run
   (``policy.sieve_run``) with the limits of ``[sieve]``. A script that does not parse, or
   fails while running (a limit, a conflict of actions), changes nothing: the message is kept
   (RFC 5228 section 2.10.6) and the log line says so, with the script, the line and why;
2. the result is carried out:

   - keep, fileinto (into the IMAP folder it names, a Maildir++ subfolder made when missing;
     a name the store cannot hold keeps the message in the INBOX that POP3 serves), implicit keep: the
     recipient stays for the commit stage; imap4flags' flags are not stored (POP3 has none);
   - discard: the recipient leaves the message without a reply (the client still gets 250);
   - reject / ereject (RFC 5429): the recipient is refused with ``550 5.7.1 <reason>``; when
     the message is still taken for someone else (one SMTP reply for all), a rejection
     notice goes to the envelope sender instead (never to ``<>``);
   - redirect [:copy]: a copy with ``X-Sieve-Redirected-From: <mailbox>`` in front is queued
     for the target, its envelope sender rewritten with SRS when ``[sieve] srs`` is on
     (``policy.srs``). Loop protection: a message that already carries the marker for this
     mailbox, or has more than ``redirect_max_received`` Received fields, is kept instead;
   - vacation: the reply of ``policy.vacation`` when its rules allow, at most once per
     sender and handle per ``:days`` (``ISieveScripts.vacation_due``), queued with ``<>``.

Queued copies are built in the store's spool folder and handed to ``IOutboundQueue.enqueue``.
They are queued before the commit stage runs: if the commit then fails, the client is told to
try again and the retry runs the script again (a redirect may then go twice; a vacation reply
never does, its record is kept).

When every recipient was discarded or rejected and nothing else is left, the stage ends the
run: ACCEPT (the message was deliberately dropped) or the rejection's 550.
"""

from __future__ import annotations

import email.utils
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist.errors import MailError
from pop3coexist.interfaces import IIdleRules, IMailboxRules
from pop3coexist.policy import vacation
from pop3coexist.policy.sieve import Command, SieveSyntaxError, parse
from pop3coexist.policy.sieve_run import Limits, MailContext, Result, SieveRuntimeError, run
from pop3coexist.policy.srs import SRS
from pop3coexist.policy.stages import ACCEPT, CONTINUE, Message, Recipient, Verdict

log = Logger(namespace="pop3coexist.sieve")

LOOP_HEADER = "X-Sieve-Redirected-From"
NO_SCRIPT_TTL = 1.0  # seconds a mailbox found without an active script is not looked at again


@dataclass(frozen=True)
class RulesSettings:
    """What the rules need of ``[sieve]`` and ``[server]`` (see config.SieveConfig)."""

    hostname: str
    limits: Limits = Limits()
    vacation_days: int = 7
    vacation_min_days: int = 1
    vacation_max_days: int = 30
    redirect_max_received: int = 20

    @classmethod
    def from_config(cls, config: Any) -> RulesSettings:
        s = config.sieve
        return cls(
            hostname=config.server.hostname,
            limits=Limits(seconds=s.max_run_time, actions=s.max_actions,
                          redirects=s.max_redirects),
            vacation_days=s.vacation_days, vacation_min_days=s.vacation_min_days,
            vacation_max_days=s.vacation_max_days,
            redirect_max_received=s.redirect_max_received,
        )


@dataclass
class _Decision:
    """What the script decided for one recipient: "keep", "discard" or "reject" (+ reason)."""

    recipient: Recipient
    fate: str = "keep"
    reason: str = ""
    result: Result | None = None
    script: str = ""
    notes: list[str] = field(default_factory=list)


@implementer(IMailboxRules, IIdleRules)
class SieveRules:
    """See IMailboxRules. ``scripts``: ISieveScripts; ``queue``: IOutboundQueue; ``store``:
    the IMailStore (its ``spool_dir`` is where queued copies are built); ``srs``: an SRS or
    None (forwarded mail keeps its sender); ``run_blocking``: runs a blocking call off the
    reactor (a Deferred); ``clock``: unix time (Date, records); ``monotonic``: for the
    no-script cache."""

    def __init__(self, settings: RulesSettings, scripts: Any, queue: Any, store: Any,
                 run_blocking: Callable[..., Any], srs: SRS | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.scripts = scripts
        self.queue = queue
        self.store = store
        self.run_blocking = run_blocking
        self.srs = srs
        self.clock = clock
        self.monotonic = monotonic
        self._compiled: dict[tuple[str, str], tuple[Any, list[Command] | SieveSyntaxError]] = {}
        # mailbox -> (known until (monotonic), the store's change marker when it was looked at)
        self._no_script: dict[tuple[str, str], tuple[float, object]] = {}

    def _marker(self) -> object:
        """The store's change marker (``ISieveScripts.changes``); one that equals no other
        when it cannot be read (then nothing cached counts)."""
        try:
            return self.scripts.changes()
        except OSError:
            return object()

    def idle(self, message: Message) -> bool:
        """See IIdleRules: no local recipient, or each one's mailbox known to have no active
        script (looked at less than NO_SCRIPT_TTL seconds ago, and no script set or unset
        anywhere since: the store's change marker is the same)."""
        no_script = self._no_script
        now = marker = None
        for r in message.recipients:
            if r.mailbox is None:
                continue
            known = no_script.get(r.mailbox)
            if known is None:
                return False
            if now is None:
                now, marker = self.monotonic(), self._marker()
            if known[0] <= now or known[1] != marker:
                return False
        return True

    async def apply(self, message: Message) -> Verdict:
        """See IMailboxRules."""
        if self.idle(message):
            return CONTINUE  # no thread hop for mailboxes known to have no rules
        local = [r for r in message.recipients if r.mailbox is not None]
        decisions = await self.run_blocking(self.decide_and_act, message, local)
        gone = {id(d.recipient) for d in decisions if d.fate == "discard"}
        for d in decisions:
            if d.fate == "reject":
                message.decide(d.recipient, Verdict.refusal(
                    MailError(550, "5.7.1", _reply_text(d.reason))))
        if gone:
            message.recipients = [r for r in message.recipients if id(r) not in gone]
        left = [r for r in message.recipients if not r.verdict.refused]
        if not left and gone:  # nothing to store; a discard took the message (RFC 5228 4.5)
            message.spool.abort()
            return ACCEPT
        return CONTINUE

    # ------------------------------------------------------------------ blocking part

    def decide_and_act(self, message: Message, local: list[Recipient]) -> list[_Decision]:
        """Blocking: run each recipient's script, then carry out what they decided."""
        data: bytes | None = None
        decisions: list[_Decision] = []
        marker = self._marker()  # before the look: a change after it moves the marker on
        for r in local:
            d = _Decision(r)
            decisions.append(d)
            domain, box = r.mailbox  # type: ignore[misc]
            try:
                active = self.scripts.active_script(domain, box)
            except Exception as e:  # the store cannot answer: keep, and say so
                log.error("SIEVE {id} <{rcpt}>: the rules cannot be read ({why}); the message "
                          "is kept", id=message.queue_id, rcpt=r.address, why=str(e))
                continue
            if active is None:
                if len(self._no_script) > 100_000:
                    self._no_script.clear()
                self._no_script[(domain, box)] = (self.monotonic() + NO_SCRIPT_TTL, marker)
                continue
            self._no_script.pop((domain, box), None)
            name, text, version = active
            d.script = name
            commands = self._compile(domain, box, text, version)
            if data is None:
                data = self._message_bytes(message)
            mail = MailContext.from_bytes(message.sender, r.address, data)
            try:
                if isinstance(commands, SieveSyntaxError):
                    raise commands
                d.result = run(commands, mail, self.settings.limits)
            except (SieveSyntaxError, SieveRuntimeError) as e:
                log.warn("SIEVE {id} <{rcpt}>: script \"{script}\" failed at line {line}: "
                         "{why}; the message is kept (RFC 5228 section 2.10.6)",
                         id=message.queue_id, rcpt=r.address, script=name, line=e.line,
                         why=e.message)
                continue
            except Exception:
                log.failure("SIEVE {id} <{rcpt}>: script \"{script}\" failed; the message is "
                            "kept", id=message.queue_id, rcpt=r.address, script=name)
                continue
            self._carry_out(message, d, mail, data, domain, box)
        remote_left = any(r.mailbox is None for r in message.recipients)
        taken = remote_left or any(d.fate != "reject" for d in decisions)
        for d in decisions:
            if d.fate == "reject" and taken and data is not None:
                self._notify_rejection(message, d, data)
        return decisions

    def _compile(self, domain: str, box: str, text: str,
                 version: Any) -> list[Command] | SieveSyntaxError:
        key = (domain, box)
        cached = self._compiled.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            compiled: list[Command] | SieveSyntaxError = parse(text)
        except SieveSyntaxError as e:
            compiled = e
        if len(self._compiled) > 10_000:
            self._compiled.clear()
        self._compiled[key] = (version, compiled)
        return compiled

    @staticmethod
    def _message_bytes(message: Message) -> bytes:
        """Blocking: the message as the stages see it (``ISpool.read``: no Return-Path)."""
        return message.spool.read()

    def _carry_out(self, message: Message, d: _Decision, mail: MailContext, data: bytes,
                   domain: str, box: str) -> None:
        result = d.result
        assert result is not None
        own = f"{box}@{domain}"
        did: list[str] = []
        rejects = result.of("reject") + result.of("ereject")
        if rejects:
            d.fate, d.reason = "reject", rejects[0].argument
            did.append(f"{rejects[0].kind}")
        keep_instead = False
        for action in result.of("redirect"):
            why_not = self._redirect_loop(mail, message, own)
            if why_not:
                did.append(f"redirect to <{action.argument}> not done ({why_not})")
                keep_instead = True
                continue
            self._redirect(message, data, action.argument, own, domain)
            did.append(f"redirect{' :copy' if action.copy else ''} to <{action.argument}>")
        for action in result.of("vacation"):
            did.append(self._vacation(message, mail, action, r_address=d.recipient.address,
                                      own=own, domain=domain, box=box))
        inbox = bool(result.implicit_keep or result.of("keep"))
        for action in result.of("fileinto"):
            stored = self._fileinto(data, domain, box, action.argument, action.flags)
            if stored is None:
                inbox = True
                did.append(f"fileinto \"{action.argument}\" (kept in INBOX)")
            else:
                did.append(f"fileinto \"{stored}\"")
        if result.of("keep"):
            did.append("keep")
        if result.of("discard") and not result.keeps:
            did.append("discard")
        if d.fate != "reject":
            if inbox or keep_instead:
                d.fate = "keep"
                if result.implicit_keep:
                    did.append("implicit keep")
            else:
                d.fate = "discard"
        log.info("SIEVE {id} <{rcpt}>: script \"{script}\": {did}", id=message.queue_id,
                 rcpt=d.recipient.address, script=d.script, did="; ".join(did) or "keep")

    # -- fileinto (issue 18: folders are IMAP folders, Maildir++ subfolders)
    def _fileinto(self, data: bytes, domain: str, box: str, folder: str,
                  flags: Any) -> str | None:
        """Blocking: store the message in ``folder`` of the recipient's mailbox, creating the
        folder when missing (as RFC 5490's ``:create``, always: a script that names a folder
        means it); returns the folder's name, or None for INBOX or a folder that cannot be
        (a bad name, a store failure: the message is kept in INBOX instead, nothing lost)."""
        if not folder or folder.upper() == "INBOX":
            return None
        from pop3coexist.store.folders import FolderError, MaildirFolders, to_folder_name

        try:
            name = to_folder_name(folder)
            account = MaildirFolders(self.store).open_account(domain, box)
            if not account.exists(name):
                account.create(name)
            account.open_folder(name).add(data, [str(f) for f in (flags or ())], None)
        except (FolderError, OSError, ValueError) as e:
            log.info("SIEVE fileinto \"{folder}\" for {box}@{domain} not done: {e}",
                     folder=folder, box=box, domain=domain, e=e)
            return None
        return name

    # -- redirect
    def _redirect_loop(self, mail: MailContext, message: Message, own: str) -> str | None:
        marks = [v.strip("<> ").lower() for v in mail.header_values(LOOP_HEADER)]
        if own.lower() in marks:
            return f"it was redirected by <{own}> before: a loop"
        received = len(mail.headers.get_all("received") or [])
        if received > self.settings.redirect_max_received:
            return f"{received} Received fields: a loop"
        return None

    def _redirect(self, message: Message, data: bytes, target: str, own: str,
                  domain: str) -> None:
        sender = message.sender
        if self.srs is not None:
            sender = self.srs.forward(sender, domain)
        copy = f"{LOOP_HEADER}: <{own}>\r\n".encode("ascii", "replace") + data
        self._enqueue(copy, sender, target, message)

    # -- vacation
    def _vacation(self, message: Message, mail: MailContext, action: Any, r_address: str,
                  own: str, domain: str, box: str) -> str:
        opts = action.options
        mine = [own, r_address, *opts.get("addresses", [])]
        why_not = vacation.refusal(mail, mine)
        if why_not:
            return f"no vacation reply: {why_not}"
        s = self.settings
        seconds = vacation.period(opts.get("days"), s.vacation_days, s.vacation_min_days,
                                  s.vacation_max_days)
        handle = vacation.handle(action.argument, opts.get("subject"), opts.get("from"),
                                 bool(opts.get("mime")), opts.get("handle"))
        key = f"{handle}\0{message.sender.lower()}"
        if not self.scripts.vacation_due(domain, box, key, seconds):
            return (f"no vacation reply: <{message.sender}> had one in the last "
                    f"{seconds / 86400:g} days")
        reply = vacation.build_reply(mail, action.argument, r_address if "@" in r_address
                                     else own, s.hostname, subject=opts.get("subject"),
                                     from_=opts.get("from"), mime=bool(opts.get("mime")),
                                     now=self.clock())
        self._enqueue(reply, "", message.sender, message)
        return f"vacation reply to <{message.sender}>"

    # -- rejection notices
    def _notify_rejection(self, message: Message, d: _Decision, data: bytes) -> None:
        if not message.sender:
            return
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        boundary = secrets.token_hex(12)
        text = (
            f"From: Mail Delivery System <MAILER-DAEMON@{self.settings.hostname}>\r\n"
            f"To: <{message.sender}>\r\n"
            f"Subject: Rejected: your message to {d.recipient.address}\r\n"
            f"Date: {email.utils.formatdate(self.clock())}\r\n"
            f"Message-ID: <{secrets.token_hex(12)}.reject@{self.settings.hostname}>\r\n"
            "Auto-Submitted: auto-replied (rejected)\r\n"
            "MIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Your message to <{d.recipient.address}> was rejected by the recipient's "
            f"rules:\r\n\r\n{d.reason}\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        ).encode() + head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + \
            f"\r\n\r\n--{boundary}--\r\n".encode("ascii")
        self._enqueue(text, "", message.sender, message)
        log.info("SIEVE {id} <{rcpt}>: rejection notice to <{to}>", id=message.queue_id,
                 rcpt=d.recipient.address, to=message.sender)

    # -- the queue
    def _enqueue(self, data: bytes, sender: str, target: str, message: Message) -> None:
        spool = Path(self.store.spool_dir())
        path = spool / f"sieve.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            with open(path, "xb") as f:
                f.write(data.replace(b"\r\n", b"\n"))  # the store's form: LF lines
                f.flush()
                os.fsync(f.fileno())
            self.queue.enqueue(path, {
                "sender": sender,
                "recipients": [{"address": target, "orcpt": None, "notify": None}],
                "ret": None, "envid": None, "body": None,
                "received_from": message.received_from,
                "arrival": self.clock(), "hops": message.hops,
            })
        finally:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _reply_text(reason: str) -> str:
    """A rejection reason as one SMTP reply line (RFC 5429 section 2.1.1)."""
    line = " ".join(reason.split())
    line = "".join(c if 32 <= ord(c) < 127 else "?" for c in line)
    return (line[:200] or "Rejected by the recipient's rules")
