"""The delivery runner (smtp/outbound.py) with task.Clock, a real FileQueue and a fake next hop."""

from __future__ import annotations

import dataclasses
import email
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from pop3coexist.config import parse_config
from pop3coexist.errors import NoSuchMailbox
from pop3coexist.smtp import client as c
from pop3coexist.smtp.hops import HopError, HopResolver
from pop3coexist.smtp.outbound import OutboundService
from pop3coexist.store.queue import FileQueue, Notice, State

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nhello\r\n"
START = 1_000_000.0


@dataclass
class Call:
    ip: str
    port: int
    settings: c.ClientSettings
    txn: c.Transaction
    remote_mta: str
    deferred: defer.Deferred
    body: bytes = b""

    @property
    def rcpts(self) -> list[str]:
        return [r["address"] for r in self.txn.recipients]


class FakeHop:
    """Stands in for client.deliver: records calls; answers with ``responder`` (or waits)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.responder: Callable[[Call], dict | str] | None = lambda call: {}
        self.dsn = False

    def __call__(self, ip, port, settings, txn, remote_mta=None):  # noqa: ANN001
        call = Call(ip, port, settings, txn, remote_mta, defer.Deferred(), Path(txn.body_path).read_bytes())
        self.calls.append(call)
        if self.responder is not None:
            self.answer(call, self.responder(call))
        return call.deferred

    def answer(self, call: Call, spec: dict | str) -> None:
        """``spec``: "refused", "no-auth" (AUTH impossible, with advice), "no-tls" (greeted, but TLS required and not offered), or
        {address: "code text"} (missing: "250 2.0.0 ok"), or a TransactionResult as it is."""
        if isinstance(spec, c.TransactionResult):
            call.deferred.callback(spec)
            return
        if spec == "refused":
            replies = [c.RecipientReply(a, 421, "421 4.4.1 connection refused", remote=False)
                       for a in call.rcpts]
            result = c.TransactionResult(replies=replies, remote_mta=call.remote_mta,
                                         hop_failed=True)
        elif spec == "no-auth":
            replies = [c.RecipientReply(a, 451, "451 4.7.0 cannot authenticate to the smart "
                                        "host: why and fix", remote=False) for a in call.rcpts]
            result = c.TransactionResult(replies=replies, remote_mta=call.remote_mta,
                                         connected=True, hop_failed=True,
                                         advice="it offers AUTH only in clear text; the fix")
        elif spec == "no-tls":
            replies = [c.RecipientReply(a, 454, "454 4.7.4 TLS required by policy but the "
                                        "server does not offer STARTTLS", remote=False)
                       for a in call.rcpts]
            result = c.TransactionResult(replies=replies, remote_mta=call.remote_mta,
                                         connected=True, hop_failed=True)
        else:
            replies = []
            for a in call.rcpts:
                text = spec.get(a, "250 2.0.0 ok")
                replies.append(c.RecipientReply(a, int(text[:3]), text))
            result = c.TransactionResult(replies=replies, remote_mta=call.remote_mta,
                                         dsn=self.dsn, connected=True)
        call.deferred.callback(result)


class Env:
    """A runner over a queue in tmp_path, on a Clock."""

    def __init__(self, tmp_path: Path, smarthost: str = "[192.0.2.10]:2525", extra: str = "",
                 store: object = None, resolver: HopResolver | None = None,
                 expiration: str = "100s") -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pw").write_text("s3cret\n")
        self.config = parse_config(f"""
[server]
hostname = "pop.contoso.test"
state_dir = "{tmp_path}/state"
[smtp]
listen = ["tcp:2525:interface=127.0.0.1"]
[domains]
local = ["pop.contoso.test"]
[smarthost]
host = "{smarthost}"
tls = "none"
max_connections = 2
max_connections_per_host = 1
{extra}
[queue]
retry_intervals = ["10s", "20s", "40s"]
delay_notification = "25s"
expiration = "{expiration}"
""")
        self.tmp = tmp_path
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = FileQueue(self.config.server.queue_dir, "pop.contoso.test", clock=self.clock.seconds)
        self.hop = FakeHop()
        self.store = store
        self.resolver = resolver
        self.svc = self.new_service()

    def new_service(self) -> OutboundService:
        return OutboundService(self.config, self.queue, store=self.store, reactor=self.clock,
                               deliver=self.hop, poll_interval=5, resolver=self.resolver,
                               remove_linger=0)

    def start(self) -> None:
        self.svc.startService()
        assert self.svc.started.called

    def enqueue(self, *rcpts: str, sender: str = "a@example.org", notify: list[str] | None = None,
                **kw: object) -> str:
        spool = self.tmp / "spool"
        spool.mkdir(exist_ok=True)
        src = spool / f"m{len(list(spool.iterdir()))}"
        src.write_bytes(MESSAGE)
        env = {"sender": sender, "arrival": self.clock.seconds(), "hops": 1, "ret": None,
               "envid": None, "received_from": "test",
               "recipients": [{"address": r, "orcpt": None, "notify": notify} for r in rcpts]}
        env.update(kw)
        qid = self.queue.enqueue(src, env)
        src.unlink()
        return qid

    def reports(self) -> list[tuple[list[str], email.message.Message]]:
        """Every report handed to the next hop so far: (recipients, parsed message)."""
        return [(call.rcpts, email.message_from_bytes(call.body))
                for call in self.hop.calls
                if call.txn.sender == "" and call.body.startswith(b"From: Mail Delivery System")]


def _status_blocks(msg: email.message.Message) -> list:
    return msg.get_payload(1).get_payload()[1:]


@pytest.fixture
def logs() -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _text(events: list[dict]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def test_new_mail_is_delivered_at_once_and_removed(tmp_path: Path, logs: list[dict]) -> None:
    """A message enqueued while running goes out immediately; once delivered it leaves the
    queue, and the log has one line per recipient with the next hop's reply."""
    env = Env(tmp_path)
    env.start()
    qid = env.enqueue("b@example.net", "c@example.net")
    [call] = env.hop.calls
    assert (call.ip, call.port, call.rcpts) == ("192.0.2.10", 2525, ["b@example.net", "c@example.net"])
    assert env.queue.ids() == []
    text = _text(logs)
    assert f"{qid} to=<b@example.net> relay=192.0.2.10" in text and "reply=250 2.0.0 ok" in text
    assert f"{qid} to=<c@example.net>" in text


