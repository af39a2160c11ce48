"""A throw-away Dovecot POP3 server for comparison tests (the reference SASL implementation).

``DovecotPop3(root, users)`` writes a private dovecot.conf (pop3 only, on an OS-picked
loopback port, no TLS, plain-text and SCRAM-SHA-256 log-ins), a passwd-file whose entries are
given as Dovecot password strings (``{SCRAM-SHA-256}4096,<salt>,<StoredKey>,<ServerKey>``:
salted keys, never the password), and empty Maildirs. Dovecot must run as root (it drops to
``nobody`` for the mail, so ``root`` must be a folder ``nobody`` can reach: ``make_root()``
gives one outside pytest's private temporary folder); ``start()`` waits for the port with a
deadline. The passwd-file (mode 0600) is read by Dovecot's auth process, run as root here.
"""

from __future__ import annotations

import pwd
import socket
import subprocess
import time
from pathlib import Path

from tests.support.programs import free_port, require_program


def dovecot_scram_entry(salt: bytes, iterations: int, stored_key: bytes, server_key: bytes) -> str:
    """Dovecot's SCRAM-SHA-256 password string (src/auth/password-scheme-scram.c)."""
    import base64

    def b(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"{{SCRAM-SHA-256}}{iterations},{b(salt)},{b(stored_key)},{b(server_key)}"


def make_root() -> Path:
    """A fresh folder under the system's temporary folder that Dovecot's unprivileged
    processes can reach (pytest's own are private to root); the caller removes it."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pop3coexist-dovecot-"))
    root.chmod(0o755)
    return root


class DovecotPop3:
    """A private Dovecot POP3 instance; see the module docstring."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        self.root = Path(root)
        self.users = users  # address -> Dovecot password string
        self.port = free_port()
        self.conf = self.root / "dovecot.conf"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        nobody = pwd.getpwnam("nobody")
        for d in ("run", "state", "mail"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        passwd = self.root / "passwd"
        passwd.write_text("".join(f"{u}:{p}::::::\n" for u, p in self.users.items()))
        passwd.chmod(0o600)
        mail = self.root / "mail"
        for user in self.users:
            local, _, domain = user.partition("@")
            for sub in ("tmp", "new", "cur"):
                (mail / domain / local / sub).mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(mail)], check=True)
        self.conf.write_text(f"""base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
protocols = pop3
listen = 127.0.0.1
log_path = {self.root / "dovecot.log"}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain scram-sha-256
first_valid_uid = 1
mail_location = maildir:{mail}/%d/%n
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={self.root}/home/%d/%n
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service auth {{
  user = root
}}
service auth-worker {{
  user = root
}}
""")

    def start(self, timeout: float = 30.0) -> DovecotPop3:
        exe = require_program("dovecot", "/usr/sbin/dovecot")
        self.write_config()
        self.proc = subprocess.Popen([exe, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop()
                raise AssertionError(f"dovecot did not start: {err}\n{self.log()}")
            time.sleep(0.1)

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

    def __enter__(self) -> DovecotPop3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
