"""The seams of pop3coexist: every concern meets the others through one of these interfaces.

- IMailStore: domains and mailboxes on disk (Maildir), delivery, locks, quota (store/maildir.py).
- IMaildrop: one POP3 session's snapshot of one mailbox (store/maildir.py).
- IAccountChecker: one ``auth.method`` (identity/): log-ins and recipient lookups.
- IOutboundQueue: the durable outbound queue (store/queue.py), filled by the ESMTP server and
  drained by the delivery runner (smtp/outbound.py).
- IMessageDelivery / IDeliveryTransaction: the SMTP avatar (policy/delivery.py) that makes
  every sender and recipient decision, and the one message it delivers (policy/stages.py);
  ICommitter: the group commit (smtp/incoming.py) the last stage hands the message to;
  ISpool: the spool file of one message, which the stages read and edit.
- ISieveScripts: a mailbox's Sieve scripts and out-of-office records (store/sievestore.py);
  IMailboxRules: the per-recipient rules stage's work (policy/rules.py).
- IContentFilter / IContentFilterFactory: one SMTP session's conversation with the content
  filters (milters; pop3coexist.milter) and the per-listener factory of those conversations;
  IQuarantine: the messages they held (store/quarantine.py).

Optional capabilities are declared, never probed: an object that has an optional method set
says so with ``@implementer``, callers ask ``I....providedBy(obj)``, and a test fake provides
exactly what its real class declares (``verifyObject`` checks both):

- IBlockingRecipientLookup (a checker): the recipient look-up in the caller's thread;
- IDirectoryLookup (a checker): a directory object's attributes (the gateway role needs it);
- ISelfCheck (a checker): a start-up / ``check-config`` test of its source;
- IClosable: connections or files to release at shutdown; IStartStop: a shared table made
  when the server starts (after any ``--uid`` switch) and closed at the end;
- IQuotaCheck (a store): would a message of this size be refused by the quota (RCPT time);
- IBatchDelivery (a store): ``deliver_within_quota`` / ``deliver_file`` with ``sync`` and
  ``enforce_quota`` (the caller syncs the folders of a whole batch at once);
- ICachedMessageOpen (a maildrop): open a message without waiting for the disk;
- ICachedMessageRead (a maildrop): read a small message whole without waiting for the disk;
- IConnectionLimiter, ISharedConnectionLimiter: concurrent connections (the shared one also
  tells whether this process is busier than the others); IAuthThrottle: failed log-in delays;
- IAliasTable (a store): the administrator's aliases and distribution lists of its domains;
  IGroupLookup (a checker): a directory group (``objectClass=group``) with its members
  flattened; ICopyCommitter (a committer): a second copy of a message with its own envelope
  sender and header fields (the copy of a distribution list).

Methods documented as *blocking* do disk I/O: protocol code calls them off the reactor thread
(``twisted.internet.threads.deferToThread`` or an injected equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from zope.interface import Attribute, Interface


class IMailStore(Interface):
    """Mail domains and their mailboxes under ``<state_dir>/mailroot`` (README "On disk").

    Domain and mailbox names are lower case on disk; every method lower-cases what it is given.
    Unknown domains or mailboxes raise ``errors.NoSuchMailbox``; bad names ``ValueError``.
    All methods are blocking. Changes made by another process (the admin command) are seen by
    the next call: nothing is cached past a cheap stat check.
    """

    root = Attribute("Path of the mailroot folder")

    def check_writable() -> None:
        """Raise ``errors.StoreError`` with a clear message if the mailroot cannot be written."""

    # -- domains
    def list_domains() -> list[str]:
        """Sorted names of the existing domains."""

    def domain_exists(domain: str) -> bool:
        """True when the domain's folder exists."""

    def add_domain(domain: str) -> bool:
        """Create the domain folder; False if it already existed."""

    def remove_domain(domain: str) -> None:
        """Delete the domain with all its mailboxes and mail."""

    def set_domain_locked(domain: str, locked: bool) -> None:
        """Lock or unlock every log-in in a domain (mail is still received)."""

    def is_domain_locked(domain: str) -> bool:
        """True when the domain is locked."""

    # -- mailboxes
    def list_mailboxes(domain: str) -> list[str]:
        """Sorted mailbox names (local parts) of one domain."""

    def mailbox_exists(domain: str, mailbox: str) -> bool:
        """True when ``mailroot/<domain>/<mailbox>`` is a Maildir."""

    def add_mailbox(domain: str, mailbox: str) -> bool:
        """Create the Maildir (tmp, new, cur); False if it already existed."""

    def remove_mailbox(domain: str, mailbox: str) -> None:
        """Delete a mailbox and its mail."""

    def set_mailbox_locked(domain: str, mailbox: str, locked: bool) -> None:
        """Lock or unlock one mailbox's log-in. Unlocking while the domain is locked is an
        ``errors.AdminError`` (as in the Windows POP3 service)."""

    def is_mailbox_locked(domain: str, mailbox: str) -> bool:
        """True when the mailbox itself, or its domain, is locked."""

    def set_quota(domain: str, mailbox: str, limit: int | None) -> None:
        """Set the mailbox quota in bytes; None removes it."""

    def get_quota(domain: str, mailbox: str) -> int | None:
        """The mailbox quota in bytes, or None."""

    def usage(domain: str, mailbox: str) -> tuple[int, int]:
        """(number of messages, bytes on disk) of one mailbox."""

    # -- delivery
    def spool_dir() -> object:
        """A Path on the same file system as the mailroot, where a writer builds a message
        (write, flush, fsync) before calling ``deliver_file``."""

    def deliver_file(source: object, recipients: list[tuple[str, str]]) -> list[object]:
        """Deliver the fsynced file ``source`` (a Path) to each ``(domain, mailbox)``.

        Single-instance: the file is hard-linked into each recipient's ``new/`` under a new
        unique Maildir name, then each ``new/`` folder is fsynced. When this returns, the
        message is durable in every mailbox. ``source`` itself is left for the caller to remove.
        Returns the paths written. Raises ``errors.QuotaExceeded`` before writing anything if a
        recipient is over quota and ``enforce_quota`` is true.
        """

    def deliver_within_quota(
        source: object, recipients: list[tuple[str, str]]
    ) -> tuple[list[object], list[tuple[str, str]]]:
        """Deliver the fsynced file ``source`` to each ``(domain, mailbox)`` with room for it
        under its quota and the configured grace; return ``(paths written, recipients refused
        for their quota)``. The quota check and the write of one mailbox are atomic against
        other deliveries (any process). Keyword-only options: ``prefix`` (bytes, LF lines) is put in front of the
        message in every mailbox (the ``Return-Path`` of a delivery from the queue): each then
        gets a copy instead of a hard link. ``sync=False``: the caller fsyncs the ``new/``
        folders of the returned paths. Raises ``errors.NoSuchMailbox`` before writing anything
        for an unknown recipient; ``errors.StoreError`` (nothing left written) on I/O errors.
        """

    def deliver_bytes(domain: str, mailbox: str, data: bytes) -> object:
        """Write one message (tmp, fsync, rename into new, fsync new). Returns its Path."""

    # -- POP3
    def open_maildrop(domain: str, mailbox: str) -> IMaildrop:
        """Take the mailbox's session lock and snapshot its messages.

        Raises ``errors.MailboxInUse`` if another session (in any process) holds the lock.
        The lock is held until ``commit`` or ``close``.
        """