def test_mail_queued_while_running_is_run_without_a_claim_or_a_read(tmp_path: Path) -> None:
    """What the runner's own process queues is born claimed (store/queue.py): the runner takes
    its envelope from memory, so no ``claim`` (rename, read, thread hop) runs for it; the
    store's domains are read once for several messages within a second."""
    env = Env(tmp_path)
    env.start()
    claims: list[str] = []
    claim = env.queue.claim

    def counting_claim(qid: str) -> object:
        claims.append(qid)
        return claim(qid)

    env.queue.claim = counting_claim  # type: ignore[method-assign]
    env.enqueue("b@example.net")
    env.enqueue("c@example.net")
    env.enqueue("d@example.net")
    assert len(env.hop.calls) == 3 and env.queue.ids() == []
    assert len(claims) <= 1  # the first one may read the domain list (and so claim) once


def test_smarthost_down_then_up_delivers_after_retry(tmp_path: Path) -> None:
    """Connection refused defers on the retry schedule; when the host is back it is delivered."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: "refused"
    env.start()
    qid = env.enqueue("b@example.net")
    [r] = env.queue.load(qid).recipients
    assert r.state == "deferred" and r.next_attempt == START + 10
    assert r.last_reply == "421 4.4.1 connection refused"
    env.clock.advance(9)
    assert len(env.hop.calls) == 1
    env.hop.responder = lambda call: {}
    env.clock.advance(1)
    assert len(env.hop.calls) == 2
    assert env.queue.ids() == []


def test_retry_intervals_last_one_repeats(tmp_path: Path) -> None:
    """Attempts come after 10, 20, 40, 40 seconds (the last interval repeats)."""
    env = Env(tmp_path, expiration="1d")
    env.hop.responder = lambda call: {"b@example.net": "451 4.3.0 later"}
    env.start()
    env.enqueue("b@example.net", notify=["FAILURE"])
    times = []
    for _ in range(160):
        env.clock.advance(1)
        if len(env.hop.calls) > len(times) + 1:
            times.append(env.clock.seconds() - START)
    assert times == [10, 30, 70, 110, 150]


def test_mixed_replies(tmp_path: Path) -> None:
    """Delivered recipients are not resent, failed ones get exactly one report listing only
    them, deferred ones are retried alone."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: {"c@example.net": "550 5.1.1 no such user",
                                      "d@example.net": "451 4.2.1 try later",
                                      "e@example.net": "553 5.1.3 bad address"}
    env.start()
    qid = env.enqueue("b@example.net", "c@example.net", "d@example.net", "e@example.net")
    states = {r.address: r.state for r in env.queue.load(qid).recipients}
    assert states == {"b@example.net": "delivered", "c@example.net": "failed",
                      "d@example.net": "deferred", "e@example.net": "failed"}
    [(to, report)] = env.reports()
    assert to == ["a@example.org"]  # went out through the same next hop, from <>
    blocks = _status_blocks(report)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; c@example.net", "rfc822; e@example.net"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.1.3"]
    assert blocks[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[0]["Remote-MTA"] == "dns; 192.0.2.10"
    env.hop.responder = lambda call: {}
    env.clock.advance(10)
    assert env.hop.calls[-1].rcpts == ["d@example.net"]
    assert env.queue.load(qid) is None
    assert len(env.reports()) == 1  # no second report


def test_expiration_fails_with_one_report(tmp_path: Path) -> None:
    """Still deferred after `expiration`: failed (no more attempts) with one report saying
    Action failed, Status 4.4.7 and the last reply as diagnostic."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: "refused" if call.txn.sender else {}
    env.start()
    qid = env.enqueue("b@example.net", notify=["FAILURE"])
    env.clock.pump([10] * 15)
    assert [call.txn.sender for call in env.hop.calls].count("a@example.org") == 4  # 0,10,30,70
    [(to, report)] = env.reports()
    assert to == ["a@example.org"]
    [block] = _status_blocks(report)
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert "connection refused" in block["Diagnostic-Code"]
    assert report.get_payload(2).get_content_type() == "message/rfc822"
    assert env.queue.load(qid) is None and env.queue.ids() == []


def test_delayed_report_is_sent_once(tmp_path: Path) -> None:
    """After delay_notification a "delayed" report goes once (NOTIFY allowing)."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: {"b@example.net": "451 4.2.0 busy"} if call.txn.sender else {}
    env.start()
    env.enqueue("b@example.net")
    env.clock.pump([10] * 9)  # up to 90 s: attempts at 0, 10, 30, 70
    actions = [b["Action"] for _, m in env.reports() for b in _status_blocks(m)]
    assert actions == ["delayed"]
    assert env.reports()[0][1].get_payload(2).get_content_type() == "text/rfc822-headers"


def test_notify_never_and_null_sender_get_no_reports(tmp_path: Path, logs: list[dict]) -> None:
    """NOTIFY=NEVER suppresses reports; mail from <> is never reported (only logged)."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: {a: "550 5.1.1 unknown" for a in call.rcpts}
    env.start()
    env.enqueue("b@example.net", notify=["NEVER"])
    env.enqueue("c@example.net", sender="")
    assert env.reports() == [] and env.queue.ids() == []
    assert "mail from <> to <c@example.net> failed and is dropped" in _text(logs)


def test_a_failing_report_is_dropped_not_bounced(tmp_path: Path, logs: list[dict]) -> None:
    """A report that itself fails is dropped and logged: no report about a report."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: {a: "550 5.1.1 unknown" for a in call.rcpts}
    env.start()
    env.enqueue("b@example.net")
    assert [call.txn.sender for call in env.hop.calls] == ["a@example.org", ""]
    assert env.queue.ids() == []


def test_notify_success_gives_relayed_without_dsn_and_passes_on_with_dsn(tmp_path: Path) -> None:
    """NOTIFY=SUCCESS: a next hop without DSN yields a "relayed" report; with DSN the
    parameters are passed on and no report is made here."""
    env = Env(tmp_path)
    env.hop.responder = None
    env.start()
    env.enqueue("b@example.net", notify=["SUCCESS"], envid="X1")
    call = env.hop.calls[0]
    assert call.txn.recipients[0]["notify"] == ["SUCCESS"] and call.txn.envid == "X1"
    env.hop.answer(call, {})
    [(_, report)] = env.reports()
    assert [b["Action"] for b in _status_blocks(report)] == ["relayed"]
    env.hop.answer(env.hop.calls[1], {})
    env.hop.dsn = True
    env.hop.responder = lambda call: {}
    env.enqueue("c@example.net", notify=["SUCCESS"])
    assert len(env.reports()) == 1 and env.queue.ids() == []


def test_loop_to_myself_is_refused(tmp_path: Path, logs: list[dict]) -> None:
    """A smart host that is our own listener fails with 554 5.4.6 "loops back to myself"
    (the report about it loops too, and is dropped, not bounced)."""
    env = Env(tmp_path, smarthost="[127.0.0.1]:2525")
    env.start()
    qid = env.enqueue("b@example.net")
    assert env.hop.calls == []
    assert env.queue.load(qid) is None and env.queue.ids() == []
    text = _text(logs)
    assert f"{qid} to=<b@example.net>" in text
    assert "state=failed reply=554 5.4.6 mail for example.net loops back to myself" in text
    assert f"{qid}: failed report for <b@example.net> queued" in text
    assert "to <a@example.org> failed and is dropped (no report about a report)" in text


def test_connection_limits_total_and_per_host(tmp_path: Path) -> None:
    """At most max_connections_per_host (1) at once to one hop; the next waits for a slot."""
    env = Env(tmp_path)
    env.hop.responder = None
    env.start()
    env.enqueue("b@example.net")
    env.enqueue("c@example.net")
    assert len(env.hop.calls) == 1
    assert env.svc.limiter.open == 1
    env.hop.answer(env.hop.calls[0], {})
    assert len(env.hop.calls) == 2
    env.hop.answer(env.hop.calls[1], {})
    assert env.svc.limiter.open == 0 and env.queue.ids() == []


def test_recipients_are_grouped_per_next_hop(tmp_path: Path) -> None:
    """One transaction per next hop: a routed domain gets its own, the rest share one."""
    env = Env(tmp_path, extra='[[domains.remote]]\nname = "x.test"\nroute = "[192.0.2.20]:26"')
    env.start()
    env.enqueue("b@example.net", "e@x.test", "c@example.org", "d@example.net")
    assert sorted((call.ip, call.port, tuple(call.rcpts)) for call in env.hop.calls) == [
        ("192.0.2.10", 2525, ("b@example.net", "c@example.org", "d@example.net")),
        ("192.0.2.20", 26, ("e@x.test",)),
    ]


def test_flush_from_another_process_retries_now(tmp_path: Path) -> None:
    """`queue flush` (a marker from another FileQueue) is noticed by the poll and retries."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: "refused"
    env.start()
    env.enqueue("b@example.net")
    env.hop.responder = lambda call: {}
    FileQueue(env.queue.root, "pop.contoso.test").request_flush()
    env.clock.advance(5)  # one poll, well before the 10 s retry
    assert len(env.hop.calls) == 2 and env.queue.ids() == []


def test_delete_by_admin_is_respected(tmp_path: Path) -> None:
    """A message deleted by the admin while deferred is not tried again."""
    env = Env(tmp_path)
    env.hop.responder = lambda call: "refused"
    env.start()
    qid = env.enqueue("b@example.net")
    FileQueue(env.queue.root, "pop.contoso.test").delete(qid)
    env.clock.pump([5, 5, 5])
    assert len(env.hop.calls) == 1


def test_restart_resumes_from_disk(tmp_path: Path) -> None:
    """A new runner over the same queue (after a crash) delivers what was pending, including
    a message whose delivery was in flight (at least once, never zero times)."""
    env = Env(tmp_path)
    env.hop.responder = None
    env.start()
    env.enqueue("b@example.net")  # in flight, never answered: the process "dies"
    env.svc.running = False
    env.hop.responder = lambda call: {}
    env.svc = env.new_service()
    env.start()
    assert [call.rcpts for call in env.hop.calls] == [["b@example.net"], ["b@example.net"]]
    assert env.queue.ids() == []


def test_pending_report_is_sent_after_a_crash(tmp_path: Path) -> None:
    """A recipient marked failed whose report was not queued yet gets it after a restart."""
    env = Env(tmp_path)
    qid = env.enqueue("b@example.net")
    e = env.queue.load(qid)
    r = e.recipients[0]
    r.state, r.notice, r.status = State.FAILED, Notice.FAILED, "5.1.1"
    r.last_reply = "550 5.1.1 unknown"
    env.queue.save(e)
    env.hop.responder = None
    env.start()
    [(_, report)] = env.reports()
    assert [b["Status"] for b in _status_blocks(report)] == ["5.1.1"]
    assert env.queue.load(qid) is None


def test_auth_credentials_only_for_the_smarthost(tmp_path: Path) -> None:
    """The smart host gets username/password (read from password_file); a route does not."""
    env = Env(tmp_path, extra=f'username = "relay"\npassword_file = "{tmp_path}/pw"\n'
                              '[[domains.remote]]\nname = "x.test"\nroute = "[192.0.2.20]:26"')
    env.start()
    env.enqueue("b@example.net", "c@x.test")
    by_host = {call.ip: call.settings for call in env.hop.calls}
    assert by_host["192.0.2.10"].username == "relay"
    assert by_host["192.0.2.10"].password.reveal() == b"s3cret"
    assert by_host["192.0.2.20"].username == "" and by_host["192.0.2.20"].password is None


class FakeStore:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, str]] = []
        self.data: list[bytes] = []

    def deliver_within_quota(self, source: Path, recipients: list[tuple[str, str]],
                             prefix: bytes = b"") -> tuple[list[Path], list[tuple[str, str]]]:
        for dom, box in recipients:
            if box != "ted":
                raise NoSuchMailbox(f"{box}@{dom}")
            self.delivered.append((dom, box))
            self.data.append(prefix + Path(source).read_bytes())
        return [], []


def test_report_to_a_local_sender_goes_into_the_store(tmp_path: Path) -> None:
    """A report for a sender in a local domain is delivered to the mail store."""
    store = FakeStore()
    env = Env(tmp_path, store=store)
    env.hop.responder = lambda call: {a: "550 5.1.1 unknown" for a in call.rcpts}
    env.start()
    env.enqueue("b@example.net", sender="Ted@pop.contoso.test")
    assert store.delivered == [("pop.contoso.test", "ted")]
    assert env.queue.ids() == []
    # final delivery of a report: Return-Path <> first (RFC 5321 section 4.4)
    assert store.data[0].startswith(b"Return-Path: <>\nFrom: Mail Delivery System")


def test_queue_delivers_into_the_store_for_a_domain_added_at_run_time(tmp_path: Path) -> None:
    """A report to a sender whose domain ``domain add`` made while the server runs (not in
    ``domains.local``) is final delivery into the store (Return-Path <>), never sent to the
    smart host or an MX; the quota (with its grace) applies there as on every other path: a
    mailbox at its quota refuses with 552 5.2.2 and nothing is stored."""
    from pop3coexist.config import QuotaGrace
    from pop3coexist.store.maildir import MaildirStore

    store = MaildirStore(tmp_path / "mailroot", quota_grace=QuotaGrace(percent=10))
    store.add_domain("fabrikam.test")
    store.add_mailbox("fabrikam.test", "bob")
    store.add_mailbox("fabrikam.test", "full")
    store.set_quota("fabrikam.test", "full", 10)
    (store.root / "fabrikam.test" / "full" / "new" / "1.filler.host").write_bytes(b"x" * 10)
    env = Env(tmp_path, store=store)
    env.hop.responder = lambda call: {a: "550 5.1.1 unknown" for a in call.rcpts}
    env.start()
    env.enqueue("b@example.net", sender="Bob@Fabrikam.test")
    env.enqueue("bob@fabrikam.test", "full@fabrikam.test", sender="", notify=["NEVER"])
    assert [c.rcpts for c in env.hop.calls] == [["b@example.net"]]  # the reports stay here
    [report, relayed] = sorted((store.root / "fabrikam.test" / "bob" / "new").iterdir(),
                               key=lambda p: p.read_bytes()[:40])
    assert report.read_bytes().startswith(b"Return-Path: <>\nFrom: Mail Delivery System")
    assert relayed.read_bytes().startswith(b"Return-Path: <>\n")
    assert store.usage("fabrikam.test", "full") == (1, 10)
    assert env.queue.ids() == []


class FakeDNS:
    def __init__(self, mx: dict, hosts: dict) -> None:
        self.mx, self.hosts = mx, hosts

    def lookupMailExchange(self, name: str) -> defer.Deferred:
        from twisted.names import dns
        from twisted.names import error as dns_error

        if name not in self.mx:
            return defer.fail(dns_error.DNSNameError(name))
        answers = [dns.RRHeader(name, dns.MX, payload=dns.Record_MX(pref, host))
                   for pref, host in self.mx[name]]
        return defer.succeed((answers, [], []))

    def _records(self, name: str, version: int) -> defer.Deferred:
        """The A (``version`` 4) or AAAA (6) records of ``name``: ``hosts`` maps a name to
        one address or a list of them, IPv4 and IPv6 mixed, in answer order."""
        import ipaddress

        from twisted.names import dns
        from twisted.names import error as dns_error

        if name not in self.hosts:
            return defer.fail(dns_error.DNSNameError(name))
        given = self.hosts[name]
        ips = [ipaddress.ip_address(ip) for ip in ([given] if isinstance(given, str) else given)]
        answers = [dns.RRHeader(name, dns.A, payload=dns.Record_A(str(ip))) if version == 4 else
                   dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(str(ip)))
                   for ip in ips if ip.version == version]
        return defer.succeed((answers, [], []))

    def lookupAddress(self, name: str) -> defer.Deferred:
        return self._records(name, 4)

    def lookupIPV6Address(self, name: str) -> defer.Deferred:
        return self._records(name, 6)

    def getHostByName(self, name: str) -> defer.Deferred:
        if name in self.hosts:
            given = self.hosts[name]
            return defer.succeed(given if isinstance(given, str) else given[0])
        return defer.fail(OSError("no address"))


def test_direct_mx_delivery_tries_the_next_mx_when_unreachable(tmp_path: Path) -> None:
    """Without a smart host, MX records are tried by preference; an unreachable host is
    skipped within the same attempt (not a hidden retry of the same host)."""
    dns_ = FakeDNS({"example.net": [(20, "mx2.example.net"), (10, "mx1.example.net")]},
                   {"mx1.example.net": "192.0.2.1", "mx2.example.net": "192.0.2.2"})
    env = Env(tmp_path, smarthost="", resolver=HopResolver(dns_))
    env.hop.responder = lambda call: "refused" if call.ip == "192.0.2.1" else {}
    env.start()
    env.enqueue("b@example.net")
    assert [(call.ip, call.port, call.settings.tls_name) for call in env.hop.calls] == [
        ("192.0.2.1", 25, "mx1.example.net"), ("192.0.2.2", 25, "mx2.example.net")]
    assert env.queue.ids() == []


def test_smart_host_name_with_several_addresses_tries_each(tmp_path: Path) -> None:
    """RFC 5321 section 5.1: a smart host name with two A records and an AAAA record is tried
    at each address in turn, A records first, within one attempt: the first refuses, the
    second takes the message (no retry, no 4xx)."""
    dns_ = FakeDNS({"smart.relay.test": []},  # no MX: the name's own addresses
                   {"smart.relay.test": ["192.0.2.21", "2001:db8::21", "192.0.2.22"]})
    env = Env(tmp_path, smarthost="smart.relay.test:2525", resolver=HopResolver(dns_))
    env.hop.responder = lambda call: "refused" if call.ip == "192.0.2.21" else {}
    env.start()
    env.enqueue("b@example.net")
    assert [(call.ip, call.port, call.settings.tls_name) for call in env.hop.calls] == [
        ("192.0.2.21", 2525, "smart.relay.test"), ("192.0.2.22", 2525, "smart.relay.test")]
    assert env.queue.ids() == []


def test_every_address_of_every_mx_is_tried_before_a_temporary_failure(tmp_path: Path) -> None:
    """Each address of each MX host, by MX preference and A before AAAA, is tried once before
    the recipient is deferred (one temporary failure, then the retry schedule)."""
    dns_ = FakeDNS({"example.net": [(10, "mx1.example.net"), (20, "mx2.example.net")]},
                   {"mx1.example.net": ["2001:db8::1", "192.0.2.1", "192.0.2.11"],
                    "mx2.example.net": ["192.0.2.2"]})
    env = Env(tmp_path, smarthost="", resolver=HopResolver(dns_))
    env.hop.responder = lambda call: "refused"
    env.start()
    qid = env.enqueue("b@example.net")
    assert [call.ip for call in env.hop.calls] == [
        "192.0.2.1", "192.0.2.11", "2001:db8::1", "192.0.2.2"]
    [r] = env.queue.load(qid).recipients
    assert r.state == "deferred" and r.last_reply == "421 4.4.1 connection refused"


@pytest.mark.parametrize(("hosts", "expected"), [
    ({"h.example.net": "192.0.2.5"}, ["192.0.2.5"]),
    ({"h.example.net": ["2001:db8::5"]}, ["2001:db8::5"]),
    ({"h.example.net": ["192.0.2.5", "192.0.2.5", "2001:DB8::5"]}, ["192.0.2.5", "2001:db8::5"]),
    ({"h.example.net": []}, ["fallback"]),  # no address record: getHostByName (CNAME chase)
])
def test_addresses_of_a_host(hosts: dict, expected: list[str]) -> None:
    """A host's addresses: A records, then AAAA, duplicates dropped; an answer with neither
    asks getHostByName, which follows a CNAME."""
    dns_ = FakeDNS({}, hosts)
    if expected == ["fallback"]:
        dns_.getHostByName = lambda name: defer.succeed("fallback")  # type: ignore[method-assign]
    d = defer.ensureDeferred(HopResolver(dns_).addresses("h.example.net"))
    assert d.result == expected  # type: ignore[attr-defined]


def test_unknown_host_name_has_no_address() -> None:
    """A name in no zone (both look-ups fail) raises the resolver's error: the hop's caller
    turns it into 451 4.4.3."""
    from twisted.names import error as dns_error

    d = defer.ensureDeferred(HopResolver(FakeDNS({}, {})).addresses("nowhere.example.net"))
    failure = d.result  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, dns_error.DNSNameError)


def test_unknown_domain_fails_permanently(tmp_path: Path) -> None:
    """NXDOMAIN for a recipient domain is 550 5.1.2 (no retries)."""
    env = Env(tmp_path, smarthost="", resolver=HopResolver(FakeDNS({}, {})))
    env.start()
    qid = env.enqueue("b@nowhere.test", notify=["NEVER"])
    assert env.hop.calls == [] and env.queue.load(qid) is None


@pytest.mark.parametrize("smarthost", [True, False])
def test_dns_errors(smarthost: bool) -> None:
    """An unknown smart host name is temporary (our configuration), an unknown domain not."""
    from pop3coexist.policy.routing import NextHop

    r = HopResolver(FakeDNS({}, {}))
    d = defer.ensureDeferred(r.resolve(NextHop("nowhere.test", smarthost=smarthost)))
    failure = d.result  # type: ignore[attr-defined]
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, HopError)
    assert failure.value.code == (451 if smarthost else 550)


def test_stop_waits_for_running_deliveries(tmp_path: Path) -> None:
    """stopService waits (up to stop_grace) for deliveries in flight, then returns."""
    env = Env(tmp_path)
    env.hop.responder = None
    env.start()
    env.enqueue("b@example.net")
    d = env.svc.stopService()
    assert not d.called
    env.hop.answer(env.hop.calls[0], {})
    assert d.called
    env2 = Env(tmp_path / "x")
    env2.hop.responder = None
    env2.start()
    env2.enqueue("b@example.net")
    d2 = env2.svc.stopService()
    env2.clock.advance(10)
    assert d2.called


def test_hop_limiter_lets_other_hosts_pass_a_busy_one() -> None:
    """A host at its per-host limit does not hold up another host; the total limit holds;
    waiters for one host are served first come, first served."""
    from pop3coexist.smtp.hostlimits import HopLimiter

    lim = HopLimiter(total=3, per_host=1)
    a1 = lim.acquire("a")
    a2 = lim.acquire("a")
    b1 = lim.acquire("b")
    a3 = lim.acquire("a")
    c1 = lim.acquire("c")
    assert a1.called and not a2.called and b1.called and c1.called
    assert lim.open == 3
    lim.release("b")
    assert not a2.called and not a3.called  # "a" is still at its per-host limit
    d1 = lim.acquire("d")
    e1 = lim.acquire("e")
    assert d1.called and not e1.called and lim.open == 3  # the total limit holds
    lim.release("a")
    assert a2.called and not a3.called  # first come, first served
    lim.release("a")
    assert a3.called
    lim.release("c")
    assert e1.called


def test_ids_queued_by_a_worker_process_go_out_at_once(tmp_path: Path) -> None:
    """``enqueued(ids)`` (a worker's control line) makes those messages due now; ids that
    arrive before the start-up scan is done are kept and delivered after it."""
    env = Env(tmp_path)
    other = FileQueue(env.queue.root, "pop.contoso.test", clock=env.clock.seconds)
    env.svc.enqueued(["0" * 24])  # before start: kept (an unknown id is simply not found)
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "m").write_bytes(MESSAGE)
    env_rec = {"sender": "a@example.org", "arrival": env.clock.seconds(), "hops": 1, "ret": None,
               "envid": None, "received_from": "test",
               "recipients": [{"address": "b@example.net", "orcpt": None, "notify": None}]}
    env.start()
    qid = other.enqueue(spool / "m", env_rec)  # another process: this runner is not woken
    assert env.hop.calls == []
    env.svc.enqueued([qid])
    assert len(env.hop.calls) == 1 and env.queue.ids() == []


# --------------------------------------------------------------------------- fault 13: fall-back


def _gateway_extra(tmp_path: Path, connectors: str) -> str:
    (tmp_path / "bind.secret").write_text("x\n")
    return f"""
[auth]
method = "directory"
apop = false
[auth.directory]
base_dn = "dc=contoso,dc=test"
bind_dn = "cn=svc,dc=contoso,dc=test"
bind_password_file = "{tmp_path}/bind.secret"
[gateway]
{connectors}
"""


CONNECTORS = """
[[gateway.connectors]]
name = "dear"
address_spaces = [{ domain = "d.test", cost = 9 }]
next_hops = ["[192.0.2.9]:25"]
[[gateway.connectors]]
name = "cheap"
address_spaces = [{ domain = "d.test", cost = 1 }]
next_hops = ["[192.0.2.1]:25", "[192.0.2.2]:25"]
[[gateway.connectors]]
name = "next"
address_spaces = [{ domain = "d.test", cost = 5 }]
next_hops = ["[192.0.2.5]:25"]
"""


def test_cheapest_connector_down_goes_to_the_next_cost_at_once(tmp_path: Path, logs: list[dict]) -> None:
    """Fault 13: both next hops of the cheapest connector refuse the connection: the message
    goes through the next-cost connector in the same run (no retry interval passes), never
    through the dearer one, and the log names the hop used and each hop passed over."""
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, CONNECTORS))
    env.hop.responder = lambda call: "refused" if call.ip in ("192.0.2.1", "192.0.2.2") else {}
    env.start()
    qid = env.enqueue("b@d.test")
    assert [call.ip for call in env.hop.calls] == ["192.0.2.1", "192.0.2.2", "192.0.2.5"]
    assert env.clock.seconds() == START and env.queue.ids() == []
    text = _text(logs)
    assert (f"{qid}: next hop [192.0.2.1]:25 (connector 'cheap' cost 1, next hop 1 of 2) failed: "
            "421 4.4.1 connection refused; trying [192.0.2.2]:25 (connector 'cheap' cost 1, next "
            "hop 2 of 2)") in text
    assert (f"{qid} to=<b@d.test> relay=192.0.2.5 via=\"connector 'next' cost 5, next hop 1 of 1\""
            in text)


@pytest.mark.parametrize("reply", ["451 4.3.0 try later", "550 5.1.1 no such user"])
def test_a_reply_about_the_recipient_is_the_answer(tmp_path: Path, reply: str) -> None:
    """Fault 13: a 4xx or 5xx for the message or recipient itself is the answer: no other hop
    is tried (the next hop would say the same, or the mail would be delivered twice)."""
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, CONNECTORS))
    env.hop.responder = lambda call: {"b@d.test": reply}
    env.start()
    qid = env.enqueue("b@d.test", notify=["NEVER"])
    assert [call.ip for call in env.hop.calls] == ["192.0.2.1"]
    env_after = env.queue.load(qid)
    if reply.startswith("4"):
        assert env_after.recipients[0].state == "deferred"
        assert env_after.recipients[0].last_reply == reply
    else:
        assert env_after is None  # failed for good, no report wanted: removed


def test_every_hop_down_waits_with_the_last_temporary_reply(tmp_path: Path, logs: list[dict]) -> None:
    """Fault 13: only when every hop of every connector failed does the message wait; each hop
    was tried once, the stored reply is a temporary one, and the next run starts again with the
    cheapest connector's primary."""
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, CONNECTORS))
    env.hop.responder = lambda call: "refused"
    env.start()
    qid = env.enqueue("b@d.test")
    assert [call.ip for call in env.hop.calls] == ["192.0.2.1", "192.0.2.2", "192.0.2.5", "192.0.2.9"]
    [r] = env.queue.load(qid).recipients
    assert r.state == "deferred" and r.next_attempt == START + 10
    assert r.last_reply == "421 4.4.1 connection refused"
    assert (f"{qid}: every next hop for d.test failed ([192.0.2.1]:25, [192.0.2.2]:25, "
            "[192.0.2.5]:25, [192.0.2.9]:25); the mail waits for its next retry") in _text(logs)
    env.hop.responder = lambda call: {}
    env.clock.advance(10)
    assert env.hop.calls[4].ip == "192.0.2.1" and env.queue.ids() == []


