"""Failures shared across the product.

Each mail failure carries what a protocol front-end needs to answer with: an SMTP basic code,
an RFC 3463 enhanced status code, whether it is temporary, and a human text. Policy and storage
raise these; each front-end has one ``reply_for(failure)`` that turns any failure into
its reply (``as_mail_error`` below). Nothing here touches sockets or files.
"""

from __future__ import annotations

import errno

from twisted.cred.error import LoginFailed


class ConfigError(Exception):
    """The configuration is invalid; the message names the file, key and line where possible."""


class AdminError(Exception):
    """An administrative request cannot be carried out; str() is one line for stderr."""


class MailError(Exception):
    """A mail failure with SMTP code, enhanced code, temporary/permanent and POP3 response code.

    ``code`` / ``enhanced`` / ``text``: the SMTP reply (RFC 5321, RFC 3463); ``pop3``: the
    RFC 2449 / RFC 3206 response code a POP3 ``-ERR`` carries (``"AUTH"``, ``"IN-USE"``,
    ``"SYS/TEMP"``) or None, and ``pop3_text`` its text (default ``text``). ``generic``: the
    reply says no more than "local error", so a front-end answers with its own wording for
    the command at hand (``as_mail_error`` gives None for it).
    """

    generic = False

    def __init__(self, code: int, enhanced: str, text: str, pop3: str | None = None,
                 pop3_text: str | None = None) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.pop3 = pop3
        self.pop3_text = text if pop3_text is None else pop3_text

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def reply(self) -> str:
        """The SMTP reply line without CRLF, e.g. ``550 5.1.1 unknown user``."""
        return f"{self.code} {self.enhanced} {self.text}"

    def pop3_reply(self) -> str:
        """What follows ``-ERR `` in a POP3 reply, e.g. ``[IN-USE] mailbox is in use``."""
        return f"[{self.pop3}] {self.pop3_text}" if self.pop3 else self.pop3_text


class TemporaryFailure(MailError):
    """A transient failure (4xx): try again later."""

    def __init__(self, text: str, enhanced: str = "4.3.0", code: int = 451) -> None:
        super().__init__(code, enhanced, text)


class PermanentFailure(MailError):
    """A permanent failure (5xx): do not retry."""

    def __init__(self, text: str, enhanced: str = "5.0.0", code: int = 550) -> None:
        super().__init__(code, enhanced, text)


class _KnownFailure(MailError):
    """A failure whose replies are fixed per class; ``str()`` is the detail it was raised
    with (for logs and the admin command, never sent to a client)."""

    CODE = 451
    ENHANCED = "4.3.0"
    TEXT = "Local error in processing, try again later"
    POP3: str | None = "SYS/TEMP"
    POP3_TEXT = "cannot open the mailbox now, try again later"

    def __init__(self, detail: str = "") -> None:
        Exception.__init__(self, *((detail,) if detail else ()))
        self.code = self.CODE
        self.enhanced = self.ENHANCED
        self.text = self.TEXT
        self.pop3 = self.POP3
        self.pop3_text = self.POP3_TEXT


class MailboxInUse(_KnownFailure):
    """Another POP3 session holds this mailbox: POP3 ``-ERR [IN-USE]`` (RFC 2449 section 8.1.2)."""

    CODE, ENHANCED, TEXT = 450, "4.2.0", "Mailbox in use, try again later"
    POP3, POP3_TEXT = "IN-USE", "mailbox is in use by another session"


class LoginRefused(_KnownFailure):
    """The credentials were right but the log-in is refused (locked mailbox or domain):
    POP3 ``-ERR [AUTH]`` (RFC 3206 section 4), SMTP ``535 5.7.8`` (RFC 4954 section 6)."""

    CODE, ENHANCED, TEXT = 535, "5.7.8", "Authentication credentials invalid"
    POP3, POP3_TEXT = "AUTH", "mailbox is locked"


