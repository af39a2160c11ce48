"""Password log-in for the web front-ends, through the same checker and failed-log-in
throttle the mail protocols use.

``WebLogin(checker, throttle, clock, allowed=...)``: ``checker`` is an
``interfaces.IAccountChecker`` (web mail: the server's; a console: its own admin accounts),
``throttle`` an ``interfaces.IAuthThrottle``. Web mail is given POP3's throttle (the table
ManageSieve uses too, shared by every process with ``server.workers`` > 1), so a failure on
the web delays the next POP3 check from that address and the other way round. Every check
passes ``policy.throttle.LoginGate`` (one check at a time per source, the failure delay
before it, unknown sources never taking more than half of the check time), exactly as a POP3
USER/PASS does; a failed check is answered only after its failure delay.

``allowed(account)`` (optional, may return a Deferred) is asked after the password matched:
False refuses the log-in like a wrong password (web mail: the mailbox exists here and is not
locked). Passwords are never logged; the log line names the user (printable) and source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from pop3coexist.errors import AuthUnavailable
from pop3coexist.identity.credentials import PasswordCredentials
from pop3coexist.policy.throttle import LoginGate

log = Logger()


class LoginFailed(Exception):
    """The log-in was refused (wrong password, unknown or locked account); the message is
    for the user and never says which."""


class LoginUnavailable(Exception):
    """The accounts cannot be read now (directory down): try later."""


def printable(text: str, limit: int = 80) -> str:
    """``text`` safe for a log line: control characters replaced, cut at ``limit``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class WebLogin:
    """Checks a user name and password for one web front-end (see the module docstring)."""

    def __init__(self, checker: Any, throttle: Any, clock: Any,
                 allowed: Callable[[str], Any] | None = None, name: str = "web") -> None:
        self.checker = checker
        self.throttle = throttle
        self.clock = clock
        self.allowed = allowed
        self.name = name
        self.gate = LoginGate.for_throttle(throttle, clock)

    async def authenticate(self, username: str, password: str, source: str) -> str:
        """The account (``"local@domain"``, lower case) of a matching user name and password
        from client address ``source``; raises LoginFailed (after the source's failure delay)
        or LoginUnavailable."""
        if not username or not password or len(username) > 320 or len(password) > 1024:
            await self._failed(username, source)
        release = await self.gate.enter(source)
        try:
            try:
                avatar = await defer.maybeDeferred(
                    self.checker.requestAvatarId, PasswordCredentials(username.strip(), password))
                if isinstance(avatar, bytes):
                    avatar = avatar.decode("ascii")
                account = str(avatar).lower()
                if self.allowed is not None and not await defer.maybeDeferred(self.allowed,
                                                                              account):
                    raise LoginFailed()
            except AuthUnavailable:
                log.info("{name} log-in {user} from {peer}: temporary failure", name=self.name,
                         user=printable(username), peer=source)
                raise LoginUnavailable() from None
            except Exception as e:
                if not isinstance(e, LoginFailed):
                    log.info("{name} log-in {user}: {why}", name=self.name,
                             user=printable(username), why=type(e).__name__)
                release()
                await self._failed(username, source)
        finally:
            release()
        self.throttle.success(source)
        log.info("{name} log-in {user} from {peer}: success", name=self.name, user=account,
                 peer=source)
        return account

    async def _failed(self, username: str, source: str) -> None:
        delay = self.throttle.failure_delay(source)
        log.info("{name} log-in {user} from {peer}: refused", name=self.name,
                 user=printable(username), peer=source)
        if delay > 0:
            await task.deferLater(self.clock, delay, lambda: None)
        raise LoginFailed()
