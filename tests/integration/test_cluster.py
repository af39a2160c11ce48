"""Several pop3coexist nodes over one replicated GlusterFS volume (issue 20, README "Several servers").

The module's fixture builds, on this machine only: three GlusterFS hosts in network namespaces
on a bridge with link-local addresses (tests/support/gluster.py), a replica-3 volume with the
README's options, a FUSE mount from each host's network, and three pop3coexist nodes ``a``,
``b``, ``c`` (real twistd) whose ``state_dir`` is one folder on the volume, each through its own
mount, and whose ``local_dir`` is on local disk. An aiosmtpd smart host takes relayed mail.

The tests run in order and share the nodes: what one node accepted another serves; the POP3
lock holds across nodes and dies with its holder; 500 relayed messages reach the smart host
exactly once though one node is killed with -9 while it holds claims; a restarted node takes
its id again; a brick host cut off the network leaves the other nodes serving, its own node
answers with temporary failures and /healthz says why, and everything returns by itself.

Budget: about 150 s (marked ``cluster``; root, glusterfs-server and glusterfs-client needed:
missing, it skips locally and fails in CI).
"""

from __future__ import annotations

import poplib
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gluster import ClusterNode, GlusterCluster, missing
from tests.support.programs import in_ci
from tests.support.server import HOSTNAME, require_installed_plugin
from tests.support.smarthost import SmartHost, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(200)]

USER = f"ted@{HOSTNAME}"
PASSWORD = "cluster-secret-1"
RELAYED = 500


def _require_cluster() -> None:
    why = missing()
    if why is not None:
        if in_ci():
            pytest.fail(f"cluster test: {why}")
        pytest.skip(f"cluster test: {why}")


@pytest.fixture(scope="module")
def gluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterCluster]:
    """Three brick hosts, the volume started, one mount per host (m1, m2, m3)."""
    _require_cluster()
    require_installed_plugin()
    work = tmp_path_factory.mktemp("gluster")
    cluster = GlusterCluster(work).start()
    try:
        for i in (1, 2, 3):
            cluster.mount(i, work / f"m{i}")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def smarthost() -> Iterator[SmartHost]:
    host = SmartHost(gate=threading.Event())
    host.gate.set()
    host.start()
    yield host
    host.gate.set()
    host.stop()


@pytest.fixture(scope="module")
def nodes(gluster: GlusterCluster, smarthost: SmartHost,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ClusterNode]]:
    """Nodes a, b, c on mounts m1, m2, m3; the mailbox made by the admin command on node a."""
    work = tmp_path_factory.mktemp("nodes")
    made: dict[str, ClusterNode] = {}
    try:
        for i, name in enumerate("abc", start=1):
            node = ClusterNode(
                work / name, gluster.mounts[i - 1] / "state", name, tls=False,
                extra_config=(f'[smarthost]\nhost = "{smarthost.hop}"\ntls = "none"\n'
                              '[queue]\nretry_intervals = ["2s"]\nclaim_lease = "20s"\n'
                              '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'),
                smtp_config="max_messages_per_connection = 100\n")
            node.write_config()
            made[name] = node
        made["a"].add_mailbox(USER, PASSWORD)
        _start_together(list(made.values()))
        yield made
    finally:
        for node in made.values():
            node.stop(signal.SIGTERM, timeout=20)


def _start_together(nodes: list[ClusterNode]) -> None:
    """Start the nodes at once (each start polls for its own listeners.json)."""
    failures: list[BaseException] = []

    def start(node: ClusterNode) -> None:
        try:
            node.start(timeout=90)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if failures:
        raise failures[0]


def _send(node: ClusterNode, body: bytes, to: str = USER, sender: str = "ann@example.org",
          timeout: float = 60) -> str:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=timeout) as s:
        s.ehlo("client.example.org")
        s.sendmail(sender, [to], body)
        return s.noop()[1].decode()


def _pop(node: ClusterNode) -> poplib.POP3:
    box = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=60)
    box.user(USER)
    box.pass_(PASSWORD)
    return box


def _retr_all(node: ClusterNode) -> list[bytes]:
    box = _pop(node)
    try:
        count = box.stat()[0]
        return [b"\r\n".join(box.retr(i)[1]) for i in range(1, count + 1)]
    finally:
        box.quit()


