"""The POP3 cred realm: an authenticated mailbox address becomes an open maildrop.

``Pop3Realm`` implements ``twisted.cred.portal.IRealm``. The checker (an ``IAccountChecker``)
returns the avatar id ``"mailbox@domain"``; the realm then, off the reactor thread via
``run_blocking``: refuses an account that has no mailbox in this store (``UnauthorizedLogin``,
logged at info: SMTP AUTH needs only the account, POP3 needs the mailbox), refuses a locked
mailbox or domain (``errors.LoginRefused``), takes the session lock with
``IMailStore.open_maildrop`` (``errors.MailboxInUse`` when another session holds it) and
reads the snapshot's sizes and unique ids once. The avatar is a
``POP3Mailbox`` (an ``IMaildrop`` with those values cached, so the protocol never blocks
for STAT, LIST or UIDL). The logout callable releases the lock and is blocking: the protocol
calls it through ``run_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer

from pop3coexist.errors import LoginRefused, NoSuchMailbox
from pop3coexist.interfaces import ICachedMessageOpen, ICachedMessageRead, IMaildrop, IMailStore

log = Logger(namespace="pop3coexist.pop3.realm")


@implementer(IMaildrop, ICachedMessageOpen)
class POP3Mailbox:
    """See IMaildrop. Wraps the store's maildrop; sizes and ids are read once at log-in."""

    def __init__(self, address: str, maildrop: Any, sizes: list[int], uids: list[str]) -> None:
        self.address = address
        self.maildrop = maildrop
        self._sizes = sizes
        self._uids = uids
        self._closed = False
        self._cached_open = ICachedMessageOpen.providedBy(maildrop)  # asked once, not per RETR
        if self._cached_open:  # RETR calls the maildrop's own method: no wrapper call (issue 17)
            self.open_message_cached = maildrop.open_message_cached
        if ICachedMessageRead.providedBy(maildrop):  # RETR's short cut, likewise direct
            alsoProvides(self, ICachedMessageRead)
            self.read_message_cached = maildrop.read_message_cached

    def __len__(self) -> int:
        return len(self._sizes)

    def size(self, index: int) -> int:
        return self._sizes[index]

    def uidl(self, index: int) -> str:
        return self._uids[index]

    def open_message(self, index: int) -> Any:
        return self.maildrop.open_message(index)

    def open_message_cached(self, index: int) -> Any:
        if self._cached_open:
            return self.maildrop.open_message_cached(index)
        return None

    def commit(self, deleted: set[int]) -> None:
        self.maildrop.commit(set(deleted))
        self._closed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.maildrop.close()

    def __repr__(self) -> str:
        return f"<POP3Mailbox {self.address} messages={len(self._sizes)}>"


@implementer(IRealm)
class Pop3Realm:
    """Maps ``"mailbox@domain"`` to a ``POP3Mailbox`` (avatar interface ``IMaildrop``)."""

    def __init__(
        self,
        store: IMailStore,
        run_blocking: Callable[..., defer.Deferred] | None = None,
    ) -> None:
        self.store = store
        self.run_blocking = run_blocking or threads.deferToThread

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> defer.Deferred:  # noqa: N802,N803
        if IMaildrop not in interfaces:
            return defer.fail(NotImplementedError("the POP3 realm only gives IMaildrop avatars"))
        address = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        mailbox, sep, domain = address.lower().rpartition("@")
        if not sep or not mailbox or not domain:
            log.error("checker returned an avatar id that is not mailbox@domain: {avatar!r}",
                      avatar=address)
            return defer.fail(UnauthorizedLogin("authentication failed"))
        d = self.run_blocking(self._open, domain, mailbox)
        d.addCallback(lambda box: (IMaildrop, box, box.close))
        return d

    def _open(self, domain: str, mailbox: str) -> POP3Mailbox:
        """Blocking: lock check, session lock, snapshot of sizes and unique ids."""
        address = f"{mailbox}@{domain}"
        try:
            if self.store.is_mailbox_locked(domain, mailbox):
                raise LoginRefused("mailbox is locked")
            drop = self.store.open_maildrop(domain, mailbox)
        except (NoSuchMailbox, ValueError):
            # An account may exist without a mailbox here (a relay or service account, a user
            # whose mailbox lives on another server): it may SMTP AUTH, but POP3 needs the
            # mailbox. An ordinary refusal, never a server fault.
            log.info("POP3 log-in of {address} refused: the account has no mailbox on this server",
                     address=address)
            raise UnauthorizedLogin("authentication failed") from None
        try:
            count = len(drop)
            sizes = [drop.size(i) for i in range(count)]
            uids = [drop.uidl(i) for i in range(count)]
        except BaseException:
            drop.close()
            raise
        return POP3Mailbox(address, drop, sizes, uids)
