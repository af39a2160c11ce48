"""The local-accounts checker (``auth.method = "local"``): Unix accounts checked through PAM.

Implements ``interfaces.IAccountChecker``. As in the Windows POP3 service: one mail domain only
(the config refuses a second one with this method) and one address per account; the mailbox
name is the account name, so ``ted`` receives ``ted@<domain>`` and logs in as ``ted`` or
``ted@<domain>`` (any case; Unix account names are lower case).

- The password goes to PAM (python-pam) with the service ``[auth.local] pam_service``
  (``etc/pam.d/pop3coexist`` is a sample). ``pam_authenticate`` and ``pam_acct_mgmt`` both
  run, so locked (``passwd -l``), expired and disabled accounts are refused. PAM blocks (for
  seconds on a wrong password with ``pam_unix`` delays), so it runs in the reactor's thread
  pool, at most ``max_concurrent`` at a time so log-in floods cannot starve the mail store.
- System accounts (uid below ``UID_MIN`` or above ``UID_MAX`` of ``/etc/login.defs``, by default
  1000 and 60000; so also ``nobody``) and names that are not valid mailbox names are refused
  before PAM is asked, and never receive mail.
- An empty password is refused before PAM is asked (``nullok`` setups would accept it).
- An account needs no Maildir to log in for SMTP AUTH (``identity.logins.login_locked``);
  POP3 needs the mailbox (``pop3.realm``).
- PAM failing to run (missing module, service errors) gives ``errors.AuthUnavailable``.

``pam_unix`` can only check other users' passwords when the server runs as root (or is allowed
to read ``/etc/shadow``); otherwise every log-in fails, and ``check()`` says so at start.
"""

from __future__ import annotations

import os
import pwd
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.cred import credentials as cred_credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3coexist import address as addr_mod
from pop3coexist.config import Config
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.identity.logins import map_login
from pop3coexist.identity.stamps import stamp_of
from pop3coexist.interfaces import IAccountChecker, ICredentialStamp, ISelfCheck

log = Logger()

# PAM results that mean "these credentials do not log in" (Linux-PAM _pam_types.h).
PAM_SUCCESS = 0
_REFUSED = frozenset({
    6,   # PAM_PERM_DENIED
    7,   # PAM_AUTH_ERR
    8,   # PAM_CRED_INSUFFICIENT
    10,  # PAM_USER_UNKNOWN
    11,  # PAM_MAXTRIES
    12,  # PAM_NEW_AUTHTOK_REQD (password expired: must be changed first)
    13,  # PAM_ACCT_EXPIRED
    16,  # PAM_CRED_EXPIRED
})
PAM_DIRS = (Path("/etc/pam.d"), Path("/usr/lib/pam.d"), Path("/lib/pam.d"))
_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def login_defs_uid_range(path: Path = Path("/etc/login.defs")) -> tuple[int, int]:
    """(UID_MIN, UID_MAX) for ordinary users from login.defs; (1000, 60000) by default."""
    values = {"UID_MIN": 1000, "UID_MAX": 60000}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return values["UID_MIN"], values["UID_MAX"]
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in values and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values["UID_MIN"], values["UID_MAX"]


def pam_authenticate(service: str, username: str, password: bytes) -> tuple[int, str]:
    """Blocking: run PAM authentication and account checks; (PAM code, reason)."""
    import pam

    authenticator = pam.pam()  # a fresh handle per call: safe from several threads
    try:
        authenticator.authenticate(username, password, service=service, resetcreds=False)
    except ValueError:  # NUL in a name or password
        return 7, "invalid characters"
    return int(authenticator.code), str(authenticator.reason)