def test_a_hop_that_cannot_start_a_transaction_is_passed_over(tmp_path: Path) -> None:
    """Fault 13: a next hop that greets but cannot start a transaction (TLS required and
    failing, AUTH impossible: `hop_failed`) is a connection-level failure: the next hop is tried."""
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, CONNECTORS))
    env.hop.responder = lambda call: "no-tls" if call.ip == "192.0.2.1" else {}
    env.start()
    env.enqueue("b@d.test")
    assert [call.ip for call in env.hop.calls] == ["192.0.2.1", "192.0.2.2"]
    assert env.queue.ids() == []


def test_remote_route_list_falls_back_in_order(tmp_path: Path) -> None:
    """Fault 13 for `[[domains.remote]]`: a route list is walked in order like a connector's
    next hops; the smart host is not a fall-back for a routed domain."""
    env = Env(tmp_path, extra='[[domains.remote]]\nname = "x.test"\n'
                              'route = ["[192.0.2.20]:26", "[192.0.2.21]:26"]')
    env.hop.responder = lambda call: "refused" if call.ip == "192.0.2.20" else {}
    env.start()
    env.enqueue("e@x.test")
    assert [(call.ip, call.port) for call in env.hop.calls] == [("192.0.2.20", 26), ("192.0.2.21", 26)]
    assert env.queue.ids() == []
    env.hop.responder = lambda call: "refused"
    qid = env.enqueue("e@x.test")
    assert [call.ip for call in env.hop.calls[2:]] == ["192.0.2.20", "192.0.2.21"]
    assert env.queue.load(qid).recipients[0].state == "deferred"


