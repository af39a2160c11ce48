"""Monitoring without sockets: the mail event vocabulary and its text and JSON lines, the mail
log observer (order, files, reopen), the metrics observer (one process, in memory), the
cached mailbox figures, the queue figures, /metrics and /healthz as twisted.web resources,
the [metrics] and [log] keys, and the queue keeping the id the SMTP client was told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.web.test.requesthelper import DummyRequest

from pop3coexist import events
from pop3coexist.config import parse_config
from pop3coexist.errors import ConfigError
from pop3coexist.monitor.http import HealthPage, MetricsPage, check_queue
from pop3coexist.monitor.maillog import MailLogObserver
from pop3coexist.monitor.metrics import (
    Metrics,
    MetricsObserver,
    exposed_names,
    make_registry,
    queue_figures,
)
from pop3coexist.monitor.storestats import StoreStats, read_store
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.queue import FileQueue

QID = "18ecd0d4c01915faa95bcf88"


def ev(name: str, **fields) -> dict:
    return {"mail_event": name, "log_time": 1_764_504_000.25, **fields}


# --------------------------------------------------------------------------- events


def test_text_lines_read_like_postfix_maillog() -> None:
    """A text line has the time, host, process, the queue id (NOQUEUE before DATA) and the
    event in Postfix's words (from=, size=, nrcpt=, to=, relay=, status=)."""
    [(name, fields)] = events.expand(ev("accepted", queue_id=QID, sender="a@b.test", size=12,
                                        recipients=["c@d.test", "e@f.test"], client="192.0.2.1",
                                        listener="smtp"))
    line = events.format_text(name, fields, 1_764_504_000.25, 42)
    assert line.endswith(f"pop3coexist[42]: {QID}: accepted from=<a@b.test>, size=12, nrcpt=2, "
                         "to=<c@d.test>,<e@f.test>, client=[192.0.2.1], listener=smtp")
    assert line.startswith("2025-11-30T12:00:00.250Z ")
    [(name, fields)] = events.expand(ev("bounced", queue_id=QID, recipient="c@d.test",
                                        route="mx", relay="mx.d.test", delay=3.25, attempts=1,
                                        reply="550 5.1.1 no"))
    assert events.format_text(name, fields, 0.0).endswith(
        f"{QID}: to=<c@d.test>, relay=mx.d.test, route=mx, delay=3.2, attempts=1, "
        "status=bounced (550 5.1.1 no)")
    [(name, fields)] = events.expand(ev("refused", command="RCPT", code=554, enhanced="5.7.1",
                                        reply="Relay access denied", client="192.0.2.9",
                                        sender="a@b.test", recipient="x@y.test"))
    assert ": NOQUEUE: reject: RCPT from [192.0.2.9]: 554 5.7.1 Relay access denied; " \
           "reason=\"relay denied\"" in events.format_text(name, fields, 0.0)


def test_json_lines_carry_the_fields() -> None:
    """A JSON line is one object: time, event, queue_id and the event's fields, lists as lists;
    Twisted's own keys (log_format, log_namespace) stay out."""
    e = ev("accepted", queue_id=QID, sender="", size=5, recipients=("c@d.test",),
           log_format="SMTP {id} ...", log_namespace="x")
    [(name, fields)] = events.expand(e)
    record = json.loads(events.format_json(name, fields, 0.0, 7))
    assert record["event"] == "accepted" and record["queue_id"] == QID and record["pid"] == 7
    assert record["recipients"] == ["c@d.test"] and record["sender"] == "" and record["size"] == 5
    assert "log_format" not in record and "log_namespace" not in record


def test_stored_is_one_delivered_line_per_local_mailbox() -> None:
    """``stored`` expands to a ``delivered`` entry per mailbox, route local; other log events
    expand to nothing."""
    out = events.expand(ev("stored", queue_id=QID, mailboxes=["a@l.test", "b@l.test"]))
    assert [(n, f["recipient"], f["route"]) for n, f in out] == [
        ("delivered", "a@l.test", "local"), ("delivered", "b@l.test", "local")]
    assert events.expand({"log_format": "hello"}) == []
    assert events.expand(ev("no such event")) == []


