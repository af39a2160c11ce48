"""The delivery runner: a twisted Service that drains the outbound queue (store/queue.py).

At start it cleans up after a crash (``FileQueue.recover``) and loads every envelope. A message
is due when a recipient is pending, or deferred with ``next_attempt`` in the past, or a report
for it is still to be queued. For a due message the runner:

1. re-reads the envelope from disk (``queue delete`` from another process wins);
2. fails recipients past ``queue.expiration``;
3. groups the due recipients by route (policy/routing.py: the ordered next hops of their
   domain) and runs one SMTP transaction per group (smtp/client.py), within
   ``smarthost.max_connections`` in total and ``max_connections_per_host`` per hop
   (smtp/hostlimits.py). A route is walked in order, host after host (smtp/hops.py resolves a
   hop into hosts), hop after hop, until one answers about each recipient (smtp/delivery.py
   says when a host or hop counts as failed, when the recipients it left unanswered, after a
   ``421`` or a lost connection, go on to the next one, and which reply then stands); each
   part of a group may so be answered by a different hop. The log names the hop used
   (``via=``) and each hop passed over. A hop that cannot be used because of our own settings
   (smart host AUTH impossible) is explained once per hop in the log, not once per message;
4. applies each recipient's reply (smtp/retry.py): 2xx delivered, 5xx failed, 4xx / no reply
   deferred on the ``retry_intervals`` schedule (the last interval repeats), logging one line
   per recipient;
5. writes the envelope durably, then queues the RFC 3464 reports it owes (smtp/dsn.py), then
   clears those notices and removes the message once every recipient is final. The removal
   gets its own log line ("done: removed from the queue") only when the run logged no
   recipient line (a run that only sent the reports owed): after a run that logged each
   recipient's final state, that line would say nothing new (one log line per message less:
   issue 17).

The queue state is typed (store/envelope.py ``Envelope`` / ``Recipient``); this module is the
scheduler: which message runs when, how many at once, start, stop, flush and wake.

A crash between steps repeats work (a delivery or a report may happen twice), never loses it.
``queue flush`` from another process is a marker file polled every ``poll_interval`` seconds;
``queue.wake()`` (new mail, SIGHUP) runs new messages at once.

Every serving process runs one (``server.workers``; over a shared volume, every node): a
runner claims a message before it works on it and gives it back when it defers it (the claim
protocol: store/queue.py). Each runner delivers what its own process queued at once, keeps
the messages it deferred on its own timer, renews its lease at every
poll, and every ``scan_interval`` seconds takes back expired claims and
claims due messages nobody took for ``scan_grace`` seconds (those of a process that died).
``smarthost.max_connections`` and ``max_connections_per_host`` are totals: each of the
``processes`` runners of a node gets its share (at least one).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import threadable

from pop3coexist import errors
from pop3coexist.config import Config
from pop3coexist.interfaces import IFileRecycler, IMailStore
from pop3coexist.policy import routing
from pop3coexist.policy.expansion import Expander
from pop3coexist.smtp import client as smtp_client
from pop3coexist.smtp import dsn, retry
from pop3coexist.smtp.delivery import RouteDelivery, our_reply
from pop3coexist.smtp.hops import HopResolver
from pop3coexist.smtp.hostlimits import HopLimiter
from pop3coexist.smtp.serial import SerialThread
from pop3coexist.store.envelope import Envelope, Notice, Recipient, State
from pop3coexist.store.queue import FileQueue, make_owner

log = Logger(namespace="pop3coexist.outbound")

DOMAINS_TTL = 1.0  # seconds: how long the store's domain list is taken as known
REMOVE_LINGER = 0.02  # seconds: delivered messages gathered for one removal call


def _sync_blocking(f: Callable, *a: Any, **kw: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *a, **kw)


class GroupCall:
    """Group commit for a blocking call on a list: ``call(item)`` returns a Deferred that
    fires when ``work(items)`` (run by ``blocking``, one call at a time) has done a batch
    holding ``item``; every request made while a batch runs goes into the next batch. A
    failed batch fails each of its requests with the same error.

    ``linger`` (seconds, with ``clock``: an IReactorTime): a batch starts that long after
    its first request rather than at once, so that more requests share its thread call
    (the removals of delivered messages: nobody waits for them but their own job)."""

    def __init__(self, blocking: Callable[..., defer.Deferred],
                 work: Callable[[list[Any]], Any], linger: float = 0.0,
                 clock: Any = None) -> None:
        self._blocking = blocking
        self._work = work
        self._pending: list[tuple[Any, defer.Deferred]] = []
        self._running = False
        self._linger = linger if clock is not None else 0.0
        self._clock = clock

    def __call__(self, item: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._pending.append((item, d))
        if not self._running:
            if self._linger > 0:
                self._running = True  # the batch is on its way: the others join it
                self._clock.callLater(self._linger, self._run)
            else:
                self._run()
        return d

    def _run(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True
        done = self._blocking(self._work, [item for item, _ in batch])

        def ok(result: Any) -> None:
            for _, d in batch:
                d.callback(result)

        def failed(failure: Any) -> None:
            for _, d in batch:
                d.errback(failure)

        def next_batch(_: Any) -> None:
            self._running = False
            if self._pending:
                self._run()

        done.addCallbacks(ok, failed)
        done.addBoth(next_batch)


class OutboundService(service.Service):
    """Delivers the queue; see the module docstring.

    ``checker``: the IAccountChecker, so the local hop finds aliases and proxy addresses.
    ``resolver`` (a HopResolver), ``deliver`` (like ``client.deliver``) and ``blocking``
    (like ``threads.deferToThread``) can be replaced by tests. ``remove_linger`` (seconds):
    how long delivered messages are gathered for one removal call (0: each group at once).
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
        checker: Any = None,
        worker: int = 0,
        processes: int = 1,
        node: str | None = None,
        scan_interval: float = 30.0,
        scan_grace: float = 5.0,
        remove_linger: float = REMOVE_LINGER,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.queue = queue
        self.store = store
        self.reactor = reactor
        self.resolver = resolver or HopResolver()
        # SMTP connection reuse: the sessions to each next hop are kept for the next messages
        sh = config.smarthost
        self.connections = smtp_client.ConnectionCache(
            reactor, sh.reuse_messages, sh.reuse_idle, sh.reuse_idle_per_host)
        self._deliver = deliver or self.connections.deliver
        grouped = blocking
        if blocking is None:
            if hasattr(reactor, "getThreadPool"):
                from twisted.internet import threads

                def blocking(f: Callable, *a: Any, **kw: Any) -> defer.Deferred:
                    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw)

                # the grouped removals and claims (one group at a time each) on a thread of
                # their own: a cheaper hand-off than the pool's (smtp/serial.py, issue 17)
                grouped = SerialThread(reactor, f"pop3coexist-queue-w{worker}")
            else:
                blocking = grouped = _sync_blocking
        self._blocking = blocking
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        sh = config.smarthost
        self.worker = worker
        self.node = node
        self.scan_interval = scan_interval
        self.scan_grace = scan_grace
        self._last_scan = 0.0
        share = max(1, processes)
        total = max(1, math.ceil(sh.max_connections / share))
        self.limiter = HopLimiter(total, max(1, math.ceil(sh.max_connections_per_host / share)))
        self.max_jobs = max(10, total * 2)
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._active: dict[str, defer.Deferred] = {}
        self._forced: set[str] = set()
        self._timer: Any = None
        self._poller: task.LoopingCall | None = None
        self._ready = False
        self._early: list[str] = []
        self._domains: tuple[float, frozenset[str]] | None = None  # (monotonic time, domains)
        # the local hop: an alias, list or proxy address reaches its mailboxes (issue 14)
        expander = None
        if checker is not None and store is not None:
            expander = Expander(config, store, checker, self._blocking)
        # delivered messages leave the queue in groups: one folder sync per group
        self._remove = GroupCall(grouped, queue.remove_many, remove_linger, reactor)
        # and are claimed in groups: one thread hop for the jobs started meanwhile
        self._claims = GroupCall(grouped, self._claim_many)
        self.routes = RouteDelivery(config, queue, store, self.resolver, self.limiter,
                                    self._deliver, self._blocking, expander)
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
        owner = make_owner(self.node, self.worker)
        if self.worker == 0:  # the main process: the runners of this node before it are dead
            node = owner.split(".", 1)[0]
            counts = self.queue.recover(node=node)
            if counts["tmp"] or counts["orphans"]:
                log.info("queue recovery: removed {tmp} temp files and {orphans} unfinished "
                         "messages", **counts)
            if counts.get("taken_back"):
                log.info("queue recovery: {n} claimed messages of this node's earlier "
                         "processes taken back", n=counts["taken_back"])
        self.queue.set_owner(owner)
        self.queue.drain_new()
        self.queue.claim_new = True  # what this process queues from now on is born claimed
        if self.worker != 0:
            return {}  # the main process's scan finds what is queued; the scans share it later
        return self._scan()

    def _scan(self) -> dict[str, float]:
        """Blocking: the due time of every unclaimed message (from its envelope)."""
        due: dict[str, float] = {}
        for qid in self.queue.ready_ids():
            env = self.queue.load(qid)
            if env is None:
                continue
            t = env.due_time()
            due[qid] = self._now_blocking() if t is None else t  # None: removed by its run
        return due

    def _now_blocking(self) -> float:
        return float(self.reactor.seconds())

    def _orphan_scan(self) -> list[str]:
        """Blocking: renew nothing, take back expired claims, and list the unclaimed messages
        due ``scan_grace`` seconds ago (their runner is gone or busy)."""
        self.queue.take_back(expired=self.queue.lease)
        return self.queue.due_ids(self.queue.clock() - self.scan_grace)

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
        self.queue.forget_born()
        self.connections.close_all()
        d = self._stop_jobs()

        def give_back(result: Any) -> Any:
            try:  # what this runner still holds goes back to env/ for the others, except a
                # run that did not end in stop_grace (taken back once this process is gone)
                self.queue.release_all(keep=set(self._active))
            except OSError as e:
                log.error("outbound: cannot give back the claimed messages: {e}", e=e)
            return result

        return d.addBoth(give_back)

    def worker_ended(self, number: int) -> None:
        """Worker ``number`` of this node died: take its claims back now and run them."""
        node = (self.queue.owner or make_owner(self.node)).split(".", 1)[0]
        d = self._blocking(self.queue.take_back, f"{node}.w{int(number)}.")

        def taken(n: int) -> Any:
            if n:
                log.info("{n} messages claimed by worker {number} taken back", n=n,
                         number=number)
                return self._blocking(self._scan).addCallback(self._rescanned, force=False)
            return None

        d.addCallback(taken)
        d.addErrback(lambda f: log.failure("taking back worker {number}'s claims failed", f,
                                           number=number))

    def _stop_jobs(self) -> defer.Deferred[None]:
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
        """``ids`` were queued elsewhere (a restore, a test): try to claim them now. Before the
        start-up scan is done they are kept and added after it."""
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
        now = self._now()
        scan = now - self._last_scan >= self.scan_interval
        if scan:
            self._last_scan = now

        def blocking() -> tuple[bool, bool, list[str]]:
            self.queue.touch_lease()
            if IFileRecycler.providedBy(self.queue):
                self.queue.trim_pool()  # spent files idle for a minute (store/recycle.py)
            orphans = self._orphan_scan() if scan else []
            return self.queue.take_marker("flush"), self.queue.take_marker("rescan"), orphans

        d = self._blocking(blocking)

        def got(markers: tuple[bool, bool, list[str]]) -> Any:
            flush, rescan, orphans = markers
            if orphans and not (flush or rescan):
                self._adopt(orphans)
            if flush:
                log.info("queue flush requested: retrying every message now")
            if flush or rescan:
                return self._blocking(self._scan).addCallback(self._rescanned, force=flush)
            return None

        d.addCallback(got)
        d.addErrback(_poll_failed)
        return d

    def _adopt(self, ids: list[str]) -> None:
        """Unclaimed messages overdue for ``scan_grace``: try to claim them now."""
        now = self._now()
        for qid in ids:
            if qid not in self._active and self._due.get(qid, now + 1) > now:
                self._set_due(qid, now)
        self._pump()

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

    # ------------------------------------------------------------------ one message

    async def _run_message(self, qid: str, forced: bool) -> float | None:
        env: Any = self.queue.take_born(qid)
        domains = self._fresh_domains()
        if env is None or domains is None:  # claim it, or read the domains: one thread hop
            claimed, domains = await self._claims(qid)
            env = claimed.get(qid, env)
            if isinstance(env, Exception):
                raise env
        if env is None:  # delivered, deleted, or another runner has it
            return None
        if not self.queue.lease_fresh():  # our claims may be taken back before we end
            await self._blocking(self.queue.release, qid, self.queue.clock())
            return None
        try:
            next_due = await self._run_claimed(qid, env, forced, domains)
        except BaseException:
            await self._blocking(self.queue.release, qid,
                                 self.queue.clock() + self.config.queue.retry_intervals[0])
            raise
        if next_due is not None:  # deferred: back to env/, due then (this runner's timer too)
            await self._blocking(self.queue.release, qid,
                                 self.queue.clock() + max(0.0, next_due - self._now()))
        return next_due

    def _claim_many(self, qids: list[str]) -> tuple[dict[str, Envelope | None], frozenset[str]]:
        """Blocking: claim each of ``qids`` (the jobs started while the last group ran) and
        read the store's domains, in one thread hop."""
        claimed: dict[str, Any] = {}
        for qid in qids:
            try:
                claimed[qid] = self.queue.claim(qid)
            except Exception as e:  # noqa: BLE001 - that job fails alone (retried later)
                claimed[qid] = e
        domains = self._fresh_domains()
        if domains is None:
            domains = self._store_domains()
            self._domains = (time.monotonic(), domains)
        return claimed, domains

    def _fresh_domains(self) -> frozenset[str] | None:
        """The store's domains read within ``DOMAINS_TTL`` (a ``domain add`` routes mail to
        the store within a second), or None: read them again (blocking)."""
        known = self._domains
        if known is None or time.monotonic() - known[0] >= DOMAINS_TTL:
            return None
        return known[1]

    async def _run_claimed(self, qid: str, env: Envelope, forced: bool,
                           domains: frozenset[str]) -> float | None:
        if any(r.notice for r in env.recipients):
            if not await self._send_notices(env):
                return None
        now = self._now()
        qcfg = self.config.queue
        arrival = float(env.arrival or now)
        due: list[Recipient] = []
        changed = False
        for r in env.recipients:
            if not r.due:
                continue
            if not forced and float(r.next_attempt or 0.0) > now:
                continue
            if r.state == State.DEFERRED and now - arrival >= qcfg.expiration:
                retry.expire(env, r, now, qcfg)
                changed = True
                continue
            due.append(r)
        if due:
            groups = routing.group_by_route(
                [r.address for r in due], self.config, local_delivery=self.store is not None,
                spread=routing.spread_key(qid),
                local_domains=domains,
            )
            by_addr: dict[str, list[Recipient]] = {}
            for r in due:
                by_addr.setdefault(r.address, []).append(r)
            jobs = []
            for route, addrs in groups.items():
                rcpts = []
                seen: set[str] = set()
                for a in addrs:
                    if a in seen:
                        continue
                    seen.add(a)
                    rcpts.extend(by_addr[a])
                jobs.append((route, rcpts))
            if len(jobs) == 1:  # one route (the usual case): awaited here, no Deferred for it
                results = [await self.routes.deliver_route(env, *jobs[0])]
            else:  # the routes at once
                results = await defer.gatherResults(
                    [defer.ensureDeferred(self.routes.deliver_route(env, route, rcpts))
                     for route, rcpts in jobs], consumeErrors=True)
            now = self._now()
            for rcpts, attempt, result in (part for parts in results for part in parts):
                replies = {rep.address: rep for rep in result.replies}
                for r in rcpts:
                    rep = replies.get(r.address) or our_reply(
                        r.address, errors.TemporaryFailure("no result"))
                    retry.apply_reply(env, r, rep, result, attempt, now, qcfg)
            changed = True
        finished = env.due_time() is None
        if changed and not finished:
            if not await self._blocking(self.queue.save, env):
                log.info("{qid} was deleted from the queue during delivery", qid=qid)
                return None
        if any(r.notice for r in env.recipients):
            if not await self._send_notices(env):
                return None
        next_due = env.due_time()
        if next_due is None:
            await self._remove(qid)
            if not changed:  # a line per recipient of this run says it ended (issue 17)
                log.info("{qid} done: removed from the queue", qid=qid)
        return next_due

    # ------------------------------------------------------------------ reports

    async def _send_notices(self, env: Envelope) -> bool:
        """Queue the reports this message owes, then clear its notices (durably).

        False when the message was deleted meanwhile.
        """
        kinds: dict[Notice, list[Recipient]] = {}
        for r in env.recipients:
            if r.notice:
                kinds.setdefault(r.notice, []).append(r)
        now = self._now()
        for kind, rcpts in kinds.items():
            addrs = ", ".join(f"<{r.address}>" for r in rcpts)
            if not env.sender:
                log.info("{qid}: no {kind} report for {addrs}: the sender is <> (dropped)",
                         qid=env.id, kind=str(kind), addrs=addrs)
                continue
            try:
                report_id = await self._blocking(self._queue_report, env, kind, rcpts, now)
            except Exception as e:
                log.error("{qid}: cannot queue the {kind} report: {e}", qid=env.id,
                          kind=str(kind), e=e)
                raise
            log.info("{qid}: {kind} report for {addrs} queued as {rid} to <{sender}>",
                     qid=env.id, kind=str(kind), addrs=addrs, rid=report_id, sender=env.sender)
        for r in env.recipients:
            r.notice = None
        return bool(await self._blocking(self.queue.save, env))

    def _queue_report(self, env: Envelope, kind: Notice, rcpts: list[Recipient],
                      now: float) -> str:
        full = dsn.include_full(env, kind)
        original = dsn.read_original(self.queue.body_path(env.id), full)
        data = dsn.build_report(kind, env, rcpts, self.config.server.hostname, original, now, full)
        return self.queue.enqueue_bytes(data, dsn.report_envelope(env, now))
    def _store_domains(self) -> frozenset[str]:
        """Blocking. The domains the mail store holds: the configured local ones and those
        ``domain add`` made while running; mail for them (a report to a local sender) is
        final delivery here, never sent out by MX. Empty when the store cannot say."""
        if not IMailStore.providedBy(self.store):  # no store, or one that only delivers
            return frozenset()
        try:
            return frozenset(d.lower() for d in self.store.list_domains())
        except Exception as e:  # noqa: BLE001 - the configured local domains still route
            log.warn("outbound: cannot list the store's domains: {err}", err=e)
            return frozenset()


def _poll_failed(failure: Any) -> None:
    """A queue poll that failed: one line when the shared volume cannot be reached (the next
    poll tries again), the traceback otherwise."""
    volume = errors.volume_unreachable(failure.value)
    if volume is not None:
        log.error("queue poll failed: the queue cannot be reached: {volume}", volume=volume)
    else:
        log.failure("queue poll failed", failure)
