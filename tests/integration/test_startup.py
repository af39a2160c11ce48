"""Start-up against the real installed twistd (issue 11, faults 16 and 17).

- Any failure after the first listener is bound (a port taken, a shared table that cannot be
  created, a worker process that does not start) ends the whole server: one line naming what
  failed, exit status non-zero, pid file removed, nothing left serving; daemonised, twistd's
  parent process exits non-zero with that line too.
- A second server on a state folder that a live one holds is refused, naming the live one's
  pid; the live one's files (``listeners.json``, ``run/*.table``) are untouched and it keeps
  serving with shared limits. A lock left by a process killed with -9 does not block.

Ports are taken by a socket the test binds on port 0; every other listener uses port 0.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin, twistd_path
from tests.support.smarthost import wait_until

pytestmark = pytest.mark.integration

USER = f"ann@{HOSTNAME}"
PASSWORD = "start-up pass 1"
ANY_PORT = '["tcp:0:interface=127.0.0.1"]'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _taken_port() -> tuple[socket.socket, int]:
    """A loopback port held (listening) by this test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    return s, s.getsockname()[1]


def _set_listener(srv: ServerProcess, section: str, key: str, port: int) -> str:
    """Point ``[section] key`` of the written config at ``port``; return the description."""
    desc = f"tcp:{port}:interface=127.0.0.1"
    text = srv.config_path.read_text()
    pattern = rf"(\[{section}\]\n(?:.*\n)*?[ \t]*){key} = {re.escape(ANY_PORT)}"
    new, n = re.subn(pattern, rf'\g<1>{key} = ["{desc}"]', text, count=1)
    assert n == 1, f"no {section}.{key} in the test config"
    srv.config_path.write_text(new)
    return desc


def _twistd(srv: ServerProcess, *, daemon: bool = False, name: str = "second",
            env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run twistd on ``srv``'s config with its own log and pid files; wait for it to end."""
    args = [twistd_path(), "--logfile", str(srv.root / f"{name}.log"),
            "--pidfile", str(srv.root / f"{name}.pid"), "pop3coexist", "-c", str(srv.config_path)]
    if not daemon:
        args.insert(1, "-n")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=env or srv.env(), cwd=srv.root)


def _lock_is_free(state_dir: Path) -> bool:
    """True once no process holds the state folder's lock (the server process has ended)."""
    from pop3coexist.startup import StateInUse, StateLock

    try:
        StateLock.acquire(state_dir).release()
        return True
    except StateInUse:
        return False


def _assert_refused(srv: ServerProcess, out: subprocess.CompletedProcess, line: str,
                    name: str = "second") -> None:
    """Exit status non-zero, ``line`` on the terminal and in the log, no traceback, pid file
    gone, no listeners.json, and the process has ended (its lock is free)."""
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert line in text
    log = (srv.root / f"{name}.log").read_text()
    assert f"cannot start: {line}" in log
    assert "Traceback" not in text + log
    assert "Server Shut Down." in log
    assert not (srv.root / f"{name}.pid").exists()
    assert not (srv.state_dir / "run" / "listeners.json").exists()
    assert _lock_is_free(srv.state_dir)


@pytest.mark.parametrize("section,key,role", [
    ("pop3", "listen", "pop3"),        # the first listener
    ("smtp", "listen", "smtp"),        # after POP3 and POP3S are bound
    ("smtp", "tls_listen", "smtps"),   # the last listener
])
def test_a_taken_port_refuses_to_start(tmp_path: Path, section: str, key: str,
                                       role: str) -> None:
    """Whichever listener's port is taken, twistd -n ends at once with exit status non-zero
    and one line naming the listener and the reason; nothing keeps serving."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path)
    srv.write_config()
    blocker, port = _taken_port()
    try:
        desc = _set_listener(srv, section, key, port)
        out = _twistd(srv)
        _assert_refused(srv, out, f"cannot listen on {desc} ({role}): Address already in use")
    finally:
        blocker.close()


def test_a_taken_port_refuses_to_start_daemonised(tmp_path: Path) -> None:
    """Without -n: twistd's parent process exits non-zero naming the listener, the daemon
    ends, and its pid file goes."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False)
    srv.write_config()
    blocker, port = _taken_port()
    try:
        desc = _set_listener(srv, "smtp", "submission_listen", port)
        out = _twistd(srv, daemon=True)
        assert out.returncode != 0
        assert f"cannot listen on {desc} (submission)" in out.stdout + out.stderr
        wait_until(lambda: _lock_is_free(srv.state_dir), timeout=30, what="the daemon to end")
        log = (srv.root / "second.log").read_text()
        assert f"cannot start: cannot listen on {desc} (submission): Address already in use" in log
        assert not (srv.root / "second.pid").exists()
    finally:
        blocker.close()


