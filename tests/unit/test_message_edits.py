"""The stages' edit API (policy.stages.Message over smtp.incoming.SpoolWriter): an edit
rewrites the spool at once, keeps the local-only Return-Path in front, and size follows,
for a small message still in memory and a big one already on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from zope.interface.verify import verifyObject

from pop3coexist.interfaces import ISpool
from pop3coexist.policy.stages import Message
from pop3coexist.smtp.incoming import WRITE_CHUNK, SpoolWriter


def _spool(tmp_path: Path, body: bytes) -> SpoolWriter:
    spool = SpoolWriter(tmp_path, "q1", lazy=True)
    spool.write_local_prefix(b"Return-Path: <a@b.test>\n")
    spool.write(b"Received: from c\nSubject: s\n\n" + body)
    return spool


def _run(coro) -> object:
    box: list = []
    defer.ensureDeferred(coro).addBoth(box.append)
    return box[0]


@pytest.mark.parametrize("body_size", [10, 3 * WRITE_CHUNK])
def test_edits_rewrite_the_spool_keep_the_prefix_and_update_size(
        tmp_path: Path, body_size: int, monkeypatch) -> None:
    """Small (buffer) and big (file) spools: content excludes Return-Path; prepend, change,
    remove and replace_body land in the bytes the commit later reads, prefix first."""
    import pop3coexist.policy.stages as stages

    monkeypatch.setattr(stages.threads, "deferToThread",
                        lambda f, *a: defer.maybeDeferred(f, *a))  # no reactor in unit tests
    body = b"x" * (body_size - 1) + b"\n"
    spool = _spool(tmp_path, body)
    verifyObject(ISpool, spool)
    msg = Message("q1", spool, "a@b.test", [])
    assert _run(msg.content()) == b"Received: from c\nSubject: s\n\n" + body
    _run(msg.prepend_header("Authentication-Results", "mx.test; spf=pass"))
    _run(msg.change_header("subject", 1, "t"))
    _run(msg.add_header("X-Scanned", "yes"))
    expected = (b"Authentication-Results: mx.test; spf=pass\nReceived: from c\nSubject: t\n"
                b"X-Scanned: yes\n\n" + body)
    assert _run(msg.content()) == expected
    assert msg.size == len(expected) + expected.count(b"\n")  # CRLF octets
    _run(msg.replace_body(b"short\r\n"))
    spool.finish()
    on_disk = spool.path.read_bytes()
    assert on_disk == (b"Return-Path: <a@b.test>\nAuthentication-Results: mx.test; spf=pass\n"
                       b"Received: from c\nSubject: t\nX-Scanned: yes\n\nshort\n")
    assert spool.size == len(on_disk)
    spool.abort()
    assert not spool.path.exists()


def test_an_edit_that_changes_nothing_does_not_rewrite(tmp_path: Path) -> None:
    """Removing a field the message lacks leaves the spool alone (no write at all)."""
    spool = _spool(tmp_path, b"b\n")
    calls: list = []
    real = spool.replace
    spool.replace = lambda data: (calls.append(data), real(data))  # type: ignore[method-assign]
    msg = Message("q1", spool, "a@b.test", [])
    _run(msg.remove_headers("x-none"))
    assert calls == []
