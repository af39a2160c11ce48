"""A node of several over one shared state_dir (issue 20, README "Several servers"): the config
split between shared and local state, the node lock, the per-node spool, the health probe,
and the store's answers to a shared volume's faults (link limits, ESTALE). The real volume is
driven by tests/integration/test_cluster.py."""

from __future__ import annotations

import errno
import os
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pop3coexist.config import parse_config
from pop3coexist.errors import ConfigError
from pop3coexist.fsutil import STALE_ATTEMPTS, retry_stale
from pop3coexist.monitor.http import check_volume
from pop3coexist.startup import NodeLock, StateInUse, StateLock, check_state_dir
from pop3coexist.store import maildir as maildir_module
from pop3coexist.store import queue as queue_module
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.queue import FileQueue

DOMAIN = "pop.contoso.test"


def config(tmp_path: Path, server: str = "", extra: str = ""):
    text = textwrap.dedent(f"""\
        [server]
        hostname = "pop.contoso.test"
        state_dir = "shared/state"
        {server}
        """) + textwrap.dedent(extra)
    path = tmp_path / "etc" / "pop3coexist.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return parse_config(text, path)


def config_error(tmp_path: Path, server: str = "", extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, server, extra)
    return str(info.value)


# -- the config: what is shared, what is this node's -------------------------------------------


def test_one_server_alone_keeps_everything_in_state_dir(tmp_path: Path) -> None:
    """Without local_dir nothing changes: run/ is under state_dir, the spool is .spool, and
    the node id is the machine's host name."""
    c = config(tmp_path).server
    assert not c.shared and c.local_dir is None
    assert c.run_dir == c.state_dir / "run" and c.spool_node == ""
    assert c.node and c.node[0].isalnum()


def test_a_node_keeps_its_run_files_in_local_dir(tmp_path: Path) -> None:
    """With local_dir (relative to the config file) run/ moves there; the spool folder and
    the claims are named by node_id."""
    c = config(tmp_path, 'local_dir = "../local"\nnode_id = "mail-1"').server
    assert c.shared and c.local_root == tmp_path / "local"
    assert c.run_dir == tmp_path / "local" / "run"
    assert c.node == "mail-1" and c.spool_node == "mail-1"
    assert c.mailroot == tmp_path / "etc" / "shared" / "state" / "mailroot"


@pytest.mark.parametrize("local", ['"shared/state"', '"shared/state/local"', '"shared"'])
def test_local_dir_inside_or_around_state_dir_is_refused(tmp_path: Path, local: str) -> None:
    """local_dir must not be state_dir, inside it (every node would share its run files) or
    hold it: a config error naming the file, line and key."""
    text = config_error(tmp_path, f"local_dir = {local}")
    assert "[server.local_dir]" in text and "pop3coexist.toml" in text, text


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "a.b", "x" * 64, "bad name", "-x"])
def test_node_id_must_name_a_file(tmp_path: Path, bad: str) -> None:
    """node_id names files on the shared volume: letters, digits, '_', '-' (1-63),
    starting with a letter or digit; "" is the host name."""
    if bad == "":
        assert config(tmp_path, f'node_id = "{bad}"').server.node_id == ""
        return
    assert "[server.node_id]" in config_error(tmp_path, f'node_id = "{bad}"')


def test_claim_lease_has_a_floor(tmp_path: Path) -> None:
    """queue.claim_lease under 20 s is refused (runners renew every 5 s); 30 s is taken."""
    assert "[queue.claim_lease]" in config_error(tmp_path, extra='[queue]\nclaim_lease = "5s"\n')
    assert config(tmp_path, extra='[queue]\nclaim_lease = "30s"\n').queue.claim_lease == 30


def test_check_state_dir_looks_for_run_in_local_dir(tmp_path: Path) -> None:
    """With a local_dir, a file where its run/ should be is named under server.local_dir,
    and state_dir's own run/ is not needed."""
    state, local = tmp_path / "state", tmp_path / "local"
    local.mkdir()
    (local / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"\[server.local_dir\]"):
        check_state_dir(state, local)
    (local / "run").unlink()
    check_state_dir(state, local)
    assert not (state / "run").exists()


# -- the node lock ---------------------------------------------------------------------------


def test_a_node_id_is_held_once(tmp_path: Path) -> None:
    """While a node holds its id on the volume a second one with that id is refused, naming
    the holder's pid and host; another id is free; after release the id can be taken again."""
    first = NodeLock.acquire_node(tmp_path, "mail1")
    try:
        with pytest.raises(StateInUse) as caught:
            NodeLock.acquire_node(tmp_path, "mail1")
        text = str(caught.value)
        assert f"pid {os.getpid()} on " in text and "node_id 'mail1'" in text, text
        NodeLock.acquire_node(tmp_path, "mail2").release()
    finally:
        first.release()
    NodeLock.acquire_node(tmp_path, "mail1").release()
    assert (tmp_path / "nodes" / "mail1.lock").is_file()


