"""Failures shared across the product.

Each mail failure carries what a protocol front-end needs to answer with: an SMTP basic code,
an RFC 3463 enhanced status code, whether it is temporary, and a human text. Policy and storage
raise these; protocol code turns them into replies. Nothing here touches sockets or files.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is invalid; the message names the file, key and line where possible."""


class AdminError(Exception):
    """An administrative request cannot be carried out; str() is one line for stderr."""


class MailError(Exception):
    """A mail transaction failure with SMTP code, enhanced code and temporary/permanent."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def reply(self) -> str:
        """The reply line without CRLF, e.g. ``550 5.1.1 unknown user``."""
        return f"{self.code} {self.enhanced} {self.text}"


class TemporaryFailure(MailError):
    """A transient failure (4xx): try again later."""

    def __init__(self, text: str, enhanced: str = "4.3.0", code: int = 451) -> None:
        super().__init__(code, enhanced, text)


class PermanentFailure(MailError):
    """A permanent failure (5xx): do not retry."""

    def __init__(self, text: str, enhanced: str = "5.0.0", code: int = 550) -> None:
        super().__init__(code, enhanced, text)


class MailboxInUse(Exception):
    """Another POP3 session holds this mailbox (POP3 ``-ERR [IN-USE]``)."""


class LoginRefused(Exception):
    """The credentials were right but the log-in is refused (locked mailbox or domain)."""


class AuthUnavailable(Exception):
    """The credential source cannot answer now (directory down): a temporary failure.

    POP3 answers ``-ERR [SYS/TEMP]``, SMTP ``454 4.7.0``. Never a false success.
    """


class StoreError(Exception):
    """The mail store cannot carry out a request (unknown domain or mailbox, I/O failure)."""


class NoSuchMailbox(StoreError):
    """The named domain or mailbox does not exist."""


class QuotaExceeded(StoreError):
    """Delivering would put the mailbox over its quota."""
