"""The queue's typed state (store/envelope.py) keeps the JSON of the queue files written before
it was typed: old files load and run, a file loaded and saved again is unchanged, and the runner
writes the very same envelopes as the code before (fixtures in tests/fixtures/queue_v1)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pop3coexist.store.envelope import Envelope, Notice, Recipient, State
from pop3coexist.store.queue import FileQueue
from tests.unit.test_outbound import Env

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "queue_v1"
OLD_FILES = sorted((FIXTURES / "env").glob("*.json"))


def run_scenario(tmp_path: Path) -> list[str]:
    """Drive the runner on a Clock through the queue states (pending; delivered, failed and
    deferred side by side with notices owed; delayed with its report; expired; reports from
    ``<>``; ORCPT, NOTIFY=NEVER, ENVID, RET, BODY) and return every envelope it wrote, in
    order, with queue ids replaced by Q1, Q2, ... in order of appearance."""
    env = Env(tmp_path, expiration="100s")
    written: list[bytes] = []
    save = env.queue.save

    def recording_save(record: object, create: bool = False, sync: bool = True) -> bool:
        ok = save(record, create, sync)  # type: ignore[arg-type]
        if ok:
            qid = record["id"] if isinstance(record, dict) else record.id  # type: ignore[attr-defined]
            written.append(env.queue.envelope_file(qid).read_bytes())  # env/ or the claim
        return ok

    env.queue.save = recording_save  # type: ignore[method-assign]
    create_claimed = env.queue._create_claimed

    def recording_create(record: Envelope, sync: bool) -> bool:  # a new message, born claimed
        ok = create_claimed(record, sync)
        if ok:
            written.append(env.queue.envelope_file(record.id).read_bytes())
        return ok

    env.queue._create_claimed = recording_create  # type: ignore[method-assign]
    env.start()
    answers = {"b@example.net": "250 2.0.0 ok", "c@example.net": "550 5.1.1 no such user",
               "d@example.net": "451 4.3.0 try later"}
    env.hop.responder = lambda call: {a: answers.get(a, "250 2.0.0 ok") for a in call.rcpts}
    env.enqueue("b@example.net", "c@example.net", "d@example.net",
                notify=["SUCCESS", "FAILURE", "DELAY"], ret="FULL", envid="ENV-1", body="8BITMIME")
    env.enqueue("d@example.net", sender="ted@pop.contoso.test")
    env.enqueue("d@example.net", notify=["NEVER"])
    env.enqueue("x", recipients=[{"address": "d@example.net", "orcpt": "rfc822;D@Example.NET",
                                  "notify": ["failure"]}])
    for _ in range(10):  # past delay_notification (25 s) and expiration (100 s)
        env.clock.advance(15)
    ids: dict[str, str] = {}
    out = []
    for data in written:
        text = data.decode()
        for qid in re.findall(r"[0-9a-f]{24}", text):
            ids.setdefault(qid, f"Q{len(ids) + 1}")
        for qid, name in ids.items():
            text = text.replace(qid, name)
        out.append(text)
    return out


def test_the_runner_writes_the_same_envelopes_as_the_code_before(tmp_path: Path) -> None:
    """Byte for byte, in the same order, the runner writes the envelopes the untyped code wrote
    for the same scenario: new queue files are the same JSON."""
    expected = (FIXTURES / "scenario.jsonl").read_text().splitlines()
    assert run_scenario(tmp_path) == expected


@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.stem)
def test_an_old_queue_file_loads_and_saves_unchanged(path: Path, tmp_path: Path) -> None:
    """A queue file written before the types loads as an Envelope of Recipients with their
    State and Notice, and saving it again writes the same bytes."""
    queue = FileQueue(tmp_path / "queue", "pop.contoso.test")
    queue.ensure_dirs()
    shutil.copy(path, queue.envelope_path(path.stem))
    env = queue.load(path.stem)
    assert isinstance(env, Envelope) and env.id == path.stem
    assert all(isinstance(r, Recipient) and isinstance(r.state, State) for r in env.recipients)
    assert all(r.notice is None or isinstance(r.notice, Notice) for r in env.recipients)
    assert queue.save(env)
    assert queue.envelope_path(path.stem).read_bytes() == path.read_bytes()


def test_the_old_files_states_read_as_written() -> None:
    """The typed view of an old file says what its JSON says (a spot check of each kind of
    field: enums, lists, numbers, nulls, keys written only after the first attempt)."""
    env = Envelope.from_json(json.loads((FIXTURES / "env" / "18ecca287fb565b67073ee42.json").read_text()))
    assert (env.sender, env.ret, env.envid, env.body, env.size) == ("a@example.org", "FULL", "ENV-1",
                                                                    "8BITMIME", 61)
    b, c, d = env.recipients
    assert (b.state, b.notice, b.remote_mta) == (State.DELIVERED, Notice.RELAYED, "192.0.2.10")
    assert (c.state, c.notice, c.status, c.next_attempt) == (State.FAILED, Notice.FAILED, "5.1.1", None)
    assert (d.state, d.next_attempt, d.will_retry_until) == (State.DEFERRED, 1000010.0, 1000100.0)
    assert d.notify == ["SUCCESS", "FAILURE", "DELAY"] and env.due_time() == 0.0


def test_a_new_recipient_leaves_out_the_keys_of_later_attempts() -> None:
    """As before: ``diagnostic`` and ``will_retry_until`` appear in the JSON only once set
    (None included), and unknown keys of a file are kept."""
    r = Recipient("b@example.net")
    assert "diagnostic" not in r.to_json() and "will_retry_until" not in r.to_json()
    r.diagnostic = None
    assert r.to_json()["diagnostic"] is None and "will_retry_until" not in r.to_json()
    data = {**Recipient("c@example.net").to_json(), "x_future": [1]}
    assert Recipient.from_json(data).to_json() == data


@pytest.mark.parametrize("bad", [
    {"state": "sent"}, {"notice": "bounced"}, {"address": None},
])
def test_a_damaged_file_is_moved_aside(bad: dict, tmp_path: Path) -> None:
    """A file whose recipient is not one (unknown state or notice, no address) is damaged: load
    returns None and moves it to queue/damaged/, as for unreadable JSON."""
    queue = FileQueue(tmp_path / "queue", "pop.contoso.test")
    queue.ensure_dirs()
    path = OLD_FILES[0]
    data = json.loads(path.read_text())
    data["recipients"][0].update(bad)
    queue.envelope_path(path.stem).write_text(json.dumps(data))
    assert queue.load(path.stem) is None
    assert (queue.root / "damaged" / path.name).exists()


def test_old_queue_files_are_delivered_by_the_runner(tmp_path: Path) -> None:
    """A queue folder written by the code before (every state it wrote) is picked up at start:
    the reports owed go out (with the ENVID kept), the due recipients are delivered with their
    ORCPT and NOTIFY passed on, and the queue empties."""
    env = Env(tmp_path, expiration="2d")
    root = env.config.server.queue_dir
    shutil.copytree(FIXTURES / "env", root / "env")
    shutil.copytree(FIXTURES / "msg", root / "msg")
    env.clock.advance(1000)  # every deferred recipient is due
    env.start()
    for _ in range(5):
        env.clock.advance(60)
    assert env.queue.ids() == []
    sent = [r for call in env.hop.calls if call.txn.sender for r in call.txn.recipients]
    assert sorted((r["address"], r["orcpt"] or "", tuple(r["notify"] or ())) for r in sent) == [
        ("d@example.net", "", ()),
        ("d@example.net", "", ("NEVER",)),
        ("d@example.net", "", ("SUCCESS", "FAILURE", "DELAY")),
        ("d@example.net", "rfc822;D@Example.NET", ("FAILURE",)),
    ]
    reports = env.reports()
    assert sorted(rcpts[0] for rcpts, _ in reports) == [
        "a@example.org", "a@example.org", "a@example.org", "a@example.org", "ted@pop.contoso.test",
    ]
    # the relayed and failed reports owed, the one for d, and the old report still queued
    assert sum(b"Original-Envelope-Id: ENV-1" in call.body for call in env.hop.calls) == 4