class IMaildrop(Interface):
    """One POP3 session's snapshot of a mailbox (RFC 1939). Message indexes are 0-based.

    Messages delivered after the snapshot are not seen. Methods are blocking.
    """

    def __len__() -> int:
        """Number of messages in the snapshot."""

    def size(index: int) -> int:
        """Size in octets as POP3 sends it: the message's canonical form (``pop3coexist.canonical``:
        CRLF line ends, a final CRLF added when missing), before dot-stuffing."""

    def uidl(index: int) -> str:
        """Unique id: 1-70 characters in 0x21-0x7E, stable across sessions and restarts."""

    def open_message(index: int) -> object:
        """A binary file object of the message as stored (any line ends). The caller turns it
        into the canonical form (``pop3.stream.DotStuffer``), dot-stuffs, and closes it."""

    def commit(deleted: set[int]) -> None:
        """The UPDATE state: remove the messages with these indexes, then release the lock."""

    def close() -> None:
        """Release the lock without deleting anything (dropped connection). Idempotent."""


class IAccountChecker(ICredentialsChecker):
    """One ``auth.method``: password file, directory (LDAP) or local accounts (PAM).

    ``requestAvatarId`` returns a Deferred that fires with the account's canonical address
    ``"local@domain"`` (a lower-case str): its mailbox address when it has one in a local
    domain, else another of its own addresses (a directory account whose mailbox lives on
    another server, a relay or service account). SMTP AUTH needs only the account; POP3 also
    needs the mailbox (the realm refuses an account without one). It fails with:

    - ``twisted.cred.error.UnauthorizedLogin`` for a wrong password, an unknown user, an empty
      password or a disabled account (one failure for all, so nothing leaks);
    - ``errors.AuthUnavailable`` when the credential source cannot answer now.

    Credential interfaces: ``IUsernamePassword`` always; ``IUsernameHashedPassword`` (APOP and
    CRAM-MD5, whose ``checkPassword(secret)`` is called with the shared secret) only when
    ``offers_secrets`` is true. The user name in the credentials is the log-in name as the
    client sent it (bytes or str): the checker maps it with ``address.login_to_address``.
    """

    offers_secrets = Attribute("True when APOP and CRAM-MD5 can be verified")

    def resolve_recipient(address: str) -> object:
        """Deferred firing with the mailbox address ``"mailbox@domain"`` that receives mail for
        ``address`` (compared case-insensitively; for a directory also ``mail`` and every
        ``proxyAddresses`` entry), or None when no account has that address. Fails with
        ``errors.AuthUnavailable`` when the source cannot answer now."""

    def sender_owner(address: str) -> object:
        """Deferred firing with the avatar id (as ``requestAvatarId`` gives it) of the account
        that owns ``address`` as a sender, or None when no account does. Unlike
        ``resolve_recipient`` the address may be in any domain: for a directory, ``mail`` and
        every ``proxyAddresses`` entry of the account count. The sender-matches-login rule
        (``smtp.sender_must_match_login``) compares it with the logged-in account. Fails with
        ``errors.AuthUnavailable`` when the source cannot answer now."""


class IScramKeyStore(Interface):
    """An ``IAccountChecker`` that keeps SCRAM-SHA-256 keys (RFC 5802 section 3: salt,
    iteration count, StoredKey, ServerKey; never the password): the password file. SASL
    front-ends offer ``SCRAM-SHA-256`` only when the checker provides this and
    ``offers_scram`` is true, and then also hand ``IScramCredentials`` to ``requestAvatarId``.
    """

    offers_scram = Attribute("True when every account has its SCRAM keys (so no client that "
                             "picks SCRAM-SHA-256 is refused for lack of them)")

    def scram_keys(login: str) -> object:
        """Deferred firing with the ``identity.scram.ScramKeys`` of the account that log-in
        name ``login`` maps to, or None (unknown name, no keys yet). Fails with
        ``errors.AuthUnavailable`` when the store cannot be read."""


