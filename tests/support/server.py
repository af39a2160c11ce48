"""Run the real installed server (``twistd -n pop3coexist -c FILE``) for integration tests.

``ServerProcess`` writes a config into a temporary folder (every listener on port 0 on
loopback, test certificates from tests/support/certs.py), prepares domains and mailboxes with
the real ``pop3coexist-admin`` code, starts twistd as a child process, and waits (polling, with
a deadline) until ``<state_dir>/run/listeners.json`` names the ports the OS picked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.certs import CertFiles, make_ca_and_cert
from tests.support.programs import in_ci

HOSTNAME = "pop.contoso.test"


def twistd_path() -> str:
    """The twistd of the Python running the tests (a venv's, when the README's venv is used)."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if not found:
        pytest.fail("twistd not found: install the project first (README, 'Run the tests')")
    return found


def admin_path() -> list[str]:
    """How to run pop3coexist-admin (the console script, or the module as a fallback)."""
    candidate = Path(sys.executable).parent / "pop3coexist-admin"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("pop3coexist-admin")
    return [found] if found else [sys.executable, "-m", "pop3coexist.admin.cli"]


def plugin_installed() -> bool:
    """True when Twisted's plugin discovery sees pop3coexist (a regular install)."""
    out = subprocess.run(
        [twistd_path(), "--help"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    return "pop3coexist" in out.stdout


@dataclass
class ServerProcess:
    """A configured, running pop3coexist; use as a context manager or call start()/stop()."""

    root: Path
    extra_config: str = ""
    tls: bool = True
    local_domains: tuple[str, ...] = (HOSTNAME,)
    method_config: str = '[auth]\nmethod = "passwordfile"\napop = true\n'
    pop3_config: str = ""
    smtp_config: str = ""
    imap_config: str = ""  # more [imap] keys, e.g. "require_secure_auth = true"
    server_config: str = ""  # more [server] keys, e.g. "workers = 2"
    certs: CertFiles | None = None
    ports: dict[str, list[int]] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "etc" / "pop3coexist.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "var"

    @property
    def log_path(self) -> Path:
        return self.root / "twistd.log"

    def port(self, role: str) -> int:
        return self.ports[role][0]

    def write_config(self) -> None:
        etc = self.root / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        tls_section = ""
        pop3_tls = smtp_tls = "[]"
        if self.tls:
            self.certs = make_ca_and_cert(self.root / "certs", hostname="localhost")
            tls_section = f'[tls]\ncertificate = "{self.certs.cert}"\nprivate_key = "{self.certs.key}"\n'
            pop3_tls = smtp_tls = '["tcp:0:interface=127.0.0.1"]'
        domains = ", ".join(f'"{d}"' for d in self.local_domains)
        text = textwrap.dedent(
            f"""\
            [server]
            hostname = "{HOSTNAME}"
            state_dir = "../var"
            {self.server_config}

            [pop3]
            listen = ["tcp:0:interface=127.0.0.1"]
            tls_listen = {pop3_tls}
            auth_failure_delay = "0.05s"
            {self.pop3_config}

            [imap]
            listen = ["tcp:0:interface=127.0.0.1"]
            tls_listen = {pop3_tls}
            auth_failure_delay = "0.05s"
            {self.imap_config}

            [smtp]
            listen = ["tcp:0:interface=127.0.0.1"]
            submission_listen = ["tcp:0:interface=127.0.0.1"]
            tls_listen = {smtp_tls}
            auth_failure_delay = "0.05s"
            {self.smtp_config}

            {tls_section}
            {self.method_config}

            [domains]
            local = [{domains}]

            [relay]
            networks = ["127.0.0.1/32"]
            """
        )
        self.config_path.write_text(text + "\n" + textwrap.dedent(self.extra_config))

    def env(self) -> dict[str, str]:
        """The environment of the server and admin processes: the installed package's."""
        return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def admin_command(self) -> list[str]:
        return admin_path()

    def admin(self, *args: str, password: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the real pop3coexist-admin against this server's config."""
        cmd = [*self.admin_command(), "-c", str(self.config_path), *args]
        if password is not None:
            cmd.append("--password-stdin")
        result = subprocess.run(
            cmd, input=(password + "\n") if password is not None else None,
            capture_output=True, text=True, timeout=120, env=self.env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"admin {args} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def add_mailbox(self, address: str, password: str) -> None:
        self.admin("mailbox", "add", address, password=password)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if not self.config_path.exists():
            self.write_config()
        listeners = self.state_dir / "run" / "listeners.json"
        if listeners.exists():
            listeners.unlink()
        self.proc = subprocess.Popen(
            [
                twistd_path(), "-n", "--logfile", str(self.log_path),
                "--pidfile", str(self.root / "twistd.pid"),
                "pop3coexist", "-c", str(self.config_path),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env(), cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise AssertionError(f"twistd exited with {self.proc.returncode}: {out}\n{self.log_tail()}")
            if listeners.exists():
                try:
                    self.ports = json.loads(listeners.read_text())["listeners"]
                    return self
                except (ValueError, KeyError):
                    pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"server did not start within {timeout}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return code

    def stop_cleanly(self, *secrets: str) -> None:
        """Stop the server and assert what every real-process test expects of its end: a
        clean exit (0 or SIGTERM), no traceback in the log, and none of ``secrets`` in it."""
        code = self.stop()
        assert code in (0, -signal.SIGTERM), f"twistd did not stop cleanly ({code})\n{self.log_tail()}"
        log = self.log_text()
        assert "Traceback" not in log, log[-4000:]
        for secret in secrets:
            assert secret not in log, "a password reached the log"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def require_installed_plugin() -> None:
    """Skip (fail in CI) unless the project is installed so twistd can see the plugin."""
    if not plugin_installed():
        message = "pop3coexist is not installed where twistd can see it: pip install . (README)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