@pytest.mark.parametrize(("command", "code", "enhanced", "reason"), [
    ("RCPT", 550, "5.1.1", "unknown recipient"),
    ("RCPT", 554, "5.7.1", "relay denied"),
    ("RCPT", 552, "5.2.2", "over quota"),
    ("DATA", 552, "5.2.2", "over quota"),
    ("MAIL", 552, "5.3.4", "message too big"),
    ("DATA", 552, "5.3.4", "message too big"),
    ("MAIL", 553, "5.7.1", "wrong sender"),
    ("MAIL", 530, "5.7.0", "AUTH required"),
    ("RCPT", 451, "4.3.0", "temporary failure"),
    ("RCPT", 553, "5.1.3", "bad address"),
])
def test_refusal_reasons(command: str, code: int, enhanced: str, reason: str) -> None:
    """Each refusal the mail log names is told apart by command and reply codes."""
    assert events.refusal_reason(command, code, enhanced) == reason


# --------------------------------------------------------------------------- mail log


def test_mail_log_writes_delivered_after_accepted_and_reopens(tmp_path: Path) -> None:
    """The ``stored`` event (before the 250) is written after the ``accepted`` line of its
    queue id; the file is appended to, reopened after a rename (logrotate, SIGHUP) and closed."""
    path = tmp_path / "log" / "mail.log"
    obs = MailLogObserver(path, "text")
    obs(ev("connect", client="192.0.2.1", protocol="smtp", listener="smtp"))
    obs(ev("stored", queue_id=QID, mailboxes=["a@l.test"]))
    obs({"log_format": "not a mail event"})
    obs(ev("accepted", queue_id=QID, sender="s@x.test", size=1, recipients=["a@l.test"]))
    lines = path.read_text().splitlines()
    assert [line.split(": ", 2)[2].split()[0] for line in lines] == [
        "connect", "accepted", "to=<a@l.test>,"]
    path.rename(tmp_path / "log" / "mail.log.1")
    obs.open()
    obs(ev("expired", queue_id=QID, recipient="r@x.test", reply="451 later"))
    obs.close()
    assert "status=expired" in path.read_text()
    assert len((tmp_path / "log" / "mail.log.1").read_text().splitlines()) == 3


def test_mail_log_json_takes_a_worker_pid(tmp_path: Path) -> None:
    """A worker's event (re-published by workers.py) is written with that worker's pid."""
    path = tmp_path / "mail.json"
    obs = MailLogObserver(path, "json")
    obs(ev("login", protocol="pop3", user="a@l.test", method="APOP", outcome="failed",
           delay=2.0, worker_event=1, worker_pid=4242))
    obs.close()
    record = json.loads(path.read_text())
    assert record["pid"] == 4242 and record["outcome"] == "failed" and record["delay"] == 2.0


# --------------------------------------------------------------------------- metrics


def samples(registry) -> dict:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_observer_counts_the_events_and_skips_worker_copies() -> None:
    """Each event moves its metric; an event re-published from a worker's log is not counted
    again in the main process; a broken event never raises."""
    m = Metrics()
    obs = MetricsObserver(m)
    obs(ev("connect", protocol="pop3", listener="pop3s"))
    obs(ev("connect", protocol="pop3", listener="pop3s"))
    obs(ev("disconnect", protocol="pop3", listener="pop3s", retr_octets=100))
    obs(ev("login", protocol="smtp", method="PLAIN", outcome="failed", delay=2.0))
    obs(ev("accepted", listener="submission", size=50))
    obs(ev("accepted", listener="smtp", size=50, worker_event=1))  # the worker counted it
    obs(ev("refused", listener="smtp", command="RCPT", code=550, enhanced="5.1.1"))
    obs(ev("stored", mailboxes=["a@l.test", "b@l.test"], arrival=0.0))
    obs(ev("delivered", route="smarthost", delay=4.0))
    obs(ev("deferred", route="smarthost"))
    obs(ev("expired", route="-"))
    obs(ev("worker_restart", worker=1, pid=9))
    obs(ev("milter", milter="spam", verdict="reject"))
    obs(ev("accepted", listener="odd", size="not a number"))  # counted, bytes left out
    s = samples(make_registry(m, None))

    def v(name: str, **labels: str) -> float:
        return s.get((name, tuple(sorted(labels.items()))), 0.0)

    assert v("pop3coexist_sessions_total", protocol="pop3", listener="pop3s") == 2
    assert v("pop3coexist_sessions_open", protocol="pop3", listener="pop3s") == 1
    assert v("pop3coexist_message_bytes_total", protocol="pop3", direction="out") == 100
    assert v("pop3coexist_message_bytes_total", protocol="smtp", direction="in") == 50
    assert v("pop3coexist_logins_total", protocol="smtp", method="PLAIN", outcome="failed") == 1
    assert v("pop3coexist_auth_throttled_total", protocol="smtp") == 1
    assert v("pop3coexist_messages_accepted_total", listener="submission") == 1
    assert v("pop3coexist_messages_accepted_total", listener="smtp") == 0
    assert v("pop3coexist_messages_refused_total", listener="smtp", command="RCPT", code="550",
             enhanced="5.1.1") == 1
    assert v("pop3coexist_deliveries_total", route="local", outcome="delivered") == 2
    assert v("pop3coexist_deliveries_total", route="smarthost", outcome="delivered") == 1
    assert v("pop3coexist_deliveries_total", route="smarthost", outcome="deferred") == 1
    assert v("pop3coexist_deliveries_total", route="-", outcome="expired") == 1
    assert v("pop3coexist_delivery_latency_seconds_bucket", route="smarthost", le="5.0") == 1
    assert v("pop3coexist_delivery_latency_seconds_bucket", route="smarthost", le="2.5") == 0
    assert v("pop3coexist_worker_restarts_total") == 1
    assert v("pop3coexist_milter_verdicts_total", milter="spam", verdict="reject") == 1
    assert {name for name, _ in s} <= exposed_names()