def test_a_connector_hop_name_not_in_dns_is_passed_over_not_bounced(tmp_path: Path) -> None:
    """A connector's named next hop that is not in DNS is our configuration problem: the next
    hop is tried, and if none works the mail waits (451 4.4.3), it is never bounced."""
    conns = """
[[gateway.connectors]]
name = "typo"
address_spaces = ["d.test"]
next_hops = ["no-such-relay.test", "relay.test"]
"""
    dns_ = FakeDNS({"relay.test": [(10, "mx.relay.test")]}, {"mx.relay.test": "192.0.2.30"})
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, conns), resolver=HopResolver(dns_))
    env.start()
    env.enqueue("b@d.test")
    assert [call.ip for call in env.hop.calls] == ["192.0.2.30"] and env.queue.ids() == []
    dns_.mx.pop("relay.test")
    qid = env.enqueue("b@d.test")
    [r] = env.queue.load(qid).recipients
    assert r.state == "deferred" and r.last_reply == "451 4.4.3 next hop relay.test not found in DNS"


def test_mx_hosts_of_equal_preference_are_shuffled_lower_preference_first() -> None:
    """RFC 5321 section 5.1: MX hosts are tried by preference, and hosts of equal preference in
    random order (here a shuffle that reverses, to see that it is applied to each group)."""
    dns_ = FakeDNS({"example.net": [(20, "c.example.net"), (10, "a.example.net"),
                                    (10, "b.example.net"), (20, "d.example.net")]},
                   {f"{n}.example.net": f"192.0.2.{i}" for i, n in enumerate("abcd", 1)})
    r = HopResolver(dns_, shuffle=lambda names: names.reverse())
    from pop3coexist.policy.routing import NextHop

    d = defer.ensureDeferred(r.resolve(NextHop("example.net")))
    assert [cand.name for cand in d.result] == [  # type: ignore[attr-defined]
        "b.example.net", "a.example.net", "d.example.net", "c.example.net"]


