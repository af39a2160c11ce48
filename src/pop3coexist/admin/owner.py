"""Who ``pop3coexist-admin`` writes state files as (README "Running in production").

The server runs as a dedicated user (``User=`` of the systemd unit, or ``twistd --uid``) and
owns ``state_dir``. An administrator often runs ``pop3coexist-admin`` as root; a file it then
made (a password file, a mailbox, a metadata file) would belong to root with mode 0600, and the
server could not read it (``451 4.4.3`` / ``-ERR [SYS/TEMP]``). So, run as root, the admin
command acts as the owner of ``state_dir`` for everything it does inside it: ``StateOwner``
switches the *effective* user and group ids (``seteuid``/``setegid``, with that user's
supplementary groups) and switches back to root for the few outside files a verb reads or
writes as the invoking user (the backup archive, a Windows mail store to import).

On Linux the switch keeps root's capabilities (``SECBIT_NO_SETUID_FIXUP``): only the owner of
the files made changes, so nothing the command reads (Python's own modules too, when Python
lives in root's private home) becomes unreadable half-way. Elsewhere it is a plain effective
id switch.

Nothing changes when the command does not run as root, when ``state_dir`` does not exist yet,
or when it belongs to root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path


class StateOwner:
    """The ids to act as inside ``state_dir``; a no-op unless root runs the command and the
    folder belongs to another user."""

    def __init__(self, state_dir: Path) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        self.groups: list[int] = []
        self._root_groups: list[int] = []
        self.active = False
        if os.geteuid() != 0:
            return
        try:
            st = os.stat(state_dir)
        except OSError:
            return
        if st.st_uid == 0:
            return
        self.uid, self.gid = st.st_uid, st.st_gid
        try:
            name = pwd.getpwuid(st.st_uid).pw_name
            self.groups = sorted(set(os.getgrouplist(name, st.st_gid)))
        except KeyError:  # a uid without a passwd entry: its folder's group only
            self.groups = [st.st_gid]
        self._root_groups = os.getgroups()

    @property
    def switches(self) -> bool:
        """True when this command acts as another user inside ``state_dir``."""
        return self.uid is not None

    def enter(self) -> None:
        """Act as the owner (effective ids only: ``leave`` or ``as_invoker`` can come back)."""
        if self.uid is None or self.active:
            return
        _keep_capabilities()
        os.setgroups(self.groups)
        os.setegid(self.gid)  # type: ignore[arg-type]
        os.seteuid(self.uid)
        self.active = True

    def leave(self) -> None:
        """Be root again."""
        if not self.active:
            return
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(self._root_groups)
        self.active = False

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """Inside: files are created as (and permissions checked for) the state's owner."""
        was = self.active
        self.enter()
        try:
            yield
        finally:
            if not was:
                self.leave()

    @contextlib.contextmanager
    def as_invoker(self) -> Iterator[None]:
        """Inside: the invoking user's own ids again (root), for a file outside the state."""
        was = self.active
        self.leave()
        try:
            yield
        finally:
            if was:
                self.enter()


_PR_GET_SECUREBITS, _PR_SET_SECUREBITS = 27, 28
_SECBIT_NO_SETUID_FIXUP = 1 << 2


def _keep_capabilities() -> None:
    """Linux: let this process keep its capabilities when its effective uid leaves 0, so the
    switch changes who owns new files and nothing else (best effort; without it the switch is
    a plain seteuid)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        bits = libc.prctl(_PR_GET_SECUREBITS, 0, 0, 0, 0)
        if bits >= 0 and not bits & _SECBIT_NO_SETUID_FIXUP:
            libc.prctl(_PR_SET_SECUREBITS, bits | _SECBIT_NO_SETUID_FIXUP, 0, 0, 0)
    except (OSError, AttributeError):
        return
