"""Connection limits shared by worker processes through one mapped file (policy/sharedlimit.py).

Several limiters on one file stand for different workers; the race and crash tests start real
second processes (``python -c``) on the same file.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pop3coexist.policy import sharedlimit
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.sharedlimit import (
    SharedConnectionLimiter,
    client_key,
    create_table,
    recommended_slots,
    reset_worker,
)

SRC = Path(sharedlimit.__file__).resolve().parents[2]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """A fresh table for 4 workers with 64 slots each."""
    path = tmp_path / "pop3.connections"
    create_table(path, 4, 64)
    return path


def _limiters(path: Path, n: int, total: int, per_client: int) -> list[SharedConnectionLimiter]:
    return [SharedConnectionLimiter(path, w, total, per_client) for w in range(n)]


# -- the file -------------------------------------------------------------------------------


def test_create_table_writes_header_and_zeroed_regions_mode_0600(tmp_path: Path) -> None:
    """The file has the documented size and header, mode 0600, and no temp file is left."""
    path = tmp_path / "t"
    create_table(path, 3, 128)
    data = path.read_bytes()
    region = 64 + 128 * 24
    assert len(data) == 64 + 3 * region
    assert data[:8] == b"P3CXCONN"
    assert struct.unpack_from("<IIIII", data, 8) == (1, 3, 128, 64, region)
    assert data[64:] == bytes(3 * region)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_create_table_replaces_an_old_table_with_zero_counts(table: Path) -> None:
    """Re-creating the table starts every count at zero, even over a file full of counts."""
    lim = SharedConnectionLimiter(table, 1, 10, 10)
    assert lim.acquire("192.0.2.1")
    create_table(table, 2, 32)
    fresh = SharedConnectionLimiter(table, 0, 10, 10)
    assert fresh.workers == 2 and fresh.slots == 32
    assert fresh.in_use() == 0
    assert lim.in_use() == 1  # the old limiter still has the old (unlinked) file mapped


def test_create_table_rejects_silly_sizes(tmp_path: Path) -> None:
    """workers and slots must be positive and bounded; nothing is written otherwise."""
    with pytest.raises(ValueError, match="workers"):
        create_table(tmp_path / "t", 0, 64)
    with pytest.raises(ValueError, match="slots"):
        create_table(tmp_path / "t", 2, 0)
    assert list(tmp_path.iterdir()) == []


def test_recommended_slots_is_a_power_of_two_at_least_twice_the_limit() -> None:
    """Guidance: next power of two >= 2 * total, at least 1024."""
    assert recommended_slots(1) == 1024
    assert recommended_slots(512) == 1024
    assert recommended_slots(513) == 2048
    assert recommended_slots(1000) == 2048
    assert recommended_slots(5000) == 16384


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"", "too short"),
        (lambda b: b[:40], "too short"),
        (lambda b: b"NOTMAGIC" + b[8:], "bad magic"),
        (lambda b: b[:8] + struct.pack("<I", 9) + b[12:], "version 9"),
        (lambda b: b[:-24], "truncated or damaged"),
        (lambda b: b + b"\0" * 24, "truncated or damaged"),
        (lambda b: b[:16] + struct.pack("<I", 0) + b[20:], "inconsistent header"),
    ],
)
def test_bad_or_short_file_is_a_clear_error_naming_it(table: Path, mangle, message: str) -> None:
    """A damaged or foreign file raises ValueError that names the file and the problem."""
    table.write_bytes(mangle(table.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        SharedConnectionLimiter(table, 0, 10, 10)
    assert str(table) in str(info.value)
    with pytest.raises(ValueError, match=message):
        reset_worker(table, 0)


def test_worker_index_out_of_range_is_refused(table: Path) -> None:
    """A worker number the table has no region for is a clear error."""
    with pytest.raises(ValueError, match=r"worker must be 0\.\.3"):
        SharedConnectionLimiter(table, 4, 10, 10)
    with pytest.raises(ValueError, match=r"worker must be 0\.\.3"):
        reset_worker(table, -1)


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    """No table at all is the ordinary FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        SharedConnectionLimiter(tmp_path / "absent", 0, 10, 10)


# -- limits across workers ------------------------------------------------------------------