def test_a_shared_table_that_cannot_be_created_refuses_to_start(tmp_path: Path) -> None:
    """workers = 2 with ``run/connections-pop3.table`` a folder (the state cannot be written):
    the server ends non-zero naming the table file, the config line and the key, now before
    any listener is bound (the state folder is checked first; a table that fails after the
    bind is tests/unit/test_startup.py::test_shared_table_failure_names_the_file), and nothing
    is left running."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path, tls=False, server_config="workers = 2")
    srv.write_config()
    table = srv.state_dir / "run" / "connections-pop3.table"
    table.mkdir(parents=True)
    out = _twistd(srv)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert (f"{srv.config_path}:3: [server.state_dir] {table.resolve()} is a folder where the "
            "server writes a file; move it away") in text
    assert "Traceback" not in text
    assert not (srv.root / "second.pid").exists()
    assert _lock_is_free(srv.state_dir)


def test_a_worker_that_cannot_start_refuses_to_start(tmp_path: Path) -> None:
    """workers = 3 where worker 2 exits at once (a sitecustomize makes it): the server ends
    non-zero naming the worker and its exit status, worker 1 (which did start) ends too,
    and no process ever served."""
    require_installed_plugin()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""\
        import os, sys
        argv = sys.orig_argv
        if "pop3coexist.worker" in argv and argv[argv.index("--worker") + 1] == "2":
            os._exit(3)
        """))
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 3")
    srv.write_config()
    env = {**srv.env(), "PYTHONPATH": str(hook)}
    out = _twistd(srv, env=env)
    log = (srv.root / "second.log").read_text()
    assert re.search(r"the worker processes did not start: worker 2 \(pid \d+\) ended with "
                     r"exit status 3 before it listened", out.stdout + out.stderr), out.stderr
    _assert_refused(srv, out, "the worker processes did not start: worker 2")
    started = [int(p) for p in re.findall(r"worker 1 \(pid (\d+)\) serving", log)]
    for pid in started:
        wait_until(lambda pid=pid: not _alive(pid), timeout=30, what="worker 1 to end")
    assert "starting a new one" not in log


# ------------------------------------------------------------------ a second instance


def _run_files(state_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    """listeners.json and run/*.table: (inode, mtime in ns, content) of each."""
    run = state_dir / "run"
    out = {}
    for path in [run / "listeners.json", *sorted(run.glob("*.table"))]:
        st = path.stat()
        out[path.name] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out


@pytest.mark.parametrize("daemon", [False, True])
def test_a_second_server_on_a_live_state_dir_is_refused(tmp_path: Path, daemon: bool) -> None:
    """A second twistd on the same config (own pid and log files) is refused naming the live
    server's pid; listeners.json and every run/*.table are identical before and after; the
    live server still serves, and its two processes still share the per-client limit."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2",
                        pop3_config="max_connections_per_client = 2")
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    with srv:
        assert srv.proc is not None
        before = _run_files(srv.state_dir)
        assert set(before) >= {"listeners.json", "connections-pop3.table",
                               "auth-failures-pop3.table"}
        out = _twistd(srv, daemon=daemon)
        text = out.stdout + out.stderr
        assert out.returncode != 0
        assert f"is in use by another running pop3coexist server (pid {srv.proc.pid};" in text
        assert "Traceback" not in text
        assert _run_files(srv.state_dir) == before
        assert not (srv.root / "second.pid").exists()
        assert srv.proc.poll() is None
        _, worker = json.loads((srv.state_dir / "run" / "listeners.json").read_text())["workers"]
        # the worker's sessions and the main process's count in the same table
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            held = [poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)]
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        os.kill(worker, signal.SIGSTOP)
        try:
            held.append(poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20))
        finally:
            os.kill(worker, signal.SIGCONT)
        pids = {int(p.getwelcome().split(b"<")[1].split(b".")[0]) for p in held}
        assert pids == {srv.proc.pid, worker}
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
        held[0].user(USER)
        held[0].pass_(PASSWORD)
        for p in held:
            p.quit()


def test_another_config_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """A second config file naming the same state_dir by another path (absolute, through a
    symlink) is refused too: the lock is on the folder, not on the config."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False)
    srv.write_config()
    with srv:
        assert srv.proc is not None
        before = _run_files(srv.state_dir)
        link = tmp_path / "same-state"
        link.symlink_to(srv.state_dir)
        other = tmp_path / "other.toml"
        other.write_text(textwrap.dedent(f"""\
            [server]
            hostname = "{HOSTNAME}"
            state_dir = "{link}"
            [pop3]
            listen = {ANY_PORT}
            [smtp]
            listen = {ANY_PORT}
            [domains]
            local = ["{HOSTNAME}"]
            """))
        out = subprocess.run([twistd_path(), "-n", "--pidfile", "", "pop3coexist", "-c",
                              str(other)], capture_output=True, text=True, timeout=120,
                             env=srv.env(), cwd=tmp_path)
        assert out.returncode != 0
        assert f"(pid {srv.proc.pid};" in out.stdout + out.stderr
        assert _run_files(srv.state_dir) == before
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
        p.quit()


def test_a_lock_left_by_kill_9_does_not_block(tmp_path: Path) -> None:
    """kill -9 of a running server (with a worker) leaves its lock file behind with its pid;
    the next start on the same state_dir succeeds and serves."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False, server_config="workers = 2")
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    srv.start()
    try:
        assert srv.proc is not None
        old = srv.proc.pid
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
        assert (srv.state_dir / "run" / "server.lock").read_text().strip() == str(old)
        srv.stop()
        srv.start()
        assert srv.proc is not None and srv.proc.pid != old
        assert (srv.state_dir / "run" / "server.lock").read_text().strip() == str(srv.proc.pid)
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
        p.user(USER)
        p.pass_(PASSWORD)
        p.quit()
    finally:
        srv.stop()


def test_admin_verbs_work_while_the_server_runs(tmp_path: Path) -> None:
    """The lock is for a second server only: pop3coexist-admin adds a mailbox and reads the
    state while the server holds the lock, and the server serves it at once."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path / "srv", tls=False)
    srv.write_config()
    with srv:
        srv.add_mailbox(USER, PASSWORD)
        assert USER in srv.admin("mailbox", "list").stdout
        p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
        p.user(USER)
        p.pass_(PASSWORD)
        p.quit()


assert sys.version_info >= (3, 10)  # sys.orig_argv, used by the worker hook above