def test_mail_accepted_on_a_is_read_on_b_byte_for_byte(nodes: dict[str, ClusterNode]) -> None:
    """A message accepted by node a (250 after the volume has it) is listed and retrieved over
    POP3 on node b at once, its bytes those node a wrote: the same RETR from node c (a third
    mount) and the sent message whole after the trace fields."""
    body = (b"From: ann@example.org\r\nTo: ted@pop.contoso.test\r\nSubject: across\r\n"
            b"Message-ID: <across.1@example.org>\r\n\r\n" + b"line of text\r\n" * 200
            + b".dot at the start\r\n")
    _send(nodes["a"], body)
    on_b = _retr_all(nodes["b"])
    on_c = _retr_all(nodes["c"])
    assert len(on_b) == 1 and on_b == on_c
    assert on_b[0].endswith(body.rstrip(b"\r\n")), on_b[0][:400]
    assert on_b[0].startswith(b"Return-Path: <ann@example.org>\r\nReceived: ")


def test_pop3_lock_holds_across_nodes(nodes: dict[str, ClusterNode]) -> None:
    """While node a holds the maildrop, a session on node b gets -ERR [IN-USE]; once a's
    session ends b gets in. (That the lock dies with a killed node: the relay test below.)"""
    holder = _pop(nodes["a"])
    try:
        second = poplib.POP3("127.0.0.1", nodes["b"].port("pop3"), timeout=60)
        second.user(USER)
        with pytest.raises(poplib.error_proto) as refused:
            second.pass_(PASSWORD)
        assert refused.value.args[0].startswith(b"-ERR [IN-USE]"), refused.value
        second.quit()
    finally:
        holder.quit()
    _pop(nodes["b"]).quit()


def test_admin_verbs_run_on_any_node(nodes: dict[str, ClusterNode]) -> None:
    """A mailbox added with the admin command of node c can log in on node b at once, and
    node a's admin command lists it (accounts and mailboxes live on the shared volume);
    `nodes` on node b shows all three running, each with a recent health probe."""
    _ensure_ann(nodes)
    box = poplib.POP3("127.0.0.1", nodes["b"].port("pop3"), timeout=60)
    box.user(f"ann@{HOSTNAME}")
    box.pass_("another-secret-2")
    box.quit()
    listed = nodes["a"].admin("mailbox", "list", HOSTNAME).stdout
    assert f"ann@{HOSTNAME}" in listed and USER in listed
    for node in nodes.values():
        node.health()  # each writes its probe
    table = nodes["b"].admin("nodes").stdout
    for name in "abc":
        assert re.search(rf"^{name}  running  pid \d+ on \S+ +probe \d+s ago", table, re.M), table


def test_past_the_volumes_link_limit_a_delivery_copies(
        gluster: GlusterCluster, nodes: dict[str, ClusterNode]) -> None:
    """With storage.max-hardlinks at 2, one message for two mailboxes (spool file + two
    links) cannot be linked into the second (EMLINK): the delivery still gets its 250, that
    mailbox gets a copy, and both mailboxes read the same bytes."""
    _ensure_ann(nodes)
    first = gluster.hosts[0]
    gluster.gluster(first, "volume", "set", gluster.volume, "storage.max-hardlinks", "2")
    try:
        body = b"Subject: two boxes\r\nMessage-ID: <links.1@example.org>\r\n\r\nsame bytes\r\n"
        with smtplib.SMTP("127.0.0.1", nodes["b"].port("smtp"), timeout=60) as s:
            s.sendmail("ann@example.org", [USER, f"ann@{HOSTNAME}"], body)
    finally:
        gluster.gluster(first, "volume", "set", gluster.volume, "storage.max-hardlinks", "100")
    box = _pop_eventually(nodes["a"], f"ann@{HOSTNAME}", "another-secret-2")
    ann = b"\r\n".join(box.retr(box.stat()[0])[1])
    box.quit()
    assert ann.endswith(b"same bytes") and ann == _retr_all(nodes["c"])[-1]


