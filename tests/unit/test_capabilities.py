"""Optional capabilities are declared, never probed (issue 12 item 3).

Each real class declares the interfaces of the optional method sets it has; each test fake
provides at least what the real class it stands for declares, so the unit tier runs the branch
production runs; ``verifyObject`` checks both; and no ``getattr(obj, "name", None)`` probe of a
capability nor ``inspect.signature`` is left in ``src/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet import defer, task
from zope.interface import implementedBy, providedBy
from zope.interface.verify import verifyClass, verifyObject

from pop3coexist import interfaces as I  # noqa: N812
from pop3coexist.identity.directory import DirectoryChecker
from pop3coexist.identity.local import LocalChecker
from pop3coexist.identity.passwordfile import PasswordFileChecker
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.limiters import TableLimiter
from pop3coexist.policy.sharedlimit import SharedConnectionLimiter, create_table
from pop3coexist.policy.sharedthrottle import SharedAuthThrottle
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.smtp.incoming import GroupCommitter
from pop3coexist.store.maildir import MaildirStore, Maildrop
from tests.support.fakes import (
    FakeChecker,
    FakeDirectoryChecker,
    FakeMaildrop,
    FakeMailStore,
    FakePasswordFileChecker,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "pop3coexist"

# (real class, the fake that stands for it in the unit tier)
PAIRS = [
    (MaildirStore, FakeMailStore),
    (Maildrop, FakeMaildrop),
    (PasswordFileChecker, FakePasswordFileChecker),
    (LocalChecker, FakeChecker),
    (DirectoryChecker, FakeDirectoryChecker),
]


@pytest.mark.parametrize(("real", "fake"), PAIRS, ids=[r.__name__ for r, _ in PAIRS])
def test_each_fake_declares_what_its_real_class_declares(real: type, fake: type) -> None:
    """A fake provides every interface its real class declares (optional capabilities too),
    and both classes really have the methods of each (verifyClass)."""
    declared = set(implementedBy(real).flattened())
    assert declared <= set(implementedBy(fake).flattened())
    for iface in implementedBy(real):
        verifyClass(iface, real)
        verifyClass(iface, fake)


def test_the_capabilities_each_real_class_declares() -> None:
    """The optional method sets, by class: what the server's branches are chosen by."""
    assert I.IQuotaCheck.implementedBy(MaildirStore)
    assert I.IBatchDelivery.implementedBy(MaildirStore)
    assert I.ICachedMessageOpen.implementedBy(Maildrop)
    assert I.IBlockingRecipientLookup.implementedBy(PasswordFileChecker)
    assert not I.IBlockingRecipientLookup.implementedBy(DirectoryChecker)
    assert not I.IBlockingRecipientLookup.implementedBy(LocalChecker)
    assert I.IDirectoryLookup.implementedBy(DirectoryChecker)
    assert I.IClosable.implementedBy(DirectoryChecker)
    for cls in (PasswordFileChecker, LocalChecker, DirectoryChecker):
        assert I.ISelfCheck.implementedBy(cls)
    assert I.IConnectionLimiter.implementedBy(ConnectionLimiter)
    assert not I.ISharedConnectionLimiter.implementedBy(ConnectionLimiter)
    assert I.ISharedConnectionLimiter.implementedBy(SharedConnectionLimiter)
    assert I.ISharedConnectionLimiter.implementedBy(TableLimiter)
    assert I.IStartStop.implementedBy(TableLimiter)
    assert I.IStartStop.implementedBy(SharedAuthThrottle)
    assert I.IAuthThrottle.implementedBy(AuthThrottle)
    assert I.IAuthThrottle.implementedBy(SharedAuthThrottle)
    assert I.ICommitter.implementedBy(GroupCommitter)


def test_verify_object_on_real_objects_and_fakes(tmp_path: Path) -> None:
    """verifyObject on live instances: the real store, maildrop, limiters, throttles and
    group committer, and every fake."""
    store = MaildirStore(tmp_path / "mailroot")
    store.add_domain("pop.contoso.test")
    store.add_mailbox("pop.contoso.test", "ted")
    drop = store.open_maildrop("pop.contoso.test", "ted")
    table = tmp_path / "table"
    create_table(table, 2, 32)
    clock = task.Clock()
    fake_store = FakeMailStore()
    fake_store.add("ted@pop.contoso.test")
    objects = [
        store, drop, ConnectionLimiter(10, 2), SharedConnectionLimiter(table, 0, 10, 2),
        AuthThrottle(clock), SharedAuthThrottle(clock, tmp_path / "throttle", create=True),
        GroupCommitter(store, None, defer.maybeDeferred),
        fake_store, fake_store.open_maildrop("pop.contoso.test", "ted"),
        FakeChecker(), FakePasswordFileChecker(), FakeDirectoryChecker(),
    ]
    try:
        for obj in objects:
            for iface in providedBy(obj):
                verifyObject(iface, obj)
    finally:
        drop.close()


_PROBE = re.compile(r"getattr\([^,()]+,\s*\"(\w+)\",\s*None\)")
# getattr probes left in src/ that read a third party's objects (Twisted transports, ldaptor,
# argparse, OSError, os and fcntl constants), never a capability of ours
_FOREIGN = {"host", "connected", "transport", "abortConnection", "resultCode", "verb",
            "preference", "protocol", "ipv4_mapped", "RWF_NOWAIT", "F_SETLEASE", "_tlsConnection", "username", "setTcpNoDelay"}


def test_no_capability_probes_in_src() -> None:
    """No ``getattr(x, "name", None)`` for a method of ours and no ``inspect.signature``."""
    found = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "inspect.signature" not in text, path
        for m in _PROBE.finditer(text):
            if m.group(1) not in _FOREIGN:
                found.append(f"{path.relative_to(SRC)}: {m.group(0)}")
    assert found == []
