"""Real content scanners for the integration tier, started on loopback in a temporary folder:
ClamAV (``clamd`` + ``clamav-milter``, Debian packages clamav-daemon and clamav-milter) and
rspamd (its proxy worker in milter mode, self-scan). No network and no freshclam: ClamAV gets
a signature database written here (one ``.ndb`` signature for ``VIRUS_MARKER``); rspamd gets
a small config over Debian's (DNS pointed at a closed loopback port, the network modules off,
a short TLD list so that it starts in seconds).

Every process is started by its path with its own config, and stopped by its own pid. Start-up
is polled with a deadline (clamd loads its database in a few seconds; rspamd compiles its
rules). A missing program skips the test (fails it in CI), as ``programs.require_program``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.programs import free_port, free_ports, require_program

VIRUS_MARKER = "POP3COEXIST-TEST-VIRUS-MARKER-6d2f9a41"
SIGNATURE = "Pop3coexist.Test.Marker"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _wait(check, what: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``check()`` until true; fail with the program's log when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start within {timeout:g} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class ClamAV:
    """clamd on a UNIX socket, and clamav-milter processes on loopback TCP ports that use it
    (``milter(...)`` starts one and gives its address for ``[[milter]] socket``)."""

    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    clamd_socket: Path | None = None
    _milters: int = 0

    def start(self) -> ClamAV:
        clamd = require_program("clamd", "/usr/sbin/clamd")
        require_program("clamav-milter", "/usr/sbin/clamav-milter")
        root = self.root
        (root / "db").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        # a body-based signature (target type 0: any file) for the marker string
        (root / "db" / "pop3coexist-test.ndb").write_text(
            f"{SIGNATURE}:0:*:{VIRUS_MARKER.encode().hex()}\n")
        sock = self.clamd_socket = root / "clamd.sock"
        (root / "clamd.conf").write_text(
            f"LocalSocket {sock}\nDatabaseDirectory {root / 'db'}\n"
            f"TemporaryDirectory {root / 'tmp'}\nForeground yes\nLogFile {root / 'clamd.log'}\n"
            "LogTime yes\nStreamMaxLength 20M\nMaxFileSize 20M\nMaxScanSize 20M\n")
        self.procs.append(subprocess.Popen([clamd, "-c", str(root / "clamd.conf")],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(sock.exists, "clamd", self.procs[-1], root / "clamd.log", 90)
        return self

    def milter(self, on_infected: str = "Reject", max_file_size: str = "100K",
               port: int = 0) -> str:
        """Start a clamav-milter (OnInfected ``on_infected``: Reject, Quarantine or Blackhole;
        MaxFileSize ``max_file_size``: bigger messages are not scanned and are accepted) on
        ``port`` (0: one the OS picks); its ``inet:127.0.0.1:PORT``."""
        milter = require_program("clamav-milter", "/usr/sbin/clamav-milter")
        self._milters += 1
        port = port or free_port()
        conf = self.root / f"clamav-milter-{self._milters}.conf"
        log = self.root / f"clamav-milter-{self._milters}.log"
        conf.write_text(
            f"MilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{self.clamd_socket}\n"
            f"Foreground yes\nOnInfected {on_infected}\nOnFail Defer\n"
            f"MaxFileSize {max_file_size}\nAddHeader Replace\nRejectMsg \"Virus found: %v\"\n"
            f"LogFile {log}\nLogInfected Full\nLogClean Basic\n")
        self.procs.append(subprocess.Popen([milter, "-c", str(conf)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: _listening(port), "clamav-milter", self.procs[-1], log, 60)
        return f"inet:127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()


@dataclass
class Rspamd:
    """rspamd with its proxy worker in milter mode (``self_scan``) on a loopback port."""

    root: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> Rspamd:
        rspamd = require_program("rspamd", "/usr/bin/rspamd")
        root = self.root
        local = root / "local"
        for d in (local / "local.d", local / "override.d", root / "run", root / "db", root / "log"):
            d.mkdir(parents=True, exist_ok=True)
        self.port, normal, controller = free_ports(3)
        (root / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
        (local / "override.d" / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\ntimeout = 60s;\ncount = 1;\n'
            'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n')
        (local / "override.d" / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n')
        (local / "override.d" / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n')
        (local / "override.d" / "logging.inc").write_text(
            f'type = "file";\nfilename = "{root / "log" / "rspamd.log"}";\nlevel = "info";\n')
        (local / "local.d" / "options.inc").write_text(
            'dns {\n  nameserver = ["127.0.0.1:1"];\n  timeout = 0.2s;\n  retransmits = 1;\n}\n'
            f'url_tld = "{root / "tld.dat"}";\n')
        (local / "local.d" / "milter_headers.conf").write_text(
            'use = ["authentication-results", "x-spam-status"];\n'
            "skip_local = false;\nskip_authenticated = false;\n")
        for module in ("rbl", "surbl", "fuzzy_check", "asn", "rspamd_update", "dcc",
                       "url_redirector", "reputation", "ratelimit", "neural", "phishing"):
            (local / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        log = root / "log" / "rspamd.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [rspamd, "-f", "--insecure", "-c", "/etc/rspamd/rspamd.conf",
             "--var", f"LOCAL_CONFDIR={local}", "--var", f"RUNDIR={root / 'run'}",
             "--var", f"DBDIR={root / 'db'}", "--var", f"LOGDIR={root / 'log'}"],
            stdout=(root / "rspamd.out").open("wb"), stderr=subprocess.STDOUT, env=env)
        _wait(lambda: _listening(self.port), "rspamd", self.proc, log, 240)
        return self

    def log(self) -> str:
        return _tail(self.root / "log" / "rspamd.log", 200)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
