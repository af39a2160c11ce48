"""In-memory fakes of the seams, for protocol tests (POP3, ESMTP): no disk, no threads.

Each fake provides exactly the interfaces its real class declares (``verifyObject`` checks
both, tests/unit/test_capabilities.py), optional capabilities included:

- ``FakeMailStore`` (IMailStore, IQuotaCheck, IBatchDelivery, IAliasTable, as
  ``MaildirStore``): aliases and lists in ``distributions`` (address -> Distribution); domains,
  mailboxes and messages in dicts; locks, quotas, session locks (``open_maildrop`` ->
  ``FakeMaildrop``); every call recorded in ``calls``. Delivered paths lie in a real temporary
  folder (created, the files are not), so a caller can sync their folders.
- ``FakeMaildrop`` (IMaildrop, ICachedMessageOpen): a snapshot; ``commit`` removes messages.
- ``FakeChecker`` (IAccountChecker, ISelfCheck, as ``LocalChecker``): accounts as
  ``{"user@domain": "password"}``; checks clear-text and (when ``offers_secrets``) APOP /
  CRAM-MD5 credentials by calling their ``checkPassword`` with the secret, as a real checker
  does. ``FakePasswordFileChecker`` adds IBlockingRecipientLookup (as ``PasswordFileChecker``),
  ``FakeDirectoryChecker`` IDirectoryLookup, IGroupLookup (``groups``: address ->
  Distribution) and IClosable (as ``DirectoryChecker``).

Injectable failures: ``store.fail["method_name"] = SomeException(...)`` makes that method
raise (``"open_message"``, ``"commit"``, ``"close"`` and ``"read"`` apply to maildrops, the last
one to reading an opened message); ``checker.fail = AuthUnavailable()`` fails every check;
``checker.hold = True`` leaves log-ins pending until ``checker.release()`` (pipelining tests).

``sync_run_blocking(f, *args)`` runs ``f`` now and returns a fired Deferred: inject it as a
protocol's ``run_blocking`` so tests stay single-threaded.
"""

from __future__ import annotations

import io
import itertools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from pop3coexist.address import login_to_address
from pop3coexist.errors import MailboxInUse, NoSuchMailbox, QuotaExceeded
from pop3coexist.interfaces import (
    Distribution,
    IAccountChecker,
    IAliasTable,
    IBatchDelivery,
    IBlockingRecipientLookup,
    ICachedDomainList,
    ICachedMailboxCheck,
    ICachedMessageOpen,
    ICachedMessageRead,
    ICachedRecipientLookup,
    IClosable,
    ICredentialStamp,
    IDirectoryLookup,
    IGroupLookup,
    IMaildrop,
    IMailStore,
    IQuotaCheck,
    IScramKeyStore,
    ISelfCheck,
)