def test_smart_host_advice_is_logged_once_per_host(tmp_path: Path, logs: list[dict]) -> None:
    """Fault 10: the explanation of why a smart host cannot be used (AUTH only in clear text)
    is logged once for that host, not once per message or per retry; each recipient's line
    and stored reply still carry the reply; once the host works it is forgotten, so that a
    problem that comes back is logged again."""
    env = Env(tmp_path, extra=f'username = "relay"\npassword_file = "{tmp_path}/pw"')
    env.hop.responder = lambda call: "no-auth"
    env.start()
    ids = [env.enqueue(f"b{i}@example.net") for i in range(3)]
    env.clock.advance(10)
    assert len(env.hop.calls) == 6
    text = _text(logs)
    advice = ("smart host [192.0.2.10]:2525: it offers AUTH only in clear text; the fix "
              "(logged once for this host)")
    assert text.count(advice) == 1
    for qid in ids:
        [r] = env.queue.load(qid).recipients
        assert r.last_reply == "451 4.7.0 cannot authenticate to the smart host: why and fix"
    assert "s3cret" not in text
    env.hop.responder = lambda call: {}
    env.clock.advance(20)
    assert env.queue.ids() == []
    env.hop.responder = lambda call: "no-auth"
    env.enqueue("c@example.net")
    assert _text(logs).count(advice) == 2


