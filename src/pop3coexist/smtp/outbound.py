"""The delivery runner: a twisted Service that drains the outbound queue (store/queue.py).

At start it cleans up after a crash (``FileQueue.recover``) and loads every envelope. A message
is due when a recipient is pending, or deferred with ``next_attempt`` in the past, or a report
for it is still to be queued. For a due message the runner:

1. re-reads the envelope from disk (``queue delete`` from another process wins);
2. fails recipients past ``queue.expiration``;
3. groups the due recipients by route (policy/routing.py: the ordered next hops of their
   domain) and runs one SMTP transaction per group (smtp/client.py), within
   ``smarthost.max_connections`` in total and ``max_connections_per_host`` per hop. A route is
   walked in order: the next host (MX) of a hop, then the next hop (a connector's fall-back,
   then the next-cost connector) is tried at once for the recipients a host said nothing
   about (refused, timeout, a 4xx/5xx greeting, TLS or AUTH impossible, ``530`` to MAIL FROM,
   a ``421`` or a lost connection before the end of the message, a name not in DNS, a hop
   that is this server); the first reply about the message or a recipient is the answer.
   Under ``tls = "opportunistic"`` a failed STARTTLS handshake is retried at once on the
   same host in clear text (without the password unless CRAM-MD5).
   Only when every hop failed does the message wait for its next retry, with the last
   temporary failure as its reply (a permanent one only when every hop failed for good). The
   log names the hop used (``via=``) and each hop passed over. A hop that cannot be used
   because of our own settings (smart host AUTH impossible) is explained once per hop in the
   log, not once per message;
4. applies each recipient's reply: 2xx delivered, 5xx failed, 4xx / no reply deferred on the
   ``retry_intervals`` schedule (the last interval repeats), logging one line per recipient;
5. writes the envelope durably, then queues the RFC 3464 reports it owes (smtp/dsn.py), then
   clears those notices and removes the message once every recipient is final.

A crash between steps repeats work (a delivery or a report may happen twice), never loses it.
``queue flush`` from another process is a marker file polled every ``poll_interval`` seconds;
``queue.wake()`` (new mail, SIGHUP) runs new messages at once.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.python import threadable

from pop3coexist import errors
from pop3coexist.config import Config, read_secret
from pop3coexist.policy import routing
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.smtp import client as smtp_client
from pop3coexist.smtp import dsn
from pop3coexist.smtp.received import return_path_field
from pop3coexist.store.queue import FileQueue

log = Logger(namespace="pop3coexist.outbound")

MAX_HOSTS_PER_ATTEMPT = 5


# --------------------------------------------------------------------------- resolution


class HopError(Exception):
    """A next hop cannot be used now (or ever): carries the reply for its recipients."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class Candidate:
    """One host to connect to: its name (for logs, TLS and DSN Remote-MTA), address, port."""

    name: str
    ip: str
    port: int