def test_the_server_lock_of_a_node_names_local_dir(tmp_path: Path) -> None:
    """A second server on one local_dir is refused naming local_dir."""
    first = StateLock.acquire(tmp_path, "local_dir")
    try:
        with pytest.raises(StateInUse, match="local_dir .* its own local_dir"):
            StateLock.acquire(tmp_path, "local_dir")
    finally:
        first.release()


# -- the spool and the store's answers to the volume's faults ---------------------------------


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mailroot", hostname="mx.test", node="mail1")
    s.check_writable()
    s.add_domain(DOMAIN)
    s.add_mailbox(DOMAIN, "ted")
    s.add_mailbox(DOMAIN, "ann")
    return s


def _spooled(store: MaildirStore, data: bytes) -> Path:
    path = store.spool_dir() / "incoming"
    path.write_bytes(data)
    return path


def test_each_node_spools_in_its_own_folder(store: MaildirStore) -> None:
    """A node's spool is <mailroot>/.spool/<node>: on the volume (links work) and its own."""
    assert store.spool_dir() == store.root / ".spool" / "mail1" and store.spool_dir().is_dir()
    assert MaildirStore(store.root).spool_dir() == store.root / ".spool"


@pytest.mark.parametrize("code", [errno.EMLINK, errno.ENOSPC])
def test_a_link_past_the_volumes_limit_becomes_a_copy(
        store: MaildirStore, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """When link() fails with EMLINK or ENOSPC (GlusterFS past storage.max-hardlinks) each
    mailbox gets a copy: delivered everywhere, same bytes."""
    source = _spooled(store, b"Subject: many\r\n\r\nlinks\r\n")

    def no_link(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(maildir_module.os, "link", no_link)
    written, refused = store.deliver_within_quota(source, [(DOMAIN, "ted"), (DOMAIN, "ann")])
    assert not refused and len(written) == 2
    assert all(p.read_bytes() == source.read_bytes() for p in written)
    assert all(p.stat().st_nlink == 1 for p in written)


def test_the_queue_copies_a_body_it_cannot_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue's enqueue falls back to a durable copy on EMLINK as on EXDEV."""
    q = FileQueue(tmp_path / "queue", "mx.test")
    src = tmp_path / "spooled"
    src.write_bytes(b"Subject: q\r\n\r\nbody\r\n")

    def no_link(*_args, **_kwargs):
        raise OSError(errno.EMLINK, "Too many links")

    monkeypatch.setattr(queue_module.os, "link", no_link)
    qid = q.enqueue(src, {"sender": "a@example.org",
                          "recipients": [{"address": "b@example.net"}]})
    assert q.body_path(qid).read_bytes() == src.read_bytes()


def test_retry_stale_reads_again_then_gives_up() -> None:
    """ESTALE is read again (a new version was renamed over the file), up to STALE_ATTEMPTS
    calls; any other error is not retried."""
    calls = []

    def stale_twice() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ESTALE, "Stale file handle")
        return b"new"

    assert retry_stale(stale_twice) == b"new" and len(calls) == 3
    calls.clear()

    def always_stale() -> bytes:
        calls.append(1)
        raise OSError(errno.ESTALE, "Stale file handle")

    with pytest.raises(OSError) as caught:
        retry_stale(always_stale)
    assert caught.value.errno == errno.ESTALE and len(calls) == STALE_ATTEMPTS
    calls.clear()

    def gone() -> bytes:
        calls.append(1)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    with pytest.raises(OSError):
        retry_stale(gone)
    assert len(calls) == 1


def test_metadata_is_read_again_on_estale(store: MaildirStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A mailbox's metadata read that meets ESTALE once is read again and answers."""
    store.set_quota(DOMAIN, "ted", 1000)
    real = maildir_module._read_whole
    stale = [True]

    def read_whole(path: str) -> bytes:
        if path.endswith("/.pop3coexist.json") and stale:
            stale.pop()
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path)

    monkeypatch.setattr(maildir_module, "_read_whole", read_whole)
    assert store.get_quota(DOMAIN, "ted") == 1000 and not stale


# -- the health probe ------------------------------------------------------------------------


def test_check_volume_writes_and_reads_back_the_nodes_probe(tmp_path: Path) -> None:
    """The volume check leaves nodes/<node>.alive (pid and time), and fails with the
    OSError when the volume cannot take it."""
    detail = check_volume(tmp_path, "mail1")
    assert "shared volume writable by node mail1" in detail
    text = (tmp_path / "nodes" / "mail1.alive").read_text()
    assert text.startswith(f"mail1 pid {os.getpid()} at ")
    assert abs(float(text.split()[-1]) - time.time()) < 60
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the nodes/ folder should be")
    with pytest.raises(OSError):
        check_volume(blocked, "mail1")


def test_an_unreachable_volume_is_named_on_one_line() -> None:
    """errors.volume_unreachable finds ENOTCONN (or ESTALE, EROFS ...) behind a StoreError and
    names it with the path; a full disk or a bug is not the volume's state."""
    from pop3coexist.errors import StoreError, volume_unreachable

    try:
        try:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", "/srv/mail/x")
        except OSError as e:
            raise StoreError("cannot list the domains") from e
    except StoreError as wrapped:
        assert volume_unreachable(wrapped) == "Transport endpoint is not connected (/srv/mail/x)"
    assert volume_unreachable(OSError(errno.ENOSPC, "No space left on device")) is None
    assert volume_unreachable(ValueError("a bug")) is None


def test_a_shared_queue_keeps_young_temp_files_at_start(tmp_path: Path) -> None:
    """At a node's start the queue's recovery removes only temp files older than ORPHAN_AGE
    when other nodes share the queue (a young one may be another node's envelope being
    written); alone, it removes them all."""
    shared = FileQueue(tmp_path / "queue", "mx.test", shared=True)
    shared.ensure_dirs()
    young, old = shared.tmp_dir / "env.young", shared.tmp_dir / "env.old"
    young.write_text("{}")
    old.write_text("{}")
    long_ago = time.time() - queue_module.ORPHAN_AGE - 60
    os.utime(old, (long_ago, long_ago))
    assert shared.recover()["tmp"] == 1 and young.exists() and not old.exists()
    assert FileQueue(tmp_path / "queue", "mx.test").recover()["tmp"] == 1
    assert not young.exists()


def test_admin_nodes_lists_running_and_stopped_nodes(tmp_path: Path) -> None:
    """`pop3coexist-admin nodes` reads the node locks without disturbing them: a node whose
    lock is held is running (with its holder), one whose lock is free is stopped; claims
    are counted per node from queue/claimed/."""
    import io

    from pop3coexist.admin.nodes import node_rows, run_nodes

    NodeLock.acquire_node(tmp_path, "old").release()
    live = NodeLock.acquire_node(tmp_path, "mail1")
    try:
        check_volume(tmp_path, "mail1")
        claim = tmp_path / "queue" / "claimed" / "mail1.w0.abc123"
        claim.mkdir(parents=True)
        (claim / "0123456789abcdef0123.json").write_text("{}")
        (claim / "lease").write_text("")
        rows = {r["node"]: r for r in node_rows(tmp_path)}
        assert rows["mail1"]["running"] and rows["mail1"]["holder"].startswith(f"pid {os.getpid()}")
        assert rows["mail1"]["claims"] == 1 and rows["mail1"]["probe_age"] < 60
        assert not rows["old"]["running"] and rows["old"]["probe_age"] is None
        out = io.StringIO()
        run_nodes(SimpleNamespace(server=SimpleNamespace(state_dir=tmp_path)), out)
        text = out.getvalue()
        assert "mail1  running" in text and "claims 1" in text and "old    stopped" in text
        NodeLock.acquire_node(tmp_path, "old").release()  # the look took nothing
    finally:
        live.release()


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /srv/mail rw,relatime shared:2 - fuse.glusterfs host1:/mail rw,user_id=0
41 22 0:41 / /srv/nfs\\040share rw shared:3 - nfs4 server:/x rw
"""


def test_syncfs_is_not_trusted_on_fuse_or_nfs() -> None:
    """The group commit's syncfs is used only where it makes data durable: a local file
    system yes; a GlusterFS FUSE mount or NFS (the mount of a path found by its longest mount
    point, escaped spaces read) no: there each file is fsynced."""
    from pop3coexist.fsutil import file_system_type, syncfs_is_durable

    assert file_system_type("/var/spool/x", MOUNTINFO) == "ext4"
    assert file_system_type("/srv/mail/state/mailroot", MOUNTINFO) == "fuse.glusterfs"
    assert file_system_type("/srv/nfs share/state", MOUNTINFO) == "nfs4"
    assert syncfs_is_durable("/var/spool", MOUNTINFO)
    assert not syncfs_is_durable("/srv/mail/state", MOUNTINFO)
    assert not syncfs_is_durable("/srv/nfs share", MOUNTINFO)
    assert syncfs_is_durable("/srv/mailbox", MOUNTINFO)  # on /, not under /srv/mail
