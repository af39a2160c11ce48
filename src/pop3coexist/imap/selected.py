"""The selected state (RFC 3501 section 6.4, UIDPLUS, MOVE, UNSELECT): ``Selected`` is the
session's picture of the folder (sequence numbers, unreported expunges, \\Recent), and
``SelectedCommands`` (a mixin of ``server.IMAPServer``) tells the client what changed and runs
CHECK, CLOSE, UNSELECT, EXPUNGE, SEARCH, FETCH, STORE, COPY and MOVE."""

from __future__ import annotations

import bisect
import contextlib
import weakref
from array import array
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from pop3coexist.imap import fetch as fetchmod
from pop3coexist.imap.common import (
    Refuse,
    _text,
)
from pop3coexist.imap.idle import idle_hub
from pop3coexist.imap.parse import (
    BadSyntax,
    format_seqset,
    parse_seqset,
)
from pop3coexist.interfaces import ICachedFolderView
from pop3coexist.netutil import send_now


def _uid_key(msg: Any) -> int:
    return msg.uid


# id(snapshot) -> (weak reference to it, its uids, its flags): the lists every session that
# SELECTs the same snapshot starts from (reactor thread only; an entry goes with its snapshot)
_LISTS: dict[int, tuple[weakref.ref, array, list]] = {}


def _shared_lists(msgs: Sequence[Any]) -> tuple[array, list] | None:
    """The (uids, flags) of ``msgs`` that sessions share until they change them; None when
    ``msgs`` cannot be weakly referenced (a plain list): then each session makes its own."""
    key = id(msgs)
    entry = _LISTS.get(key)
    if entry is not None and entry[0]() is msgs:
        return entry[1], entry[2]

    def gone(ref: weakref.ref, key: int = key) -> None:
        current = _LISTS.get(key)
        if current is not None and current[0] is ref:
            del _LISTS[key]

    try:
        ref = weakref.ref(msgs, gone)
    except TypeError:
        return None
    uids, flags = array("I", [m.uid for m in msgs]), [m.flags for m in msgs]
    _LISTS[key] = (ref, uids, flags)
    return uids, flags


class Selected:
    """The selected folder as this session knows it: ``uids`` (an ``array('I')``, ascending,
    in sequence order: position + 1 is the message sequence number) and, aligned with it,
    ``flags`` (the flags this session last told the client); ``snap``, the folder's messages
    at the last sync (ascending UID; the store shares that list between the sessions of the
    process, so it is never changed here); the \\Recent UIDs and the UIDs gone but not yet
    reported (``lost`` keeps their records until then). The message records are shared,
    and so are ``uids`` and ``flags`` while they are what the snapshot holds (a ``Snapshot``
    makes them once for all its sessions): a session copies them (about 12 octets a message)
    only when they first differ, so 1,000 sessions IDLE on one folder hold one pair."""

    def __init__(self, name: str, view: Any, readonly: bool) -> None:
        self.name = name
        self.view = view
        self.readonly = readonly
        self.uids: array[int] = array("I")
        self.flags: list[frozenset[str]] = []
        self.snap: Sequence[Any] = ()
        self.lost: dict[int, Any] = {}
        self.recent: set[int] = set()
        self.gone: set[int] = set()
        self.pending: list | None = None  # a snapshot an IDLE poll read but could not tell
        self._shared = False  # uids and flags are the snapshot's: copy before changing them

    def load(self, msgs: Sequence[Any]) -> None:
        """Start from a ``sync``'s messages (SELECT, EXAMINE)."""
        self.snap = msgs
        lists = _shared_lists(msgs)
        if lists is not None:
            self.uids, self.flags = lists
            self._shared = True
        else:
            self.uids = array("I", [m.uid for m in msgs])
            self.flags = [m.flags for m in msgs]
            self._shared = False

    def _own(self) -> None:
        """Take copies of the shared ``uids`` and ``flags`` before the first change."""
        if self._shared:
            self.uids = array("I", self.uids)
            self.flags = list(self.flags)
            self._shared = False

    def set_flags_at(self, index: int, flags: frozenset[str]) -> None:
        """The flags told for the message at ``index`` (sequence number - 1)."""
        if self.flags[index] is not flags:
            self._own()
            self.flags[index] = flags

    def seq_of(self, uid: int) -> int:
        """The message sequence number of ``uid``; raises ValueError when not known."""
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i + 1
        raise ValueError(uid)

    def msg(self, uid: int) -> Any:
        """The store's record of ``uid`` (the last sync's, or the one it had before it was
        found gone), or None."""
        snap = self.snap
        i = bisect.bisect_left(snap, uid, key=_uid_key)
        if i < len(snap) and snap[i].uid == uid:
            return snap[i]
        return self.lost.get(uid)

    def flags_of(self, uid: int) -> frozenset[str]:
        return self.flags[self.seq_of(uid) - 1]

    def set_flags_of(self, uid: int, flags: frozenset[str]) -> None:
        with contextlib.suppress(ValueError):
            self.set_flags_at(self.seq_of(uid) - 1, flags)

    def append(self, msg: Any) -> None:
        self._own()
        self.uids.append(msg.uid)
        self.flags.append(msg.flags)

    def remove(self, uid: int) -> None:
        i = self.seq_of(uid) - 1
        self._own()
        del self.uids[i]
        del self.flags[i]
        self.recent.discard(uid)
        self.lost.pop(uid, None)


