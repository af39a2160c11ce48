"""Route fall-back (fault 13) and the smart host that offers AUTH without STARTTLS (fault 10),
against real aiosmtpd next hops on loopback ports, the delivery runner in a subprocess.

A next hop that is down is a loopback port with nothing listening (bound on port 0 by the OS,
then closed): the connection is refused at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.store.queue import FileQueue
from tests.support.programs import free_port
from tests.support.smarthost import Runner, SmartHost, enqueue, wait_until, write_config

pytestmark = pytest.mark.integration

BODY = b"From: a@example.org\r\nTo: b@d.test\r\nSubject: route test\r\n\r\nhello\r\n"
PASSWORD = "n0t-in-the-log"


@pytest.fixture
def cleanup():  # noqa: ANN201
    items: list = []
    yield items
    for item in reversed(items):
        item.stop()


def _queue(config: Path) -> FileQueue:
    return FileQueue(config.parent / "state" / "queue", "pop.contoso.test")


def _gateway(tmp_path: Path, connectors: str) -> str:
    secret = tmp_path / "bind.secret"
    secret.write_text("x\n")
    return f"""
[auth]
method = "directory"
apop = false
[auth.directory]
base_dn = "dc=contoso,dc=test"
bind_dn = "cn=svc,dc=contoso,dc=test"
bind_password_file = "{secret}"
[gateway]
{connectors}
"""


def test_cheapest_connector_down_delivers_through_the_next_cost_at_once(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 13, as Exchange fails over by cost: the cost-1 connector's only next hop refuses
    connections, so the message goes out through the cost-2 connector in the same delivery
    run (the retry interval is an hour: waiting for it would time the test out), never
    through the cost-3 one; the log names the hop passed over and the hop used."""
    second = SmartHost(hostname="second.test").start()
    cleanup.append(second)
    third = SmartHost(hostname="third.test").start()
    cleanup.append(third)
    dead = f"[127.0.0.1]:{free_port()}"
    connectors = f"""
[[gateway.connectors]]
name = "third"
address_spaces = [{{ domain = "d.test", cost = 3 }}]
next_hops = ["{third.hop}"]
[[gateway.connectors]]
name = "cheapest"
address_spaces = [{{ domain = "d.test", cost = 1 }}]
next_hops = ["{dead}"]
[[gateway.connectors]]
name = "second"
address_spaces = [{{ domain = "d.test", cost = 2 }}]
next_hops = ["{second.hop}"]
"""
    cfg = write_config(tmp_path / "run", "", retry_intervals=("1h",),
                       extra=_gateway(tmp_path, connectors))
    queue = _queue(cfg)
    qid = enqueue(queue, ["b@d.test"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = second.wait_for(1)
    assert msg.rcpt_tos == ["b@d.test"] and third.received == []
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    log = runner.log()
    assert (f"{qid}: next hop {dead} (connector 'cheapest' cost 1, next hop 1 of 1) failed: "
            f"421 4.4.1 connection refused; trying {second.hop} (connector 'second' cost 2, "
            "next hop 1 of 1)") in log
    assert "via=\"connector 'second' cost 2, next hop 1 of 1\"" in log
    assert "state=delivered" in log


def test_a_connectors_next_hops_are_tried_in_the_order_written(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 13: a connector's first next hop is its primary, the others fall-backs in
    order (not picked at random): with the primary down, every message goes to the second
    hop, none to the third."""
    second = SmartHost(hostname="second.test").start()
    cleanup.append(second)
    third = SmartHost(hostname="third.test").start()
    cleanup.append(third)
    dead = f"[127.0.0.1]:{free_port()}"
    connectors = f"""
[[gateway.connectors]]
name = "pop3"
address_spaces = ["d.test"]
next_hops = ["{dead}", "{second.hop}", "{third.hop}"]
"""
    cfg = write_config(tmp_path / "run", "", retry_intervals=("1h",),
                       extra=_gateway(tmp_path, connectors))
    queue = _queue(cfg)
    for i in range(4):
        enqueue(queue, [f"u{i}@d.test"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    second.wait_for(4)
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert third.received == []
    assert runner.log().count("via=\"connector 'pop3' cost 1, next hop 2 of 3\"") == 4


def test_remote_route_list_falls_back_in_order(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 13 for `[[domains.remote]]`: `route = [primary, fall-back]` with the primary down
    delivers through the fall-back at once; the smart host is not used for that domain."""
    fallback = SmartHost(hostname="fallback.test").start()
    cleanup.append(fallback)
    smarthost = SmartHost(hostname="smarthost.test").start()
    cleanup.append(smarthost)
    dead = f"[127.0.0.1]:{free_port()}"
    extra = f"""
[[domains.remote]]
name = "d.test"
route = ["{dead}", "{fallback.hop}"]
"""
    cfg = write_config(tmp_path / "run", smarthost.hop, retry_intervals=("1h",), extra=extra)
    queue = _queue(cfg)
    enqueue(queue, ["b@d.test"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = fallback.wait_for(1)
    assert msg.rcpt_tos == ["b@d.test"] and smarthost.received == []
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert 'via="route of d.test, next hop 2 of 2"' in runner.log()


def test_smart_host_offering_auth_without_starttls(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 10: an aiosmtpd smart host that offers AUTH PLAIN LOGIN and no STARTTLS (an
    Exchange 2003 smart host without a certificate), tls = "opportunistic" and a password:
    the password never leaves (no AUTH attempt, no MAIL), every message waits with a stored
    reply that names the reason and the fix, the log explains it once for the host (not once
    per message), and the password is in no log line."""
    host = SmartHost(users={"relay": PASSWORD}, mechanisms=("PLAIN", "LOGIN"),
                     auth_require_tls=False).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="opportunistic", username="relay",
                       password=PASSWORD, retry_intervals=("1h",))
    queue = _queue(cfg)
    ids = [enqueue(queue, [f"u{i}@example.net"], BODY) for i in range(3)]
    runner = Runner(cfg).start()
    cleanup.append(runner)

    def all_deferred() -> bool:
        entries = queue.entries()
        return len(entries) == 3 and all(e["recipients"][0]["state"] == "deferred" for e in entries)

    wait_until(all_deferred, what="three deferred messages")
    for qid in ids:
        reply = queue.load(qid).recipients[0].last_reply
        assert reply.startswith("451 4.7.0 cannot authenticate to the smart host: it offers AUTH "
                                "LOGIN PLAIN only in clear text (it offers no STARTTLS)")
        assert 'give the smart host a certificate, or set smarthost.tls = "none"' in reply
    assert host.auth_attempts == [] and host.commands == []
    log = runner.log()
    warning = f"smart host {host.hop}: mail to this smart host waits in the queue"
    assert log.count(warning) == 1, log
    line = next(ln for ln in log.splitlines() if warning in ln)
    assert "certificate" in line and 'smarthost.tls = "none"' in line and "Exchange 2003" in line
    assert PASSWORD not in log


def test_tls_none_relays_through_such_a_smart_host(tmp_path: Path, cleanup) -> None:  # noqa: ANN001
    """Fault 10's documented way out: with tls = "none" the same smart host gets clear-text
    AUTH and the message is relayed."""
    host = SmartHost(users={"relay": PASSWORD}, mechanisms=("PLAIN", "LOGIN"),
                     auth_require_tls=False).start()
    cleanup.append(host)
    cfg = write_config(tmp_path / "run", host.hop, tls="none", username="relay",
                       password=PASSWORD, retry_intervals=("1h",))
    queue = _queue(cfg)
    enqueue(queue, ["b@example.net"], BODY)
    runner = Runner(cfg).start()
    cleanup.append(runner)
    [msg] = host.wait_for(1)
    assert msg.login == "relay" and not msg.tls
    wait_until(lambda: queue.ids() == [], what="the queue to empty")
    assert PASSWORD not in runner.log()
