"""The shipped systemd units and logrotate snippet (README "Running under systemd").

``systemd-analyze verify`` checks etc/systemd/*.service and *.socket in a scratch root (the
units' own paths, /opt/pop3coexist/bin/twistd, exist there as stand-ins), and the real server
runs under ``systemd-socket-activate`` with the sockets the shipped .socket files define
(their FileDescriptorName= and order; loopback ports the OS picks instead of 110, 995, 25,
587, 465) and the listener lines of the shipped etc/systemd/pop3coexist.toml.
"""

from __future__ import annotations

import configparser
import imaplib
import json
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.support.privilege import system_user
from tests.support.programs import require_program
from tests.support.server import HOSTNAME, twistd_path
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "etc" / "systemd"
PASSWORD = "Systemd-pw-1"
# the config key of each listener role, as in etc/systemd/pop3coexist.toml
ROLE_KEYS = {"pop3": ("pop3", "listen"), "pop3s": ("pop3", "tls_listen"),
             "smtp": ("smtp", "listen"), "submission": ("smtp", "submission_listen"),
             "smtps": ("smtp", "tls_listen"), "imap": ("imap", "listen"),
             "imaps": ("imap", "tls_listen")}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path) -> None:
    """systemd-analyze verify accepts the service and every socket unit without a single
    warning; the service is hardened (a dedicated user, NoNewPrivileges, ProtectSystem=strict
    with the state as its only writable path, PrivateTmp) and reloads with SIGHUP."""
    analyze = require_program("systemd-analyze")
    root = tmp_path / "root"
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    for path in sorted(UNITS.glob("pop3coexist*.s*")):
        if path.suffix in (".service", ".socket"):
            shutil.copy(path, system / path.name)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    service = unit(UNITS / "pop3coexist.service")["Service"]
    for command in (service["ExecStart"], service["ExecReload"]):
        program = root / command.split()[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    units = sorted(str(p) for p in system.iterdir())
    assert len(units) == 8
    result = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", *units],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr

    assert service["User"] == "pop3coexist" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "yes"
    assert service["ReadWritePaths"] == "/var/lib/pop3coexist" == \
        "/var/lib/" + service["StateDirectory"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    shipped = tomllib.loads((UNITS / "pop3coexist.toml").read_text())
    assert shipped["server"]["state_dir"] == service["ReadWritePaths"]


def shipped_sockets() -> list[tuple[str, str]]:
    """(FileDescriptorName, ListenStream) of each shipped socket unit, in the service's
    Requires= order."""
    required = unit(UNITS / "pop3coexist.service")["Unit"]["Requires"].split()
    out = []
    for name in required:
        sock = unit(UNITS / name)["Socket"]
        assert sock["Service"] == "pop3coexist.service"
        out.append((sock["FileDescriptorName"], sock["ListenStream"]))
    return out


def free_v6_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def test_server_runs_under_systemd_socket_activate(tmp_path) -> None:
    """The server started by systemd-socket-activate with the shipped socket definitions
    adopts every socket by name (listeners.json names the ports passed), serves POP3, POP3S,
    SMTP, submission, SMTPS, IMAP and IMAPS on them, keeps serving after SIGHUP (ExecReload), and stops
    cleanly on SIGTERM."""
    activate = require_program("systemd-socket-activate")
    sockets = shipped_sockets()
    assert sorted(name for name, _ in sockets) == sorted(ROLE_KEYS)
    assert {name: port for name, port in sockets} == {
        "pop3": "110", "pop3s": "995", "smtp": "25", "submission": "587", "smtps": "465",
        "imap": "143", "imaps": "993"}
    shipped = tomllib.loads((UNITS / "pop3coexist.toml").read_text())
    srv = make_server(tmp_path, tls=True)
    srv.write_config()
    srv.add_mailbox(f"ted@{HOSTNAME}", PASSWORD)
    text = srv.config_path.read_text()
    for role, (section, key) in ROLE_KEYS.items():  # the shipped listener lines, verbatim
        line = f'{key} = ["tcp:0:interface=127.0.0.1"]'
        start = text.index(f"[{section}]")
        at = text.index(line, start)
        shipped_value = json.dumps(shipped[section][key])
        text = text[:at] + f"{key} = {shipped_value}" + text[at + len(line):]
        assert shipped[section][key] == [f"systemd:domain=INET6:name={role}"]
    srv.config_path.write_text(text)
    ports = {name: free_v6_port() for name, _ in sockets}
    env = srv.env()
    command = [activate]
    for name, _ in sockets:
        command += ["-l", f"[::1]:{ports[name]}"]
    command.append("--fdname=" + ":".join(name for name, _ in sockets))
    for key in ("PYTHONPATH", "HOME", "LANG", "VIRTUAL_ENV"):
        if key in env:
            command += ["-E", f"{key}={env[key]}"]
    command += [twistd_path(), "--nodaemon", "--pidfile=", "--logfile", str(srv.log_path),
                "pop3coexist", "--config", str(srv.config_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=tmp_path)
    try:
        # like a socket unit, systemd-socket-activate starts the service on the first client
        deadline = time.monotonic() + 30
        while True:  # until systemd-socket-activate listens
            try:
                first = socket.create_connection(("::1", ports["pop3"]), timeout=60)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "not listening"
                time.sleep(0.02)
        listeners = srv.state_dir / "run" / "listeners.json"
        deadline = time.monotonic() + 90
        while not listeners.exists():
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace") + srv.log_tail()
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.05)
        assert first.recv(100).startswith(b"+OK")  # the client that woke it is served
        first.close()
        record = json.loads(listeners.read_text())["listeners"]
        assert record == {name: [port] for name, port in ports.items()}
        context = ssl.create_default_context(cafile=str(srv.certs.ca_cert))
        context.check_hostname = False

        def check() -> None:
            p = poplib.POP3("::1", ports["pop3"], timeout=30)
            p.user(f"ted@{HOSTNAME}")
            p.pass_(PASSWORD)
            p.quit()
            poplib.POP3_SSL("::1", ports["pop3s"], context=context, timeout=30).quit()
            for name in ("smtp", "submission"):
                with smtplib.SMTP("::1", ports[name], timeout=30) as s:
                    assert s.ehlo()[0] == 250
            with smtplib.SMTP_SSL("::1", ports["smtps"], context=context, timeout=30) as s:
                assert s.ehlo()[0] == 250
            with imaplib.IMAP4("::1", ports["imap"], timeout=30) as m:
                m.login(f"ted@{HOSTNAME}", PASSWORD)
            with imaplib.IMAP4_SSL("::1", ports["imaps"], ssl_context=context, timeout=30) as m:
                m.login(f"ted@{HOSTNAME}", PASSWORD)
            with smtplib.SMTP("::1", ports["smtp"], timeout=30) as s:
                s.sendmail("a@example.test", [f"ted@{HOSTNAME}"], b"Subject: hi\r\n\r\nhi\r\n")

        check()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "SIGHUP" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.05)
        check()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        proc.stdout.close()
    assert code in (0, -signal.SIGTERM), srv.log_tail()
    assert "Traceback" not in srv.log_text()
    assert PASSWORD not in srv.log_text()


def test_logrotate_snippet_parses(tmp_path) -> None:
    """logrotate reads etc/logrotate.d/pop3coexist without an error (debug mode: nothing is
    rotated; the test's system user stands in for the user pop3coexist) and it names the log
    file the README's production story uses."""
    logrotate = require_program("logrotate", "/usr/sbin/logrotate")
    snippet = ROOT / "etc" / "logrotate.d" / "pop3coexist"
    user = system_user()
    copy = tmp_path / "pop3coexist"
    copy.write_text(snippet.read_text().replace("pop3coexist pop3coexist",
                                                f"{user.name} {user.name}"))
    result = subprocess.run([logrotate, "--debug", "--state", str(tmp_path / "state"),
                             str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    assert "/var/log/pop3coexist/pop3coexist.log" in snippet.read_text()