def sync_run_blocking(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run ``f`` at once; a Deferred already fired with its result or failure."""
    return defer.maybeDeferred(f, *args, **kwargs)


def crlf_size(data: bytes) -> int:
    """The POP3 size of stored bytes, written out here apart from the server's code: CRLF, LF,
    CR CR LF and a bare CR each end a line, sent as CRLF; an unended last line gets a CRLF;
    Ctrl-Zs that end the file (the DOS end-of-file mark) and a first line starting with
    ``From `` (an mbox envelope line) are not part of the message."""
    lines = re.split(rb"\r*\n|\r", data.rstrip(b"\x1a"))
    if lines[-1] == b"":
        lines.pop()  # the data ended with a line end (or was empty)
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    return sum(len(line) + 2 for line in lines)


class _FailingFile(io.BytesIO):
    """A message file whose ``read`` raises the injected exception after ``after`` bytes."""

    def __init__(self, data: bytes, exc: BaseException, after: int = 0) -> None:
        super().__init__(data)
        self._exc = exc
        self._after = after

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self._after:
            raise self._exc
        return super().read(min(size if size and size > 0 else len(self.getvalue()),
                                self._after - self.tell()))


@implementer(IMaildrop, ICachedMessageOpen, ICachedMessageRead)
class FakeMaildrop:
    """See IMaildrop. A snapshot of ``(uid, bytes)`` pairs of one FakeMailStore mailbox."""

    def __init__(self, store: FakeMailStore, domain: str, mailbox: str,
                 messages: list[tuple[str, bytes]]) -> None:
        self.store = store
        self.domain = domain
        self.mailbox = mailbox
        self.messages = list(messages)
        self.opened: list[Any] = []  # file objects handed out
        self.committed: set[int] | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self.messages)

    def size(self, index: int) -> int:
        return crlf_size(self.messages[index][1])

    def uidl(self, index: int) -> str:
        return self.messages[index][0]

    def open_message(self, index: int) -> Any:
        self.store._maybe_fail("open_message")
        data = self.messages[index][1]
        exc = self.store.fail.get("read")
        f: Any = _FailingFile(data, exc, self.store.read_fail_after) if exc else io.BytesIO(data)
        self.opened.append(f)
        return f

    def open_message_cached(self, index: int) -> Any:
        """Never cached: the server under test takes the thread path, which tests control."""
        return None

    def read_message_cached(self, index: int, limit: int) -> bytes | None:
        """Never cached, like ``open_message_cached``."""
        return None

    def commit(self, deleted: set[int]) -> None:
        self.store._maybe_fail("commit")
        gone = {self.messages[i][0] for i in deleted}
        box = self.store.mail[self.domain][self.mailbox]
        box[:] = [m for m in box if m[0] not in gone]
        self.committed = set(deleted)
        self._release()

    def close(self) -> None:
        self.store._maybe_fail("close")
        self._release()

    def _release(self) -> None:
        self.closed = True
        self.store.sessions.discard((self.domain, self.mailbox))


@implementer(IMailStore, IQuotaCheck, IBatchDelivery, ICachedMailboxCheck, IAliasTable,
             ICachedDomainList)
class FakeMailStore:
    """See IMailStore. ``mail[domain][mailbox]`` is a list of ``(uid, bytes)``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path("/nonexistent/mailroot")
        self.distributions: dict[str, Distribution] = {}
        self.mail: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
        self.locked_domains: set[str] = set()
        self.locked_mailboxes: set[tuple[str, str]] = set()
        self.quotas: dict[tuple[str, str], int] = {}
        self.sessions: set[tuple[str, str]] = set()  # session locks held
        self.maildrops: list[FakeMaildrop] = []  # every maildrop opened
        self.fail: dict[str, BaseException] = {}
        self.read_fail_after = 0
        self.enforce_quota = True
        self.calls: list[tuple[str, tuple]] = []
        self._uids = itertools.count(1)
        self._spool: Path | None = None
        self._links: Path | None = None

    # -- helpers for tests

    def add(self, address: str, *messages: bytes) -> None:
        """Create ``address``'s domain and mailbox if needed and append messages."""
        mailbox, _, domain = address.lower().rpartition("@")
        box = self.mail.setdefault(domain, {}).setdefault(mailbox, [])
        for data in messages:
            box.append((f"uid{next(self._uids):06d}", data))

    def messages(self, address: str) -> list[bytes]:
        mailbox, _, domain = address.lower().rpartition("@")
        return [m[1] for m in self.mail[domain][mailbox]]

    def _maybe_fail(self, name: str) -> None:
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        self._maybe_fail(name)

    def _box(self, domain: str, mailbox: str) -> list[tuple[str, bytes]]:
        domain, mailbox = domain.lower(), mailbox.lower()
        try:
            return self.mail[domain][mailbox]
        except KeyError:
            raise NoSuchMailbox(f"no mailbox {mailbox}@{domain}") from None

    # -- IAliasTable

    def distribution(self, address: str) -> Distribution | None:
        """See IAliasTable: ``distributions[address]`` (lower case), or None."""
        self._call("distribution", address)
        return self.distributions.get(address.lower())

    # -- IMailStore

    def check_writable(self) -> None:
        self._call("check_writable")

    def list_domains(self) -> list[str]:
        self._call("list_domains")
        return sorted(self.mail)

    def domain_exists(self, domain: str) -> bool:
        self._call("domain_exists", domain)
        return domain.lower() in self.mail

    def add_domain(self, domain: str) -> bool:
        self._call("add_domain", domain)
        if domain.lower() in self.mail:
            return False
        self.mail[domain.lower()] = {}
        return True

    def remove_domain(self, domain: str) -> None:
        self._call("remove_domain", domain)
        if self.mail.pop(domain.lower(), None) is None:
            raise NoSuchMailbox(f"no domain {domain}")

    def set_domain_locked(self, domain: str, locked: bool) -> None:
        self._call("set_domain_locked", domain, locked)
        (self.locked_domains.add if locked else self.locked_domains.discard)(domain.lower())

    def is_domain_locked(self, domain: str) -> bool:
        self._call("is_domain_locked", domain)
        return domain.lower() in self.locked_domains

    def list_mailboxes(self, domain: str) -> list[str]:
        self._call("list_mailboxes", domain)
        if domain.lower() not in self.mail:
            raise NoSuchMailbox(f"no domain {domain}")
        return sorted(self.mail[domain.lower()])

    cached = False  # ICachedMailboxCheck answers only when a test sets this

    def list_domains_cached(self) -> list[str] | None:
        """See ICachedDomainList: with ``cached`` set, the domains (no ``list_domains`` call)."""
        self._call("list_domains_cached")
        return sorted(self.mail) if self.cached else None

    def mailbox_fits_cached(self, domain: str, mailbox: str) -> bool:
        """See ICachedMailboxCheck: with ``cached`` set, an existing mailbox with no quota."""
        self._call("mailbox_fits_cached", domain, mailbox)
        key = (domain.lower(), mailbox.lower())
        return self.cached and key[1] in self.mail.get(key[0], {}) and key not in self.quotas

    def mailbox_exists(self, domain: str, mailbox: str) -> bool:
        self._call("mailbox_exists", domain, mailbox)
        return mailbox.lower() in self.mail.get(domain.lower(), {})

    def add_mailbox(self, domain: str, mailbox: str) -> bool:
        self._call("add_mailbox", domain, mailbox)
        if domain.lower() not in self.mail:
            raise NoSuchMailbox(f"no domain {domain}")
        boxes = self.mail[domain.lower()]
        if mailbox.lower() in boxes:
            return False
        boxes[mailbox.lower()] = []
        return True

    def remove_mailbox(self, domain: str, mailbox: str) -> None:
        self._call("remove_mailbox", domain, mailbox)
        self._box(domain, mailbox)
        del self.mail[domain.lower()][mailbox.lower()]

    def set_mailbox_locked(self, domain: str, mailbox: str, locked: bool) -> None:
        self._call("set_mailbox_locked", domain, mailbox, locked)
        key = (domain.lower(), mailbox.lower())
        (self.locked_mailboxes.add if locked else self.locked_mailboxes.discard)(key)

    def is_mailbox_locked(self, domain: str, mailbox: str) -> bool:
        self._call("is_mailbox_locked", domain, mailbox)
        self._box(domain, mailbox)
        return (domain.lower() in self.locked_domains
                or (domain.lower(), mailbox.lower()) in self.locked_mailboxes)

    def set_quota(self, domain: str, mailbox: str, limit: int | None) -> None:
        self._call("set_quota", domain, mailbox, limit)
        self._box(domain, mailbox)
        key = (domain.lower(), mailbox.lower())
        if limit is None:
            self.quotas.pop(key, None)
        else:
            self.quotas[key] = limit

    def get_quota(self, domain: str, mailbox: str) -> int | None:
        self._call("get_quota", domain, mailbox)
        return self.quotas.get((domain.lower(), mailbox.lower()))

    def usage(self, domain: str, mailbox: str) -> tuple[int, int]:
        self._call("usage", domain, mailbox)
        box = self._box(domain, mailbox)
        return len(box), sum(len(m[1]) for m in box)

    def spool_dir(self) -> Path:
        self._call("spool_dir")
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="fake-spool-"))
        return self._spool

    def deliver_file(self, source: Any, recipients: list[tuple[str, str]], *,
                     enforce_quota: bool = True, sync: bool = True) -> list[Any]:
        self._call("deliver_file", source, recipients)
        data = Path(source).read_bytes()
        saved, self.enforce_quota = self.enforce_quota, self.enforce_quota and enforce_quota
        try:
            return self._deliver(data, recipients)
        finally:
            self.enforce_quota = saved

    def would_exceed_quota(self, domain: str, mailbox: str, size: int) -> bool:
        """See IQuotaCheck (no grace here: the quota is exact; at or over it, nothing fits)."""
        self._call("would_exceed_quota", domain, mailbox, size)
        quota = self.quotas.get((domain.lower(), mailbox.lower()))
        used = sum(len(x[1]) for x in self._box(domain, mailbox))
        return quota is not None and (used >= quota or used + max(size, 0) > quota)

    def deliver_within_quota(self, source: Any, recipients: list[tuple[str, str]], *,
                             sync: bool = True,
                             prefix: bytes = b"") -> tuple[list[Any], list[tuple[str, str]]]:
        """See IMailStore.deliver_within_quota (no grace here: the quota is exact)."""
        self._call("deliver_within_quota", source, recipients)
        data = prefix + Path(source).read_bytes()
        for d, m in recipients:
            self._box(d, m)
        room, refused = [], []
        for d, m in recipients:
            quota = self.quotas.get((d.lower(), m.lower()))
            used = sum(len(x[1]) for x in self._box(d, m))
            if quota is not None and used + len(data) > quota:
                refused.append((d, m))
            else:
                room.append((d, m))
        saved, self.enforce_quota = self.enforce_quota, False
        try:
            return self._deliver(data, room), refused
        finally:
            self.enforce_quota = saved

    def deliver_bytes(self, domain: str, mailbox: str, data: bytes) -> Any:
        self._call("deliver_bytes", domain, mailbox)
        return self._deliver(data, [(domain, mailbox)])[0]

    def _deliver(self, data: bytes, recipients: list[tuple[str, str]]) -> list[Any]:
        boxes = [self._box(d, m) for d, m in recipients]
        if self.enforce_quota:
            for d, m in recipients:
                quota = self.quotas.get((d.lower(), m.lower()))
                if quota is not None and sum(len(x[1]) for x in self._box(d, m)) + len(data) > quota:
                    raise QuotaExceeded(f"{m}@{d} is over quota")
        paths = []
        for (d, m), box in zip(recipients, boxes, strict=True):
            uid = f"uid{next(self._uids):06d}"
            box.append((uid, data))
            if self._links is None:
                self._links = Path(tempfile.mkdtemp(prefix="fake-mailroot-"))
            folder = self._links / d.lower() / m.lower() / "new"
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(folder / uid)  # the folder is real (a caller may sync it), the file not
        return paths

    def open_maildrop(self, domain: str, mailbox: str) -> FakeMaildrop:
        self._call("open_maildrop", domain, mailbox)
        box = self._box(domain, mailbox)
        key = (domain.lower(), mailbox.lower())
        if key in self.sessions:
            raise MailboxInUse(f"{mailbox}@{domain} is in use")
        self.sessions.add(key)
        drop = FakeMaildrop(self, key[0], key[1], box)
        self.maildrops.append(drop)
        return drop


