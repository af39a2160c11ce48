"""The queue's local hop and aliases (issue 14's known fault): a delivery report to a sender
that is an alias, a list owner address or a directory proxy address reaches the mailboxes it
stands for; an outside target gets it as a new queue entry. Real MaildirStore (with its alias
files), a fake checker (IAccountChecker), the fake next hop of tests/unit/test_outbound.py."""

from __future__ import annotations

from pathlib import Path

from pop3coexist.smtp.outbound import OutboundService
from pop3coexist.store.maildir import MaildirStore
from tests.support.fakes import FakeChecker
from tests.unit.test_outbound import Env

D = "pop.contoso.test"


class AliasEnv(Env):
    def __init__(self, tmp_path: Path, store, checker) -> None:
        self.checker = checker
        super().__init__(tmp_path, store=store)

    def new_service(self) -> OutboundService:
        return OutboundService(self.config, self.queue, store=self.store, reactor=self.clock,
                               deliver=self.hop, poll_interval=5, resolver=self.resolver,
                               checker=self.checker, remove_linger=0)


def test_reports_to_alias_owner_and_proxy_senders_reach_their_mailboxes(tmp_path: Path) -> None:
    """Three refused messages from an alias, owner-LIST and a checker's proxy address: each
    report lands in the target mailbox (Return-Path <>); the alias's outside target gets the
    report through a new queue entry; nothing is left in the queue."""
    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain(D)
    for box in ("ann", "bo", "postmaster"):
        store.add_mailbox(D, box)
    with store.aliases.changing(D) as data:
        data["aliases"]["sales"] = [f"ann@{D}", "copy@example.net"]
        data["lists"]["team"] = {"members": [f"ann@{D}"], "senders": "anyone",
                                 "owner": f"bo@{D}"}
    checker = FakeChecker({f"ann@{D}": "pw", f"bo@{D}": "pw"}, aliases={f"annie@{D}": f"ann@{D}"})
    env = AliasEnv(tmp_path, store, checker)
    env.hop.responder = lambda call: {a: "550 5.1.1 unknown" for a in call.rcpts
                                      if a.startswith("gone")}
    env.start()
    for sender in (f"sales@{D}", f"owner-team@{D}", f"Annie@{D}"):
        env.enqueue("gone@example.net", sender=sender)

    def reports(box: str) -> list[bytes]:
        return [p.read_bytes() for p in (store.root / D / box / "new").iterdir()]

    assert len(reports("ann")) == 2 and len(reports("bo")) == 1
    assert all(r.startswith(b"Return-Path: <>\nFrom: Mail Delivery System")
               for r in reports("ann") + reports("bo"))
    assert reports("postmaster") == []
    forwarded = [c for c in env.hop.calls if c.rcpts == ["copy@example.net"]]
    assert len(forwarded) == 1 and forwarded[0].txn.sender == ""
    assert env.queue.ids() == []