class BadCredentials(_KnownFailure):
    """The credentials are wrong (any ``twisted.cred`` ``LoginFailed``): POP3 ``-ERR [AUTH]``,
    SMTP ``535 5.7.8``. ``as_mail_error`` gives it for a LoginFailed."""

    CODE, ENHANCED, TEXT = 535, "5.7.8", "Authentication credentials invalid"
    POP3, POP3_TEXT = "AUTH", "authentication failed"


class AuthUnavailable(_KnownFailure):
    """The credential source (directory, password file, account service) cannot answer now:
    a temporary failure, never a false success.

    POP3 answers ``-ERR [SYS/TEMP]``, SMTP AUTH ``454 4.7.0`` (RFC 4954 section 6); a
    recipient or sender look-up turns it into ``451 4.4.3`` (``DirectoryUnavailable``).
    """

    CODE, ENHANCED, TEXT = 454, "4.7.0", "Temporary authentication failure"
    POP3, POP3_TEXT = "SYS/TEMP", "authentication service unavailable, try again later"


class DirectoryUnavailable(_KnownFailure):
    """A directory look-up for MAIL or RCPT cannot be answered now: SMTP ``451 4.4.3``."""

    CODE, ENHANCED, TEXT = 451, "4.4.3", "Directory lookup failed, try again later"
    POP3, POP3_TEXT = "SYS/TEMP", "directory lookup failed, try again later"


class StoreError(_KnownFailure):
    """The mail store cannot carry out a request (unknown domain or mailbox, I/O failure).

    Generic: a client is answered with the front-end's local-error reply for the command
    (SMTP ``451 4.3.0``, POP3 ``-ERR [SYS/TEMP]``), never with the detail.
    """

    generic = True


class NoSuchMailbox(StoreError):
    """The named domain or mailbox does not exist (generic like every StoreError: the
    delivery policy answers an unknown recipient ``550 5.1.1`` itself)."""


class QuotaExceeded(StoreError):
    """Delivering would put the mailbox over its quota: SMTP ``552 5.2.2`` (RFC 3463)."""

    generic = False
    CODE, ENHANCED, TEXT = 552, "5.2.2", "Mailbox full"
    POP3, POP3_TEXT = None, "mailbox full"


class StorageFull(_KnownFailure):
    """The state file system is full (ENOSPC, EDQUOT): SMTP ``452 4.3.1`` (RFC 3463 "mail
    system full"; RFC 5321 section 4.2.2 452), POP3 ``-ERR [SYS/TEMP]``. Nothing was stored."""

    CODE, ENHANCED, TEXT = 452, "4.3.1", "Insufficient system storage, try again later"
    POP3, POP3_TEXT = "SYS/TEMP", "the mail store is full, try again later"


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or the exception it was raised from) is an OSError saying the file
    system is full or over quota."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


# A shared volume that cannot be reached (a GlusterFS or NFS mount cut off, without quorum, or
# a file replaced under a reader more often than it is read again): README "Several servers"
_VOLUME_ERRNOS = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EROFS, errno.ETIMEDOUT,
                            errno.EHOSTDOWN, errno.EHOSTUNREACH})


def volume_unreachable(exc: BaseException) -> str | None:
    """One line naming the failure when ``exc`` (or what it was raised from) is an OSError
    of an unreachable shared volume (ENOTCONN, ESTALE, EROFS, ETIMEDOUT, EHOSTDOWN,
    EHOSTUNREACH), else None. The front-ends log such a failure on one line (no traceback: it
    is the volume's state, not a bug) and answer with their temporary local error."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _VOLUME_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{exc.strerror or exc}{where}"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def as_mail_error(exc: BaseException) -> MailError | None:
    """The MailError a client is answered with for ``exc``, or None when ``exc`` says nothing
    a client may see (a bug, an OSError, a generic StoreError): the front-end then answers with
    its own local-error reply for the command. A ``twisted.cred`` ``LoginFailed`` (wrong
    credentials, unhandled credentials) is ``BadCredentials``."""
    if disk_full(exc):
        return StorageFull(str(exc))
    if isinstance(exc, MailError):
        return None if exc.generic else exc
    if isinstance(exc, LoginFailed):
        return BadCredentials()
    return None
