"""Outside programs for the integration tier: find them, or skip (fail in CI), and free ports."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_program(name: str, *candidates: str) -> str:
    """Path of an outside program. Missing: skip on a developer's machine, fail in CI."""
    for cand in (name, *candidates):
        found = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else None)
        if found:
            return found
    message = f"outside program {name!r} is not installed (see .ci/run for the Debian packages)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


# Ports this process has handed out: binding port 0 and closing the socket frees the port
# again, so two calls in a row may get the same number back (Dovecot then refused its config:
# "duplicate listener"). Never hand one out twice.
_HANDED_OUT: set[int] = set()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the OS picks, none handed out before by this process (for
    programs that cannot report the port they bound). All sockets are held until every number
    is chosen. Another process may still take one before the program binds it: a fixture that
    starts a program retries with fresh ports when the bind fails."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 50):
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                ports.append(port)
        else:
            if len(ports) < count:
                raise RuntimeError(f"could not pick {count} fresh ports on {host}")
    finally:
        for s in held:
            s.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One port as ``free_ports`` picks them."""
    return free_ports(1, host)[0]