@implementer(IPushProducer)
class _WriteGate:
    """A streaming producer registered with the transport while FETCH writes: the transport
    pauses it when its send buffer is full (a client that reads slowly), and FETCH waits
    (``wait``) before building more, so a large FETCH never piles up in memory."""

    def __init__(self) -> None:
        self.paused = False
        self._waiters: list[defer.Deferred] = []

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.paused = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


class SelectedCommands:
    """Selected-state commands (mixed into ``IMAPServer``)."""

    async def refresh(self, expunges: bool, idle: bool = False) -> bool:
        """Tell the client what changed in the selected folder (module docstring). One
        refresh at a time per session (an IDLE poll and the command after DONE never
        interleave); ``idle``: an IDLE poll, whose findings wait for the next command when
        IDLE ended meanwhile (no EXPUNGE while no command runs, RFC 3501 section 7.4.1).
        True when the folder had changed since this session last read it; a change found
        outside IDLE is passed on to the folder's IDLE sessions (``idle.IdleHub.changed``)."""
        sel = self.sel
        if sel is None:
            return False
        await self._refresh_lock.acquire()
        try:
            changed = await self._refresh(sel, expunges, idle)
        finally:
            self._refresh_lock.release()
        if changed and not idle:
            idle_hub(self.factory.reactor).changed((self.address, sel.name))
        return changed

    async def _refresh(self, sel: Selected, expunges: bool, idle: bool) -> bool:
        view = sel.view
        if ICachedFolderView.providedBy(view) and view.unchanged_cached():
            msgs = None  # told without the disk: no thread hop
        else:
            msgs = await self.blocking(view.sync_if_changed)
        changed = msgs is not None
        if self.sel is not sel or self._gone:
            return changed
        if idle and self._idle is None:
            if msgs is not None:
                sel.pending = msgs  # told at the next command
            return changed
        if msgs is None:  # unchanged since this session last looked
            msgs, sel.pending = sel.pending, None
        if msgs is not None:
            j, n = 0, len(msgs)
            for uid in sel.uids:  # both ascending: one merge walk
                while j < n and msgs[j].uid < uid:
                    j += 1
                if j >= n or msgs[j].uid != uid:
                    if uid not in sel.gone:
                        sel.gone.add(uid)
                        old = sel.msg(uid)
                        if old is not None:
                            sel.lost[uid] = old
            sel.snap = msgs
        if expunges and sel.gone:
            for uid in sorted(sel.gone, reverse=True):  # descending UID: descending number
                self.send(b"* %d EXPUNGE" % sel.seq_of(uid))
                sel.remove(uid)
            sel.gone.clear()
        if msgs is None:
            return changed
        j, n = 0, len(msgs)
        for i, uid in enumerate(sel.uids):
            while j < n and msgs[j].uid < uid:
                j += 1
            if j < n and msgs[j].uid == uid and msgs[j].flags != sel.flags[i]:
                sel.set_flags_at(i, msgs[j].flags)
                self.send(b"* %d FETCH (FLAGS (%s))" % (i + 1, self._flags(uid)))
        last = sel.uids[-1] if sel.uids else 0
        fresh = [m for m in msgs if m.uid > last]
        if fresh:
            if not sel.readonly:
                claimed = await self.blocking(sel.view.claim_recent, fresh)
                sel.recent.update(claimed or ())
            for m in fresh:
                sel.append(m)
            self.send(b"* %d EXISTS" % len(sel.uids))
            self.send(b"* %d RECENT" % len(sel.recent))
        return changed

    def _flags(self, uid: int) -> bytes:
        sel = self.sel
        assert sel is not None
        return fetchmod.format_flags(sel.flags_of(uid), uid in sel.recent)

    def _targets(self, spec: Any, uid: bool) -> list[int]:
        """UIDs named by a sequence set (``uid``: a UID set), in sequence order: only the
        messages that exist, found range by range (parse.SeqSet), whatever span was typed."""
        sel = self.sel
        assert sel is not None
        if not isinstance(spec, str):
            raise BadSyntax("missing sequence set")
        if uid:
            return parse_seqset(spec, sel.uids[-1] if sel.uids else 0).select(sel.uids)
        if not sel.uids:
            raise BadSyntax("no messages")
        count = len(sel.uids)
        numbers = parse_seqset(spec, count)
        if numbers.highest > count:
            raise BadSyntax("no such message")
        return [sel.uids[i] for i in numbers.positions(count)]

    def _records(self, uids: list[int]) -> list:
        """The store's records of these UIDs (one gone without a trace is left out)."""
        sel = self.sel
        assert sel is not None
        return [m for m in map(sel.msg, uids) if m is not None]

    async def do_CHECK(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "CHECK completed")
    do_CHECK.states = ("selected",)  # type: ignore[attr-defined]

    async def do_CLOSE(self, tag: bytes, args: list) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if not sel.readonly:
            msgs = await self.blocking(sel.view.sync)
            doomed = [m for m in msgs if "\\Deleted" in m.flags]
            await self.blocking(sel.view.expunge, doomed)
        self.sel, self.state = None, "auth"
        self.tagged(tag, "OK", "CLOSE completed")
    do_CLOSE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_UNSELECT(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.sel, self.state = None, "auth"
        self.tagged(tag, "OK", "UNSELECT completed")
    do_UNSELECT.states = ("selected",)  # type: ignore[attr-defined]

    async def do_EXPUNGE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        if len(args) != (1 if uid else 0):
            raise BadSyntax("UID EXPUNGE uid-set" if uid else "EXPUNGE takes no arguments")
        await self.refresh(expunges=True)
        targets = self._targets(args[0], True) if uid else list(sel.uids)
        doomed = self._records([u for u in targets if "\\Deleted" in sel.flags_of(u)])
        await self.blocking(sel.view.expunge, doomed)
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "EXPUNGE completed")
    do_EXPUNGE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        await self.refresh(expunges=uid)
        if args and str(args[0]).upper() == "CHARSET":
            charset = _text(args[1]).upper() if len(args) > 1 else ""
            if charset not in ("UTF-8", "US-ASCII"):
                raise Refuse("charset not supported", "BADCHARSET (UTF-8 US-ASCII)")
            args = args[2:]
        query = fetchmod.compile_search(args)
        found = await self.blocking(fetchmod.search, sel, query, list(sel.uids),
                                    list(sel.flags))
        numbers = found if uid else [sel.seq_of(u) for u in found]
        self.send(b"* SEARCH" + b"".join(b" %d" % n for n in numbers))
        self.tagged(tag, "OK", "SEARCH completed")
    do_SEARCH.states = ("selected",)  # type: ignore[attr-defined]

    async def do_FETCH(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if len(args) != 2:
            raise BadSyntax("FETCH sequence-set items")
        await self.refresh(expunges=uid)
        items = fetchmod.compile_fetch(args[1], uid)
        records = self._records(self._targets(args[0], uid))
        sets_seen = fetchmod.sets_seen(items) and not sel.readonly
        # small messages are read on the reactor when the kernel has their paths cached and
        # nothing is renamed (no \\Seen): no thread hop (ICachedFolderView)
        cached = not sets_seen and ICachedFolderView.providedBy(sel.view)
        done = tag + b" OK FETCH completed\r\n"
        gate = _WriteGate()
        self.transport.registerProducer(gate, True)  # the socket's buffer paces the reads
        registered = True
        try:
            i = 0
            while i < len(records):
                await gate.wait()
                chunk = [(m, sel.flags_of(m.uid), m.uid in sel.recent)
                         for m in records[i:i + 50]]
                blobs = fetchmod.fetch_cached(sel.view, chunk, items) if cached else []
                if not blobs:
                    blobs = await self.blocking(fetchmod.fetch_many, sel.view, chunk, items,
                                                sets_seen)
                if self.sel is not sel or self._gone:
                    return
                i += len(blobs)
                out = self._fetch_bytes(sel, chunk, blobs)
                if i >= len(records):  # the last answers and the tagged reply: one send
                    registered = False
                    self.transport.unregisterProducer()
                    send_now(self.transport, out + done)
                    return
                self.transport.write(out)
        finally:
            gate.stopProducing()
            if registered and not self._gone:
                self.transport.unregisterProducer()
        self.send(done[:-2])
    do_FETCH.states = ("selected",)  # type: ignore[attr-defined]

    def _fetch_bytes(self, sel: Selected, chunk: list, blobs: list) -> bytes:
        """The ``* n FETCH (...)`` answers of one chunk, as one string of octets."""
        out = []
        for (msg, _, _), (blob, flags) in zip(chunk, blobs, strict=False):
            if blob is None:
                continue  # gone meanwhile: reported as EXPUNGE at a later command
            sel.set_flags_of(msg.uid, flags)
            out.append(b"* %d FETCH (" % sel.seq_of(msg.uid) + blob + b")\r\n")
        return b"".join(out)

    async def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        sel = self.sel
        assert sel is not None
        if len(args) != 3:
            raise BadSyntax("STORE sequence-set item flags")
        if sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        await self.refresh(expunges=uid)
        item = str(args[1]).upper()
        mode, _, silent = item.partition(".")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS") or silent not in ("", "SILENT"):
            raise BadSyntax("STORE item must be FLAGS, +FLAGS or -FLAGS[.SILENT]")
        flags = args[2] if isinstance(args[2], list) else [args[2]]
        flags = [str(f) for f in flags]
        if any(not isinstance(f, str) or not f for f in flags):
            raise BadSyntax("bad flag")
        targets = self._records(self._targets(args[0], uid))
        now = await self.blocking(fetchmod.store_flags, sel.view,
                                  [(m, sel.flags_of(m.uid)) for m in targets], mode, flags)
        for msg, new in zip(targets, now, strict=True):
            sel.set_flags_of(msg.uid, new)
        for msg in targets:
            if silent:
                continue
            extra = b" UID %d" % msg.uid if uid else b""
            self.send(b"* %d FETCH (FLAGS (%s)%s)" % (sel.seq_of(msg.uid), self._flags(msg.uid),
                                                      extra))
        self.tagged(tag, "OK", "STORE completed")
    do_STORE.states = ("selected",)  # type: ignore[attr-defined]

    async def do_COPY(self, tag: bytes, args: list, uid: bool = False, move: bool = False  # noqa: N802
                      ) -> None:
        sel = self.sel
        assert sel is not None
        if len(args) != 2:
            raise BadSyntax("COPY sequence-set mailbox")
        if move and sel.readonly:
            raise Refuse("the folder is read-only", "READ-ONLY")
        await self.refresh(expunges=uid or move)
        name = self._name(args[1])
        if not await self.blocking(self.account.exists, name):
            raise Refuse(f"no folder {name}", "TRYCREATE")
        targets = self._records(self._targets(args[0], uid))
        dest = await self.blocking(self.account.open_folder, name)
        # the quota rule of APPEND and SMTP (grace included), checked under the quota lock
        pairs = await self.blocking(self.account.copy_within_quota, sel.view, targets, dest)
        code = ""
        if pairs:
            code = (f"COPYUID {dest.uidvalidity} {format_seqset([a for a, _ in pairs])} "
                    f"{format_seqset([b for _, b in pairs])}")
        if move:
            if code:
                self.send(b"* OK [" + code.encode() + b"] moved")
            await self.blocking(sel.view.expunge, self._records([a for a, _ in pairs]))
            await self.refresh(expunges=True)
            self.tagged(tag, "OK", "MOVE completed")
            return
        self.tagged(tag, "OK", "COPY completed", code)
    do_COPY.states = ("selected",)  # type: ignore[attr-defined]

    async def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        await self.do_COPY(tag, args, uid, move=True)
    do_MOVE.states = ("selected",)  # type: ignore[attr-defined]
