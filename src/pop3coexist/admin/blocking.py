"""``wait``: running the reactor from the blocking ``pop3coexist-admin`` command (it lives in
ops/blocking.py, where the operations use it too)."""

from __future__ import annotations

from pop3coexist.ops.blocking import wait

__all__ = ["wait"]
