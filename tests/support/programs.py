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


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS picks (for programs that cannot report the port they bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