class ICredentialStamp(Interface):
    """Optional for an ``IAccountChecker``: tells a front-end that keeps a log-in alive for
    long (a web session) whether the account's credentials changed since. Web mail and the
    admin console ask it at most every ``web.session_recheck`` seconds and end the session
    when the answer differs from the one taken at log-in (OWASP ASVS 3.3.3: a password change
    ends the other sessions of the account)."""

    def credential_stamp(account: str) -> object:
        """Deferred firing with ``bytes`` (opaque, a digest: never a password or a hash of one
        that could be attacked) that change whenever ``account``'s password changes or it is
        disabled or locked, and stay the same otherwise; or None when ``account`` (the avatar
        id a log-in gave) no longer exists or can no longer log in. Fails with
        ``errors.AuthUnavailable`` when the accounts cannot be read now (the caller keeps
        the session and asks again later)."""


class IScramCredentials(Interface):
    """A finished SCRAM exchange whose proof the front-end checked (``identity.scram``)."""

    username = Attribute("the log-in name the client sent (str)")

    def matches(keys: object) -> bool:
        """True when ``keys`` (``ScramKeys`` or None) are the keys the client proved."""


class IOutboundQueue(Interface):
    """The durable outbound queue under ``<state_dir>/queue`` (README "On disk")."""

    def enqueue(source: object, envelope: dict) -> str:
        """Blocking. Take a fsynced message file (a Path on the same file system, which is
        hard-linked, not moved) and a JSON-able envelope::

            {"sender": "a@b" or "", "recipients": [{"address": "...", "orcpt": str|None,
             "notify": ["FAILURE", ...]|None}], "ret": "FULL"|"HDRS"|None, "envid": str|None,
             "received_from": "client description", "arrival": unix time, "hops": int,
             "inside": bool (optional, not stored)}

        ``inside``: the message comes from a logged-in client or ``relay.networks``
        (policy/stages.py ``from_inside``): a DKIM-signing wrapper (policy/dkimsign.py) signs
        only such mail. When this returns, the message and its envelope are durable. Returns
        the queue id: the envelope's optional ``"id"`` (the id the SMTP client was told) when
        it is free, else a new one.
        """

    def wake() -> None:
        """Ask the delivery runner to look at the queue now (new mail or ``queue flush``)."""


# --------------------------------------------------------------------------- optional capabilities


class ICachedMessageOpen(Interface):
    """Optional for an IMaildrop: open a message without a thread hop when the disk allows."""

    def open_message_cached(index: int) -> object | None:
        """The one method that never blocks: ``open_message``'s file if it can be opened
        without waiting for the disk, else None (then call ``open_message`` off the reactor).
        Callers use it when provided, so the reactor saves a thread hop per RETR."""


class ICachedMessageRead(Interface):
    """Optional for an IMaildrop: a small message's stored bytes at once when the kernel has
    its path and all its pages cached (RETR's short cut without a file object, issue 17)."""

    def read_message_cached(index: int, limit: int) -> bytes | None:
        """Never blocks: the whole stored file of message ``index`` (0-based; the bytes as
        stored, no line-end conversion) if it holds at most ``limit`` octets, is still the
        size the snapshot saw, and can be opened and read without waiting for the disk; else
        None (then use ``open_message_cached`` or ``open_message``). OSError propagates."""


class IBlockingRecipientLookup(Interface):
    """Optional for an IAccountChecker whose recipient look-up is cheap and local (the
    password file): the ESMTP delivery policy folds it into the thread hop of the mailbox
    check."""

    def resolve_recipient_blocking(address: str) -> str | None:
        """Blocking form of ``IAccountChecker.resolve_recipient``: ``"mailbox@domain"`` or
        None; raises ``errors.AuthUnavailable`` when the source cannot answer now."""


class ICachedRecipientLookup(Interface):
    """Optional for an IAccountChecker with IBlockingRecipientLookup: the common answer of a
    RCPT look-up given on the reactor thread from what is cached, checked fresh against the
    kernel's cache, with no thread hop (issue 17); every other answer is the blocking one's."""

    def resolve_recipient_cached(address: str, domains: list[str]) -> str | None:
        """Never blocks on the disk: ``"mailbox@domain"`` when the cached data alone shows
        that ``address`` has a mailbox and its domain is one of ``domains`` (lower case);
        None when only ``resolve_recipient_blocking`` can say (no such recipient included)."""


class ICachedMailboxCheck(Interface):
    """Optional for an IMailStore with IQuotaCheck: RCPT's mailbox check on the reactor thread
    from the kernel's cache, with no thread hop (issue 17)."""

    def mailbox_fits_cached(domain: str, mailbox: str) -> bool:
        """Never blocks on the disk: True when the cache alone shows that the mailbox exists
        and has no quota (any message fits); False when only ``mailbox_exists`` and
        ``would_exceed_quota``, off the reactor, can say."""


class ICachedDomainList(Interface):
    """Optional for an IMailStore: its domain list from the kernel's cache, with no thread hop
    (issue 17: every RCPT to a foreign domain asks whether that domain was just added)."""

    def list_domains_cached() -> list[str] | None:
        """Never blocks on the disk: ``list_domains()`` when the kernel's cache shows that the
        store's domains are unchanged since the last ``list_domains``; None when only
        ``list_domains``, off the reactor, can say."""