def test_total_limit_holds_across_workers_and_release_frees(table: Path) -> None:
    """max_connections counts every worker's connections together; a release frees one."""
    a, b, c = _limiters(table, 3, total=5, per_client=100)
    assert a.acquire("192.0.2.1") and a.acquire("192.0.2.2")
    assert b.acquire("192.0.2.3") and b.acquire("192.0.2.4")
    assert c.acquire("192.0.2.5")
    assert not c.acquire("192.0.2.6")
    assert not a.acquire("192.0.2.1")
    assert (a.open, b.open, c.open) == (2, 2, 1)
    assert a.in_use() == b.in_use() == 5
    assert a.worker_totals() == [2, 2, 1, 0]
    b.release("192.0.2.3")
    assert b.open == 1 and c.in_use() == 4
    assert c.acquire("192.0.2.6")
    assert not a.acquire("192.0.2.7")


def test_per_client_limit_holds_across_workers(table: Path) -> None:
    """max_connections_per_client counts one address over all workers; others are unaffected."""
    a, b = _limiters(table, 2, total=100, per_client=3)
    assert a.acquire("198.51.100.9") and b.acquire("198.51.100.9") and b.acquire("198.51.100.9")
    assert not a.acquire("198.51.100.9")
    assert not b.acquire("198.51.100.9")
    assert a.acquire("198.51.100.10")
    assert a.in_use("198.51.100.9") == 3 and a.in_use("198.51.100.10") == 1
    a.release("198.51.100.9")
    assert b.acquire("198.51.100.9")
    assert not a.acquire("198.51.100.9")


def test_per_client_limit_exact_on_both_sides_of_the_look_up_shortcut(table: Path) -> None:
    """acquire looks up the other workers' entries for the client only when their total
    could reach the per-client limit: below it (others hold fewer connections than the
    limit) and above it (others hold many, from other clients and from this one) the
    per-client limit holds exactly, and a random mix agrees with one process's counts."""
    a, b, c = _limiters(table, 3, total=1000, per_client=4)
    assert b.acquire("203.0.113.1") and c.acquire("203.0.113.1")  # others: 2 < 4, no look-up
    assert a.acquire("203.0.113.1") and a.acquire("203.0.113.1")  # 4 in all
    assert not a.acquire("203.0.113.1")
    for i in range(20):  # others' totals far above the limit, from other clients
        assert b.acquire(f"198.51.100.{i}")
    assert a.acquire("203.0.113.2") and not b.acquire("203.0.113.1")
    b.release("203.0.113.1")
    assert a.acquire("203.0.113.1") and not c.acquire("203.0.113.1")
    rng = random.Random(17)
    held: list[tuple[SharedConnectionLimiter, str]] = []
    for _ in range(2000):
        who = rng.choice((a, b, c))
        client = f"192.0.2.{rng.randrange(4)}"
        if held and rng.random() < 0.45:
            lim, cl = held.pop(rng.randrange(len(held)))
            lim.release(cl)
            continue
        count = sum(1 for _, cl in held if cl == client)
        assert who.acquire(client) == (count < 4)
        if count < 4:
            held.append((who, client))


def test_refused_acquire_counts_nothing(table: Path) -> None:
    """A refusal leaves this worker's open count and the table unchanged."""
    a, b = _limiters(table, 2, total=2, per_client=1)
    assert a.acquire("192.0.2.1")
    assert not b.acquire("192.0.2.1")  # per client
    assert b.open == 0 and b.worker_totals() == [1, 0, 0, 0]
    assert b.acquire("192.0.2.2")
    assert not b.acquire("192.0.2.3")  # total
    assert b.open == 1 and a.in_use() == 2


def test_release_of_unknown_client_is_ignored(table: Path) -> None:
    """Releasing a client that has nothing counted (or once too often) changes nothing."""
    a, b = _limiters(table, 2, total=10, per_client=10)
    assert a.acquire("192.0.2.1")
    a.release("203.0.113.50")
    b.release("192.0.2.1")  # counted by a, not by b
    assert a.open == 1 and b.open == 0 and a.in_use("192.0.2.1") == 1
    a.release("192.0.2.1")
    a.release("192.0.2.1")
    assert a.open == 0 and a.in_use() == 0


def test_ipv4_mapped_ipv6_counts_as_the_ipv4_address(table: Path) -> None:
    """::ffff:192.0.2.7 and 192.0.2.7 are one client, whichever worker sees which form."""
    a, b = _limiters(table, 2, total=10, per_client=2)
    assert a.acquire("::ffff:192.0.2.7")
    assert b.acquire("192.0.2.7")
    assert not a.acquire("192.0.2.7")
    assert not b.acquire("::FFFF:c000:0207")
    assert a.in_use("192.0.2.7") == 2
    b.release("::ffff:192.0.2.7")
    assert b.open == 0 and a.in_use("::ffff:192.0.2.7") == 1


