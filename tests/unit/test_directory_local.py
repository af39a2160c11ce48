"""LocalChecker (identity/local.py, the local-accounts method) with a fake PAM and passwd.

Proves the rules that do not need root: what reaches PAM and what never does (empty
passwords, system accounts, bad names), PAM codes mapped to refusals or temporary failures,
one-domain mapping, and the concurrency limit on the thread pool.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pop3coexist.config import parse_config
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.identity.local import LocalChecker, login_defs_uid_range
from pop3coexist.interfaces import IAccountChecker

DOMAIN = "pop.contoso.test"
USERS = {"ted": 1001, "root": 0, "daemon": 1, "nobody": 65534, "kim": 1002}
PASSWORDS = {"ted": b"ted-pw", "root": b"root-pw", "kim": b"kim-pw"}


def cfg(tmp_path, service="pop3coexist", domains=(DOMAIN,)):
    dom = ", ".join(f'"{d}"' for d in domains)
    return parse_config(
        f'[server]\nhostname = "{DOMAIN}"\nstate_dir = "{tmp_path}"\n'
        f'[auth]\nmethod = "local"\napop = false\n[auth.local]\npam_service = "{service}"\n'
        f"[domains]\nlocal = [{dom}]\n"
    )


class FakePam:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.code: int | None = None  # force a result code

    def __call__(self, service: str, name: str, password: bytes) -> tuple[int, str]:
        self.calls.append((service, name))
        if self.code is not None:
            return self.code, "forced"
        return (0, "Success") if PASSWORDS.get(name) == password else (7, "Authentication failure")


def getpwnam(name: str):
    if name not in USERS:
        raise KeyError(name)
    return SimpleNamespace(pw_name=name, pw_uid=USERS[name])


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def pam() -> FakePam:
    return FakePam()


@pytest.fixture
def checker(tmp_path, pam) -> LocalChecker:
    return LocalChecker(cfg(tmp_path), None, authenticate=pam, getpwnam=getpwnam,
                        uid_range=(1000, 60000), run_blocking=run_now)


def result(d: defer.Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box
    return box[0].type if isinstance(box[0], Failure) else box[0]


def login(checker, name, password):
    return result(checker.requestAvatarId(UsernamePassword(name, password)))


def test_interface(checker) -> None:
    """LocalChecker provides IAccountChecker and offers no secrets."""
    assert verifyObject(IAccountChecker, checker)
    assert checker.offers_secrets is False


def test_login_uses_configured_service(checker, pam) -> None:
    """The right password logs in as name@domain; PAM is asked with the configured service
    and the bare account name."""
    assert login(checker, "TED@Pop.Contoso.Test", "ted-pw") == "ted@pop.contoso.test"
    assert pam.calls == [("pop3coexist", "ted")]


def test_empty_password_not_sent(checker, pam) -> None:
    """An empty password is refused before PAM is asked (nullok setups would accept it)."""
    assert login(checker, "ted", "") is UnauthorizedLogin
    assert pam.calls == []


@pytest.mark.parametrize("name", ["root", "daemon", "nobody", "nosuch", "ted@other.test", "ted*", "../ted"])
def test_never_reaches_pam(checker, pam, name) -> None:
    """System accounts, unknown accounts, other domains and bad names are refused without
    asking PAM (so the server cannot be used to guess root's password)."""
    assert login(checker, name, "root-pw") is UnauthorizedLogin
    assert pam.calls == []


@pytest.mark.parametrize("code, expected", [
    (7, UnauthorizedLogin), (10, UnauthorizedLogin), (13, UnauthorizedLogin), (12, UnauthorizedLogin),
    (9, AuthUnavailable), (28, AuthUnavailable), (4, AuthUnavailable), (3, AuthUnavailable),
])
def test_pam_codes(checker, pam, code, expected) -> None:
    """Credential refusals (auth error, unknown, expired, new token needed) refuse; PAM
    failing to run (authinfo unavailable, module unknown, system, service errors) is
    temporary."""
    pam.code = code
    assert login(checker, "ted", "ted-pw") is expected


def test_pam_exception_is_temporary(tmp_path) -> None:
    """An exception from PAM itself is AuthUnavailable, never success."""

    def boom(*_):
        raise RuntimeError("libpam missing")

    c = LocalChecker(cfg(tmp_path), None, authenticate=boom, getpwnam=getpwnam,
                     uid_range=(1000, 60000), run_blocking=run_now)
    assert login(c, "ted", "ted-pw") is AuthUnavailable


def test_resolve_recipient(checker) -> None:
    """An ordinary account at the local domain resolves (any case); others do not."""
    assert result(checker.resolve_recipient("Ted@POP.contoso.test")) == "ted@pop.contoso.test"
    assert result(checker.resolve_recipient("root@pop.contoso.test")) is None
    assert result(checker.resolve_recipient("ted@other.test")) is None
    # a quoted dot-atom is the same mailbox (RFC 5321 4.1.2, issue 11 fault 2); other quoted
    # local parts name no account
    assert result(checker.resolve_recipient('"ted"@pop.contoso.test')) == "ted@pop.contoso.test"
    assert result(checker.resolve_recipient('"te d"@pop.contoso.test')) is None
    assert result(checker.resolve_recipient("garbage")) is None


def test_concurrency_limit(tmp_path, pam) -> None:
    """At most max_concurrent PAM calls run at once; the rest wait their turn."""
    started: list[defer.Deferred] = []

    def held(f, *args):
        d: defer.Deferred = defer.Deferred()
        started.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    c = LocalChecker(cfg(tmp_path), None, authenticate=pam, getpwnam=getpwnam,
                     uid_range=(1000, 60000), run_blocking=held, max_concurrent=2)
    results = [c.requestAvatarId(UsernamePassword("ted", "ted-pw")) for _ in range(5)]
    assert len(started) == 2
    started[0].callback(None)
    assert len(started) == 3
    for d in list(started):
        if not d.called:
            d.callback(None)
    while len(started) < 5 or not all(d.called for d in started):
        for d in list(started):
            if not d.called:
                d.callback(None)
    assert all(result(r) == "ted@pop.contoso.test" for r in results)


def test_bad_service_name(tmp_path) -> None:
    """A PAM service name with a path in it is a ConfigError."""
    with pytest.raises(ConfigError):
        LocalChecker(cfg(tmp_path, service="../etc/shadow"), None, run_blocking=run_now)


def test_login_defs(tmp_path) -> None:
    """UID_MIN / UID_MAX come from login.defs; defaults 1000 / 60000."""
    p = tmp_path / "login.defs"
    p.write_text("# x\nUID_MIN\t\t 500\nUID_MAX 40000\n")
    assert login_defs_uid_range(p) == (500, 40000)
    assert login_defs_uid_range(tmp_path / "missing") == (1000, 60000)


def test_credential_stamp_from_the_shadow_entry(tmp_path, pam) -> None:
    """ICredentialStamp of local accounts: from the shadow(5) line, so a new password hash or
    last-change day gives a new stamp; a locked (``!``) or expired account, a system account
    or one not in the shadow file gives None; a shadow file this process may not read gives
    a stamp of the account's existence only (the same before and after a password change)."""
    from pop3coexist.interfaces import ICredentialStamp

    shadow = tmp_path / "shadow"
    line = "ted:{pw}:{day}:0:99999:7::{expires}:\nkim:$y$kim:19000:0:99999:7:::\n"
    shadow.write_text(line.format(pw="$y$one", day=19000, expires=""))
    checker = LocalChecker(cfg(tmp_path), None, authenticate=pam, getpwnam=getpwnam,
                           uid_range=(1000, 60000), run_blocking=run_now, shadow_path=shadow,
                           clock=lambda: 20000 * 86400.0)
    verifyObject(ICredentialStamp, checker)
    ted = f"ted@{DOMAIN}"
    first = result(checker.credential_stamp(ted))
    assert isinstance(first, bytes) and result(checker.credential_stamp(ted)) == first
    shadow.write_text(line.format(pw="$y$two", day=19000, expires=""))
    second = result(checker.credential_stamp(ted))
    assert second not in (None, first)
    shadow.write_text(line.format(pw="$y$two", day=19001, expires=""))
    assert result(checker.credential_stamp(ted)) not in (None, first, second)
    shadow.write_text(line.format(pw="!$y$two", day=19001, expires=""))
    assert result(checker.credential_stamp(ted)) is None
    shadow.write_text(line.format(pw="$y$two", day=19001, expires=19999))
    assert result(checker.credential_stamp(ted)) is None
    assert result(checker.credential_stamp(f"root@{DOMAIN}")) is None
    assert result(checker.credential_stamp(f"nobody-at-all@{DOMAIN}")) is None
    shadow.write_text("kim:$y$kim:19000:0:99999:7:::\n")
    assert result(checker.credential_stamp(ted)) is None  # no shadow line
    checker._shadow_fields = lambda name: None  # as when not root: the file unreadable
    plain = result(checker.credential_stamp(ted))
    assert isinstance(plain, bytes) and plain == result(checker.credential_stamp(ted))