@implementer(IAccountChecker, ISelfCheck, ICredentialStamp)
class LocalChecker:
    """See IAccountChecker; local Unix accounts through PAM (module docstring has the rules)."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)
    offers_secrets = False

    def __init__(
        self,
        config: Config,
        store: Any = None,
        *,
        reactor: Any = None,
        authenticate: Callable[[str, str, bytes], tuple[int, str]] = pam_authenticate,
        getpwnam: Callable[[str], Any] = pwd.getpwnam,
        uid_range: tuple[int, int] | None = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        max_concurrent: int = 4,
        shadow_path: Path = Path("/etc/shadow"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``store`` (an IMailStore) names the domain when ``[domains] local`` is empty.
        ``authenticate``, ``getpwnam``, ``uid_range``, ``run_blocking`` (a deferToThread
        equivalent), ``shadow_path`` and ``clock`` are for tests."""
        self.config = config
        self.store = store
        self.service = config.auth.local.pam_service
        if not _SERVICE_RE.match(self.service):
            raise ConfigError(f"[auth.local.pam_service] {self.service!r} is not a PAM service name")
        self._authenticate = authenticate
        self._getpwnam = getpwnam
        self.uid_min, self.uid_max = uid_range or login_defs_uid_range()
        if run_blocking is None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            from twisted.internet.threads import deferToThreadPool

            def run_blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self._run = run_blocking
        self._limit = defer.DeferredSemaphore(max(1, max_concurrent))
        self.shadow_path = Path(shadow_path)
        self._clock = clock

    def __repr__(self) -> str:
        return f"<LocalChecker pam_service={self.service!r}>"

    def check(self) -> None:
        """Start-up check (blocking): one local domain, the PAM service file exists, and the
        process can check other users' passwords (root)."""
        domains = self._domains()
        if len(domains) != 1:
            raise ConfigError(
                "[domains.local] auth.method = \"local\" needs exactly one mail domain "
                f"(found {len(domains)})"
            )
        if not any((d / self.service).is_file() for d in PAM_DIRS):
            raise ConfigError(
                f"[auth.local.pam_service] no PAM service file {self.service!r} in /etc/pam.d "
                "(copy etc/pam.d/pop3coexist there)"
            )
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            log.warn(
                "auth.method = local without root: pam_unix can only check the server "
                "account's own password, so log-ins of other accounts will fail"
            )

    # ------------------------------------------------------------------ helpers

    def _domains(self) -> list[str]:
        """Blocking when the store is asked."""
        if self.config.domains.local:
            return [d.lower() for d in self.config.domains.local]
        if self.store is not None:
            return [d.lower() for d in self.store.list_domains()]
        return []

    def _account(self, name: str) -> bool:
        """Blocking: True when ``name`` is an ordinary (non-system) local account."""
        if not addr_mod.is_valid_mailbox_name(name):
            return False
        try:
            entry = self._getpwnam(name)
        except KeyError:
            return False
        uid = int(entry.pw_uid)
        return self.uid_min <= uid <= self.uid_max

    def _map_login(self, login: str) -> str | None:
        """Blocking: the mailbox address for a log-in name, or None."""
        domains = self._domains()
        if len(domains) != 1:
            map_login(login, domains)  # logs why a bare name was refused
            return None
        mapped = map_login(login, domains)
        if mapped is None or mapped[1] != domains[0]:
            return None
        name = mapped[0]
        if not self._account(name):
            return None
        return f"{name}@{domains[0]}"

    def _login(self, login: str, password: bytes) -> str:
        """Blocking: the mailbox address, or raise UnauthorizedLogin / AuthUnavailable."""
        try:
            mailbox = self._map_login(login)
        except OSError as e:
            log.warn("account database failed: {err}", err=e.__class__.__name__)
            raise AuthUnavailable("the account database cannot answer now")
        if mailbox is None:
            raise UnauthorizedLogin()
        name = mailbox.partition("@")[0]
        try:
            code, reason = self._authenticate(self.service, name, password)
        except Exception as e:
            log.warn("PAM failed for {name!r}: {err}", name=name, err=e.__class__.__name__)
            raise AuthUnavailable("the account service cannot answer now")
        if code == PAM_SUCCESS:
            return mailbox
        if code in _REFUSED:
            log.info("local log-in {name!r} refused by PAM: {reason}", name=name, reason=reason)
            raise UnauthorizedLogin()
        log.warn("PAM error for {name!r}: {code} {reason}", name=name, code=code, reason=reason)
        raise AuthUnavailable("the account service cannot answer now")

    # ------------------------------------------------------------------ IAccountChecker

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        """See ICredentialsChecker / IAccountChecker."""
        try:
            login = credentials.username
            if isinstance(login, bytes):
                login = login.decode("utf-8")
            password = credentials.password
            if isinstance(password, str):
                password = password.encode("utf-8")
        except (AttributeError, UnicodeError):
            # a name or password that is no Unicode text (an SMTP AUTH password of octets
            # that are not UTF-8 arrives surrogate-escaped) is a wrong one: 535, not 454
            return defer.fail(UnauthorizedLogin())
        if not password or b"\x00" in password:
            return defer.fail(UnauthorizedLogin())
        return self._limit.run(self._run, self._login, login, password)

    def _shadow_fields(self, name: str) -> list[str] | None:
        """Blocking: ``name``'s line of the shadow file split at ``:`` (shadow(5)), or None
        when this process may not read the file (not root); ``[]`` when it has no line."""
        try:
            with open(self.shadow_path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if fields[0] == name and len(fields) >= 8:
                        return fields
        except PermissionError:
            return None
        return []

    def _stamp(self, account: str) -> bytes | None:
        """Blocking: see ``credential_stamp``."""
        try:
            if self._map_login(account) != account:
                return None
            name = account.partition("@")[0]
            uid = str(self._getpwnam(name).pw_uid)
            fields = self._shadow_fields(name)
        except (OSError, KeyError) as e:
            log.warn("account database failed: {err}", err=e.__class__.__name__)
            raise AuthUnavailable("the account database cannot answer now")
        if fields is None:  # not root: what the account database shows to anyone
            return stamp_of(b"local", account, uid)
        if not fields:
            return None
        password, changed, expires = fields[1], fields[2], fields[7]
        if password.startswith("!"):  # passwd -l, usermod -L
            return None
        if expires.isdigit() and int(expires) * 86400 <= self._clock():
            return None  # the account expired (shadow(5): days since 1970-01-01)
        return stamp_of(b"local", account, uid, password, changed)

    def credential_stamp(self, account: str) -> defer.Deferred:
        """See ICredentialStamp: from the account's shadow(5) entry (its password hash and
        last-change day), so ``passwd``, ``passwd -l``, ``usermod -L`` and an expiry date
        count; None once the account is gone, locked or expired. Without read access to the
        shadow file (the server not running as root), only the account's existence and uid
        count (``pam_unix`` cannot check passwords then either, see the module docstring)."""
        return self._run(self._stamp, account)

    def resolve_recipient(self, address: str) -> defer.Deferred:
        """See IAccountChecker: ``account@<the local domain>`` for an ordinary account."""
        if not isinstance(address, str):
            return defer.succeed(None)
        try:
            parsed = addr_mod.parse_address(address.strip("<>"))
        except addr_mod.AddressError:
            return defer.succeed(None)
        if parsed.quoted:
            return defer.succeed(None)
        key = parsed.key

        def resolve() -> str | None:
            return self._map_login(key)

        def failed(f: Any) -> Any:
            f.trap(OSError)
            raise AuthUnavailable("the account database cannot answer now")

        return self._run(resolve).addErrback(failed)

    def sender_owner(self, address: str) -> defer.Deferred:
        """See IAccountChecker: an account's one address is ``account@<the local domain>``,
        so this is ``resolve_recipient``."""
        return self.resolve_recipient(address)
