"""The peers the benchmark compares against: Postfix (SMTP) and Dovecot (POP3), each a
throw-away instance in a temporary folder on loopback ports the OS picked.

- ``ensure_packages()`` finds ``postfix`` and ``dovecot`` (with its pop3 part), or installs the
  Debian packages ``postfix`` and ``dovecot-pop3d`` when run as root with apt-get (the package
  scripts may start system services: they are stopped again at once, and the instances used
  here never touch /etc or the system's spool).
- ``PostfixInstance(root, domain, mailboxes, relayhost="")``: its own config_directory,
  queue_directory and data_directory under ``root``; one ``smtpd`` on ``127.0.0.1:<port>``; the
  domain delivered to Maildir by the ``virtual`` transport (``virtual_mailbox_base``), with
  Postfix's default durability (cleanup and virtual fsync every file); every other domain
  relayed (from loopback) to ``relayhost`` (``[127.0.0.1]:PORT``). ``start()`` / ``stop()``,
  ``queued()``.
- ``DovecotInstance(root, maildir_root, users, password, imap=False)``: pop3 (and imap) on
  ``127.0.0.1:<port>`` (``port``, ``ports["imap"]``), plain-text log-in allowed on loopback,
  users from a passwd-file, mail in ``maildir_root/<domain>/<user>`` (the same layout
  pop3coexist uses, so one copy of the same Maildir serves both): the one Dovecot template of
  tests/support/dovecot.py. ``start()`` / ``stop()``.
- ``free_port()``: a port the OS says is free now (the peers need a number in their config).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support import programs
from tests.support.dovecot import Dovecot


def free_port() -> int:
    """A loopback TCP port that is free at this moment (never one handed out before)."""
    return programs.free_port()


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _have(program: str, *extra: str) -> bool:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/lib/postfix/sbin") is not None and all(
        Path(p).exists() for p in extra
    )


def ensure_packages() -> dict[str, bool]:
    """Find or install postfix, dovecot-pop3d and dovecot-imapd; return which peers are usable."""
    need = []
    if not _have("postfix") or not _have("smtp-source"):
        need.append("postfix")
    if not _have("dovecot", "/usr/lib/dovecot/pop3"):
        need.append("dovecot-pop3d")
    if not _have("dovecot", "/usr/lib/dovecot/imap"):
        need.append("dovecot-imapd")
    if need and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # no system services from the package scripts (a policy-rc.d that says "no")
        policy = Path("/usr/sbin/policy-rc.d")
        made = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            made = True
        try:
            # postfix asks at install time: no system mail configuration
            subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select "
                           "No configuration\n", text=True, capture_output=True)
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", *need], env=env, capture_output=True,
                           timeout=600)
        finally:
            if made:
                policy.unlink()
    return {
        "postfix": _have("postfix") and _have("smtp-source") and os.geteuid() == 0,
        "dovecot": _have("dovecot", "/usr/lib/dovecot/pop3") and os.geteuid() == 0,
        "dovecot-imap": _have("dovecot", "/usr/lib/dovecot/imap") and os.geteuid() == 0,
    }


def _sbin(program: str) -> str:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin") or program


class PostfixInstance:
    """A private Postfix: see the module docstring."""

    def __init__(self, root: Path, domain: str, mailboxes: list[str],
                 relayhost: str = "") -> None:
        self.root = Path(root)
        self.domain = domain
        self.mailboxes = mailboxes
        self.relayhost = relayhost
        self.port = free_port()
        self.etc = self.root / "etc"
        self.queue = self.root / "spool"
        self.data = self.root / "data"
        self.vmail = self.root / "vmail"
        self.log = self.root / "postfix.log"

    def maildir(self, mailbox: str) -> Path:
        return self.vmail / self.domain / mailbox

    def write_config(self) -> None:
        for d in (self.etc, self.queue, self.data, self.vmail):
            d.mkdir(parents=True, exist_ok=True)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.vmail, nobody.pw_uid, nobody.pw_gid)
        os.chown(self.data, pwd.getpwnam("postfix").pw_uid, -1)
        maps = "".join(f"{m}@{self.domain} {self.domain}/{m}/\n" for m in self.mailboxes)
        (self.etc / "vmailbox").write_text(maps)
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench-postfix.test
mydomain = bench-postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = {self.relayhost}
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_rate_limit = 0
smtpd_client_connection_count_limit = 0
default_process_limit = 200
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
virtual_minimum_uid = 1
virtual_destination_concurrency_limit = 20
maillog_file = {self.log}
maillog_file_prefixes = {self.root}
smtputf8_enable = no
biff = no
"""
        )
        master = Path("/etc/postfix/master.cf").read_text() if Path("/etc/postfix/master.cf").exists() else ""
        lines = []
        for line in master.splitlines():
            if line.startswith("smtp ") and " inet " in line:
                line = f"127.0.0.1:{self.port} inet n - y - - smtpd"
            elif line.startswith(("submission ", "smtps ", "postlog ")):
                continue
            lines.append(line)
        lines.append("postlog unix-dgram n - n - 1 postlogd")
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([_sbin("postfix"), "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=120, check=check)

    def start(self) -> PostfixInstance:
        self.write_config()
        self._postfix("set-permissions", check=False)
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout.strip()} {r.stderr.strip()} {self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}")
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self._postfix("stop", check=False)
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def queued(self) -> int:
        """Messages in Postfix's queue (every queue folder but the bounce/defer logs)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dirpath, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def count(self, mailbox: str) -> int:
        try:
            return len(os.listdir(self.maildir(mailbox) / "new"))
        except FileNotFoundError:
            return 0

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DovecotInstance(Dovecot):
    """A private Dovecot (tests/support/dovecot.py's template): POP3, and IMAP with
    ``imap=True``; see the module docstring."""

    def __init__(self, root: Path, maildir_root: Path, domain: str, users: list[str], password: str,
                 imap: bool = False) -> None:
        super().__init__(root, {f"{u}@{domain}": "{PLAIN}" + password for u in users},
                         protocols=("pop3", "imap") if imap else ("pop3",), mail_root=maildir_root,
                         autocreate=False)
        self.maildir_root = Path(maildir_root)
        self.domain = domain
