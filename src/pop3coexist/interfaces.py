"""The seams of pop3coexist: every concern meets the others through one of these interfaces.

- IMailStore: domains and mailboxes on disk (Maildir), delivery, locks, quota (store/maildir.py).
- IMaildrop: one POP3 session's snapshot of one mailbox (store/maildir.py).
- IAccountChecker: one ``auth.method`` (identity/): log-ins and recipient lookups.
- IOutboundQueue: the durable outbound queue (store/queue.py), filled by the ESMTP server and
  drained by the delivery runner (smtp/outbound.py).

Methods documented as *blocking* do disk I/O: protocol code calls them off the reactor thread
(``twisted.internet.threads.deferToThread`` or an injected equivalent).
"""

from __future__ import annotations

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

    def open_message_cached(index: int) -> object | None:
        """Optional, and the one method that never blocks: ``open_message``'s file if it can be
        opened without waiting for the disk, else None (then call ``open_message`` off the
        reactor). Callers use it when present, so the reactor saves a thread hop per RETR."""

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


class IOutboundQueue(Interface):
    """The durable outbound queue under ``<state_dir>/queue`` (README "On disk")."""

    def enqueue(source: object, envelope: dict) -> str:
        """Blocking. Take a fsynced message file (a Path on the same file system, which is
        hard-linked, not moved) and a JSON-able envelope::

            {"sender": "a@b" or "", "recipients": [{"address": "...", "orcpt": str|None,
             "notify": ["FAILURE", ...]|None}], "ret": "FULL"|"HDRS"|None, "envid": str|None,
             "received_from": "client description", "arrival": unix time, "hops": int}

        When this returns, the message and its envelope are durable. Returns the queue id.
        """

    def wake() -> None:
        """Ask the delivery runner to look at the queue now (new mail or ``queue flush``)."""