def test_client_keys_are_16_bytes_and_normalised() -> None:
    """IPv6 scope ids are dropped, IPv4 is IPv4-mapped, every non-IP peer shares one key."""
    assert client_key("192.0.2.7") == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7")
    assert client_key("fe80::1%eth0") == client_key("fe80::1")
    assert len(client_key("2001:db8::1")) == 16
    assert client_key("local") == client_key("unix") == client_key("") == b"\xff" * 16
    assert client_key("2001:db8::1") != client_key("2001:db8::2")


def test_unix_socket_peers_share_one_per_client_budget(table: Path) -> None:
    """Peers without an IP address count as one client (as 'local' does in ConnectionLimiter)."""
    a, b = _limiters(table, 2, total=10, per_client=2)
    assert a.acquire("local") and b.acquire("unix")
    assert not a.acquire("")
    assert a.acquire("127.0.0.1")


def test_one_worker_behaves_like_connection_limiter(tmp_path: Path) -> None:
    """With a single worker, a random acquire/release run gives ConnectionLimiter's answers."""
    path = tmp_path / "t"
    create_table(path, 1, 64)
    shared = SharedConnectionLimiter(path, 0, 20, 3)
    plain = ConnectionLimiter(20, 3)
    rng = random.Random(7)
    clients = [f"10.0.0.{i}" for i in range(12)]
    for _ in range(3000):
        c = rng.choice(clients)
        if rng.random() < 0.55:
            assert shared.acquire(c) == plain.acquire(c)
        else:
            shared.release(c)
            plain.release(c)
        assert shared.open == plain.open
    assert shared.in_use() == plain.open


# -- regions, crashes, lifecycle ------------------------------------------------------------


def test_region_full_refuses_new_clients_cleanly(tmp_path: Path) -> None:
    """With every slot taken by a distinct client, a new client is refused; known ones go on."""
    path = tmp_path / "t"
    create_table(path, 2, 4)
    a, b = _limiters(path, 2, total=100, per_client=100)
    for i in range(4):
        assert a.acquire(f"192.0.2.{i}")
    assert not a.acquire("192.0.2.99")
    assert a.open == 4 and a.in_use() == 4
    assert a.acquire("192.0.2.0")  # a client already in the region still fits
    assert b.acquire("192.0.2.99")  # the other worker's region is its own
    for i in range(4):
        assert b.in_use(f"192.0.2.{i}") == (2 if i == 0 else 1)
    a.release("192.0.2.3")
    assert a.acquire("192.0.2.99")
    assert b.in_use("192.0.2.99") == 2 and a.rebuilds == 0


def test_reset_worker_frees_a_dead_workers_counts_only(table: Path) -> None:
    """reset_worker zeroes one region; the other workers keep their counts."""
    a, b, c = _limiters(table, 3, total=4, per_client=10)
    assert b.acquire("192.0.2.1") and b.acquire("192.0.2.2") and b.acquire("192.0.2.1")
    assert c.acquire("192.0.2.1")
    assert not a.acquire("192.0.2.3")
    reset_worker(table, 1)  # worker 1 "died"
    assert a.worker_totals() == [0, 0, 1, 0]
    assert a.in_use("192.0.2.1") == 1
    assert a.acquire("192.0.2.3")


def test_new_limiter_clears_its_own_region_and_close_withdraws(table: Path) -> None:
    """A replacement worker starts from zero; close() takes its counts out and stops acquire."""
    a, b = _limiters(table, 2, total=10, per_client=10)
    assert b.acquire("192.0.2.1") and b.acquire("192.0.2.2")
    replacement = SharedConnectionLimiter(table, 1, 10, 10)
    assert a.in_use() == 0 and replacement.open == 0
    assert replacement.acquire("192.0.2.1")
    replacement.close()
    replacement.close()
    assert a.in_use() == 0
    assert not replacement.acquire("192.0.2.1")
    replacement.release("192.0.2.1")
    assert replacement.open == 0
    with pytest.raises(ValueError, match="closed"):
        replacement.in_use()