# --------------------------------------------------------------------------- issue 11 re-run


def _shut_down_mid_session(call: Call, answers: dict[str, str]) -> c.TransactionResult:
    """What the client returns when the host sent ``answers`` for some recipients, then 421
    (closing) before the message was accepted: the others are marked ``elsewhere``."""
    replies = []
    for a in call.rcpts:
        if a in answers:
            replies.append(c.RecipientReply(a, int(answers[a][:3]), answers[a]))
        else:
            replies.append(c.RecipientReply(a, 421, "421 4.3.2 shutting down", elsewhere=True))
    return c.TransactionResult(replies=replies, remote_mta=call.remote_mta, connected=True,
                               hop_failed=all(r.elsewhere for r in replies))


def test_421_mid_session_takes_the_next_hop_for_the_unanswered_recipients(tmp_path: Path) -> None:
    """Fault 13 (re-run): the primary refuses one recipient for good, then closes with 421:
    the other recipient goes through the next hop in the same run (never the refused one
    again), and the refused one gets its own 550."""
    env = Env(tmp_path, extra=_gateway_extra(tmp_path, CONNECTORS))
    env.hop.responder = lambda call: (
        _shut_down_mid_session(call, {"x@d.test": "550 5.1.1 no such user"})
        if call.ip == "192.0.2.1" else {})
    env.start()
    qid = env.enqueue("x@d.test", "b@d.test", notify=["NEVER"])
    assert [(call.ip, call.rcpts) for call in env.hop.calls] == [
        ("192.0.2.1", ["x@d.test", "b@d.test"]), ("192.0.2.2", ["b@d.test"])]
    assert env.queue.load(qid) is None  # b delivered, x failed without a wanted report


