"""A dedicated system user for the tests that check privileges and file ownership.

The test machines run the suite as root. ``system_user()`` makes (once) the system user
``pop3ctest`` with ``useradd --system`` when it is missing, as an administrator would make the
mail user; off root the tests that need it skip (fail in CI). ``shared_dir()`` is a temporary
folder the user can reach (pytest's own temporary folders are private to root).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.programs import in_ci, require_program

USER = "pop3ctest"


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int


def system_user() -> SystemUser:
    """The test's mail user, made with ``useradd --system`` if missing (needs root)."""
    if os.geteuid() != 0:
        message = "privilege tests need root (to make a system user and switch to it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        useradd = require_program("useradd", "/usr/sbin/useradd")
        made = subprocess.run([useradd, "--system", "--user-group", "--no-create-home",
                               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                               USER], capture_output=True, timeout=60)
        try:  # exit 9: another test process made it a moment ago, which is as good
            entry = pwd.getpwnam(USER)
        except KeyError:
            raise AssertionError(f"useradd {USER} failed ({made.returncode}): "
                                 f"{made.stderr.decode(errors='replace')}") from None
    grp.getgrgid(entry.pw_gid)
    return SystemUser(USER, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A new folder under the system temporary folder that every user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def foreign_owned(root: Path, uid: int) -> list[str]:
    """Every path under ``root`` (itself included) not owned by ``uid``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name != "." else dirpath
            try:
                if os.lstat(path).st_uid != uid:
                    out.append(path)
            except FileNotFoundError:
                continue
    return sorted(set(out))


def user_python(user: SystemUser) -> tuple[str, dict[str, str]]:
    """A Python interpreter ``user`` can run, and the environment that gives it this
    installation's packages. The test machines' Python may live under root's private home
    (pyenv in /root): then a system Python of the same version runs with ``PYTHONPATH`` naming
    this environment's site-packages (the compiled extensions share the CPython ABI)."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = [sys.executable, "-c", "import pop3coexist, twisted"]
    try:
        ok = subprocess.run(probe, user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                            capture_output=True, timeout=60, env=env).returncode == 0
    except PermissionError:
        ok = False
    if ok:
        return sys.executable, env
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = [p for p in sys.path if p.endswith("site-packages") or "__editable__" in p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.access(candidate, os.X_OK):
            probe[0] = candidate
            if subprocess.run(probe, user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                              capture_output=True, timeout=60, env=env).returncode == 0:
                return candidate, env
    message = (f"no {version} that the user {user.name} can run (this Python, {sys.executable}, "
               "is not reachable for other users)")
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