def _ensure_ann(nodes: dict[str, ClusterNode]) -> None:
    """ann's mailbox, added once with node c's admin command by whichever test needs it first
    (the tests must not depend on their order: pytest-xdist ran the link-limit test before
    the admin-verbs test in CI, and ann did not exist yet)."""
    if f"ann@{HOSTNAME}" not in nodes["c"].admin("mailbox", "list", HOSTNAME).stdout:
        nodes["c"].add_mailbox(f"ann@{HOSTNAME}", "another-secret-2")


def _pop_eventually(node: ClusterNode, user: str, password: str,
                    within: float = 20.0) -> poplib.POP3:
    """A POP3 session of ``user`` on ``node``, logging in again while the refusal is
    ``-ERR [AUTH]`` for up to ``within`` seconds: an account another node added a moment ago
    may be read from a mount's cached entries for about a second (the password file then looks
    it up again at most once a second). Any other reply, or [AUTH] past the deadline, fails
    with the node's log tail."""
    deadline = time.monotonic() + within
    while True:
        box = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=60)
        try:
            box.user(user)
            box.pass_(password)
            return box
        except poplib.error_proto as e:
            box.close()
            if not str(e).startswith("b'-ERR [AUTH]") or time.monotonic() > deadline:
                raise AssertionError(f"{e}\n{node.log_tail(60)}") from e


def _relay_batch(node: ClusterNode, numbers: range) -> None:
    """Relay messages ``numbers`` through ``node``, 50 per SMTP session."""
    for start in range(numbers.start, numbers.stop, 50):
        with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=120) as s:
            s.ehlo("client.example.org")
            for n in range(start, min(start + 50, numbers.stop)):
                body = (f"From: app@example.org\r\nTo: far@remote.example\r\n"
                        f"Subject: relay {n}\r\nMessage-ID: <relay.{n}@cluster.test>\r\n\r\n"
                        f"message {n}\r\n").encode()
                s.sendmail("app@example.org", ["far@remote.example"], body)


def _relay_together(nodes: dict[str, ClusterNode], work: tuple[tuple[str, range], ...]) -> None:
    """``_relay_batch`` on several nodes at once; the first failure is raised."""
    failures: list[BaseException] = []

    def run(name: str, numbers: range) -> None:
        try:
            _relay_batch(nodes[name], numbers)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=run, args=item) for item in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if failures:
        raise failures[0]


def _relayed_ids(smarthost: SmartHost) -> Counter:
    found: Counter = Counter()
    for msg in list(smarthost.received):
        m = re.search(rb"Message-ID: <relay\.(\d+)@cluster\.test>", msg.content)
        if m:
            found[int(m.group(1))] += 1
    return found


def _claimed_by(shared: Path, node: str) -> list[Path]:
    claimed = shared / "queue" / "claimed"
    if not claimed.is_dir():
        return []
    return [p for d in claimed.iterdir() if d.name.startswith(f"{node}.") and d.is_dir()
            for p in d.glob("*.json")]


def test_relayed_mail_reaches_the_smart_host_once_though_a_node_dies(
        nodes: dict[str, ClusterNode], smarthost: SmartHost) -> None:
    """500 relayed messages queued on all three nodes reach the smart host exactly once each.
    Midway the smart host holds every RCPT, so each node's runner holds claims; node c is
    killed with -9 while it holds some: nothing it accepted is lost, another node takes its
    claims back after the lease (queue.claim_lease = 20 s) and delivers them, once. Node c
    also held a POP3 maildrop when it died: the volume released that lock with the process
    (node a logs in at once), and node c starts again under its own node id (its node lock
    on the volume went with it too)."""
    shared = nodes["a"].shared
    _relay_together(nodes, (("a", range(0, 70)), ("b", range(70, 140)), ("c", range(140, 210))))

    assert smarthost.gate is not None
    smarthost.gate.clear()  # deliveries now wait at RCPT: claims stay claimed
    _relay_together(nodes, (("c", range(210, 260)), ("a", range(260, 290))))
    wait_until(lambda: _claimed_by(shared, "c"), 60, "claims held by node c")
    in_flight = len(_claimed_by(shared, "c"))
    held_by_c = _pop(nodes["c"])
    nodes["c"].stop(signal.SIGKILL)
    held_by_c.sock.close()
    smarthost.gate.set()
    _pop(nodes["a"]).quit()

    _relay_together(nodes, (("a", range(290, 395)), ("b", range(395, RELAYED))))
    wait_until(lambda: len(_relayed_ids(smarthost)) >= RELAYED, 120,
               f"{RELAYED} distinct messages at the smart host")
    wait_until(lambda: not _claimed_by(shared, "c"), 60, "node c's claims taken back")
    ids = _relayed_ids(smarthost)
    assert sorted(ids) == list(range(RELAYED))
    twice = {n: k for n, k in ids.items() if k != 1}
    assert not twice, f"delivered more than once: {twice} (node c held {in_flight} claims)"
    print(f"node c held {in_flight} claims when killed; all {RELAYED} delivered once")
    nodes["c"].start(timeout=90)  # the node id is free again: the dead node's lock went with it


