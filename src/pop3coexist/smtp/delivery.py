"""One delivery attempt of a group of a queued message's recipients over their route, for the
delivery runner (smtp/outbound.py).

A route (policy/routing.py) is walked in order: the hosts of a next hop (smtp/hops.py), then
the next hop (a connector's fall-back, then the next-cost connector). The walk moves on at once
for the recipients a host said nothing about (refused, timeout, a 4xx/5xx greeting, TLS or AUTH
impossible, ``530`` to MAIL FROM, a ``421`` or a lost connection before the end of the message:
``RecipientReply.elsewhere``; a name not in DNS, a hop that is this server); the first reply
about the message or a recipient is the answer for it. Under ``tls = "opportunistic"`` a failed
STARTTLS handshake is retried at once on the same host in clear text (without the password
unless CRAM-MD5). When every hop failed, the answer is the last temporary failure (a permanent
one only when every hop failed for good). Each connection takes a slot of smtp/hostlimits.py. A
hop that cannot be used because of our own settings (smart host AUTH impossible, a next hop
that wants AUTH) is explained once per hop in the log, not once per message.

The local hop is final delivery into the mail store, with ``Return-Path:`` and the quota as
for SMTP. An address there that names no mailbox (an admin alias, a list, ``owner-LIST``, a
directory proxy address or group: ``policy.expansion.Expander.flatten``) reaches every mailbox
it stands for, and its outside targets get the message as a new queue entry with the same
envelope sender (so a delivery report to an alias sender is not lost). The replies we make up ourselves (no next hop said them) are errors.MailError values.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pop3coexist import errors
from pop3coexist.config import Config, read_secret
from pop3coexist.policy import routing
from pop3coexist.smtp import client as smtp_client
from pop3coexist.smtp.hops import Candidate, HopError, HopResolver, before_self, own_addresses
from pop3coexist.smtp.hostlimits import HopLimiter
from pop3coexist.smtp.received import return_path_field
from pop3coexist.store.envelope import Envelope, Recipient
from pop3coexist.store.queue import FileQueue

OWN_ADDRESSES_TTL = 1.0  # seconds: how long the listeners' addresses are taken as known
SETTINGS_KEPT = 256  # client settings kept (per host and hop kind); then made anew

log = Logger(namespace="pop3coexist.outbound")

DELIVERED_LOCALLY = "250 2.0.0 delivered to mailbox"


Part = tuple[list[Recipient], routing.Attempt, smtp_client.TransactionResult]
"""One part of a route's outcome: recipients, the attempt that answered for them, its result."""


def our_reply(address: str, error: errors.MailError) -> smtp_client.RecipientReply:
    """The reply for ``address`` when no next hop gave one: ``error``'s code and line."""
    return smtp_client.RecipientReply(address, error.code, error.reply(), remote=False)


def hop_failed(result: smtp_client.TransactionResult) -> bool:
    """True when ``result`` says nothing about the message: the host or hop could not start a
    transaction (never connected or greeted, or ended before MAIL FROM; smtp/client.py also
    sets ``hop_failed`` when every recipient is ``elsewhere``)."""
    return not result.connected or result.hop_failed


