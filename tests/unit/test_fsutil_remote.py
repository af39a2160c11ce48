"""The reactor thread's "never waits for the disk" paths (``fsutil.open_cached``,
``stat_cached``, ``missing_cached``) stay off on network and FUSE file systems, where an open or
an fstat of a cached path can still wait for a server or a daemon (GlusterFS, NFS), and on a
root that reaches such a mount through a symlink; local paths keep them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3coexist import fsutil

pytestmark = pytest.mark.skipif(
    fsutil.stat_cached("/") is None, reason="this kernel has no openat2 RESOLVE_CACHED")


def _mountinfo(local: Path, remote: Path, kind: str) -> str:
    return (f"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            f"30 22 8:2 / {local} rw shared:2 - xfs /dev/sdb1 rw\n"
            f"31 22 0:50 / {remote} rw,relatime shared:3 - {kind} server:/vol rw\n")


@pytest.fixture
def mounts() -> Iterator[None]:
    saved_prefixes, saved_roots = fsutil._remote_prefixes, set(fsutil._noted_roots)
    yield
    fsutil._remote_prefixes = saved_prefixes
    fsutil._noted_roots.clear()
    fsutil._noted_roots.update(saved_roots)


@pytest.mark.parametrize("kind", ["fuse.glusterfs", "nfs4", "nfs", "cifs", "fuse.sshfs",
                                  "virtiofs", "ceph", "9p"])
def test_cached_paths_answer_nothing_on_remote_file_systems(tmp_path: Path, kind: str,
                                                            mounts: None) -> None:
    """Under a mount of a network or FUSE type the cached open, stat and missing check all say
    "ask off the reactor" (None, None, False) although the kernel has the paths cached; a file
    on a local mount beside it still opens from the cache."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    for d in (local, remote):
        d.mkdir()
        (d / "msg").write_bytes(b"x")
        os.stat(d / "msg")  # into the dentry cache
    fsutil.refresh_mounts(mountinfo=_mountinfo(local, remote, kind))
    assert fsutil.open_cached(remote / "msg") is None
    assert fsutil.stat_cached(remote / "msg") is None
    assert fsutil.missing_cached(remote / "gone") is False
    assert fsutil.stat_cached(remote) is None  # the mount point itself
    fd = fsutil.open_cached(local / "msg")
    assert fd is not None
    os.close(fd)
    assert fsutil.stat_cached(local / "msg") is not None


def test_a_root_that_reaches_a_remote_mount_through_a_symlink_is_off_by_its_own_name(
        tmp_path: Path, mounts: None) -> None:
    """A mail root configured as a symlink into a GlusterFS mount is matched by the name the
    config gives (the paths the store builds) as well as the mount's own; ``refresh_mounts``
    says a noted root is remote."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    (remote / "mail").mkdir(parents=True)
    (remote / "mail" / "msg").write_bytes(b"x")
    link = local / "mailroot"
    link.symlink_to(remote / "mail")
    info = _mountinfo(local, remote, "fuse.glusterfs")
    assert fsutil.refresh_mounts([link], mountinfo=info) is True
    assert fsutil.open_cached(link / "msg") is None
    assert fsutil.stat_cached(f"{link}/msg") is None


def test_local_roots_keep_the_cached_paths(tmp_path: Path, mounts: None) -> None:
    """On local file systems alone nothing is switched off and no root is reported remote; a
    name that only starts like a remote mount point ("/mnt/vol2" beside "/mnt/vol") is local."""
    local, remote = tmp_path / "vol2", tmp_path / "vol"
    local.mkdir()
    (local / "msg").write_bytes(b"x")
    os.stat(local / "msg")
    info = _mountinfo(local, remote, "nfs4")
    assert fsutil.refresh_mounts([local], mountinfo=info) is False
    fd = fsutil.open_cached(local / "msg")
    assert fd is not None
    os.close(fd)


def test_cached_look_ups_take_str_bytes_and_path_alike(tmp_path: Path) -> None:
    """``stat_cached`` and ``missing_cached`` answer the same for a str (encoded directly, as
    RCPT's look-up passes it), bytes and a Path, a name outside UTF-8 (surrogate-escaped)
    included; a missing name is a cached miss, never a stat."""
    odd = os.fsdecode(b"caf\xe9")  # not UTF-8: a lone surrogate in the str
    for name in ("plain", odd):
        f = tmp_path / name
        f.write_bytes(b"x")
        os.stat(f)  # into the cache
        forms = (str(f), os.fsencode(f), f)
        inodes = {fsutil.stat_cached(p).st_ino for p in forms}  # type: ignore[union-attr]
        assert inodes == {os.stat(f).st_ino}
        assert not any(fsutil.missing_cached(p) for p in forms)
        gone = tmp_path / f"{name}-gone"
        with pytest.raises(FileNotFoundError):
            os.stat(gone)  # a negative entry in the cache
        assert all(fsutil.missing_cached(p) for p in (str(gone), os.fsencode(gone), gone))


def test_bytes_names_work_beside_a_noted_remote_root(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """With a remote mount noted (prefixes in force), a cached look-up by bytes name answers
    as by str: it is compared decoded (a bytes name used to raise TypeError against the str
    prefixes, seen when another test in the same process had noted a remote root)."""
    monkeypatch.setattr(fsutil, "_remote_prefixes", ("/nowhere-remote/",))
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    os.stat(f)
    assert fsutil.stat_cached(os.fsencode(f)).st_ino == os.stat(f).st_ino  # type: ignore[union-attr]
    assert fsutil.stat_cached(b"/nowhere-remote/x") is None  # remote: never the cache