@implementer(IAccountChecker, ISelfCheck, ICredentialStamp)
class FakeChecker:
    """See IAccountChecker. ``accounts`` maps ``"user@domain"`` to its password. As the real
    checkers, it tells when an account's credentials changed (``credential_stamp``: the
    password itself, test data never logged; None once the account is removed)."""

    def __init__(self, accounts: dict[str, str] | None = None,
                 local_domains: tuple[str, ...] = ("pop.contoso.test",),
                 offers_secrets: bool = True,
                 aliases: dict[str, str] | None = None) -> None:
        self.accounts = {k.lower(): v for k, v in (accounts or {}).items()}
        self.local_domains = local_domains
        self.offers_secrets = offers_secrets
        self.aliases = {k.lower(): v.lower() for k, v in (aliases or {}).items()}
        self.sender_aliases: dict[str, str] = {}  # address in any domain -> avatar id
        self.fail: BaseException | None = None
        self.hold = False
        self.pending: list[tuple[defer.Deferred, Any]] = []
        self.attempts: list[tuple[str, str]] = []  # (login name, "ok" | "bad"); no secrets

    @property
    def credentialInterfaces(self) -> tuple:  # noqa: N802
        if self.offers_secrets:
            return (IUsernamePassword, IUsernameHashedPassword)
        return (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:  # noqa: N802
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append((d, credentials))
            return d
        return self._check(credentials)

    def release(self) -> None:
        """Answer every held log-in now, in order."""
        pending, self.pending = self.pending, []
        for d, credentials in pending:
            self._check(credentials).chainDeferred(d)

    def _check(self, credentials: Any) -> defer.Deferred:
        if self.fail is not None:
            return defer.fail(self.fail)
        name = credentials.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        mapped = login_to_address(name, self.local_domains)
        address = f"{mapped[0]}@{mapped[1]}" if mapped else None
        hashed = not IUsernamePassword.providedBy(credentials)
        ok = (address is not None and address in self.accounts
              and (self.offers_secrets or not hashed)
              and bool(self.accounts[address])
              and credentials.checkPassword(self.accounts[address]))
        self.attempts.append((name, "ok" if ok else "bad"))
        if not ok:
            return defer.fail(UnauthorizedLogin("authentication failed"))
        return defer.succeed(address)

    def check(self) -> None:
        """See ISelfCheck: the accounts are in memory, so there is nothing to test."""

    def credential_stamp(self, account: str) -> defer.Deferred:
        """See ICredentialStamp; ``fail`` fails it as a directory outage would."""
        if self.fail is not None:
            return defer.fail(self.fail)
        password = self.accounts.get(account.lower())
        return defer.succeed(password.encode() if password else None)

    def resolve_recipient(self, address: str) -> defer.Deferred:
        if self.fail is not None:
            return defer.fail(self.fail)
        key = address.lower()
        if key in self.aliases:
            return defer.succeed(self.aliases[key])
        return defer.succeed(key if key in self.accounts else None)

    def sender_owner(self, address: str) -> defer.Deferred:
        """The account of ``address`` as a sender: as ``resolve_recipient``, plus the
        ``sender_aliases`` (addresses in any domain, as a directory's proxyAddresses)."""
        if self.fail is not None:
            return defer.fail(self.fail)
        key = address.lower()
        if key in self.sender_aliases:
            return defer.succeed(self.sender_aliases[key])
        return self.resolve_recipient(address)


@implementer(IBlockingRecipientLookup, ICachedRecipientLookup, IScramKeyStore)
class FakePasswordFileChecker(FakeChecker):
    """A FakeChecker with the password file's blocking recipient look-up (as
    ``PasswordFileChecker``): the ESMTP delivery policy folds it into one thread hop. As a
    password file whose accounts have no SCRAM keys yet, it offers no SCRAM-SHA-256
    (``scram_keys`` holds ``identity.scram.ScramKeys`` by address when a test sets them)."""

    offers_scram = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scram: dict[str, Any] = {}

    def scram_keys(self, login: str) -> defer.Deferred:
        """See IScramKeyStore."""
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(self.scram.get(login.lower()))

    cached = False  # ICachedRecipientLookup answers only when a test sets this

    def resolve_recipient_cached(self, address: str, domains: list[str]) -> str | None:
        """See ICachedRecipientLookup: with ``cached`` set, an account of a listed domain."""
        key = address.lower()
        if not self.cached or self.fail is not None or key.rpartition("@")[2] not in domains:
            return None
        return key if key in self.accounts else None

    def resolve_recipient_blocking(self, address: str) -> str | None:
        """See IBlockingRecipientLookup: ``resolve_recipient``'s answer, in this thread."""
        if self.fail is not None:
            raise self.fail
        key = address.lower()
        if key in self.aliases:
            return self.aliases[key]
        return key if key in self.accounts else None


@implementer(IDirectoryLookup, IClosable, IGroupLookup)
class FakeDirectoryChecker(FakeChecker):
    """A FakeChecker with the directory's ``lookup`` and ``close`` (as ``DirectoryChecker``).
    ``directory`` maps a lower-case address to the attribute dict ``lookup`` gives."""

    def __init__(self, *args: Any, directory: dict[str, dict] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.directory = {k.lower(): v for k, v in (directory or {}).items()}
        self.groups: dict[str, Distribution] = {}
        self.closed = 0

    def group(self, address: str) -> defer.Deferred:
        """See IGroupLookup: ``groups[address]`` (lower case), or None."""
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(self.groups.get(address.lower()))

    def lookup(self, address: str) -> defer.Deferred:
        """See IDirectoryLookup."""
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(self.directory.get(address.lower()))

    def close(self) -> None:
        """See IClosable: counts the calls."""
        self.closed += 1
