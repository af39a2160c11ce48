"""A throw-away Dovecot for comparison tests and the benchmark: ONE configuration template with
knobs, used by the SCRAM comparison (tests/integration/test_scram_clients.py), the IMAP client
matrix (tests/integration/test_imap_clients.py) and the benchmark's peers (bench/peers.py).

``Dovecot(root, users, protocols=("pop3",), mechanisms=("plain",), ...)`` writes a private
dovecot.conf under ``root`` and runs ``dovecot -F`` with it. The knobs:

- ``protocols``: any of ``pop3`` and ``imap``; each gets a clear-text listener on an
  OS-picked loopback port (``port("pop3")``, ``port("imap")``), and, when ``certs`` are given,
  an implicit-TLS one (``port("pop3s")``, ``port("imaps")``) and STARTTLS/STLS on the first.
- ``mechanisms``: the SASL mechanisms (``auth_mechanisms``), e.g. ``plain login scram-sha-256``.
- ``users``: address -> Dovecot password string (``{PLAIN}secret``, or
  ``{SCRAM-SHA-256}4096,<salt>,<StoredKey>,<ServerKey>`` from ``dovecot_scram_entry``: salted
  keys, never the password). The passwd-file (mode 0600) is read by the auth process, run as
  root here.
- ``static_password``: one password every address logs in with (``passdb static``, in
  dovecot.conf, mode 0600; no passwd-file to rewrite when a test adds a mailbox).
- ``mail_root``: the folder holding ``<domain>/<mailbox>`` Maildirs (pop3coexist's own layout,
  so Dovecot can be pointed at our Maildir); default ``root/mail``. Dovecot's own index and
  ``dovecot-uidlist`` files go to ``root/index`` (``INDEX=`` and ``CONTROL=``), never into the
  Maildir: a Maildir it shares with pop3coexist keeps only our control files.
- ``certs``: a ``tests.support.certs.CertFiles`` for TLS (``ssl = yes``); None: ``ssl = no``.
- ``autocreate``: create and subscribe Drafts, Junk, Sent and Trash (SPECIAL-USE, RFC 6154) at
  log-in; False for a Maildir shared with pop3coexist (the folders are still labelled).
- IMAP gets the QUOTA extension (``count`` backend: kept in Dovecot's index, no ``maildirsize``
  in the Maildir) with a 1 GB limit.

Dovecot refuses to give mail processes uid 0, so they run as ``nobody``: ``make_root()`` gives a
folder ``nobody`` can reach (pytest's own are private to root), and ``give_to_nobody(path)``
hands a Maildir to ``nobody`` before Dovecot touches it. ``start()`` waits for every port with a
deadline (polling, no sleep of fixed length).
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tests.support.certs import CertFiles

_GREETING = {"pop3": b"+OK", "pop3s": None, "imap": b"* OK", "imaps": None}


def dovecot_scram_entry(salt: bytes, iterations: int, stored_key: bytes, server_key: bytes) -> str:
    """Dovecot's SCRAM-SHA-256 password string (src/auth/password-scheme-scram.c)."""

    def b(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"{{SCRAM-SHA-256}}{iterations},{b(salt)},{b(stored_key)},{b(server_key)}"


def make_root() -> Path:
    """A fresh folder under the system's temporary folder that Dovecot's unprivileged
    processes can reach (pytest's own are private to root); the caller removes it."""
    root = Path(tempfile.mkdtemp(prefix="pop3coexist-dovecot-"))
    root.chmod(0o755)
    return root


def give_to_nobody(path: Path) -> None:
    """chown -R ``path`` to nobody (Dovecot's mail processes run as nobody); a file that a
    running server renames or removes meanwhile is left alone."""
    nobody = pwd.getpwnam("nobody")
    ids = (nobody.pw_uid, nobody.pw_gid)

    def give(p: str) -> None:
        try:
            st = os.lstat(p)
            if (st.st_uid, st.st_gid) != ids:
                os.lchown(p, *ids)
        except FileNotFoundError:
            pass

    give(str(path))
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            give(os.path.join(top, name))


def dovecot_program() -> str | None:
    """The dovecot binary, or None."""
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")


class Dovecot:
    """A private Dovecot instance; see the module docstring."""

    def __init__(self, root: Path, users: dict[str, str], *, protocols: Iterable[str] = ("pop3",),
                 mechanisms: Iterable[str] = ("plain",), mail_root: Path | None = None,
                 certs: CertFiles | None = None, autocreate: bool = True,
                 static_password: str | None = None) -> None:
        self.root = Path(root)
        self.users = dict(users)
        self.protocols = tuple(protocols)
        self.mechanisms = tuple(mechanisms)
        self.mail_root = Path(mail_root) if mail_root is not None else self.root / "mail"
        self.certs = certs
        self.autocreate = autocreate
        self.static_password = static_password
        roles = list(self.protocols)
        if certs is not None:
            roles += [p + "s" for p in self.protocols]
        self.ports: dict[str, int] = self._pick_ports(roles)
        self.conf = self.root / "dovecot.conf"
        self.proc: subprocess.Popen | None = None

    # the first protocol's clear-text port (the SCRAM test's and the bench's POP3 peer)
    @property
    def port(self) -> int:
        return self.ports[self.protocols[0]]

    def maildir(self, address: str) -> Path:
        """The Maildir of ``address`` (``mail_root/<domain>/<local>``)."""
        local, _, domain = address.partition("@")
        return self.mail_root / domain / local

    def _listener(self, name: str) -> str:
        port = self.ports.get(name, 0)
        if not port:
            return f"  inet_listener {name} {{\n    port = 0\n  }}\n"
        ssl = "    ssl = yes\n" if name.endswith("s") else ""
        return f"  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n{ssl}  }}\n"

    def config_text(self) -> str:
        """The dovecot.conf this instance runs with (the template filled in)."""
        nobody = pwd.getpwnam("nobody")
        index = self.root / "index"
        if self.certs is not None:
            ssl = (f"ssl = yes\nssl_cert = <{self.certs.cert}\nssl_key = <{self.certs.key}\n"
                   "ssl_min_protocol = TLSv1.2\n")
        else:
            ssl = "ssl = no\n"
        services = ""
        auto = "subscribe" if self.autocreate else "no"
        if self.static_password is not None:
            # dovecot.conf is mode 0600 (root's): the password is in no argv and no log
            passdb = ("passdb {\n  driver = static\n"
                      f"  args = password={self.static_password}\n}}\n")
        else:
            passdb = f"passdb {{\n  driver = passwd-file\n  args = {self.root / 'passwd'}\n}}\n"
        for proto in ("pop3", "imap"):
            services += (f"service {proto}-login {{\n" + self._listener(proto)
                         + self._listener(proto + "s") + "}\n")
        quota = ""
        if "imap" in self.protocols:
            # quota counted in Dovecot's index (the "count" backend): no maildirsize file in
            # a Maildir it may share with pop3coexist
            quota = """mail_plugins = $mail_plugins quota
protocol imap {
  mail_plugins = $mail_plugins imap_quota
}
plugin {
  quota = count:User quota
  quota_rule = *:storage=1G
  quota_vsizes = yes
}
"""
        return f"""base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
protocols = {" ".join(self.protocols)}
listen = 127.0.0.1
log_path = {self.root / "dovecot.log"}
{ssl}disable_plaintext_auth = no
auth_mechanisms = {" ".join(self.mechanisms)}
first_valid_uid = 1
mail_location = maildir:{self.mail_root}/%d/%n:INDEX={index}/%d/%n:CONTROL={index}/%d/%n
mail_fsync = always
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \\Drafts
    auto = {auto}
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = {auto}
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = {auto}
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = {auto}
  }}
}}
{quota}imap_idle_notify_interval = 2 mins
{passdb}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={self.root}/home/%d/%n
}}
{services}service anvil {{
  chroot =
}}
service auth {{
  user = root
}}
service auth-worker {{
  user = root
}}
"""

    def write_config(self) -> None:
        for d in ("run", "state", "index", "home"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        passwd = self.root / "passwd"
        passwd.write_text("".join(f"{u}:{p}::::::\n" for u, p in self.users.items()))
        passwd.chmod(0o600)
        for user in self.users:
            for sub in ("tmp", "new", "cur"):
                (self.maildir(user) / sub).mkdir(parents=True, exist_ok=True)
        for d in (self.mail_root, self.root / "index", self.root / "home"):
            give_to_nobody(d)
        self.conf.touch(mode=0o600)
        self.conf.write_text(self.config_text())

    @staticmethod
    def _pick_ports(roles: list[str]) -> dict[str, int]:
        from tests.support.programs import free_ports

        return dict(zip(roles, free_ports(len(roles)), strict=True))

    def start(self, timeout: float = 30.0) -> Dovecot:
        """Start Dovecot and wait for every listener's greeting. A port another process took
        between picking and binding ("Address already in use") is picked again, up to 5 times.
        AssertionError: it did not start (its stderr and log)."""
        for attempt in range(5):
            try:
                return self._start_once(timeout)
            except AssertionError as exc:
                if attempt == 4 or "already in use" not in str(exc):
                    raise
                self.ports = self._pick_ports(list(self.ports))
        return self

    def _start_once(self, timeout: float) -> Dovecot:
        from tests.support.programs import require_program

        exe = require_program("dovecot", "/usr/sbin/dovecot")
        self.write_config()
        self.proc = subprocess.Popen([exe, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        waiting = dict(self.ports)
        while waiting:
            for role, port in list(waiting.items()):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        expected = _GREETING.get(role)
                        if expected is None or s.recv(100).startswith(expected):
                            del waiting[role]
                except OSError:
                    pass
            if not waiting:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop()
                raise AssertionError(f"dovecot did not start: {err}\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DovecotPop3(Dovecot):
    """Dovecot POP3 with plain-text and SCRAM-SHA-256 log-ins (the SCRAM comparison)."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        super().__init__(root, users, protocols=("pop3",), mechanisms=("plain", "scram-sha-256"))