class IDirectoryLookup(Interface):
    """Optional for an IAccountChecker backed by a directory (LDAP / Active Directory): the
    gateway role (policy/gateway.py) resolves recipients with it."""

    def lookup(address: str) -> object:
        """Deferred firing with the attribute dict of the one directory object that has
        ``address`` (``dn``, ``mail``, ``proxy_addresses``, ``primary_address``,
        ``target_address``, ``mailbox``, ...) or None; fails with ``errors.AuthUnavailable``."""


class ISelfCheck(Interface):
    """Optional for a checker: a test of its source at start-up and ``check-config``."""

    def check() -> None:
        """Blocking. Raise ``errors.StoreError``, OSError or ValueError with a clear message
        when the source (password file, directory, PAM) cannot be used."""


class IClosable(Interface):
    """Optional: holds connections or files that are released when the server stops."""

    def close() -> None:
        """Release them (idempotent); a later use may open them again."""


class IStartStop(IClosable):
    """A table shared with the worker processes: made when the server starts (after twistd's
    ``--uid`` switch), closed when it stops."""

    def start() -> None:
        """Create (main process) or open the table; OSError or ValueError when it cannot."""


class IQuotaCheck(Interface):
    """Optional for an IMailStore: the quota question of RCPT time."""

    def would_exceed_quota(domain: str, mailbox: str, size: int) -> bool:
        """Blocking. True when a message of ``size`` octets would be refused by the mailbox's
        quota (at or over it, or past quota + grace with it)."""


class IBatchEnqueue(Interface):
    """Optional for an IOutboundQueue: enqueues whose syncs a caller batches (the SMTP group
    commit makes a batch of queued messages durable with one ``syncfs``)."""

    def enqueue_unsynced(source: object, envelope: dict) -> str:
        """``IOutboundQueue.enqueue`` without any fsync, and not yet handed to the runner:
        the caller syncs the file system the queue is on (data and folder entries), then
        calls ``publish``, or ``discard`` when that sync failed. The source's data must be
        durable already (the body is linked, never copied)."""

    def publish(ids: list[str]) -> None:
        """The enqueues ``ids`` are durable: hand them to the delivery runner (``wake``)."""

    def discard(qid: str) -> None:
        """Remove an unsynced, unpublished enqueue (its envelope, then its body)."""

    def sync_target() -> object:
        """A path on the queue's file system (for the caller's ``syncfs``)."""


class IFileRecycler(Interface):
    """Optional for an IOutboundQueue: spent message files reused for new spool files
    (issue 17: on ext4 without a journal, a new inode after many deletions is costly;
    store/recycle.py)."""

    def take_file(dest: str) -> int | None:
        """Rename a spent file (one link, nobody else's) to the path ``dest`` (a new spool
        file's name, on the same file system; it must not exist) and return a descriptor open
        for reading and writing at offset 0, its old bytes still there: the caller overwrites
        them, cuts the file to its length and syncs it as a new file; None when there is none
        (the caller creates the file as before)."""

    def prepare_envelope(source: str, envelope: dict) -> int | None:
        """Before ``IBatchEnqueue.enqueue_unsynced(source, envelope)`` (``envelope`` naming
        its ``id``): write its envelope now into a spent file under a temp name and return the
        descriptor, for the caller to sync with the spool files' data (then close it) BEFORE
        the enqueue names it; None when there is no spent file (the enqueue writes a new one).
        A reused file's name never reaches the disk before its new data."""

    def drop_prepared(qids: list[str]) -> None:
        """Forget the prepared envelopes of ``qids`` that were not enqueued."""

    def trim_pool() -> int:
        """Unlink the spent files kept longer than a minute (they hold delivered messages);
        return how many. Blocking: the delivery runner's periodic work."""


class IBatchDelivery(Interface):
    """Optional for an IMailStore: delivery whose folder syncs a caller batches (the SMTP group
    commit makes a whole batch durable with one sync)."""

    def deliver_within_quota(
        source: object, recipients: list[tuple[str, str]], *, sync: bool = True,
        prefix: bytes = b"",
    ) -> tuple[list[object], list[tuple[str, str]]]:
        """``IMailStore.deliver_within_quota``; ``sync=False``: the caller fsyncs the ``new/``
        folders of the returned paths (then str or os.PathLike: the caller takes either)."""

    def deliver_file(
        source: object, recipients: list[tuple[str, str]], *, enforce_quota: bool = True,
        sync: bool = True,
    ) -> list[object]:
        """``IMailStore.deliver_file``; ``enforce_quota=False`` skips the quota check,
        ``sync=False`` the fsync of the ``new/`` folders."""


class IConnectionLimiter(Interface):
    """Concurrent connections, in total and per client address (policy/connlimit.py)."""

    def acquire(client: str) -> bool:
        """Count a new connection from ``client``; False (nothing counted) if over a limit."""

    def release(client: str) -> None:
        """Forget one connection from ``client`` (once per successful acquire)."""


class ISharedConnectionLimiter(IConnectionLimiter):
    """A connection limiter whose counts all worker processes share (policy/sharedlimit.py)."""

    def busier_than_others() -> bool:
        """True when this process holds more connections than another (let it accept)."""


class IAuthThrottle(Interface):
    """Failed log-in delays per source address (policy/throttle.py, policy/sharedthrottle.py)."""

    def failure_delay(source: str) -> float:
        """Record a failure from ``source``; the seconds to wait before the refusal."""

    def success(source: str) -> None:
        """A successful log-in from ``source`` clears its failures and marks it trusted."""

    def admit_delay(source: str) -> float:
        """Before a password check for ``source``: 0.0 when it may run now (a source with
        failures then has its next slot taken, so parallel connections wait their turn), else
        the seconds to wait before asking again (its current failure delay has not passed)."""

    def trusted(source: str) -> bool:
        """True when ``source``'s last log-in succeeded (within the forget time) and none
        failed since: its checks skip the queue of ``policy.throttle.LoginGate``."""