def test_a_failed_starttls_handshake_is_retried_in_clear_on_the_same_host(tmp_path: Path) -> None:
    """Fault 10 (re-run), STARTTLS offered but failing, with tls = "opportunistic": the same
    host is tried again at once without STARTTLS (TLS is a bonus there), and the retry
    carries the handshake's failure so that a refused clear-text AUTH can name it."""
    env = Env(tmp_path, extra="")
    env.config = dataclasses.replace(env.config, smarthost=dataclasses.replace(
        env.config.smarthost, tls="opportunistic"))
    env.svc = env.new_service()

    def respond(call: Call) -> object:
        if call.settings.starttls:
            return c.TransactionResult(
                replies=[c.RecipientReply(a, 421, "421 4.7.5 TLS failure with 192.0.2.10: "
                                          "unsupported protocol", remote=False, elsewhere=True)
                         for a in call.rcpts],
                connected=True, hop_failed=True, tls_failed=True)
        return {}

    env.hop.responder = respond
    env.start()
    env.enqueue("b@example.net")
    assert [(call.ip, call.settings.starttls) for call in env.hop.calls] == [
        ("192.0.2.10", True), ("192.0.2.10", False)]
    assert env.hop.calls[1].settings.tls_failure == (
        "TLS failure with 192.0.2.10: unsupported protocol")
    assert env.queue.ids() == []