def test_queue_figures_from_the_names(tmp_path: Path) -> None:
    """Length and oldest age come from queue/env/ names alone (the id starts with the enqueue
    time in ns); an empty or missing queue is (0, 0)."""
    q = FileQueue(tmp_path / "queue", "h.test")
    assert queue_figures(q.root) == (0, 0.0)
    spool = tmp_path / "m"
    spool.write_bytes(b"Subject: x\n\nx\n")
    first = q.enqueue(spool, {"sender": "", "recipients": [{"address": "a@b.test"}]})
    q.enqueue(spool, {"sender": "", "recipients": [{"address": "a@b.test"}]})
    born = int(first[:16], 16) / 1e9
    assert queue_figures(q.root, now=lambda: born + 60) == (2, pytest.approx(60.0))


def test_the_queue_keeps_the_id_the_client_was_told(tmp_path: Path) -> None:
    """An envelope's ``id`` (the 250's queue id) names the queued message; a taken or
    malformed id gets a new one."""
    q = FileQueue(tmp_path / "queue", "h.test")
    spool = tmp_path / "m"
    spool.write_bytes(b"x\n")
    env = {"sender": "", "recipients": [{"address": "a@b.test"}], "id": QID}
    assert q.enqueue(spool, env) == QID
    assert q.load(QID).id == QID
    again = q.enqueue(spool, env)
    assert again != QID and q.load(again) is not None
    assert q.enqueue(spool, {**env, "id": "../../etc"}) not in (QID, "../../etc")


def test_store_figures_are_cached_and_read_in_the_background(tmp_path: Path) -> None:
    """``figures()`` never reads the store itself: it answers the last reading and starts a new
    one only when that is older than ``refresh`` (one at a time)."""
    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain("l.test")
    store.add_mailbox("l.test", "ann")
    store.deliver_bytes("l.test", "ann", b"Subject: a\n\nbody\n")
    assert read_store(store)["l.test"][:2] == (1, 1)
    clock = task.Clock()
    calls: list[defer.Deferred] = []

    def run_blocking(f, *args):
        d = defer.Deferred()
        calls.append((d, f, args))
        return d

    stats = StoreStats(store, 60.0, run_blocking, clock=clock.seconds)
    assert stats.figures() == ({}, 0.0)
    assert stats.figures() == ({}, 0.0) and len(calls) == 1  # one reading at a time
    d, f, args = calls.pop()
    d.callback(f(*args))
    clock.advance(30)
    figures, age = stats.figures()
    assert figures["l.test"][0] == 1 and age == 30 and not calls
    clock.advance(31)
    stats.figures()
    assert len(calls) == 1


# --------------------------------------------------------------------------- HTTP


def _render(page, request: DummyRequest) -> DummyRequest:
    page.render(request)
    return request