# --------------------------------------------------------------------------- SMTP delivery


@dataclass(frozen=True)
class SMTPSession:
    """What the delivery policy knows of one SMTP session: the client's address, its EHLO
    name, and the listener's own address (for address literals of this host); whether TLS
    is on, the client's port, the SASL mechanism and TLS version (the milters' macros)."""

    client_ip: str
    helo: str | None = None
    listener_ip: str | None = None
    tls: bool = False  # the session runs over TLS (STARTTLS or SMTPS)
    client_port: int = 0  # the client's TCP port (0: unknown, a UNIX socket)
    # milter macros ({auth_type}, {tls_version}): the SASL mechanism of the log-in, the TLS
    # protocol version ("TLSv1.3"); None when there is none
    auth_type: str | None = None
    tls_version: str | None = None


@dataclass
class LocalNotes:
    """What the end of DATA tells the committer about the transaction, for the delivery
    reports of local recipients: "delivered" where NOTIFY asks for SUCCESS (RFC 3461 section
    5.2.2), "failed" (5.2.2) for a mailbox whose quota refused the message while others got it
    (RFC 3464). ``recipients`` maps ``(domain, mailbox)`` to ``{"address", "orcpt", "notify"}``
    as the client gave them; ``sender`` is ``""`` for the null sender (no reports then)."""

    sender: str
    recipients: dict[tuple[str, str], dict]
    reporting_mta: str
    ret: str | None = None
    envid: str | None = None
    arrival: float = 0.0
    received_from: str = ""


# --------------------------------------------------------------------------- aliases and lists

SENDERS_CHOICES = ("anyone", "members", "authenticated")


@dataclass(frozen=True)
class Distribution:
    """An address that stands for other addresses (README "Aliases and lists").

    ``kind``: ``"alias"`` (an administrator's alias: its mail goes on unchanged to
    ``targets``), ``"list"`` (a distribution list: each member gets the list copy),
    ``"group"`` (a directory group: ``targets`` are its members' addresses, nested groups
    already flattened), ``"owner"`` (``owner-LIST@DOMAIN``: ``targets`` is the list's owner).
    ``address`` is lower case; ``senders`` (lists) one of SENDERS_CHOICES; ``owner`` the
    configured owner address of a list or group, or None (then the postmaster's)."""

    kind: str
    address: str
    targets: tuple[str, ...] = ()
    senders: str = "anyone"
    owner: str | None = None

    @property
    def is_list(self) -> bool:
        """True for a list or a group: its members get a list copy (List-Id, owner sender)."""
        return self.kind in ("list", "group")


class IAliasTable(Interface):
    """Optional for an IMailStore: the aliases and distribution lists that ``pop3coexist-admin
    alias`` and ``list`` keep beside the mailboxes of a domain (store/aliases.py)."""

    def distribution(address: str) -> Distribution | None:
        """Blocking. The alias or list ``address`` (any case) names, or None. Changes made by
        another process are seen by the next call. Raises ``errors.StoreError`` when the table
        cannot be read."""


class IGroupLookup(Interface):
    """Optional for an IAccountChecker backed by a directory: AD-style groups
    (``objectClass=group`` with ``mail`` / ``proxyAddresses`` and ``member``)."""

    def group(address: str) -> object:
        """Deferred firing with the ``Distribution`` (kind ``"group"``) of the one group that
        has ``address`` as ``mail`` or a proxy address: its members' addresses, nested groups
        expanded once each (loop-safe), and its owner (``managedBy``) address or None; or None
        when no group has it. Fails with ``errors.AuthUnavailable``."""


class ICopyCommitter(Interface):
    """Optional for an ICommitter: another copy of a message, with its own envelope sender and
    header fields in front (the copy a distribution list's members get)."""

    def copy(spool: object, sender: str, header: bytes) -> object:
        """Deferred firing with a new spool file (like ``spool``) holding ``Return-Path:
        <sender>`` as its local-only prefix, then ``header`` (LF line ends), then the message
        of ``spool`` (without its own local prefix). ``spool`` itself is not changed."""

    def commit_copy(spool: object, local_recipients: list[tuple[str, str]],
                    envelope: dict | None, notes: LocalNotes | None = None) -> object:
        """``ICommitter.commit`` for a copy: a full mailbox never refuses the whole copy; each
        one gets its "failed" report to ``notes.sender`` (the list's owner) instead."""


class IMessageDelivery(Interface):
    """The SMTP avatar (as Twisted's ``IMessageDelivery``, maddy's delivery target): every
    sender and recipient decision of a session. The realm (policy/delivery.py) gives an
    anonymous one or, after AUTH, one for the account: relay permission is which avatar.
    Refusals are ``errors.MailError`` (the protocol replies with its code); a directory that
    cannot answer is ``errors.AuthUnavailable`` (451 4.4.3)."""

    user = Attribute("The avatar id of the logged-in account (lower case), or None")

    def connect(session: SMTPSession) -> object:
        """Deferred firing with None when the session may go on after the client connected
        (before the greeting), or failing with MailError: a 4xx or 5xx greeting instead
        (a content filter that refuses the client)."""

    def hello(session: SMTPSession) -> object:
        """Deferred firing with None when the HELO/EHLO name in ``session`` is accepted, or
        failing with MailError (the reply to HELO/EHLO)."""

    def reset() -> None:
        """The transaction in progress, if any, is abandoned (RSET, HELO, STARTTLS, a
        refused message): the content filters forget it."""

    def close() -> None:
        """The session is over (QUIT or a lost connection): release what it holds."""

    def validate_from(session: SMTPSession, sender: object, options: object = None) -> object:
        """Deferred firing with None when ``sender`` (an ``address.Address``, or None for
        ``<>``) may start a transaction; fails with MailError (553 5.7.1: not yours; a
        milter's refusal). ``options``: the MAIL parameters (``policy.delivery.MailOptions``)."""

    def validate_to(session: SMTPSession, address: str, size: int, sender: object = None) -> object:
        """Deferred firing with a ``policy.delivery.RecipientDecision`` for the inside of a
        ``RCPT TO:<...>`` path (``size``: MAIL SIZE= or 0; ``sender``: the transaction's
        reverse-path, an Address or None, for a list's ``senders`` rule), or failing with
        MailError / AuthUnavailable."""

    def begin(session: SMTPSession, sender: object, options: object) -> IDeliveryTransaction:
        """A new transaction for ``sender`` (Address or None) with the MAIL parameters
        ``options`` (``policy.delivery.MailOptions``)."""


