"""A full state file system (issue 16 item 2, found by the soak): the reply is 452 4.3.1 and
nothing half-written stays behind."""

from __future__ import annotations

import errno

import pytest

from pop3coexist.errors import StorageFull, StoreError, as_mail_error, disk_full
from pop3coexist.store.queue import FileQueue


def test_enospc_and_edquot_are_452_4_3_1():
    """An OSError ENOSPC or EDQUOT, or an error raised from one, is StorageFull (452 4.3.1,
    POP3 [SYS/TEMP]); another OSError says nothing to a client (the generic local error)."""
    for code in (errno.ENOSPC, errno.EDQUOT):
        error = as_mail_error(OSError(code, "full"))
        assert isinstance(error, StorageFull)
        assert error.reply().startswith("452 4.3.1 ")
        assert error.pop3_reply().startswith("[SYS/TEMP]")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise StoreError("cannot write") from e
    except StoreError as wrapped:
        assert disk_full(wrapped)
    assert as_mail_error(OSError(errno.EIO, "io")) is None


def test_queue_enqueue_leaves_no_body_when_the_envelope_cannot_be_written(tmp_path, monkeypatch):
    """The soak's disk-full fault left a queue body without its envelope (a message nobody
    delivers or removes) when the envelope write failed: enqueue now removes the body and
    raises, so msg/ and env/ stay empty."""
    queue = FileQueue(tmp_path / "queue", "pop.contoso.test")
    source = tmp_path / "spool-file"
    source.write_bytes(b"Subject: x\r\n\r\nbody\r\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queue, "save", full)
    envelope = {"sender": "a@example.test", "recipients": [{"address": "b@relay.example.test"}]}
    with pytest.raises(OSError) as info:
        queue.enqueue(source, envelope)
    assert disk_full(info.value)
    assert list(queue.msg_dir.iterdir()) == [] and list(queue.env_dir.iterdir()) == []