class HopResolver:
    """Turns a NextHop into the hosts to try: ``[address]`` as is, else MX (by preference,
    hosts of equal preference in random order as RFC 5321 section 5.1 requires), else the
    name's own address (RFC 5321 5.1 implicit MX). Uses twisted.names.

    ``shuffle`` (default ``random.shuffle``) orders each group of equal preference in place.
    """

    def __init__(self, resolver: Any = None,
                 shuffle: Callable[[list[str]], None] | None = None) -> None:
        self._resolver = resolver
        self._shuffle = shuffle or random.shuffle

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from twisted.names import client

            self._resolver = client.createResolver()
        return self._resolver

    async def resolve(self, hop: routing.NextHop) -> list[Candidate]:
        """The hosts to try for ``hop``, in order; HopError when there is none (a name that
        is not in DNS: 550 5.1.2 for a recipient domain, 451 4.4.3 for a configured hop)."""
        if hop.literal or isIPAddress(hop.host) or isIPv6Address(hop.host):
            return [Candidate(hop.host, hop.host, hop.port)]
        from twisted.names import error as dns_error

        names: list[str] = []
        try:
            answers, _auth, _add = await self.resolver.lookupMailExchange(hop.host)
        except dns_error.DNSNameError:
            if hop.smarthost:
                raise HopError(451, f"4.4.3 smart host {hop.host} not found in DNS")
            if hop.configured:  # a connector's or a route's next hop: our configuration
                raise HopError(451, f"4.4.3 next hop {hop.host} not found in DNS")
            raise HopError(550, f"5.1.2 domain {hop.host} not found in DNS")
        except Exception as e:
            raise HopError(451, f"4.4.3 MX lookup of {hop.host} failed: {e.__class__.__name__}")
        by_pref: dict[int, list[str]] = {}
        for a in answers:
            if getattr(a.payload, "preference", None) is not None:
                by_pref.setdefault(a.payload.preference, []).append(str(a.payload.name).rstrip("."))
        for pref in sorted(by_pref):
            group = sorted(by_pref[pref])
            self._shuffle(group)  # RFC 5321 5.1: spread over MX hosts of equal preference
            names.extend(group)
        if names == [""]:  # RFC 7505 null MX
            raise HopError(556, f"5.1.10 domain {hop.host} accepts no mail (null MX)")
        if not names:
            names = [hop.host]
        out: list[Candidate] = []
        failure: HopError | None = None
        for name in names[:MAX_HOSTS_PER_ATTEMPT]:
            if isIPAddress(name) or isIPv6Address(name):
                out.append(Candidate(name, name, hop.port))
                continue
            try:
                ip = await self.resolver.getHostByName(name)
                out.append(Candidate(name, ip, hop.port))
            except Exception as e:
                failure = HopError(451, f"4.4.3 no address for {name}: {e.__class__.__name__}")
        if not out:
            raise failure or HopError(451, f"4.4.3 no address for {hop.host}")
        return out


# --------------------------------------------------------------------------- limits


class HopLimiter:
    """Connection slots in total and per next hop; ``acquire`` waits (FIFO) for a slot."""

    def __init__(self, total: int, per_host: int) -> None:
        self._limiter = ConnectionLimiter(total, per_host)
        self._waiting: deque[tuple[str, defer.Deferred[None]]] = deque()

    @property
    def open(self) -> int:
        return self._limiter.open

    def acquire(self, key: str) -> defer.Deferred[None]:
        if not any(k == key for k, _ in self._waiting) and self._limiter.acquire(key):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((key, d))
        return d

    def release(self, key: str) -> None:
        self._limiter.release(key)
        blocked: set[str] = set()
        granted = []
        for item in self._waiting:
            if self._limiter.open >= self._limiter.total:
                break
            k = item[0]
            if k in blocked:
                continue
            if self._limiter.acquire(k):
                granted.append(item)
            else:
                blocked.add(k)
        for item in granted:
            self._waiting.remove(item)
            item[1].callback(None)


# --------------------------------------------------------------------------- the runner


def _hop_failed(result: smtp_client.TransactionResult) -> bool:
    """True when ``result`` says nothing about the message: the host or hop could not start a
    transaction (never connected or greeted, or ended before MAIL FROM)."""
    return not result.connected or result.hop_failed


def _sync_blocking(f: Callable, *a: Any, **kw: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *a, **kw)