class IDeliveryTransaction(Interface):
    """One message on its way: recipients, then the body, then commit or abort."""

    recipients = Attribute("The accepted recipients as the client gave them (str), in order")
    sender = Attribute("The reverse-path: an ``address.Address``, or None for ``<>``")
    options = Attribute("The MAIL parameters kept (``policy.delivery.MailOptions``: size, ...)")
    local_delivery = Attribute("True when a recipient's mailbox is here: the spool file then "
                               "starts with the local-only Return-Path (RFC 5321 section 4.4)")

    def add_recipient(decision: object, notify: list[str] | None, orcpt: str | None) -> None:
        """Add an accepted recipient (a RecipientDecision) with its DSN parameters."""

    def body(spool: object, size: int, hops: int, arrival: float, received_from: str) -> None:
        """The message: a spool file (``smtp.incoming.SpoolWriter``), its size in octets, its
        hop count (Received fields + 1), its arrival time and where it came from."""

    def commit() -> object:
        """Deferred firing with the per-recipient results once the message is durable
        everywhere it goes, or failing with MailError (nothing stored)."""

    def abort() -> None:
        """Give the message up: nothing is stored (idempotent)."""


class ISpool(Interface):
    """The spool file of one message between DATA and the commit (``smtp.incoming.SpoolWriter``):
    what the stages read and edit. Content is the message with LF line ends (Maildir's form),
    without the local-only ``Return-Path`` prefix."""

    queue_id = Attribute("The queue id told to the client (str)")
    size = Attribute("Octets stored, the local-only prefix included (int)")

    def read() -> bytes:
        """The message's bytes (blocking when the file is on disk; raises OSError)."""

    def replace(data: bytes) -> None:
        """Make ``data`` the message, keeping the local-only prefix (blocking; OSError)."""

    def abort() -> None:
        """Remove the spool file: nothing of the message remains (idempotent)."""


class ICommitter(Interface):
    """Makes one message durable in its mailboxes and the queue (smtp/incoming.py)."""

    def commit(spool: object, local_recipients: list[tuple[str, str]], envelope: dict | None,
               notes: LocalNotes | None = None) -> object:
        """Deferred firing once durable with the local mailboxes whose quota refused the
        message (their delivery reports are queued), or failing (``errors.QuotaExceeded``
        when every local mailbox is full and nothing else was stored)."""


# --------------------------------------------------------------------------- sender authentication


@dataclass(frozen=True)
class MethodResult:
    """One RFC 8601 ``resinfo``: a method (``spf``, ``dkim``, ``dmarc``), its result keyword
    (``pass``, ``fail``, ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``,
    ``policy``), the properties ``(ptype.property, value)`` in order, and an optional comment
    (plain text; the writer escapes it)."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()
    comment: str = ""


@dataclass(frozen=True)
class SenderAuthentication:
    """What the checks found for one message from outside.

    ``spf``: the SPF result of the MAIL FROM identity (the HELO identity for ``<>``);
    ``dkim``: one result per DKIM-Signature field (``dkim=none`` alone when there is none);
    ``dmarc``: the DMARC result of the From: domain; ``dmarc_domain``: that domain (or "");
    ``dmarc_policy``: the policy the domain asks for this message (``none``, ``quarantine``,
    ``reject``; after ``sp=`` for a subdomain and ``pct=`` sampling), or "" without one."""

    spf: MethodResult
    dkim: tuple[MethodResult, ...]
    dmarc: MethodResult
    dmarc_domain: str = ""
    dmarc_policy: str = ""


class ISenderVerifier(Interface):
    """SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489) of one message: the DNS look-ups
    happen here, below the policy that uses the answer (mailauth/verify.py)."""

    def verify(message: bytes, client_ip: str, helo: str | None, mail_from: str) -> object:
        """Deferred firing with a ``SenderAuthentication`` for ``message`` (LF or CRLF line
        ends) sent by ``client_ip`` with EHLO ``helo`` and MAIL FROM ``mail_from`` ("" for
        ``<>``). DNS failures are results (``temperror``), never errors."""
# --------------------------------------------------------------------------- Sieve rules


class ISieveScripts(Interface):
    """A mailbox's Sieve scripts (RFC 5228) and out-of-office records (store/sievestore.py),
    shared by the rules stage (policy/rules.py), ManageSieve (managesieve/) and the admin
    tool. Every method is blocking; an unknown mailbox raises ``errors.NoSuchMailbox``; the
    script errors are ``store.sievestore.ScriptError`` (NoSuchScript, ScriptExists,
    ScriptActive, BadScriptName), each with its ManageSieve response code."""

    def list_scripts(domain: str, mailbox: str) -> list:
        """``[(name, active, size in octets)]`` sorted by name."""

    def get_script(domain: str, mailbox: str, name: str) -> str:
        """The script's text; NoSuchScript."""

    def active_script(domain: str, mailbox: str) -> object:
        """``(name, text, version)`` of the active script, or None (no rules: keep). The
        version changes whenever the script does (a cache key)."""

    def put_script(domain: str, mailbox: str, name: str, text: str) -> None:
        """Create or replace a script (durable when this returns). Validation is the caller's."""

    def set_active(domain: str, mailbox: str, name: str) -> None:
        """Make ``name`` the active script; ``""`` deactivates; NoSuchScript."""

    def changes() -> int:
        """A number that changes (from any process sharing the mail root) whenever a
        mailbox's active script is set or unset, read without blocking for long (one
        ``stat``): a cache of mailboxes known to have no script is good while it stays the
        same (the rules stage's, policy/rules.py). Raises OSError."""

    def delete_script(domain: str, mailbox: str, name: str) -> None:
        """Remove a script; ScriptActive for the active one, NoSuchScript."""

    def rename_script(domain: str, mailbox: str, old: str, new: str) -> None:
        """Rename (the active one stays active); NoSuchScript, ScriptExists."""

    def vacation_due(domain: str, mailbox: str, key: str, period: float) -> bool:
        """Check and record at once: True (and the time is recorded, durably) when no reply for
        ``key`` (the vacation handle and the sender) went out in the last ``period`` seconds;
        False otherwise. Two deliveries at once get one True."""


