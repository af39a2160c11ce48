"""The POP3 realm and the shared fakes: verifyObject on each, the realm's lock checks and
snapshot, and the factory's wiring defaults."""

from __future__ import annotations

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import task
from zope.interface.verify import verifyObject

from pop3coexist.errors import LoginRefused, MailboxInUse, NoSuchMailbox
from pop3coexist.interfaces import IAccountChecker, IMaildrop, IMailStore
from pop3coexist.pop3.factory import POP3ServerFactory
from pop3coexist.pop3.realm import POP3Mailbox, Pop3Realm
from tests.support.fakes import FakeChecker, FakeMailStore, sync_run_blocking
from tests.unit.pop3_env import make_config


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def test_fakes_provide_their_interfaces():
    """FakeMailStore, FakeMaildrop and FakeChecker pass verifyObject."""
    store = FakeMailStore()
    store.add("ted@pop.contoso.test", b"x\n")
    verifyObject(IMailStore, store)
    verifyObject(IMaildrop, store.open_maildrop("pop.contoso.test", "ted"))
    verifyObject(IAccountChecker, FakeChecker())


def test_fake_store_failures_and_quota():
    """Injected failures raise; quotas refuse delivery; unknown mailboxes raise NoSuchMailbox."""
    store = FakeMailStore()
    store.add("ted@pop.contoso.test")
    store.set_quota("pop.contoso.test", "ted", 3)
    store.deliver_bytes("pop.contoso.test", "ted", b"abc")
    with pytest.raises(Exception, match="over quota"):
        store.deliver_bytes("pop.contoso.test", "ted", b"d")
    with pytest.raises(NoSuchMailbox):
        store.open_maildrop("pop.contoso.test", "nobody")
    store.fail["usage"] = OSError("boom")
    with pytest.raises(OSError):
        store.usage("pop.contoso.test", "ted")


def test_fake_checker_resolves_and_fails():
    """resolve_recipient knows accounts and aliases; fail makes every call fail."""
    checker = FakeChecker({"ted@pop.contoso.test": "pw"}, aliases={"t@x.test": "ted@pop.contoso.test"})
    assert result_of(checker.resolve_recipient("TED@pop.contoso.test")) == "ted@pop.contoso.test"
    assert result_of(checker.resolve_recipient("t@x.test")) == "ted@pop.contoso.test"
    assert result_of(checker.resolve_recipient("zz@pop.contoso.test")) is None
    checker.fail = RuntimeError("down")
    assert result_of(checker.resolve_recipient("ted@pop.contoso.test")).check(RuntimeError)


def test_realm_opens_snapshot_and_releases():
    """The realm gives a POP3Mailbox with cached sizes and ids; logout releases the lock."""
    store = FakeMailStore()
    store.add("ted@pop.contoso.test", b"a\nb\n", b"c\r\n")
    realm = Pop3Realm(store, sync_run_blocking)
    verifyObject(IRealm, realm)
    iface, box, logout = result_of(realm.requestAvatar("ted@pop.contoso.test", None, IMaildrop))
    assert iface is IMaildrop and isinstance(box, POP3Mailbox)
    verifyObject(IMaildrop, box)
    assert len(box) == 2 and [box.size(0), box.size(1)] == [6, 3]
    assert box.uidl(0) == "uid000001" and box.address == "ted@pop.contoso.test"
    second = result_of(realm.requestAvatar(b"ted@pop.contoso.test", None, IMaildrop))
    assert second.check(MailboxInUse)
    logout()
    logout()  # idempotent
    assert store.sessions == set()


def test_realm_refusals():
    """Locked mailbox -> LoginRefused; no such mailbox or malformed id -> UnauthorizedLogin;
    a store failure while reading sizes releases the lock and propagates."""
    store = FakeMailStore()
    store.add("ted@pop.contoso.test", b"a\n")
    realm = Pop3Realm(store, sync_run_blocking)
    store.locked_mailboxes.add(("pop.contoso.test", "ted"))
    assert result_of(realm.requestAvatar("ted@pop.contoso.test", None, IMaildrop)).check(LoginRefused)
    store.locked_mailboxes.clear()
    assert result_of(realm.requestAvatar("zoe@pop.contoso.test", None, IMaildrop)).check(UnauthorizedLogin)
    assert result_of(realm.requestAvatar("no-at-sign", None, IMaildrop)).check(UnauthorizedLogin)
    assert result_of(realm.requestAvatar("ted@pop.contoso.test", None, IRealm)).check(NotImplementedError)


def test_factory_defaults_from_config():
    """Without throttle/limiter the factory builds them from config.pop3; timestamps unique."""
    clock = task.Clock()
    clock.advance(1234.5)
    f = POP3ServerFactory(make_config(), FakeMailStore(), FakeChecker(), reactor=clock,
                          run_blocking=sync_run_blocking)
    assert f.throttle.base == 2.0 and f.throttle.maximum == 30.0
    assert f.limiter.total == 1000 and f.limiter.per_client == 50
    a, b = f.new_timestamp(), f.new_timestamp()
    assert a != b and a.endswith(b".1234500@pop.contoso.test>")