def test_damaged_own_region_is_rebuilt_from_the_workers_own_counts(table: Path) -> None:
    """If a worker's region no longer mirrors its counts, the next write rebuilds it."""
    a, b = _limiters(table, 2, total=10, per_client=10)
    assert a.acquire("192.0.2.1") and a.acquire("192.0.2.2")
    reset_worker(table, 0)  # wrong: worker 0 is alive; its region now disagrees with it
    assert b.in_use() == 0
    assert a.acquire("192.0.2.1")
    assert a.rebuilds == 1
    assert b.in_use() == 3 and b.in_use("192.0.2.1") == 2 and b.in_use("192.0.2.2") == 1


@pytest.mark.parametrize("slots, cap", [(64, 56), (7, 9), (1, 2)])
def test_many_distinct_clients_coming_and_going_keep_lookups_right(
    tmp_path: Path, slots: int, cap: int
) -> None:
    """Thousands of inserts and deletes in a small, crowded table never lose or invent a count.

    Worker 0 churns; worker 1 reads every client's count through the table (probing worker
    0's region) and must see exactly worker 0's model, for present and absent clients alike.
    The tiny tables run full (new clients refused) and wrap their probe chains around.
    """
    path = tmp_path / "t"
    create_table(path, 2, slots)
    writer = SharedConnectionLimiter(path, 0, 10_000, 5)
    reader = SharedConnectionLimiter(path, 1, 10_000, 5)
    rng = random.Random(1234)
    pool = [f"2001:db8::{i:x}" for i in range(400)] + [f"198.51.100.{i}" for i in range(200)]
    model: dict[str, int] = {}
    for step in range(20_000):
        c = rng.choice(list(model)) if model and rng.random() < 0.5 else rng.choice(pool)
        if len(model) < cap and rng.random() < 0.5:
            ok = writer.acquire(c)
            assert ok == (model.get(c, 0) < 5 and (c in model or len(model) < slots))
            if ok:
                model[c] = model.get(c, 0) + 1
        elif c in model:
            writer.release(c)
            model[c] -= 1
            if not model[c]:
                del model[c]
        if step % 997 == 0:
            for probe in pool:
                assert reader.in_use(probe) == model.get(probe, 0)
    for probe in pool:
        assert reader.in_use(probe) == model.get(probe, 0)
    assert reader.in_use() == sum(model.values()) == writer.open
    assert writer.rebuilds == 0
    for c, n in list(model.items()):
        for _ in range(n):
            writer.release(c)
    region = path.read_bytes()[64 : 64 + 64 + slots * 24]
    assert region[:8] == bytes(8) and region[64:] == bytes(slots * 24)


def test_limiter_inherited_through_fork_refuses_to_write(table: Path) -> None:
    """A forked child must make its own limiter: the parent's one raises there, and its
    close() in the child leaves the parent's counts in place."""
    lim = SharedConnectionLimiter(table, 1, 10, 10)
    assert lim.acquire("192.0.2.1")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            try:
                lim.acquire("192.0.2.2")
            except RuntimeError:
                try:
                    lim.release("192.0.2.1")
                except RuntimeError:
                    lim.close()
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lim.in_use() == 1 and lim.open == 1


def test_acquire_release_rate(tmp_path: Path) -> None:
    """Measures acquire+release pairs per second with 4 workers' regions (printed, no assert)."""
    path = tmp_path / "t"
    create_table(path, 4, recommended_slots(1000))
    lims = _limiters(path, 4, total=1000, per_client=50)
    for i, lim in enumerate(lims[1:]):
        for j in range(100):
            assert lim.acquire(f"192.0.{i}.{j}")
    a = lims[0]
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        client = f"203.0.113.{i & 127}"
        a.acquire(client)
        a.release(client)
    rate = n / (time.perf_counter() - start)
    print(f"\nshared limiter: {rate:,.0f} acquire+release pairs per second")
    assert a.open == 0