class IMailboxRules(Interface):
    """The per-recipient rules stage's work (policy/rules.py: each mailbox's Sieve script)."""

    def apply(message: object) -> object:
        """Awaitable firing with the stage's ``policy.stages.Verdict`` for ``message`` (a
        ``policy.stages.Message``): it may refuse recipients (``Message.decide``), take
        discarded ones out of ``message.recipients``, and queue copies; ACCEPT when nothing is
        left to store (the spool file is then removed)."""


class IIdleRules(Interface):
    """Optional, for an IMailboxRules: says without I/O when ``apply`` would CONTINUE at
    once, touching nothing (policy/stages.py ``RecipientRules.idle``: the commit then needs no
    coroutine, issue 17)."""

    def idle(message: object) -> bool:
        """True when ``apply(message)`` would CONTINUE at once, changing nothing (no local
        recipient, or only mailboxes known to have no rules)."""
# --------------------------------------------------------------------------- content filters


class IContentFilter(Interface):
    """The conversation of one SMTP session with the content filters (milters), at every step
    they negotiated (``pop3coexist.milter.conversation.MilterConversation``). The delivery
    avatar (policy/delivery.py) asks it at connect, HELO, MAIL and RCPT, so a refusal answers
    that command; the content-check stage (policy/stages.py) runs the message steps (DATA,
    headers, end of headers, body, end of message). Refusals are ``errors.MailError``. A
    conversation outlives the avatar: the avatar after AUTH or STARTTLS keeps it."""

    def connect(session: SMTPSession) -> object:
        """Deferred: None, or fails with MailError (the greeting refused)."""

    def helo(session: SMTPSession) -> object:
        """Deferred: None, or fails with MailError (the HELO/EHLO reply)."""

    def mail(session: SMTPSession, sender: str, user: str | None, args: list[str]) -> object:
        """Deferred: None, or fails with MailError (the MAIL reply). ``sender``: the address
        ("" for <>); ``user``: the logged-in account or None; ``args``: ESMTP parameters
        ("SIZE=123")."""

    def rcpt(session: SMTPSession, recipient: str, local: bool) -> object:
        """Deferred: None, or fails with MailError (the RCPT reply). ``local``: the recipient's
        mailbox is here (the ``{rcpt_mailer}`` macro)."""

    def check(message: object) -> object:
        """Deferred firing with a ``policy.content.FilterResult`` for a ``policy.stages.Message``
        after its DATA: the message steps run, the header and body changes the filters asked
        for are made in the message (its edit API); the verdict and the recipient changes are
        the caller's to apply."""

    def abort() -> None:
        """The transaction in progress is abandoned (SMFIC_ABORT)."""

    def close() -> None:
        """The session is over: close every filter connection (idempotent)."""


class IContentFilterFactory(Interface):
    """Makes the conversation of each new SMTP session of one listener."""

    def open() -> IContentFilter:
        """A new conversation (no connection is made before its ``connect``)."""


class IQuarantine(Interface):
    """Messages a content filter quarantined, kept under ``<state_dir>/quarantine/``
    (store/quarantine.py): held, not delivered, until an administrator releases or deletes
    them. All methods are blocking."""

    def put(data: bytes, envelope: dict, info: dict) -> str:
        """Keep one message (LF line ends, no Return-Path) with its queue envelope (the shape
        of ``IOutboundQueue.enqueue``; local recipients as ``mailbox@domain``) and ``info``
        (JSON-able: milter, reason, queue id, client); durable on return. Returns its id."""

    def list() -> list[dict]:
        """Every held message's record (``id``, ``time``, ``size``, ``envelope``, ``info``),
        oldest first."""

    def release(entry_id: str, queue: IOutboundQueue) -> str:
        """Hand the message to ``queue`` for delivery to its recipients and forget it; returns
        the queue id. ``KeyError`` for an unknown id."""

    def delete(entry_id: str) -> None:
        """Forget the message. ``KeyError`` for an unknown id."""


# --- IMAP folders (issue 18) -------------------------------------------------------------


class IFolderStore(Interface):
    """The IMAP folders of every mailbox (store/folders.py ``MaildirFolders``). Blocking."""

    def open_account(domain: str, mailbox: str) -> IAccountFolders:
        """One account's folders; raises NoSuchMailbox."""


