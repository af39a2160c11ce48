"""The test tier's port picker: programs that need a port number in their config (Dovecot,
slapd, rspamd, clamav-milter, smtp-sink) get distinct ones, never one handed out before."""

from __future__ import annotations

from tests.support.programs import free_port, free_ports


def test_ports_picked_together_are_distinct_and_never_repeat() -> None:
    """Many picks in a row never give a number twice, though each socket is closed before the
    next bind (the OS may hand a just-freed port straight back: Dovecot then saw two of its
    listeners on one port, "duplicate listener", and refused to start in CI)."""
    seen = free_ports(6)
    for _ in range(200):
        seen.append(free_port())
    assert len(seen) == len(set(seen))
    assert all(0 < port < 65536 for port in seen)
