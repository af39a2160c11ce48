"""The selected state (RFC 3501 section 6.4, UIDPLUS, MOVE, UNSELECT): ``Selected`` is the
session's picture of the folder (sequence numbers, unreported expunges, \\Recent), and
``SelectedCommands`` (a mixin of ``server.IMAPServer``) tells the client what changed and runs
CHECK, CLOSE, UNSELECT, EXPUNGE, SEARCH, FETCH, STORE, COPY and MOVE."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from pop3coexist.imap import fetch as fetchmod
from pop3coexist.imap.common import (
    Refuse,
    _text,
)
from pop3coexist.imap.parse import (
    BadSyntax,
    format_seqset,
    parse_seqset,
)


class Selected:
    """The selected folder as this session knows it: ``uids`` in sequence order (position + 1
    is the message sequence number), ``msgs`` by UID, the UIDs gone but not yet reported."""

    def __init__(self, name: str, view: Any, readonly: bool) -> None:
        self.name = name
        self.view = view
        self.readonly = readonly
        self.uids: list[int] = []
        self.msgs: dict[int, Any] = {}
        self.recent: set[int] = set()
        self.gone: set[int] = set()
        self.pending: list | None = None  # a snapshot an IDLE poll read but could not tell

    def seq_of(self, uid: int) -> int:
        return self.uids.index(uid) + 1



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

    async def refresh(self, expunges: bool, idle: bool = False) -> None:
        """Tell the client what changed in the selected folder (module docstring). One
        refresh at a time per session (an IDLE poll and the command after DONE never
        interleave); ``idle``: an IDLE poll, whose findings wait for the next command when
        IDLE ended meanwhile (no EXPUNGE while no command runs, RFC 3501 section 7.4.1)."""
        sel = self.sel
        if sel is None:
            return
        await self._refresh_lock.acquire()
        try:
            await self._refresh(sel, expunges, idle)
        finally:
            self._refresh_lock.release()

    async def _refresh(self, sel: Selected, expunges: bool, idle: bool) -> None:
        msgs = await self.blocking(sel.view.sync_if_changed)
        if self.sel is not sel or self._gone:
            return
        if idle and self._idle is None:
            if msgs is not None:
                sel.pending = msgs  # told at the next command
            return
        if msgs is None:  # unchanged since this session last looked
            msgs, sel.pending = sel.pending, None
        if msgs is not None:
            now = {m.uid: m for m in msgs}
            for uid in sel.uids:
                if uid not in now:
                    sel.gone.add(uid)
        if expunges and sel.gone:
            for uid in sorted(sel.gone, key=sel.seq_of, reverse=True):
                self.send(b"* %d EXPUNGE" % sel.seq_of(uid))
                sel.uids.remove(uid)
                sel.msgs.pop(uid, None)
                sel.recent.discard(uid)
            sel.gone.clear()
        if msgs is None:
            return
        for uid in sel.uids:
            m = now.get(uid)
            old = sel.msgs.get(uid)
            if m is not None and old is not None and m.flags != old.flags:
                old.flags, old.sub, old.name = m.flags, m.sub, m.name
                self.send(b"* %d FETCH (FLAGS (%s))" % (sel.seq_of(uid), self._flags(uid)))
            elif m is not None and old is not None:
                old.sub, old.name = m.sub, m.name
        known = set(sel.uids)
        fresh = [m for m in msgs if m.uid not in known and m.uid > (sel.uids[-1] if sel.uids
                                                                    else 0)]
        if fresh:
            if not sel.readonly:
                await self.blocking(sel.view.claim_recent, fresh)
                sel.recent.update(m.uid for m in fresh if m.recent)
            for m in fresh:
                sel.uids.append(m.uid)
                sel.msgs[m.uid] = m
            self.send(b"* %d EXISTS" % len(sel.uids))
            self.send(b"* %d RECENT" % len(sel.recent))

    def _flags(self, uid: int) -> bytes:
        sel = self.sel
        assert sel is not None
        flags = sorted(sel.msgs[uid].flags)
        if uid in sel.recent:
            flags.append("\\Recent")
        return " ".join(flags).encode("utf-8")

    def _targets(self, spec: Any, uid: bool) -> list[int]:
        """UIDs named by a sequence set (``uid``: a UID set), in sequence order."""
        sel = self.sel
        assert sel is not None
        if not isinstance(spec, str):
            raise BadSyntax("missing sequence set")
        if uid:
            largest = sel.uids[-1] if sel.uids else 0
            if spec.endswith("*") and not sel.uids:
                return []
            wanted = set(parse_seqset(spec, max(largest, 1)))
            if "*" in spec and sel.uids:
                wanted.add(largest)
            return [u for u in sel.uids if u in wanted]
        if not sel.uids:
            raise BadSyntax("no messages")
        numbers = parse_seqset(spec, len(sel.uids))
        if numbers[-1] > len(sel.uids):
            raise BadSyntax("no such message")
        return [sel.uids[n - 1] for n in numbers]

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
        targets = self._targets(args[0], True) if uid else sel.uids
        doomed = [sel.msgs[u] for u in targets if "\\Deleted" in sel.msgs[u].flags]
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
        found = await self.blocking(fetchmod.search, sel, query, list(sel.uids))
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
        targets = self._targets(args[0], uid)
        sets_seen = fetchmod.sets_seen(items) and not sel.readonly
        gate = _WriteGate()
        self.transport.registerProducer(gate, True)  # the socket's buffer paces the reads
        try:
            i = 0
            while i < len(targets):
                await gate.wait()
                chunk = [sel.msgs[u] for u in targets[i:i + 50]]
                blobs = await self.blocking(fetchmod.fetch_many, sel.view, chunk, items,
                                            sets_seen)
                if self.sel is not sel or self._gone:
                    return
                i += len(blobs)
                self._write_fetches(sel, chunk, blobs)
        finally:
            gate.stopProducing()
            if not self._gone:
                self.transport.unregisterProducer()
        self.tagged(tag, "OK", "FETCH completed")
    do_FETCH.states = ("selected",)  # type: ignore[attr-defined]

    def _write_fetches(self, sel: Selected, chunk: list, blobs: list) -> None:
        for msg, blob in zip(chunk, blobs, strict=False):
                if blob is None:
                    continue  # gone meanwhile: reported as EXPUNGE at a later command
                seq = sel.seq_of(msg.uid)
                recent = msg.uid in sel.recent
                blob = blob.replace(b"\x00RECENT\x00", b" \\Recent" if recent else b"")
                blob = blob.replace(b"\x00RECENT0\x00", b"\\Recent" if recent else b"")
                self.transport.write(b"* %d FETCH (" % seq + blob + b")\r\n")

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
        targets = [sel.msgs[u] for u in self._targets(args[0], uid)]
        await self.blocking(fetchmod.store_flags, sel.view, targets, mode, flags)
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
        targets = [sel.msgs[u] for u in self._targets(args[0], uid)]
        used, limit = await self.blocking(self.account.quota)
        size = sum(await self.blocking(lambda: [sel.view.size(m) for m in targets]))
        if limit is not None and used + size > limit:
            raise Refuse("over quota", "OVERQUOTA")
        dest = await self.blocking(self.account.open_folder, name)
        pairs = await self.blocking(sel.view.copy_to, targets, dest)
        code = ""
        if pairs:
            code = (f"COPYUID {dest.uidvalidity} {format_seqset([a for a, _ in pairs])} "
                    f"{format_seqset([b for _, b in pairs])}")
        if move:
            if code:
                self.send(b"* OK [" + code.encode() + b"] moved")
            await self.blocking(sel.view.expunge, [sel.msgs[a] for a, _ in pairs])
            await self.refresh(expunges=True)
            self.tagged(tag, "OK", "MOVE completed")
            return
        self.tagged(tag, "OK", "COPY completed", code)
    do_COPY.states = ("selected",)  # type: ignore[attr-defined]

    async def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> None:  # noqa: N802
        await self.do_COPY(tag, args, uid, move=True)
    do_MOVE.states = ("selected",)  # type: ignore[attr-defined]