class OutboundService(service.Service):
    """Delivers the queue; see the module docstring.

    ``resolver`` (a HopResolver), ``deliver`` (like ``client.deliver``) and ``blocking``
    (like ``threads.deferToThread``) can be replaced by tests.
    """

    name = "outbound"

    def __init__(
        self,
        config: Config,
        queue: FileQueue,
        store: Any = None,
        reactor: Any = None,
        *,
        resolver: HopResolver | None = None,
        deliver: Callable[..., defer.Deferred] | None = None,
        blocking: Callable[..., defer.Deferred] | None = None,
        poll_interval: float = 5.0,
        stop_grace: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.queue = queue
        self.store = store
        self.reactor = reactor
        self.resolver = resolver or HopResolver()
        self._deliver = deliver or (lambda *a, **kw: smtp_client.deliver(reactor, *a, **kw))
        if blocking is None:
            if hasattr(reactor, "getThreadPool"):
                from twisted.internet import threads

                def blocking(f: Callable, *a: Any, **kw: Any) -> defer.Deferred:
                    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw)
            else:
                blocking = _sync_blocking
        self._blocking = blocking
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        sh = config.smarthost
        self.limiter = HopLimiter(sh.max_connections, sh.max_connections_per_host)
        self.max_jobs = max(10, sh.max_connections * 2)
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._active: dict[str, defer.Deferred] = {}
        self._forced: set[str] = set()
        self._timer: Any = None
        self._poller: task.LoopingCall | None = None
        self._ready = False
        self._early: list[str] = []
        self._advised: dict[str, str] = {}  # hop key -> advice already logged for it
        self.started: defer.Deferred[None] = defer.Deferred()

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        self.queue.set_waker(self._threadsafe_wake)
        d = self._blocking(self._startup_scan)
        d.addCallback(self._started)
        d.addErrback(self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        """The start-up scan failed (the queue folder cannot be read or written): ``started``
        fails with it, and the server's start-up (service.Pop3CoexistService) ends."""
        log.failure("outbound queue start failed", failure)
        if not self.started.called:
            self.started.errback(failure)

    def _startup_scan(self) -> dict[str, float]:
        counts = self.queue.recover()
        if counts["tmp"] or counts["orphans"]:
            log.info("queue recovery: removed {tmp} temp files and {orphans} unfinished "
                     "messages", **counts)
        self.queue.drain_new()
        return self._scan()

    def _scan(self) -> dict[str, float]:
        due: dict[str, float] = {}
        for qid in self.queue.ids():
            env = self.queue.load(qid)
            if env is None:
                continue
            t = self._due_time(env)
            if t is None:
                self.queue.remove(qid)
            else:
                due[qid] = t
        return due

    def _started(self, due: dict[str, float]) -> None:
        if not self.running:
            return
        for qid, t in due.items():
            self._set_due(qid, t)
        log.info("outbound queue started: {n} messages queued", n=len(due))
        self._ready = True
        early, self._early = self._early, []
        for qid in early:
            if qid not in due:
                self._set_due(qid, self._now())
        self._poller = task.LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.poll_interval, now=False).addErrback(
            lambda f: log.failure("queue poll stopped", f)
        )
        self._wake()
        self.started.callback(None)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.queue.set_waker(None)
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._active:
            return defer.succeed(None)
        waits = defer.DeferredList(list(self._active.values()), consumeErrors=True)
        done: defer.Deferred[None] = defer.Deferred()
        timer = self.reactor.callLater(self.stop_grace, lambda: done.called or done.callback(None))

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        waits.addBoth(finished)
        return done

    # ------------------------------------------------------------------ waking and polling

    def _threadsafe_wake(self) -> None:
        if threadable.isInIOThread() or not hasattr(self.reactor, "callFromThread") or (
            threadable.ioThread is None and threading.current_thread() is threading.main_thread()
        ):
            self._wake()
        else:
            self.reactor.callFromThread(self._wake)

    def _wake(self) -> None:
        if not self.running or not self._ready:
            return
        now = self._now()
        for qid in self.queue.drain_new():
            self._set_due(qid, now)
        self._pump()

    def enqueued(self, ids: list[str]) -> None:
        """Another process (a worker, see workers.py) queued ``ids``: deliver them now. Before
        the start-up scan is done they are kept and added after it."""
        if not self._ready:
            self._early.extend(ids)
            return
        now = self._now()
        for qid in ids:
            if qid not in self._active:
                self._set_due(qid, now)
        self._pump()

    def flush(self) -> None:
        """Retry every queued message now (``queue flush``)."""
        d = self._blocking(self._scan)
        d.addCallback(self._rescanned, force=True)
        d.addErrback(lambda f: log.failure("queue flush failed", f))

    def _poll(self) -> defer.Deferred:
        d = self._blocking(lambda: (self.queue.take_marker("flush"), self.queue.take_marker("rescan")))

        def got(markers: tuple[bool, bool]) -> Any:
            flush, rescan = markers
            if flush:
                log.info("queue flush requested: retrying every message now")
            if flush or rescan:
                return self._blocking(self._scan).addCallback(self._rescanned, force=flush)
            return None

        d.addCallback(got)
        d.addErrback(lambda f: log.failure("queue poll failed", f))
        return d

    def _rescanned(self, due: dict[str, float], force: bool) -> None:
        now = self._now()
        for qid in list(self._due):
            if qid not in due and qid not in self._active:
                del self._due[qid]
        for qid, t in due.items():
            if force:
                self._forced.add(qid)
                t = now
            if qid in self._active:
                continue
            if qid not in self._due or t < self._due[qid]:
                self._set_due(qid, t)
        self._pump()

    # ------------------------------------------------------------------ scheduling

    def _now(self) -> float:
        return float(self.reactor.seconds())

    def _set_due(self, qid: str, t: float) -> None:
        self._due[qid] = t
        heapq.heappush(self._heap, (t, qid))

    def _pump(self) -> None:
        if not self.running:
            return
        now = self._now()
        while self._heap and len(self._active) < self.max_jobs:
            t, qid = self._heap[0]
            if self._due.get(qid) != t or qid in self._active:
                heapq.heappop(self._heap)
                continue
            if t > now:
                break
            heapq.heappop(self._heap)
            del self._due[qid]
            self._start_job(qid)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._heap and len(self._active) < self.max_jobs:
            delay = max(0.0, self._heap[0][0] - now)
            self._timer = self.reactor.callLater(delay, self._pump)

    def _start_job(self, qid: str) -> None:
        forced = qid in self._forced
        self._forced.discard(qid)
        d = defer.ensureDeferred(self._run_message(qid, forced))
        self._active[qid] = d

        def failed(f: Any) -> None:
            log.failure("delivery run for {qid} failed; retrying later", f, qid=qid)
            self._set_due(qid, self._now() + self.config.queue.retry_intervals[0])

        def done(next_due: float | None) -> None:
            if next_due is not None:
                self._set_due(qid, next_due)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._job_done(qid))

    def _job_done(self, qid: str) -> None:
        self._active.pop(qid, None)
        if qid in self._forced:
            self._forced.discard(qid)
            self._set_due(qid, self._now())
        self._pump()

    def _due_time(self, env: dict) -> float | None:
        """When this message next needs work, or None when it is finished."""
        times = []
        for r in env["recipients"]:
            if r.get("notice"):
                return 0.0
            if r["state"] == "pending":
                times.append(0.0)
            elif r["state"] == "deferred":
                times.append(float(r.get("next_attempt") or 0.0))
        return min(times) if times else None

    # ------------------------------------------------------------------ one message

    async def _run_message(self, qid: str, forced: bool) -> float | None:
        env = await self._blocking(self.queue.load, qid)
        if env is None:
            return None
        if any(r.get("notice") for r in env["recipients"]):
            if not await self._send_notices(env):
                return None
        now = self._now()
        qcfg = self.config.queue
        arrival = float(env.get("arrival") or now)
        due = []
        changed = False
        for r in env["recipients"]:
            if r["state"] not in ("pending", "deferred"):
                continue
            if not forced and float(r.get("next_attempt") or 0.0) > now:
                continue
            if r["state"] == "deferred" and now - arrival >= qcfg.expiration:
                self._expire(env, r, now)
                changed = True
                continue
            due.append(r)
        if due:
            groups = routing.group_by_route(
                [r["address"] for r in due], self.config, local_delivery=self.store is not None,
                spread=routing.spread_key(qid),
            )
            by_addr: dict[str, list[dict]] = {}
            for r in due:
                by_addr.setdefault(r["address"], []).append(r)
            jobs = []
            for route, addrs in groups.items():
                rcpts = []
                seen: set[str] = set()
                for a in addrs:
                    if a in seen:
                        continue
                    seen.add(a)
                    rcpts.extend(by_addr[a])
                jobs.append(defer.ensureDeferred(self._deliver_route(env, route, rcpts)))
            results = await defer.gatherResults(jobs, consumeErrors=True)
            now = self._now()
            for rcpts, attempt, result in (part for parts in results for part in parts):
                replies = {rep.address: rep for rep in result.replies}
                for r in rcpts:
                    rep = replies.get(r["address"]) or smtp_client.RecipientReply(
                        r["address"], 451, "451 4.3.0 no result", remote=False
                    )
                    self._apply(env, r, rep, result, attempt, now)
            changed = True
        finished = self._due_time(env) is None
        if changed and not finished:
            if not await self._blocking(self.queue.save, env):
                log.info("{qid} was deleted from the queue during delivery", qid=qid)
                return None
        if any(r.get("notice") for r in env["recipients"]):
            if not await self._send_notices(env):
                return None
        next_due = self._due_time(env)
        if next_due is None:
            await self._blocking(self.queue.remove, qid)
            log.info("{qid} done: removed from the queue", qid=qid)
        return next_due

    def _expire(self, env: dict, r: dict, now: float) -> None:
        r["state"] = "failed"
        r["status"] = "4.4.7"
        r["notice"] = "failed" if dsn.wants_notice(r, "failed") else None
        if not env.get("sender"):
            log.warn("{qid}: mail from <> to <{rcpt}> expired and is dropped (no report about "
                     "a report)", qid=env["id"], rcpt=r["address"])
        log.info(
            "{qid} to=<{rcpt}> state=failed reply=expired after {days:.1f} days in the queue "
            "(last reply: {reply})",
            qid=env["id"], rcpt=r["address"], days=self.config.queue.expiration / 86400.0,
            reply=r.get("last_reply") or "none",
        )

    def _apply(self, env: dict, r: dict, rep: smtp_client.RecipientReply,
               result: smtp_client.TransactionResult, attempt: routing.Attempt,
               now: float) -> None:
        hop = attempt.hop
        qcfg = self.config.queue
        arrival = float(env.get("arrival") or now)
        r["attempts"] = int(r.get("attempts") or 0) + 1
        r["last_attempt"] = now
        r["last_reply"] = rep.reply
        r["remote_mta"] = (result.remote_mta or None) if rep.remote else None
        r["diagnostic"] = None
        r["status"] = rep.enhanced
        if rep.delivered:
            r["state"] = "delivered"
            r["next_attempt"] = None
            if dsn.wants_notice(r, "relayed"):
                if hop.local:
                    r["notice"] = "delivered"
                elif not result.dsn:
                    r["notice"] = "relayed"
        elif rep.permanent:
            r["state"] = "failed"
            r["next_attempt"] = None
            if not r["status"].startswith("5"):
                r["status"] = "5.0.0"
            r["notice"] = "failed" if dsn.wants_notice(r, "failed") else None
        elif now - arrival >= qcfg.expiration:
            r["state"] = "failed"
            r["next_attempt"] = None
            r["status"] = "4.4.7"
            r["notice"] = "failed" if dsn.wants_notice(r, "failed") else None
        else:
            r["state"] = "deferred"
            if not r["status"].startswith("4"):
                r["status"] = "4.0.0"
            intervals = qcfg.retry_intervals
            step = intervals[min(r["attempts"] - 1, len(intervals) - 1)]
            r["next_attempt"] = now + step
            r["will_retry_until"] = arrival + qcfg.expiration
            if (
                not r.get("delay_notified")
                and now - arrival >= qcfg.delay_notification
                and dsn.wants_notice(r, "delayed")
                and not r.get("notice")
            ):
                r["notice"] = "delayed"
                r["delay_notified"] = True
        log.info(
            "{qid} to=<{rcpt}> relay={relay} via=\"{via}\" delay={delay:.1f}s "
            "attempts={attempts} state={state} reply={reply}",
            qid=env["id"], rcpt=r["address"], via=attempt.via,
            relay=("local" if hop.local else (result.remote_mta or hop.key)),
            delay=max(0.0, now - arrival), attempts=r["attempts"], state=r["state"],
            reply=rep.reply,
        )
        if r["state"] == "failed" and not env.get("sender"):
            log.warn("{qid}: mail from <> to <{rcpt}> failed and is dropped (no report about "
                     "a report)", qid=env["id"], rcpt=r["address"])

    # ------------------------------------------------------------------ reports

    async def _send_notices(self, env: dict) -> bool:
        """Queue the reports this message owes, then clear its notices (durably).

        False when the message was deleted meanwhile.
        """
        kinds: dict[str, list[dict]] = {}
        for r in env["recipients"]:
            if r.get("notice"):
                kinds.setdefault(r["notice"], []).append(r)
        now = self._now()
        for kind, rcpts in kinds.items():
            addrs = ", ".join(f"<{r['address']}>" for r in rcpts)
            if not env.get("sender"):
                log.info("{qid}: no {kind} report for {addrs}: the sender is <> (dropped)",
                         qid=env["id"], kind=kind, addrs=addrs)
                continue
            try:
                report_id = await self._blocking(self._queue_report, env, kind, rcpts, now)
            except Exception as e:
                log.error("{qid}: cannot queue the {kind} report: {e}", qid=env["id"], kind=kind,
                          e=e)
                raise
            log.info("{qid}: {kind} report for {addrs} queued as {rid} to <{sender}>",
                     qid=env["id"], kind=kind, addrs=addrs, rid=report_id, sender=env["sender"])
        for r in env["recipients"]:
            r["notice"] = None
        return bool(await self._blocking(self.queue.save, env))

    def _queue_report(self, env: dict, kind: str, rcpts: list[dict], now: float) -> str:
        full = dsn.include_full(env, kind)
        original = dsn.read_original(self.queue.body_path(env["id"]), full)
        data = dsn.build_report(kind, env, rcpts, self.config.server.hostname, original, now, full)
        return self.queue.enqueue_bytes(data, dsn.report_envelope(env, now))

    # ------------------------------------------------------------------ one route

    async def _deliver_route(
        self, env: dict, route: routing.Route, rcpts: list[dict]
    ) -> list[tuple[list[dict], routing.Attempt, smtp_client.TransactionResult]]:
        """Walk ``route`` (module docstring, step 3) for ``rcpts``: each attempt gets the
        recipients nothing is known about yet. Return ``(recipients, attempt, result)`` parts:
        the recipients each attempt answered, then those no attempt could take, with the last
        temporary failure (or the last failure) as their result."""
        parts: list[tuple[list[dict], routing.Attempt, smtp_client.TransactionResult]] = []
        temporary: tuple[routing.Attempt, smtp_client.TransactionResult] | None = None
        last: tuple[routing.Attempt, smtp_client.TransactionResult] | None = None
        pending = rcpts
        attempts = route.attempts
        for n, attempt in enumerate(attempts, 1):
            answered, pending, result = await self._deliver_group(env, attempt.hop, pending)
            parts.extend((a_rcpts, attempt, a_result) for a_rcpts, a_result in answered)
            if not pending:
                return parts
            last = (attempt, result)
            if any(400 <= rep.code < 500 for rep in result.replies):
                temporary = last
            if n < len(attempts):
                log.info("{qid}: next hop {hop} ({via}) failed: {reply}; trying {next} ({nvia})",
                         qid=env["id"], hop=attempt.hop.key, via=attempt.via,
                         reply=result.replies[0].reply if result.replies else "no reply",
                         next=attempts[n].hop.key, nvia=attempts[n].via)
        assert last is not None
        if len(attempts) > 1:
            log.info("{qid}: every next hop for {rcpt} failed ({hops}); the mail waits for its "
                     "next retry", qid=env["id"], rcpt=routing.domain_of(pending[0]["address"]),
                     hops=route.key)
        attempt, result = temporary or last
        parts.append((pending, attempt, result))
        return parts

    def _advise(self, hop: routing.NextHop, result: smtp_client.TransactionResult) -> None:
        """Log the client's advice about ``hop`` once per hop (not once per message); forget it
        when a transaction there starts, so that a problem that comes back is logged again."""
        if not result.advice:
            if not _hop_failed(result):
                self._advised.pop(hop.key, None)
            return
        if self._advised.get(hop.key) == result.advice:
            return
        self._advised[hop.key] = result.advice
        log.warn("{role} {hop}: {advice} (logged once for this host)",
                 role="smart host" if hop.smarthost else "next hop", hop=hop.key,
                 advice=result.advice)

    # ------------------------------------------------------------------ one next hop

    async def _deliver_group(
        self, env: dict, hop: routing.NextHop, rcpts: list[dict]
    ) -> tuple[list[tuple[list[dict], smtp_client.TransactionResult]], list[dict],
               smtp_client.TransactionResult]:
        """Deliver ``rcpts`` through one next hop, host after host (its MX hosts in order).

        Returns ``(answered, pending, last)``: ``answered`` the ``(recipients, result)`` of each
        host that said something about them; ``pending`` the recipients no host of this hop
        could take (a host that could not start a transaction, or that ended the session with
        421 or a lost connection before the end of the message: ``RecipientReply.elsewhere``),
        with ``last`` the result of the last host tried. A TLS handshake that fails under
        ``tls = "opportunistic"`` is retried at once in clear text on the same host (as an
        opportunistic client must: TLS is only a bonus; the password still never goes out in
        clear)."""
        if hop.local:
            result = await self._blocking(self._deliver_local, env, rcpts)
            return [(rcpts, result)], [], result

        def everyone(code: int, reply: str, remote_mta: str = "") -> smtp_client.TransactionResult:
            return smtp_client.TransactionResult(
                replies=[smtp_client.RecipientReply(r["address"], code, reply, remote=False)
                         for r in rcpts],
                remote_mta=remote_mta,
            )

        try:
            candidates = await self.resolver.resolve(hop)
        except HopError as e:
            result = everyone(e.code, e.reply)
            result.hop_failed = True
            return [], rcpts, result
        own = await self._blocking(self._own_addresses)
        kept = []
        for c in candidates:
            if own.is_self(c.name, c.ip, c.port):
                break
            kept.append(c)
        if not kept:
            c = candidates[0]
            result = everyone(
                554, f"554 5.4.6 mail for {routing.domain_of(rcpts[0]['address'])} loops back to "
                     f"myself ({c.name} [{c.ip}]:{c.port})"
            )
            result.hop_failed = True
            return [], rcpts, result
        try:
            password = await self._blocking(self._password) if hop.smarthost else None
        except OSError as e:
            result = everyone(451, f"451 4.3.5 cannot read smarthost.password_file: "
                                   f"{e.strerror}")
            return [(rcpts, result)], [], result
        answered: list[tuple[list[dict], smtp_client.TransactionResult]] = []
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
                         "text (tls = \"opportunistic\")", qid=env["id"], host=c.name,
                         reply=failure)
                settings = dataclasses.replace(settings, starttls=False,
                                               tls_failure=failure.split(" ", 2)[-1])
            self._advise(hop, result)
            if result.hop_failed:
                continue
            replies = {rep.address: rep for rep in result.replies}
            done = [r for r in pending if not replies[r["address"]].elsewhere]
            pending = [r for r in pending if replies[r["address"]].elsewhere]
            answered.append((done, result))
            if not pending:
                break  # an answer about every recipient: no other host of this hop
        assert result is not None
        return answered, pending, result

    async def _deliver_host(self, env: dict, hop: routing.NextHop, c: Candidate,
                            settings: smtp_client.ClientSettings, rcpts: list[dict]
                            ) -> smtp_client.TransactionResult:
        """One SMTP session with one host of ``hop`` for ``rcpts``, within the limits."""
        transaction = smtp_client.Transaction(
            sender=env["sender"],
            recipients=[{"address": r["address"], "notify": r.get("notify"),
                         "orcpt": r.get("orcpt")} for r in rcpts],
            body_path=self.queue.body_path(env["id"]),
            size=env.get("size"),
            ret=env.get("ret"),
            envid=env.get("envid"),
            body=env.get("body"),
        )
        await self.limiter.acquire(hop.key)
        try:
            return await self._deliver(c.ip, c.port, settings, transaction, remote_mta=c.name)
        except Exception as e:  # a bug, not a network problem: keep the mail
            log.failure("delivery to {host} raised", host=c.name)
            return smtp_client.TransactionResult(
                replies=[smtp_client.RecipientReply(
                    r["address"], 451, f"451 4.3.0 internal error: {e.__class__.__name__}",
                    remote=False) for r in rcpts])
        finally:
            self.limiter.release(hop.key)

    def _settings(self, hop: routing.NextHop, c: Candidate,
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

    def _password(self) -> smtp_client.Secret | None:
        sh = self.config.smarthost
        if not sh.username or sh.password_file is None:
            return None
        return smtp_client.Secret(read_secret(sh.password_file))

    def _own_addresses(self) -> routing.OwnAddresses:
        ports: list[int] = []
        try:
            data = json.loads((self.config.server.state_dir / "run" / "listeners.json").read_text())
            for role in ("smtp", "submission", "smtps"):
                ports.extend(int(p) for p in data.get("listeners", {}).get(role, []))
        except (OSError, ValueError, AttributeError):
            pass
        return routing.own_addresses(self.config, ports)

    def _deliver_local(self, env: dict, rcpts: list[dict]) -> smtp_client.TransactionResult:
        """A recipient in a local domain (e.g. a report to a local sender): into the store.

        This is final delivery: each mailbox gets the message with ``Return-Path:`` and the
        envelope sender (``<>`` for a report) in front (RFC 5321 section 4.4; a queued body
        never carries one). The quota with its grace applies as for SMTP: a mailbox without
        room is a permanent ``552 5.2.2`` (a failure report to the sender, per NOTIFY)."""
        replies = []
        body = self.queue.body_path(env["id"])
        prefix = return_path_field(env.get("sender") or "")
        for r in rcpts:
            local, _, domain = r["address"].rpartition("@")
            try:
                _written, refused = self.store.deliver_within_quota(
                    body, [(domain.lower(), local.lower())], prefix=prefix
                )
                if refused:
                    raise errors.QuotaExceeded(f"mailbox {r['address']} is over its quota")
                rep = smtp_client.RecipientReply(r["address"], 250, "250 2.0.0 delivered to mailbox",
                                                 remote=False)
            except errors.NoSuchMailbox:
                rep = smtp_client.RecipientReply(r["address"], 550, "550 5.1.1 no such mailbox",
                                                 remote=False)
            except errors.QuotaExceeded:
                rep = smtp_client.RecipientReply(r["address"], 552, "552 5.2.2 mailbox over quota",
                                                 remote=False)
            except (errors.StoreError, OSError) as e:
                rep = smtp_client.RecipientReply(r["address"], 451, f"451 4.3.0 store: {e}",
                                                 remote=False)
            replies.append(rep)
        return smtp_client.TransactionResult(replies=replies, remote_mta="", connected=True)
