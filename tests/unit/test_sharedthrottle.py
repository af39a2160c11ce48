"""The failed log-in delay shared by worker processes (policy/sharedthrottle.py): the same
rule as AuthThrottle, one record per source address seen by every process (also a real second
process), forgotten after forget_after or at a success, bounded probing with eviction of the
stalest record, and clear errors for a file that is not a table."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pop3coexist.policy import sharedthrottle
from pop3coexist.policy.sharedthrottle import SharedAuthThrottle, create_throttle_table
from pop3coexist.policy.throttle import AuthThrottle

SRC = Path(sharedthrottle.__file__).resolve().parents[2]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "auth-failures-pop3.table"
    create_throttle_table(path)
    return path


def test_same_delays_as_the_in_process_throttle(table: Path) -> None:
    """Base, doubling, cap, reset by success and by forget_after: step for step what
    AuthThrottle answers."""
    clock = Clock()
    clock.advance(1000)
    shared = SharedAuthThrottle(clock, table, base=2.0, maximum=30.0)
    local = AuthThrottle(clock, base=2.0, maximum=30.0)
    steps = ["f", "f", "f", "f", "f", "f", "s", "f", "wait", "f", "f"]
    for step in steps:
        if step == "f":
            assert shared.failure_delay("192.0.2.7") == local.failure_delay("192.0.2.7")
        elif step == "s":
            shared.success("192.0.2.7")
            local.success("192.0.2.7")
        else:
            clock.advance(901)
        assert shared.failures("192.0.2.7") == local.failures("192.0.2.7")
    assert shared.failure_delay("192.0.2.8") == 2.0  # another address starts afresh


def test_two_processes_share_one_record(table: Path) -> None:
    """Two throttles on one table (two workers) and a real second process count the same
    address together; IPv4-mapped IPv6 is the same address."""
    clock = Clock()
    a = SharedAuthThrottle(clock, table, base=1.0, maximum=64.0, create=True)
    b = SharedAuthThrottle(clock, table, base=1.0, maximum=64.0)
    assert a.failure_delay("198.51.100.1") == 1.0
    assert b.failure_delay("::ffff:198.51.100.1") == 2.0
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        from pop3coexist.policy.sharedthrottle import SharedAuthThrottle
        class C:
            def seconds(self): return 0.0
        t = SharedAuthThrottle(C(), {str(table)!r}, base=1.0, maximum=64.0)
        print(t.failure_delay("198.51.100.1"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 4.0
    assert a.failures("198.51.100.1") == 3
    b.success("198.51.100.1")
    assert a.failures("198.51.100.1") == 0 and a.failure_delay("198.51.100.1") == 1.0


def test_start_makes_the_table_afresh_and_workers_open_it_when_first_used(tmp_path: Path) -> None:
    """The main process's ``start`` creates the table (old records gone); a worker's throttle
    touches the file only when first used."""
    path = tmp_path / "t.table"
    worker = SharedAuthThrottle(Clock(), path)
    main = SharedAuthThrottle(Clock(), path, create=True)
    assert not path.exists()
    main.start()
    main.failure_delay("192.0.2.1")
    assert worker.failures("192.0.2.1") == 1
    again = SharedAuthThrottle(Clock(), path, create=True)
    again.start()
    assert SharedAuthThrottle(Clock(), path).failures("192.0.2.1") == 0


def test_crowded_slots_evict_the_stalest_record(tmp_path: Path) -> None:
    """With every probed slot taken, a new address replaces the record whose last failure is
    oldest; the others keep their counts."""
    path = tmp_path / "small.table"
    create_throttle_table(path, slots=sharedthrottle.PROBE)  # every key probes the same slots
    clock = Clock()
    t = SharedAuthThrottle(clock, path, base=1.0, maximum=1000.0)
    for i in range(sharedthrottle.PROBE):
        clock.advance(1)
        t.failure_delay(f"192.0.2.{i}")
        t.failure_delay(f"192.0.2.{i}")
    clock.advance(1)
    assert t.failure_delay("203.0.113.9") == 1.0
    assert t.failures("192.0.2.0") == 0  # the oldest went
    assert all(t.failures(f"192.0.2.{i}") == 2 for i in range(1, sharedthrottle.PROBE))


@pytest.mark.parametrize("content", [b"", b"short", b"NOTATHRT" + b"\0" * 1000])
def test_a_file_that_is_not_a_table_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    """A short or foreign file: ValueError naming the file, at first use."""
    path = tmp_path / "bad.table"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.table"):
        SharedAuthThrottle(Clock(), path).failures("192.0.2.1")