class RouteDelivery:
    """Delivers groups of recipients over their routes (module docstring).

    ``deliver`` is like ``client.deliver`` without the reactor; ``blocking`` runs a blocking
    call and returns a Deferred (like ``threads.deferToThread``); ``store`` is the mail store
    for the local hop (None: no local delivery).
    """

    def __init__(self, config: Config, queue: FileQueue, store: Any, resolver: HopResolver,
                 limiter: HopLimiter, deliver: Callable[..., defer.Deferred],
                 blocking: Callable[..., defer.Deferred], expander: Any = None) -> None:
        self.expander = expander  # policy.expansion.Expander, or None: mailboxes only
        self.config = config
        self.queue = queue
        self.store = store
        self.resolver = resolver
        self.limiter = limiter
        self._deliver = deliver
        self._blocking = blocking
        self._advised: dict[str, str] = {}  # hop key -> advice already logged for it
        self._own: tuple[float, Any] | None = None  # (monotonic time, own_addresses)
        self._settings_kept: dict[tuple, smtp_client.ClientSettings] = {}  # see _settings

    async def deliver_route(
        self, env: Envelope, route: routing.Route, rcpts: list[Recipient]
    ) -> list[Part]:
        """Walk ``route`` for ``rcpts``: each attempt gets the recipients nothing is known about
        yet. Return ``(recipients, attempt, result)`` parts: the recipients each attempt
        answered, then those no attempt could take, with the last temporary failure (or the
        last failure) as their result. Every recipient of ``rcpts`` is in exactly one part."""
        parts: list[Part] = []
        temporary: tuple[routing.Attempt, smtp_client.TransactionResult] | None = None
        last: tuple[routing.Attempt, smtp_client.TransactionResult] | None = None
        pending = rcpts
        attempts = route.attempts
        for n, attempt in enumerate(attempts, 1):
            answered, pending, result = await self._deliver_hop(env, attempt.hop, pending)
            parts.extend((a_rcpts, attempt, a_result) for a_rcpts, a_result in answered)
            if not pending:
                return parts
            last = (attempt, result)
            if any(400 <= rep.code < 500 for rep in result.replies):
                temporary = last
            if n < len(attempts):
                log.info("{qid}: next hop {hop} ({via}) failed: {reply}; trying {next} ({nvia})",
                         qid=env.id, hop=attempt.hop.key, via=attempt.via,
                         reply=result.replies[0].reply if result.replies else "no reply",
                         next=attempts[n].hop.key, nvia=attempts[n].via)
        assert last is not None
        if len(attempts) > 1:
            log.info("{qid}: every next hop for {rcpt} failed ({hops}); the mail waits for its "
                     "next retry", qid=env.id, rcpt=routing.domain_of(pending[0].address),
                     hops=route.key)
        attempt, result = temporary or last
        parts.append((pending, attempt, result))
        return parts

    def _advise(self, hop: routing.NextHop, result: smtp_client.TransactionResult) -> None:
        """Log the client's advice about ``hop`` once per hop (not once per message); forget it
        when a transaction there starts, so that a problem that comes back is logged again."""
        if not result.advice:
            if not hop_failed(result):
                self._advised.pop(hop.key, None)
            return
        if self._advised.get(hop.key) == result.advice:
            return
        self._advised[hop.key] = result.advice
        log.warn("{role} {hop}: {advice} (logged once for this host)",
                 role="smart host" if hop.smarthost else "next hop", hop=hop.key,
                 advice=result.advice)

    async def _deliver_hop(
        self, env: Envelope, hop: routing.NextHop, rcpts: list[Recipient]
    ) -> tuple[list[tuple[list[Recipient], smtp_client.TransactionResult]], list[Recipient],
               smtp_client.TransactionResult]:
        """Deliver ``rcpts`` through one next hop: the store for the local hop, else its hosts
        in order (its MX hosts, smtp/hops.py).

        Returns ``(answered, pending, last)``: ``answered`` the ``(recipients, result)`` of each
        host that said something about them; ``pending`` the recipients no host of this hop
        could take (a host that could not start a transaction, or that ended the session with
        421 or a lost connection before the end of the message: ``RecipientReply.elsewhere``),
        with ``last`` the result of the last host tried. A TLS handshake that fails under
        ``tls = "opportunistic"`` is retried at once in clear text on the same host (as an
        opportunistic client must: TLS is only a bonus; the password still never goes out in
        clear, smtp/client.py)."""
        if hop.local:
            result = await self._blocking(self._deliver_local, env, rcpts,
                                          await self._local_targets(rcpts))
            return [(rcpts, result)], [], result

        def everyone(error: errors.MailError) -> smtp_client.TransactionResult:
            return smtp_client.TransactionResult(
                replies=[our_reply(r.address, error) for r in rcpts])

        try:
            candidates = await self.resolver.resolve(hop)
            own = await self._own_addresses()
            kept = before_self(candidates, own, routing.domain_of(rcpts[0].address))
        except HopError as e:
            result = everyone(e)
            result.hop_failed = True
            return [], rcpts, result
        try:
            sh = self.config.smarthost
            password = (await self._blocking(self._password)
                        if hop.smarthost and sh.username and sh.password_file is not None
                        else None)  # no thread hop when there is nothing to read
        except OSError as e:
            result = everyone(errors.TemporaryFailure(
                f"cannot read smarthost.password_file: {e.strerror}", "4.3.5"))
            return [(rcpts, result)], [], result
        answered: list[tuple[list[Recipient], smtp_client.TransactionResult]] = []
        pending = rcpts
        result: smtp_client.TransactionResult | None = None
        for c in kept:
            settings = self._settings(hop, c, password)
            while True:
                result = await self._deliver_host(env, hop, c, settings, pending)
                if not (result.tls_failed and settings.tls == "opportunistic"
                        and settings.starttls):
                    break
                failure = next((r.reply for r in result.replies), "")
                log.info("{qid}: STARTTLS with {host} failed ({reply}); trying again in clear "
                         "text (tls = \"opportunistic\")", qid=env.id, host=c.name,
                         reply=failure)
                settings = dataclasses.replace(settings, starttls=False,
                                               tls_failure=failure.split(" ", 2)[-1])
            self._advise(hop, result)
            if hop_failed(result):
                continue  # nothing said about the message: the next host of this hop
            replies = {rep.address: rep for rep in result.replies}
            done = [r for r in pending
                    if r.address not in replies or not replies[r.address].elsewhere]
            pending = [r for r in pending
                       if r.address in replies and replies[r.address].elsewhere]
            answered.append((done, result))
            if not pending:
                break  # an answer about every recipient: no other host of this hop
        assert result is not None
        return answered, pending, result

    async def _deliver_host(self, env: Envelope, hop: routing.NextHop, c: Candidate,
                            settings: smtp_client.ClientSettings, rcpts: list[Recipient]
                            ) -> smtp_client.TransactionResult:
        """One SMTP session with host ``c`` of ``hop`` for ``rcpts``, within the limits
        (smtp/hostlimits.py). Never raises: a bug is a 451 for each recipient."""
        transaction = smtp_client.Transaction(
            sender=env.sender,
            recipients=[{"address": r.address, "notify": r.notify, "orcpt": r.orcpt}
                        for r in rcpts],
            body_path=self.queue.body_name(env.id),
            size=env.size,
            ret=env.ret,
            envid=env.envid,
            body=env.body,
        )
        await self.limiter.acquire(hop.key)
        try:
            return await self._deliver(c.ip, c.port, settings, transaction, remote_mta=c.name)
        except Exception as e:  # a bug, not a network problem: keep the mail
            log.failure("delivery to {host} raised", host=c.name)
            error = errors.TemporaryFailure(f"internal error: {e.__class__.__name__}")
            return smtp_client.TransactionResult(
                replies=[our_reply(r.address, error) for r in rcpts])
        finally:
            self.limiter.release(hop.key)

    def _settings(self, hop: routing.NextHop, c: Candidate,
                  password: smtp_client.Secret | None) -> smtp_client.ClientSettings:
        """The client settings for host ``c`` of ``hop``: without a password made once per
        host and hop kind and then kept (no dataclass per message, issue 17; nothing changes them: the
        clear-text retry makes a new one with ``dataclasses.replace``)."""
        if password is not None:  # read anew per message: a settings object per message too
            return self._make_settings(hop, c, password)
        key = (hop.smarthost, c.name)
        settings = self._settings_kept.get(key)
        if settings is None:
            if len(self._settings_kept) >= SETTINGS_KEPT:
                self._settings_kept.clear()
            settings = self._settings_kept[key] = self._make_settings(hop, c, password)
        return settings

    def _make_settings(self, hop: routing.NextHop, c: Candidate,
                       password: smtp_client.Secret | None) -> smtp_client.ClientSettings:
        sh = self.config.smarthost
        return smtp_client.ClientSettings(
            helo=self.config.server.hostname,
            tls=sh.tls,
            tls_name=c.name,
            ca_file=sh.ca_file,
            username=sh.username if hop.smarthost and password is not None else "",
            password=password,
            connect_timeout=sh.connect_timeout,
            command_timeout=sh.command_timeout,
        )

    async def _own_addresses(self) -> Any:
        """``own_addresses`` (it reads run/listeners.json), read again at most once a second:
        one thread hop per second instead of one per message (issue 17 profile)."""
        now = time.monotonic()
        if self._own is None or now - self._own[0] >= OWN_ADDRESSES_TTL:
            self._own = (now, await self._blocking(own_addresses, self.config))
        return self._own[1]

    def _password(self) -> smtp_client.Secret | None:
        sh = self.config.smarthost
        if not sh.username or sh.password_file is None:
            return None
        return smtp_client.Secret(read_secret(sh.password_file))

    async def _local_targets(self, rcpts: list[Recipient]) -> dict[str, Any]:
        """For each address of ``rcpts`` that is no mailbox: ``(mailboxes, outside addresses)``
        it stands for (``Expander.flatten``), None when nothing here has it, or an
        ``errors.MailError`` when the source cannot answer now."""
        if self.expander is None:
            return {}
        missing = await self._blocking(self._not_mailboxes, [r.address for r in rcpts])
        out: dict[str, Any] = {}
        for address in missing:
            try:
                out[address] = await self.expander.flatten(address)
            except errors.AuthUnavailable:
                out[address] = errors.DirectoryUnavailable()
            except Exception as e:  # noqa: BLE001 - a store failure: try again later
                out[address] = errors.TemporaryFailure(f"alias look-up: {e}")
        return out

    def _not_mailboxes(self, addresses: list[str]) -> list[str]:
        """Blocking. The addresses of ``addresses`` that name no mailbox of the store."""
        out = []
        for address in addresses:
            local, _, domain = address.rpartition("@")
            try:
                exists = self.store.mailbox_exists(domain.lower(), local.lower())
            except ValueError:  # not a mailbox name at all (a quoted local part)
                exists = False
            if not exists and address not in out:
                out.append(address)
        return out

    def _forward(self, env: Envelope, r: Recipient, remote: list[str]) -> str:
        """Blocking. Queue the body again for the outside targets of a local alias, with the
        same envelope sender and the alias as ORCPT; return the new queue id."""
        envelope = {
            "sender": env.sender,
            "recipients": [{"address": a, "orcpt": r.orcpt or f"rfc822;{r.address}",
                            "notify": r.notify} for a in remote],
            "ret": env.ret, "envid": env.envid, "body": env.body,
            "received_from": env.received_from, "arrival": env.arrival, "hops": env.hops,
        }
        qid = self.queue.enqueue(self.queue.body_path(env.id), envelope)
        self.queue.wake()
        return qid

    def _deliver_local(self, env: Envelope, rcpts: list[Recipient],
                       targets: dict[str, Any] | None = None) -> smtp_client.TransactionResult:
        """A recipient in a local domain (e.g. a report to a local sender): into the store.
        Blocking.

        This is final delivery: each mailbox gets the message with ``Return-Path:`` and the
        envelope sender (``<>`` for a report) in front (RFC 5321 section 4.4; a queued body
        never carries one). The quota with its grace applies as for SMTP: a mailbox without
        room is a permanent ``552 5.2.2`` (a failure report to the sender, per NOTIFY)."""
        replies = []
        body = self.queue.body_path(env.id)
        prefix = return_path_field(env.sender or "")
        targets = targets or {}
        for r in rcpts:
            local, _, domain = r.address.rpartition("@")
            boxes = [(domain.lower(), local.lower())]
            target = targets.get(r.address)
            if isinstance(target, errors.MailError):
                replies.append(our_reply(r.address, target))
                continue
            if target is not None:  # an alias, list or proxy address (module docstring)
                boxes, remote = target
                if remote:
                    try:
                        qid = self._forward(env, r, remote)
                    except (OSError, ValueError) as e:
                        replies.append(our_reply(r.address, errors.TemporaryFailure(f"queue: {e}")))
                        continue
                    log.info("{qid}: <{a}> forwarded to {to} as {new}", qid=env.id, a=r.address,
                             to=", ".join(f"<{x}>" for x in remote), new=qid)
                if not boxes:
                    replies.append(smtp_client.RecipientReply(r.address, 250, DELIVERED_LOCALLY,
                                                              remote=False))
                    continue
            try:
                written, refused = self.store.deliver_within_quota(body, boxes, prefix=prefix)
                if refused and not written:
                    raise errors.QuotaExceeded(f"mailbox {r.address} is over its quota")
                rep = smtp_client.RecipientReply(r.address, 250, DELIVERED_LOCALLY, remote=False)
            except errors.NoSuchMailbox:
                rep = our_reply(r.address, errors.PermanentFailure("no such mailbox", "5.1.1"))
            except errors.QuotaExceeded:
                rep = our_reply(r.address,
                                errors.PermanentFailure("mailbox over quota", "5.2.2", 552))
            except (errors.StoreError, OSError) as e:
                rep = our_reply(r.address, errors.TemporaryFailure(f"store: {e}"))
            replies.append(rep)
        return smtp_client.TransactionResult(replies=replies, remote_mta="", connected=True)