def test_metrics_page_serves_the_exposition_format(tmp_path: Path) -> None:
    """GET /metrics: 200, text format 0.0.4, this process's metrics, the queue and ``up``."""
    m = Metrics()
    MetricsObserver(m)(ev("connect", protocol="smtp", listener="smtp"))

    class Stats:
        def figures(self):
            return {"l.test": (3, 10, 2000)}, 5.0

    page = MetricsPage(m, tmp_path / "queue", Stats(), lambda f, *a: defer.succeed(f(*a)))
    request = _render(page, DummyRequest([b""]))
    assert request.finished and request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"text/plain; version=0.0.4")
    body = b"".join(request.written).decode()
    assert 'pop3coexist_sessions_total{listener="smtp",protocol="smtp"} 1.0' in body
    assert 'pop3coexist_mailboxes{domain="l.test"} 3.0' in body
    assert "pop3coexist_queue_messages 0.0" in body and "pop3coexist_up 1.0" in body


def test_healthz_is_503_naming_what_fails(tmp_path: Path) -> None:
    """GET /healthz: 200 with every check passing; a check that raises, or the listeners, make
    it 503 and say which, with the message."""
    clock = task.Clock()

    def fails() -> str:
        raise OSError("queue folder gone")

    ok_checks = {"store": lambda: "fine", "queue": lambda: check_queue(tmp_path / "queue")}
    page = HealthPage(lambda: (True, "2 listeners"), ok_checks,
                      lambda f, *a: defer.maybeDeferred(f, *a), clock)
    request = _render(page, DummyRequest([b""]))
    body = json.loads(b"".join(request.written))
    assert request.responseCode == 200 and body["status"] == "ok"
    assert body["checks"]["queue"]["detail"] == "0 message(s) queued"
    page = HealthPage(lambda: (False, "smtp down"), {"store": lambda: "fine", "queue": fails},
                      lambda f, *a: defer.maybeDeferred(f, *a), clock)
    request = _render(page, DummyRequest([b""]))
    body = json.loads(b"".join(request.written))
    assert request.responseCode == 503 and body["status"] == "failing"
    assert body["checks"]["queue"] == {"ok": False, "detail": "queue folder gone"}
    assert body["checks"]["listeners"] == {"ok": False, "detail": "smtp down"}
    assert body["checks"]["store"]["ok"] is True


def test_healthz_check_that_hangs_is_a_failure() -> None:
    """A check without an answer in CHECK_TIMEOUT seconds fails (the reply does not hang)."""
    clock = task.Clock()
    page = HealthPage(lambda: (True, "-"), {"directory": lambda: None},
                      lambda f, *a: defer.Deferred(), clock)
    request = _render(page, DummyRequest([b""]))
    assert not request.finished
    clock.advance(5.0)
    body = json.loads(b"".join(request.written))
    assert request.responseCode == 503 and "no answer within 5 s" in \
        body["checks"]["directory"]["detail"]


# --------------------------------------------------------------------------- config


BASE = '[server]\nhostname = "h.test"\nstate_dir = "var"\n'


def test_monitoring_keys_default_off_and_paths_relative(tmp_path: Path) -> None:
    """[metrics] is off by default; [log] mail_log "" keeps the server's log, a relative path is
    taken from the config file's folder, "-" is standard output."""
    c = parse_config(BASE, tmp_path / "c.toml")
    assert not c.metrics.enabled and c.log.mail_log == "" and c.log.format == "text"
    c = parse_config(BASE + '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                     '[log]\nmail_log = "log/mail.log"\nformat = "json"\n', tmp_path / "c.toml")
    assert c.metrics.enabled and c.metrics.store_refresh == 300
    assert c.log.mail_log == str(tmp_path / "log" / "mail.log")
    assert parse_config(BASE + '[log]\nmail_log = "-"\n').log.mail_log == "-"


@pytest.mark.parametrize(("text", "where"), [
    ('[log]\nformat = "json"\n', "[log.format] json needs [log] mail_log"),
    ('[log]\nformat = "xml"\n', "[log.format] must be one of text, json"),
    ('[metrics]\nstore_refresh = "0s"\n', "[metrics.store_refresh] must be longer than zero"),
    ('[metrics]\nlisten = ["ssl:443"]\n', "[metrics.listen]"),
    ('[log]\nmailog = ""\n', "[log.mailog] unknown key"),
])
def test_monitoring_key_errors_name_file_line_and_key(text: str, where: str,
                                                      tmp_path: Path) -> None:
    """A wrong [metrics] or [log] value is a config error naming the file, line and key."""
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + text, tmp_path / "c.toml")
    assert where in str(e.value) and f"{tmp_path / 'c.toml'}:" in str(e.value)
