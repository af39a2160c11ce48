"""What every administrative operation works on: the ``Context`` (the config, the Maildir store,
how to look an address up in the account source, who acts), the one error type, the address
helpers, and the audit log of every change.

The operations (``ops/mailboxes.py``, ``ops/queue.py``, ``ops/aliases.py``, ``ops/nodes.py``)
are blocking code: the ``pop3coexist-admin`` command calls them directly, the admin API and
console (``adminweb/``) call them in a thread. The few that need the account source (a
directory or the system accounts) call ``Context.resolve``, which each face supplies: the
command runs the reactor until the look-up ends, the server hands the look-up to its reactor
thread and waits.

Audit: every change (and every refused change) is one line in ``<state_dir>/admin-audit.log``
(appended with ``O_APPEND``: whole lines from several processes never interleave) and in the
server's own log when the server made it::

    2026-11-30T18:02:11Z admin=alice via=api action=mailbox.lock target=ted@pop.contoso.test ok

Passwords are never written there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from twisted.logger import Logger

from pop3coexist.address import AddressError, is_valid_mailbox_name, normalise_domain
from pop3coexist.config import Config
from pop3coexist.errors import AdminError, ConfigError, NoSuchMailbox, StoreError

log = Logger()

AUDIT_FILE = "admin-audit.log"


class OpsError(AdminError):
    """An operation cannot be carried out; ``str()`` is the one line the command prints after
    ``pop3coexist-admin: error:`` and the API returns as ``{"error": ...}``."""


def fail(message: str) -> NoReturn:
    """Raise OpsError(message)."""
    raise OpsError(message)


def error_line(e: BaseException) -> str:
    """The one line an operation's failure is reported with (command, API and console alike):
    the first line of its text; a missing domain or mailbox from the store is prefixed
    ``no such domain or mailbox:``; an OSError names its file."""
    if isinstance(e, OSError) and not isinstance(e, (AdminError, StoreError)):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    text = str(e) or e.__class__.__name__
    if isinstance(e, NoSuchMailbox):
        text = f"no such domain or mailbox: {text}"
    return text.splitlines()[0]


#: the failures an operation reports as one line (everything else is a bug: a traceback)
EXPECTED = (AdminError, ConfigError, StoreError, ValueError, OSError)


@dataclass
class Context:
    """One face's view of the server's state for the operations.

    ``store``: a MaildirStore over ``config.server.mailroot`` (made when not given);
    ``resolve(address) -> mailbox address or None`` looks an address up in the account source
    (AuthUnavailable when it cannot be reached), blocking; ``bounce(queue, id)`` deletes a
    queued message after queueing a failure report to its sender (smtp/bounce.py
    ``delete_with_report``; the face passes it in because the reports are the SMTP
    front-end's); ``actor`` and ``via`` name who acts for the audit log (``alice``, ``cli`` |
    ``api`` | ``console``); ``flush()`` tells the delivery runner of this process to retry now
(the server's faces; the command leaves a marker the runner polls)."""

    config: Config
    store: Any = None
    resolve: Callable[[str], str | None] | None = None
    bounce: Callable[[Any, str], None] | None = None
    actor: str = "?"
    via: str = "cli"
    flush: Callable[[], None] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.store is None:
            from pop3coexist.store.maildir import MaildirStore

            self.store = MaildirStore(self.config.server.mailroot)
        # The domains the config names exist from the start, for the server and for us.
        for domain in self.config.domains.local:
            if not self.store.domain_exists(domain):
                self.store.add_domain(domain)
        from pop3coexist.policy.relay import role_mailboxes

        for domain, mailbox in role_mailboxes(self.config, self.config.domains.local):
            self.store.add_mailbox(domain, mailbox)  # as at start: postmaster can receive

    def password_file(self) -> Any:
        """The password file (auth.method = "passwordfile")."""
        from pop3coexist.identity.factory import make_password_file

        return make_password_file(self.config)

    def queue(self) -> Any:
        """The outbound queue (store/queue.py FileQueue)."""
        from pop3coexist.store.queue import FileQueue

        return FileQueue(self.config.server.queue_dir, self.config.server.hostname)

    def lookup(self, address: str) -> str | None:
        """``resolve`` or, without one, a checker of the config's account source run with
        the reactor (the command's way). AuthUnavailable when it cannot be reached."""
        if self.resolve is not None:
            return self.resolve(address)
        from pop3coexist.identity.factory import make_checker
        from pop3coexist.interfaces import IClosable
        from pop3coexist.ops.blocking import wait

        checker = make_checker(self.config, self.store)
        try:
            return wait(checker.resolve_recipient(address))
        finally:
            if IClosable.providedBy(checker):
                checker.close()

    def need_domain(self, domain: str) -> None:
        """OpsError unless ``domain`` exists."""
        if not self.store.domain_exists(domain):
            fail(f"domain {domain} does not exist (pop3coexist-admin domain add {domain})")

    def audit(self, action: str, target: str, outcome: str = "ok") -> None:
        """Write one audit line (module docstring): who, through what, did what to what, and
        how it ended (``ok`` or ``error: <the one line>``)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        safe = {k: _clean(v) for k, v in (("actor", self.actor), ("target", target))}
        # the outcome is the line's last field: spaces stay, control characters do not
        safe["outcome"] = "".join(c if c.isprintable() else "?" for c in outcome)[:300]
        line = (f"{stamp} admin={safe['actor']} via={self.via} action={action} "
                f"target={safe['target'] or '-'} {safe['outcome']}")
        log.info("{line}", line=line, admin=self.actor, action=action)
        try:
            fd = os.open(self.config.server.state_dir / AUDIT_FILE,
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (line + "\n").encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as e:  # the change is made; the missing line is said in the log
            log.error("admin audit log not written: {error}", error=e)


def _clean(text: str) -> str:
    """One token of an audit line: no spaces or control characters (a name cannot forge a
    field or a line)."""
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in str(text))[:200]


def split_address(text: str) -> tuple[str, str]:
    """USER@DOMAIN -> (mailbox, domain), lower case, or OpsError."""
    if "@" not in text:
        fail(f"{text!r} is not USER@DOMAIN")
    local, _, domain = text.rpartition("@")
    try:
        domain = normalise_domain(domain)
    except AddressError as e:
        fail(f"{text!r}: {e}")
    local = local.lower()
    if not is_valid_mailbox_name(local):
        fail(f"{text!r}: mailbox names are 1-64 characters of letters, digits and "
             ".!#$%&'*+=?^_`{|}~-")
    return local, domain


def domain_name(text: str) -> str:
    """A domain name, normalised, or OpsError."""
    try:
        return normalise_domain(text)
    except AddressError as e:
        fail(str(e))


def done(*messages: str, warnings: tuple[str, ...] | list[str] = (), **data: Any) -> dict:
    """The result of a change: ``{"messages": [lines for the user], "warnings": [lines],
    ...data}``; JSON-able."""
    return {"messages": list(messages), "warnings": list(warnings), **data}
