"""events.FastLogger (issue 17): the same events as Twisted's Logger, field for field, for
every level; an unknown level is reported as Twisted reports it, not emitted."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import Logger, LogLevel

from pop3coexist.events import FastLogger


@pytest.mark.parametrize("level", list(LogLevel.iterconstants()))
def test_the_event_is_twisteds_field_for_field(level: Any) -> None:
    """For each level both loggers give the observer one event with the same fields and
    values (the logger itself and the time aside), so the mail log, the worker pipe and the
    metrics see no difference."""
    seen: dict[str, list[dict]] = {"twisted": [], "fast": []}
    twisted_log = Logger(namespace="pop3coexist.smtp.server", observer=seen["twisted"].append)
    fast_log = FastLogger(namespace="pop3coexist.smtp.server", observer=seen["fast"].append)
    for log in (twisted_log, fast_log):
        log.emit(level, "SMTP connect from {client} ({listener})", mail_event="connect",
                 protocol="smtp", listener="smtp", client="192.0.2.1")
    (a,), (b,) = seen["twisted"], seen["fast"]
    assert a.keys() == b.keys()
    for key in a.keys() - {"log_logger", "log_time"}:
        assert a[key] == b[key], key
    assert b["log_logger"] is fast_log and b["log_level"] is level
    assert abs(a["log_time"] - b["log_time"]) < 60


def test_an_unknown_level_is_reported_not_emitted() -> None:
    """A level that is not a LogLevel: Twisted's report (a critical 'invalid log level'
    event with the failure), as with Twisted's Logger."""
    seen: list[dict] = []
    FastLogger(namespace="x", observer=seen.append).emit("loud", "text")  # type: ignore[arg-type]
    assert len(seen) == 1 and seen[0]["log_level"] is LogLevel.critical
    assert "invalid log level" in seen[0]["log_format"]
