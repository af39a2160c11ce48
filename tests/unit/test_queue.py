"""The durable outbound queue (store/queue.py): layout, durability rules, admin API (and
`queue delete --bounce`, smtp/bounce.py)."""

from __future__ import annotations

import email
import json
import os
import time
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from pop3coexist.interfaces import IOutboundQueue
from pop3coexist.smtp.bounce import delete_with_report
from pop3coexist.store.queue import FileQueue, State

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def _spool(tmp_path: Path, data: bytes = MESSAGE) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    p = spool / f"m{time.time_ns()}"
    p.write_bytes(data)
    return p


def _env(*rcpts: str, sender: str = "a@example.org", **kw: object) -> dict:
    env = {
        "sender": sender,
        "recipients": [{"address": r, "orcpt": None, "notify": None} for r in rcpts],
        "ret": None, "envid": None, "received_from": "client.example [192.0.2.1]",
        "arrival": 1000.0, "hops": 1,
    }
    env.update(kw)
    return env


@pytest.fixture
def queue(tmp_path: Path) -> FileQueue:
    return FileQueue(tmp_path / "queue", "pop.contoso.test", clock=lambda: 1010.0)


def test_implements_the_interface(queue: FileQueue) -> None:
    """FileQueue provides IOutboundQueue."""
    assert verifyObject(IOutboundQueue, queue)


def test_enqueue_links_the_body_once_and_writes_a_json_envelope(queue: FileQueue, tmp_path: Path) -> None:
    """The body is a hard link of the spool file; the envelope is JSON with per-recipient state."""
    src = _spool(tmp_path)
    qid = queue.enqueue(src, _env("b@example.net", "c@example.net"))
    body = queue.body_path(qid)
    assert os.stat(body).st_ino == os.stat(src).st_ino
    env = json.loads(queue.envelope_path(qid).read_text())
    assert env["sender"] == "a@example.org" and env["arrival"] == 1000.0 and env["size"] == len(MESSAGE)
    assert [r["state"] for r in env["recipients"]] == ["pending", "pending"]
    assert env["recipients"][0]["attempts"] == 0
    assert queue.ids() == [qid]
    assert not list((queue.root / "tmp").iterdir())


def test_body_name_is_the_body_path_as_a_str(queue: FileQueue, tmp_path: Path) -> None:
    """body_name names the same file as body_path, as a str, and refuses what is no queue id
    as body_path does (no path outside msg/ from a crafted id)."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    name = queue.body_name(qid)
    assert isinstance(name, str) and name == str(queue.body_path(qid))
    assert open(name, "rb").read() == queue.body_path(qid).read_bytes()
    for bad in ("../env/x", "", qid + "/x"):
        with pytest.raises(KeyError):
            queue.body_name(bad)


def test_bad_envelopes_are_refused_clearly(queue: FileQueue, tmp_path: Path) -> None:
    """A malformed envelope raises ValueError naming the problem, and nothing is queued."""
    src = _spool(tmp_path)
    with pytest.raises(ValueError, match="recipient"):
        queue.enqueue(src, _env())
    with pytest.raises(ValueError, match="sender"):
        queue.enqueue(src, {"sender": None, "recipients": [{"address": "x@y.z"}]})
    with pytest.raises(ValueError, match="RET"):
        queue.enqueue(src, _env("b@example.net", ret="ALL"))
    assert queue.ids() == []


def test_enqueue_calls_the_waker_and_reports_new_ids(queue: FileQueue, tmp_path: Path) -> None:
    """enqueue wakes the runner and its id is handed over once by drain_new."""
    woken = []
    queue.set_waker(lambda: woken.append(1))
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    assert woken == [1]
    assert queue.drain_new() == [qid]
    assert queue.drain_new() == []


def test_save_does_not_resurrect_a_deleted_message(queue: FileQueue, tmp_path: Path) -> None:
    """A state write after `queue delete` returns False and leaves the message deleted."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    env = queue.load(qid)
    queue.delete(qid)
    assert queue.save(env) is False
    assert queue.load(qid) is None and not queue.body_path(qid).exists()


def test_entries_list_state_for_the_admin(queue: FileQueue, tmp_path: Path) -> None:
    """entries() gives id, age, sender and each recipient's state, last reply and next attempt."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    env = queue.load(qid)
    r = env.recipients[0]
    r.state, r.attempts, r.next_attempt = State.DEFERRED, 1, 2000.0
    r.last_reply = "451 4.3.0 try later"
    assert queue.save(env)
    [entry] = queue.entries()
    assert entry["id"] == qid and entry["age"] == 10.0 and entry["sender"] == "a@example.org"
    assert entry["recipients"] == [
        {"address": "b@example.net", "state": "deferred", "attempts": 1,
         "last_reply": "451 4.3.0 try later", "next_attempt": 2000.0}
    ]


def test_flush_request_is_seen_by_another_instance(queue: FileQueue) -> None:
    """request_flush (admin process) leaves a marker the server's instance takes once."""
    other = FileQueue(queue.root, "pop.contoso.test")
    other.request_flush()
    assert queue.take_marker("flush") is True
    assert queue.take_marker("flush") is False


def test_recover_drops_temp_files_and_dead_enqueues(queue: FileQueue, tmp_path: Path) -> None:
    """At start, temp files and old bodies without envelope go; queued messages stay."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    (queue.tmp_dir / "env.half-written").write_bytes(b"{")
    dead = queue.msg_dir / "0000000000000001deadbeef"
    dead.write_bytes(b"x")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    young = queue.msg_dir / "0000000000000002deadbeef"
    young.write_bytes(b"x")
    counts = queue.recover()
    assert counts == {"tmp": 1, "orphans": 1}
    assert not dead.exists() and young.exists() and queue.load(qid) is not None


def test_damaged_envelope_is_moved_aside(queue: FileQueue, tmp_path: Path) -> None:
    """An unreadable envelope is logged and moved to damaged/, not crashed on."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net"))
    queue.envelope_path(qid).write_text("{not json")
    assert queue.load(qid) is None
    assert (queue.root / "damaged" / f"{qid}.json").exists()


def test_delete_unknown_is_keyerror(queue: FileQueue) -> None:
    """Deleting an unknown or malformed id raises KeyError (the admin prints one line)."""
    with pytest.raises(KeyError):
        queue.delete("00000000000000000000abcd")
    with pytest.raises(KeyError):
        queue.delete("../../etc/passwd")


def test_delete_with_bounce_reports_undelivered_recipients(queue: FileQueue, tmp_path: Path) -> None:
    """`queue delete --bounce` queues one report to the sender for the undelivered recipients."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net", "c@example.net"))
    env = queue.load(qid)
    env.recipients[0].state = State.DELIVERED
    queue.save(env)
    delete_with_report(queue, qid)
    [rid] = queue.ids()
    report = queue.load(rid)
    assert report.sender == "" and report.recipients[0].address == "a@example.org"
    msg = email.message_from_bytes(queue.body_path(rid).read_bytes())
    assert msg.get_content_type() == "multipart/report"
    status = msg.get_payload(1).get_payload()
    assert [b["Final-Recipient"] for b in status[1:]] == ["rfc822; c@example.net"]
    assert (queue.root / "rescan").exists()


def test_delete_with_bounce_never_reports_to_null_sender(queue: FileQueue, tmp_path: Path) -> None:
    """A message from <> is deleted without any report."""
    qid = queue.enqueue(_spool(tmp_path), _env("b@example.net", sender=""))
    delete_with_report(queue, qid)
    assert queue.ids() == []