def test_a_cut_off_brick_host_leaves_the_service_up(
        gluster: GlusterCluster, nodes: dict[str, ClusterNode]) -> None:
    """Brick host 3 (node c's mount) vanishes from the network: nodes a and b keep accepting
    and serving mail (the first write pauses for about the 5 s TCP user timeout, within a
    client's 30 s wait for a reply, never GlusterFS's 42 s ping timeout); node c
    answers SMTP with 4xx and POP3 with -ERR [SYS/TEMP], its /healthz says the volume check
    fails, and it loses nothing. Once host 3 is back, node c serves again by itself."""
    before = len(_retr_all(nodes["a"]))
    status, _ = nodes["c"].health()
    assert status == 200
    gluster.cut(3)
    try:
        started = time.monotonic()
        # a client that waits 30 s per reply: a node held for GlusterFS's 42 s ping timeout
        # (the mount's 5 s TCP user timeout not in effect) loses this client (a timeout, not
        # a speed bound: the pause is printed)
        _send(nodes["a"], b"Subject: during the cut\r\n\r\nstill here\r\n", timeout=30)
        paused = time.monotonic() - started
        print(f"node a's first message after the cut took {paused:.1f} s")
        _send(nodes["b"], b"Subject: during the cut 2\r\n\r\nstill here\r\n")
        assert len(_retr_all(nodes["b"])) == before + 2

        def c_refuses() -> bool:
            try:
                _send(nodes["c"], b"Subject: to the cut node\r\n\r\nx\r\n")
            except smtplib.SMTPRecipientsRefused as e:
                [(code, _reply)] = e.recipients.values()
                assert 400 <= code < 500, e
                return True
            except smtplib.SMTPResponseException as e:
                assert 400 <= e.smtp_code < 500, e
                return True
            return False

        wait_until(c_refuses, 30, "a temporary failure from node c")
        status, body = nodes["c"].health()
        assert status == 503 and not body["checks"]["volume"]["ok"], body
        box = poplib.POP3("127.0.0.1", nodes["c"].port("pop3"), timeout=60)
        box.user(USER)
        with pytest.raises(poplib.error_proto) as failed:
            box.pass_(PASSWORD)
        assert failed.value.args[0].startswith(b"-ERR [SYS/TEMP]"), failed.value
        box.quit()
    finally:
        gluster.restore(3)
    wait_until(lambda: nodes["c"].health()[0] == 200, 60, "node c healthy again")
    _send(nodes["c"], b"Subject: after the cut\r\n\r\nback\r\n")

    def all_mail_on_c() -> bool:
        try:  # files written during the cut may answer ENOTCONN until healed: [SYS/TEMP]
            return len(_retr_all(nodes["c"])) == before + 3
        except poplib.error_proto as e:
            assert e.args[0].startswith(b"-ERR [SYS/TEMP]"), e
            return False

    wait_until(all_mail_on_c, 60, "all mail on node c")
    for node in nodes.values():  # node c's volume errors are one line each, no traceback
        node.stop_cleanly(PASSWORD)


def test_the_cluster_left_nothing_behind(gluster: GlusterCluster) -> None:
    """The volume's state folder holds no stray spool file of any node (every 250 was
    delivered, nothing half-written is left after the kill and the cut)."""
    shared = gluster.mounts[0] / "state"
    leftovers = [p for p in (shared / "mailroot" / ".spool").rglob("*") if p.is_file()]
    assert not leftovers, leftovers