# -- real second processes ------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from pop3coexist.policy.sharedlimit import SharedConnectionLimiter

    path, worker, mode, total, per = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    lim = SharedConnectionLimiter(Path(path), worker, total, per)
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "fill":
        got = sum(lim.acquire(f"192.0.2.{i % 100}") for i in range(4000))
        print(got, flush=True)
    elif mode == "one-client":
        got = sum(lim.acquire("::ffff:198.51.100.7" if i % 2 else "198.51.100.7") for i in range(4000))
        print(got, flush=True)
    elif mode == "churn":
        rng = random.Random(worker)
        held, bad = [], 0
        for _ in range(4000):
            if not held or rng.random() < 0.6:
                c = f"192.0.2.{rng.randrange(6)}"
                if lim.acquire(c):
                    held.append(c)
                    if lim.in_use() > total or lim.in_use(c) > per:
                        bad += 1
            else:
                lim.release(held.pop(rng.randrange(len(held))))
        print(bad, len(held), flush=True)
    elif mode == "hold":
        got = sum(lim.acquire("192.0.2.50") for _ in range(3))
        print(got, flush=True)
        sys.stdin.readline()
    """
)


def _spawn(path: Path, worker: int, mode: str, total: int, per: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(worker), mode, str(total), str(per)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _race(path: Path, mode: str, total: int, per: int, workers: tuple[int, ...] = (1, 2)) -> list[str]:
    procs = [_spawn(path, w, mode, total, per) for w in workers]
    for p in procs:  # both are waiting on stdin: start them together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        outs.append(out.strip())
    return outs


def test_two_processes_racing_never_exceed_the_total(tmp_path: Path) -> None:
    """Two real processes grabbing 4000 times each get exactly max_connections between them."""
    path = tmp_path / "t"
    create_table(path, 3, 1024)
    outs = _race(path, "fill", total=500, per=10**6)
    assert sum(int(o) for o in outs) == 500
    observer = SharedConnectionLimiter(path, 0, 500, 10**6)
    assert observer.in_use() == 500 and sorted(observer.worker_totals()[1:]) == sorted(
        int(o) for o in outs
    )
    assert not observer.acquire("203.0.113.1")


def test_two_processes_racing_for_one_client_never_exceed_per_client(tmp_path: Path) -> None:
    """The per-client limit holds exactly across processes (one using the IPv4-mapped form)."""
    path = tmp_path / "t"
    create_table(path, 3, 1024)
    outs = _race(path, "one-client", total=10**6, per=37)
    assert sum(int(o) for o in outs) == 37
    assert SharedConnectionLimiter(path, 0, 10**6, 37).in_use("198.51.100.7") == 37


def test_processes_churning_never_see_a_limit_exceeded(tmp_path: Path) -> None:
    """Three processes acquiring and releasing at random never observe more than the limits.

    This is the race that fails without the flock (checked by hand: each process then sees
    the total exceeded dozens of times); it keeps all three at the limits all the time.
    """
    path = tmp_path / "t"
    create_table(path, 4, 1024)
    outs = _race(path, "churn", total=12, per=3, workers=(1, 2, 3))
    results = [tuple(int(x) for x in o.split()) for o in outs]
    assert [bad for bad, _held in results] == [0, 0, 0]
    observer = SharedConnectionLimiter(path, 0, 12, 3)
    assert observer.in_use() == sum(held for _bad, held in results)


def test_killed_worker_keeps_counts_until_reset_worker(tmp_path: Path) -> None:
    """kill -9 leaves the dead worker's counts (nothing else knows); reset_worker frees them."""
    path = tmp_path / "t"
    create_table(path, 2, 1024)
    proc = _spawn(path, 1, "hold", total=3, per=3)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "3"
    main = SharedConnectionLimiter(path, 0, 3, 3)
    assert main.in_use() == 3 and not main.acquire("192.0.2.1")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert main.in_use("192.0.2.50") == 3  # a dead worker's counts stay...
    reset_worker(path, 1)  # ...until the supervisor clears them
    assert main.in_use() == 0
    assert main.acquire("192.0.2.50") and main.acquire("192.0.2.50") and main.acquire("192.0.2.1")


def test_busier_than_others_compares_this_workers_count_with_each_other(tmp_path: Path) -> None:
    """The hint for spreading connections: True only while some other worker holds fewer
    connections than this one; a single worker is never busier than nobody."""
    table = tmp_path / "three"
    create_table(table, 3, 64)
    a = SharedConnectionLimiter(table, 0, 100, 100)
    b = SharedConnectionLimiter(table, 1, 100, 100)
    c = SharedConnectionLimiter(table, 2, 100, 100)
    assert not a.busier_than_others()
    a.acquire("192.0.2.1")
    assert a.busier_than_others() and not b.busier_than_others()
    b.acquire("192.0.2.2")
    assert a.busier_than_others()  # worker 2 still holds none
    c.acquire("192.0.2.3")
    assert not a.busier_than_others() and not c.busier_than_others()
    a.release("192.0.2.1")
    assert b.busier_than_others() and not a.busier_than_others()