def test_each_domain_of_a_message_falls_back_on_its_own(tmp_path: Path) -> None:
    """Fault 13 (re-run): one message for a connector domain, a routed domain and an MX
    domain is split by route; each part walks its own route (the connector's fall-back, the
    route's fall-back, the smart host) and a failure of one part never moves another."""
    extra = _gateway_extra(tmp_path, CONNECTORS).replace(
        "[gateway]", '[[domains.remote]]\nname = "x.test"\n'
                     'route = ["[192.0.2.20]:26", "[192.0.2.21]:26"]\n[gateway]')
    env = Env(tmp_path, extra=extra)
    env.hop.responder = lambda call: "refused" if call.ip in ("192.0.2.1", "192.0.2.20") else {}
    env.start()
    env.enqueue("b@d.test", "e@x.test", "f@example.net")
    got = sorted((call.rcpts[0], call.ip) for call in env.hop.calls)
    assert got == [("b@d.test", "192.0.2.1"), ("b@d.test", "192.0.2.2"),
                   ("e@x.test", "192.0.2.20"), ("e@x.test", "192.0.2.21"),
                   ("f@example.net", "192.0.2.10")]
    assert all(len(call.rcpts) == 1 for call in env.hop.calls) and env.queue.ids() == []


def test_routes_and_connectors_never_get_the_smart_hosts_password(tmp_path: Path,
                                                                 logs: list[dict]) -> None:
    """Fault 10 (re-run): with a smart host password set, connector and route next hops get
    no user name and no password, even when the smart host is down and they are tried after
    it; a hop that wants AUTH is explained in the log as a "next hop", once."""
    extra = (f'username = "relay"\npassword_file = "{tmp_path}/pw"\n'
             + _gateway_extra(tmp_path, CONNECTORS).replace(
                 "[gateway]", '[[domains.remote]]\nname = "x.test"\nroute = "[192.0.2.20]:26"\n'
                              '[gateway]'))
    env = Env(tmp_path, extra=extra)

    def respond(call: Call) -> object:
        if call.ip == "192.0.2.10":
            return {}
        return c.TransactionResult(
            replies=[c.RecipientReply(a, 451, "451 4.7.0 the next hop requires AUTH: 530 5.7.0 "
                                      "Authentication required", elsewhere=True)
                     for a in call.rcpts],
            connected=True, hop_failed=True, advice="it requires AUTH before MAIL FROM")

    env.hop.responder = respond
    env.start()
    env.enqueue("b@d.test", "e@x.test")
    env.enqueue("b2@d.test")
    for call in env.hop.calls:
        assert call.settings.username == "" and call.settings.password is None
    assert {call.ip for call in env.hop.calls} == {"192.0.2.1", "192.0.2.2", "192.0.2.5",
                                                   "192.0.2.9", "192.0.2.20"}
    text = _text(logs)
    assert text.count("next hop [192.0.2.20]:26: it requires AUTH before MAIL FROM (logged once "
                      "for this host)") == 1
    assert text.count("next hop [192.0.2.1]:25: it requires AUTH") == 1
