"""Real local accounts and a PAM service for the integration tier (needs root).

``LocalAccounts`` creates Unix accounts with ``useradd`` and sets their passwords with
``chpasswd`` (on stdin, never in argv), writes a PAM service file under ``/etc/pam.d`` (a copy
of the project's ``etc/pam.d/pop3coexist`` under a unique name), and removes all of it
afterwards (``userdel -r``). Account names get a random suffix so parallel or aborted runs
never clash with real users. Kinds of accounts made by the ``local_accounts`` fixture:

- ``good``: an ordinary user; ``other``: a second one;
- ``locked``: password locked (``usermod -L``); ``expired``: account expired;
- ``system``: a system account (``useradd -r``, uid below 1000) with a known password.

Not root, or programs missing: skip on a developer's machine, fail in CI (tests run as root).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.programs import in_ci, require_program

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PAM_SERVICE = REPO / "etc" / "pam.d" / "pop3coexist"
PAM_DIR = Path("/etc/pam.d")


@dataclass
class LocalAccount:
    name: str
    password: str
    kind: str


def _need_root() -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return
    message = "creating local accounts and PAM services needs root"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


class LocalAccounts:
    """Creates and removes test accounts and one PAM service (see the module docstring)."""

    def __init__(self) -> None:
        _need_root()
        self.useradd = require_program("useradd", "/usr/sbin/useradd")
        self.userdel = require_program("userdel", "/usr/sbin/userdel")
        self.usermod = require_program("usermod", "/usr/sbin/usermod")
        self.chpasswd = require_program("chpasswd", "/usr/sbin/chpasswd")
        try:
            import pam  # noqa: F401
        except ImportError:
            if in_ci():
                pytest.fail("python-pam is not installed")
            pytest.skip("python-pam is not installed")
        self.tag = secrets.token_hex(3)
        self.service = f"pop3coexist-test-{self.tag}"
        self.service_file = PAM_DIR / self.service
        self.accounts: dict[str, LocalAccount] = {}

    def install_service(self) -> str:
        """Write the PAM service file (the project's sample); return the service name."""
        self.service_file.write_text(SAMPLE_PAM_SERVICE.read_text())
        return self.service

    def add(self, kind: str, *, system: bool = False, password: str | None = None) -> LocalAccount:
        """Create one account; ``kind`` becomes part of the name (``p3c<tag><kind>``)."""
        name = f"p3c{self.tag}{kind}"[:32]
        password = password or f"Pw-{secrets.token_urlsafe(9)} x"
        args = [self.useradd, "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if system:
            args.append("--system")
        subprocess.run([*args, name], check=True, capture_output=True, timeout=30)
        account = LocalAccount(name, password, kind)
        self.accounts[kind] = account
        subprocess.run(
            [self.chpasswd], input=f"{name}:{password}\n".encode(), check=True,
            capture_output=True, timeout=30,
        )
        return account

    def lock(self, kind: str) -> None:
        subprocess.run([self.usermod, "-L", self.accounts[kind].name], check=True, capture_output=True, timeout=30)

    def expire(self, kind: str) -> None:
        subprocess.run(
            [self.usermod, "--expiredate", "1970-01-02", self.accounts[kind].name],
            check=True, capture_output=True, timeout=30,
        )

    def remove(self) -> None:
        for account in self.accounts.values():
            subprocess.run([self.userdel, account.name], capture_output=True, timeout=30)
        self.accounts.clear()
        try:
            self.service_file.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture(scope="module")
def local_accounts():
    """A PAM service and accounts: good, other, locked, expired, system (see module doc)."""
    accounts = LocalAccounts()
    try:
        accounts.install_service()
        accounts.add("good")
        accounts.add("other")
        accounts.add("locked")
        accounts.lock("locked")
        accounts.add("expired")
        accounts.expire("expired")
        accounts.add("system", system=True)
        yield accounts
    finally:
        accounts.remove()