class IAccountFolders(Interface):
    """One account's folders: INBOX is POP3's maildrop, the others Maildir++ subfolders.
    Blocking; errors the client should see are ``FolderError`` (a StoreError with ``code``)."""

    def list_folders() -> list[str]:
        """Every folder name, INBOX first."""

    def exists(name: str) -> bool:
        """True when the folder exists."""

    def special_use(name: str) -> str | None:
        """The RFC 6154 attribute (``\\Sent``...) of a folder, or None."""

    def ensure_special_folders() -> None:
        """Create Sent, Drafts, Trash, Junk once (first log-in)."""

    def create(name: str) -> None:
        """Create a folder (and its parents)."""

    def delete(name: str) -> None:
        """Delete a folder and its messages."""

    def rename(old: str, new: str) -> None:
        """Rename a folder (RFC 3501 section 6.3.5; INBOX: moves its messages)."""

    def subscriptions() -> list[str]:
        """Subscribed folder names."""

    def subscribe(name: str, on: bool) -> None:
        """Add or remove a subscription."""

    def open_folder(name: str) -> IFolderView:
        """A view of one folder's messages."""

    def quota() -> tuple[int, int | None]:
        """(bytes used over all folders, limit or None)."""

    def append(name: str, data: bytes, flags: object, internaldate: float | None
               ) -> tuple[int, int]:
        """Store a message; returns (uidvalidity, uid)."""

    def copy_within_quota(view: IFolderView, messages: list, dest: IFolderView
                          ) -> list[tuple[int, int]]:
        """COPY / MOVE: ``view.copy_to(messages, dest)`` when the quota takes their octets
        (the rule APPEND and SMTP delivery apply, checked and written under the mailbox's
        quota lock), else FolderError OVERQUOTA."""


class IFolderView(Interface):
    """One folder's messages by UID, read fresh from disk by ``sync``. Blocking."""

    uidvalidity = Attribute("the folder's UIDVALIDITY (int)")
    uidnext = Attribute("the next UID the folder will give (int)")

    def sync() -> list:
        """The messages now (records with uid, flags, size, internaldate), ascending UID.
        The list and its records may be shared with other views of the folder: read only."""

    def sync_if_changed() -> list | None:
        """``sync()``, or None when the folder has not changed since this view's last sync."""

    def open(msg: object) -> object:
        """The message's file, opened for binary reading."""

    def size(msg: object) -> int:
        """The message's RFC822.SIZE (canonical CRLF form)."""

    def set_flags(msg: object, flags: object) -> frozenset:
        """Give the message exactly these flags; returns the flags now stored (the record's
        own ``flags`` stay those of its ``sync``)."""

    def claim_recent(messages: list) -> list[int]:
        """Move messages still in new/ to cur/; returns the UIDs moved by this call (this
        session's \\Recent)."""

    def expunge(messages: list) -> list[int]:
        """Remove the messages; returns their UIDs."""

    def add(data: bytes, flags: object, internaldate: float | None) -> tuple[int, int]:
        """Store a new message; returns (uidvalidity, uid)."""

    def copy_to(messages: list, dest: IFolderView) -> list[tuple[int, int]]:
        """Copy messages into another folder; returns (source uid, new uid) pairs."""


# --- the web front-ends (issue 19) ------------------------------------------------------


class IWebSessions(Interface):
    """Server-side sessions of one web front-end (web/sessions.py ``SessionStore``)."""

    def new(user: str | None = None) -> object:
        """A new session (fresh random id and CSRF token)."""

    def get(session_id: str | None) -> object | None:
        """The live session of an id, or None (unknown or timed out)."""

    def revive(session_id: str | None) -> object | None:
        """An anonymous session again under an id the store no longer has (its log-in form
        token still valid), or None for a malformed or live id."""

    def login(old: object | None, user: str) -> object:
        """The session after a log-in: always a new id; ``old`` is destroyed."""

    def logout(session: object | None) -> None:
        """Destroy a session."""

    def set_cookie(session: object | None, secure: bool) -> bytes:
        """A Set-Cookie header value for the session (None: clear the cookie)."""


class IMessageSubmission(Interface):
    """Hands a message to the SMTP submission path in-process, as if ``user`` had logged in
    with SMTP AUTH on the submission port (smtp/submit.py ``Submitter``): the sender-ownership
    rule, relay rules, the stages of policy/stages.py (expansion, content check, rules,
    commit) and DKIM signing at enqueue apply exactly as for SMTP."""

    def submit(user: str, sender: str, recipients: list, data: bytes,
               client_ip: str) -> object:
        """Deferred firing with a ``SubmissionResult`` (queue id, refused recipients with
        their replies) once the message is durable; fails with ``errors.MailError`` when the
        whole message is refused (no recipient accepted, sender not the user's, too big)."""

class ICachedFolderView(Interface):
    """Optional for an IFolderView: answers that never wait for the disk, so an IMAP session
    saves a thread hop per command when the folder is unchanged and per FETCH of a small
    message (the store's path look-ups go through ``fsutil.open_cached``)."""

    def unchanged_cached() -> bool | None:
        """True when the folder is as this view's last ``sync`` saw it (``sync_if_changed``
        would return None), False when it changed; None when that cannot be told without
        the disk or without a full ``sync`` (then call ``sync_if_changed`` off the reactor).
        Never blocks on the disk."""

    def open_cached(msg: object) -> object | None:
        """The message file (binary, to be closed by the caller) when it can be opened
        without waiting for the disk, else None (then use ``open`` off the reactor)."""
