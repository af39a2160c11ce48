"""The IMAP servers the client tests run against, behind one shape: our real server
(``ServerProcess``, twistd) and Dovecot's imapd (tests/support/dovecot.py's template), so that
every client test is first proven against the reference server and then run against ours.

``ImapTarget``: ``name`` ("pop3coexist" or "dovecot"), ``port`` (clear text, STARTTLS),
``tls_port`` (implicit TLS), ``pop3_port`` (the same mailboxes over POP3), ``cafile`` (the CA of the server certificate), ``new_mailbox(
messages)`` -> address (a fresh mailbox holding ``messages`` as raw files in ``new/``, as a
delivery leaves them), ``maildir(address)``, ``drop(address, data)``, ``set_quota_1g(address)`` (one more message in
``new/``, as the SMTP delivery writes it) and ``password`` (every mailbox's).

``pop3coexist_target(root)`` and ``dovecot_target(root)`` are context managers; ``root`` must be
reachable by ``nobody`` (``tests.support.dovecot.make_root()``), so that Dovecot can later be
pointed at our Maildir.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.certs import make_ca_and_cert
from tests.support.dovecot import Dovecot, give_to_nobody
from tests.support.programs import in_ci
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

PASSWORD = "Corr3ct-horse-imap-battery"  # no space: Dovecot's static passdb args split on spaces
_names = itertools.count(1)
_files = itertools.count(1)


@dataclass
class ImapTarget:
    """One IMAP server under test; see the module docstring."""

    name: str
    port: int
    tls_port: int
    cafile: Path
    pop3_port: int
    maildir: Callable[[str], Path]
    _add: Callable[[str], str]  # makes a mailbox; returns its address (maybe another one)
    _settle: Callable[[Path], None]
    _quota: Callable[[str], None] = lambda address: None
    password: str = PASSWORD

    def set_quota_1g(self, address: str) -> None:
        """Give the mailbox a 1 GB storage quota (Dovecot's template has it for everyone)."""
        self._quota(address)

    def new_mailbox(self, messages: list[bytes] = ()) -> str:
        """A fresh mailbox (its own address) holding ``messages`` in ``new/``."""
        address = self._add(f"imap{next(_names)}@{HOSTNAME}")
        for data in messages:
            self.drop(address, data, settle=False)
        self._settle(self.maildir(address))
        return address

    def drop(self, address: str, data: bytes, settle: bool = True) -> str:
        """One more message in the mailbox's ``new/`` (written in tmp/, renamed); its name."""
        box = self.maildir(address)
        name = f"{int(time.time())}.M{next(_files)}P{os.getpid()}.client-tests"
        tmp = box / "tmp" / name
        tmp.write_bytes(data)
        os.rename(tmp, box / "new" / name)
        if settle:
            self._settle(box)
        return name


def imap_server_available() -> bool:
    """True once ServerProcess knows the [imap] section (issue 18's server is merged)."""
    return "imap_config" in getattr(ServerProcess, "__dataclass_fields__", {})


def require_imap_server() -> None:
    """Skip (fail in CI) when our IMAP server is not there yet."""
    require_installed_plugin()
    if not imap_server_available():
        message = "pop3coexist has no IMAP server yet (ServerProcess.imap_config is missing)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


_BULK_ADD = """
import io, json, sys
from pop3coexist.admin.cli import run
job = json.loads(sys.stdin.readline())
for address in job["addresses"]:
    sys.stdin = io.StringIO(job["password"] + "\\n")
    code = run(["-c", job["config"], "mailbox", "add", address, "--password-stdin"], io.StringIO())
    if code:
        raise SystemExit(f"mailbox add {address}: exit {code}")
"""


def add_mailboxes(srv: ServerProcess, addresses: list[str], password: str = PASSWORD) -> None:
    """``pop3coexist-admin mailbox add`` for many addresses in one interpreter (the real admin
    code, its ``run()``; one Python start-up instead of one per mailbox). The password goes
    through stdin, never argv."""
    import json
    import subprocess
    import sys

    job = json.dumps({"addresses": addresses, "password": password, "config": str(srv.config_path)})
    result = subprocess.run([sys.executable, "-c", _BULK_ADD], input=job + "\n", text=True,
                            capture_output=True, timeout=300, env=srv.env())
    assert result.returncode == 0, result.stderr[-2000:]


@contextmanager
def pop3coexist_target(root: Path, pool_size: int = 0, **server_args: object) -> Iterator[tuple[ImapTarget, ServerProcess]]:
    """Our real server with POP3 and IMAP (clear text and TLS) on OS-picked ports;
    ``pool_size`` mailboxes are made before it starts (``new_mailbox`` hands them out)."""
    require_imap_server()
    srv = ServerProcess(root, **server_args)
    srv.write_config()
    pool = [f"imap{next(_names)}@{HOSTNAME}" for _ in range(pool_size)]
    if pool:
        add_mailboxes(srv, pool)
    srv.start()

    def add(address: str) -> str:
        if pool:
            return pool.pop(0)
        srv.add_mailbox(address, PASSWORD)
        return address

    try:
        assert srv.certs is not None
        target = ImapTarget(
            name="pop3coexist", port=srv.port("imap"), tls_port=srv.port("imaps"),
            cafile=srv.certs.ca_cert, pop3_port=srv.port("pop3"),
            maildir=lambda a: srv.state_dir / "mailroot" / a.partition("@")[2] / a.partition("@")[0],
            _add=add, _settle=lambda p: None,
            _quota=lambda a: srv.admin("mailbox", "quota", a, "1GB") and None,
        )
        yield target, srv
    finally:
        srv.stop()


@contextmanager
def dovecot_target(root: Path) -> Iterator[tuple[ImapTarget, Dovecot]]:
    """Dovecot's imapd (and pop3d) with TLS on OS-picked ports; every address logs in with
    ``PASSWORD`` (a static passdb), so a new mailbox is a new Maildir."""
    certs = make_ca_and_cert(root / "certs", hostname="localhost")
    dv = Dovecot(root, {}, protocols=("imap", "pop3"), mechanisms=("plain", "login"), certs=certs,
                 static_password=PASSWORD)
    dv.start()

    def add(address: str) -> str:
        for sub in ("tmp", "new", "cur"):
            (dv.maildir(address) / sub).mkdir(parents=True, exist_ok=True)
        give_to_nobody(dv.maildir(address).parent)
        return address

    try:
        yield ImapTarget(name="dovecot", port=dv.ports["imap"], tls_port=dv.ports["imaps"],
                         cafile=certs.ca_cert, pop3_port=dv.ports["pop3"], maildir=dv.maildir, _add=add,
                         _settle=give_to_nobody), dv
    finally:
        dv.stop()


def dovecot_for_module() -> Iterator[ImapTarget]:
    """The body of a module-scoped fixture: one Dovecot target in a fresh root."""
    import shutil

    from tests.support.dovecot import make_root
    from tests.support.programs import require_program

    require_program("dovecot", "/usr/sbin/dovecot")
    root = make_root()
    try:
        with dovecot_target(root) as (target, _):
            yield target
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ours_for_module(pool_size: int) -> Iterator[ImapTarget]:
    """The body of a module-scoped fixture: our server with ``pool_size`` mailboxes made; at
    the end its log holds no traceback and no password."""
    import shutil

    from tests.support.dovecot import make_root

    root = make_root()
    try:
        with pop3coexist_target(root, pool_size=pool_size) as (target, srv):
            yield target
            log = srv.log_text()
            assert "Traceback" not in log, log[-4000:]
            assert target.password not in log
    finally:
        shutil.rmtree(root, ignore_errors=True)
