"""The authenticated state's IMAP commands (RFC 3501 section 6.3 and the extensions that
work there: ENABLE, NAMESPACE, LIST with SPECIAL-USE, APPEND with UIDPLUS, IDLE, QUOTA) over
the account's ``IAccountFolders``. ``MailboxCommands`` is a mixin of ``server.IMAPServer``."""

from __future__ import annotations

from typing import Any

from pop3coexist.imap.common import (
    PERMANENT,
    SEPARATOR,
    Refuse,
    _text,
)
from pop3coexist.imap.idle import idle_hub
from pop3coexist.imap.message import astring
from pop3coexist.imap.parse import (
    BadSyntax,
    parse_datetime,
)
from pop3coexist.imap.selected import Selected


class MailboxCommands:
    """Folder commands (mixed into ``IMAPServer``)."""

    def _name(self, value: Any) -> str:
        name = _text(value)
        if name.upper() == "INBOX":
            return "INBOX"
        return name

    async def do_ENABLE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if not args:
            raise BadSyntax("ENABLE needs a capability")
        self.send(b"* ENABLED")  # none of ours needs enabling (CONDSTORE/UTF8 not offered)
        self.tagged(tag, "OK", "ENABLE completed")
    do_ENABLE.states = ("auth",)  # RFC 5161 section 3.1  # type: ignore[attr-defined]

    async def do_NAMESPACE(self, tag: bytes, args: list) -> None:  # noqa: N802
        self.send(b'* NAMESPACE (("" ".")) NIL NIL')
        self.tagged(tag, "OK", "NAMESPACE completed")
    do_NAMESPACE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> None:  # noqa: N802
        if len(args) < 1:
            raise BadSyntax("SELECT mailbox")
        name = self._name(args[0])
        self.sel = None
        self.state = "auth"
        view = await self.blocking(self.account.open_folder, name)
        sel = Selected(name, view, readonly)
        msgs = await self.blocking(view.sync)
        claimed = await self.blocking(view.claim_recent, msgs) if not readonly else None
        sel.load(msgs)
        sel.recent = set(claimed or ())
        validity, uidnext = await self.blocking(lambda: (view.uidvalidity, view.uidnext))
        self.sel, self.state = sel, "selected"
        self.send(b"* FLAGS (" + PERMANENT.encode() + b")")
        self.send(b"* OK [PERMANENTFLAGS (" + PERMANENT.encode() + b" \\*)] flags")
        self.send(b"* %d EXISTS" % len(sel.uids))
        self.send(b"* %d RECENT" % len(sel.recent))
        unseen = next((i + 1 for i, f in enumerate(sel.flags) if "\\Seen" not in f), None)
        if unseen:
            self.send(b"* OK [UNSEEN %d] first unseen" % unseen)
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % validity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % uidnext)
        self.tagged(tag, "OK", "EXAMINE completed" if readonly else "SELECT completed",
                    "READ-ONLY" if readonly else "READ-WRITE")
    do_SELECT.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_EXAMINE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_SELECT(tag, args, readonly=True)
    do_EXAMINE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_CREATE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("CREATE mailbox")
        await self.blocking(self.account.create, self._name(args[0]))
        self.tagged(tag, "OK", "CREATE completed")
    do_CREATE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_DELETE(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("DELETE mailbox")
        await self.blocking(self.account.delete, self._name(args[0]))
        self.tagged(tag, "OK", "DELETE completed")
    do_DELETE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_RENAME(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 2:
            raise BadSyntax("RENAME old new")
        await self.blocking(self.account.rename, self._name(args[0]), self._name(args[1]))
        self.tagged(tag, "OK", "RENAME completed")
    do_RENAME.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SUBSCRIBE(self, tag: bytes, args: list, on: bool = True) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("SUBSCRIBE mailbox")
        await self.blocking(self.account.subscribe, self._name(args[0]), on)
        self.tagged(tag, "OK", "SUBSCRIBE completed" if on else "UNSUBSCRIBE completed")
    do_SUBSCRIBE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_SUBSCRIBE(tag, args, on=False)
    do_UNSUBSCRIBE.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> None:  # noqa: N802
        select_opts: list = []
        if args and isinstance(args[0], list):  # RFC 5258 selection options (SPECIAL-USE)
            select_opts = [str(o).upper() for o in args.pop(0)]
        if len(args) < 2:
            raise BadSyntax("LIST reference pattern")
        ref, pattern = _text(args[0]), _text(args[1]) if not isinstance(args[1], list) else ""
        if not lsub and pattern == "":
            self.send(b'* LIST (\\Noselect) "." ""')
            self.tagged(tag, "OK", "LIST completed")
            return
        acc = self.account
        names, subs = await self.blocking(lambda: (acc.list_folders(), acc.subscriptions()))
        full = ref + pattern
        regex = _pattern(full)
        word = b"LSUB" if lsub else b"LIST"
        for name in names:
            if not regex.match(name):
                continue
            attrs = []
            if any(n.startswith(name + SEPARATOR) for n in names):
                attrs.append("\\HasChildren")
            else:
                attrs.append("\\HasNoChildren")
            special = acc.special_use(name)
            if "SPECIAL-USE" in select_opts and not special:
                continue
            if special:
                attrs.append(special)
            if lsub and name not in subs and name != "INBOX":
                continue
            if "SUBSCRIBED" in select_opts:
                if name not in subs:
                    continue
                attrs.append("\\Subscribed")
            self.send(b"* " + word + b" (" + " ".join(attrs).encode() + b') "." ' +
                      astring(name))
        self.tagged(tag, "OK", f"{word.decode()} completed")
    do_LIST.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_LSUB(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.do_LIST(tag, args, lsub=True)
    do_LSUB.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_STATUS(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 2 or not isinstance(args[1], list):
            raise BadSyntax("STATUS mailbox (items)")
        name = self._name(args[0])
        view = await self.blocking(self.account.open_folder, name)
        msgs = await self.blocking(view.sync)
        values = {"MESSAGES": len(msgs), "RECENT": sum(1 for m in msgs if m.recent),
                  "UIDNEXT": view.uidnext, "UIDVALIDITY": view.uidvalidity,
                  "UNSEEN": sum(1 for m in msgs if "\\Seen" not in m.flags)}
        out = []
        for item in args[1]:
            key = str(item).upper()
            if key not in values:
                raise BadSyntax(f"unknown STATUS item {key[:20]}")
            out.append(f"{key} {values[key]}")
        self.send(b"* STATUS " + astring(name) + b" (" + " ".join(out).encode() + b")")
        self.tagged(tag, "OK", "STATUS completed")
    do_STATUS.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_APPEND(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) < 2:
            raise BadSyntax("APPEND mailbox [(flags)] [date-time] message")
        name = self._name(args[0])
        flags: list[str] = []
        date = None
        rest = args[1:]
        if rest and isinstance(rest[0], list):
            flags = [str(f) for f in rest.pop(0)]
        if len(rest) == 2 and isinstance(rest[0], bytes):
            date = parse_datetime(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise BadSyntax("APPEND needs the message as a literal")
        data = rest[0]
        validity, uid = await self.blocking(self.account.append, name, data, flags, date)
        await self.refresh(expunges=True)
        self.tagged(tag, "OK", "APPEND completed", f"APPENDUID {validity} {uid}")
    do_APPEND.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_IDLE(self, tag: bytes, args: list) -> None:  # noqa: N802
        await self.refresh(expunges=True)
        self.send(b"+ idling")
        key = self._idle_key()
        self._idle = (tag, key)
        if key is not None:  # polled with the other IDLE sessions of the folder (idle.py)
            idle_hub(self.factory.reactor).join(key, self)
    do_IDLE.states = ("auth", "selected")  # type: ignore[attr-defined]

    def _idle_key(self) -> tuple | None:
        """The selected folder as ``idle.IdleHub`` knows it: (address, folder name)."""
        sel = self.sel
        return None if sel is None else (self.address, sel.name)

    async def idle_poll(self) -> bool:
        """One IDLE check (``idle.IdleHub`` asks): tell the client what changed; True when
        the folder had changed since this session last looked."""
        if self._idle is None or self._busy or self.sel is None:
            return False
        return await self.refresh(expunges=True, idle=True)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            _, key = self._idle
            self._idle = None
            if key is not None:
                idle_hub(self.factory.reactor).leave(key, self)

    async def do_GETQUOTAROOT(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1:
            raise BadSyntax("GETQUOTAROOT mailbox")
        name = self._name(args[0])
        if not await self.blocking(self.account.exists, name):
            raise Refuse(f"no folder {name}", "NONEXISTENT")
        self.send(b"* QUOTAROOT " + astring(name) + b' ""')
        await self._quota_line()
        self.tagged(tag, "OK", "GETQUOTAROOT completed")
    do_GETQUOTAROOT.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_GETQUOTA(self, tag: bytes, args: list) -> None:  # noqa: N802
        if len(args) != 1 or _text(args[0]) != "":
            raise Refuse("the only quota root is \"\"", "NONEXISTENT")
        await self._quota_line()
        self.tagged(tag, "OK", "GETQUOTA completed")
    do_GETQUOTA.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def do_SETQUOTA(self, tag: bytes, args: list) -> None:  # noqa: N802
        raise Refuse("quotas are set by the administrator (pop3coexist-admin mailbox quota)",
                     "NOPERM")
    do_SETQUOTA.states = ("auth", "selected")  # type: ignore[attr-defined]

    async def _quota_line(self) -> None:
        used, limit = await self.blocking(self.account.quota)
        if limit is None:
            self.send(b'* QUOTA "" ()')
        else:  # RFC 2087: units of 1024 octets
            self.send(b'* QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))


def _pattern(pattern: str) -> Any:
    """A LIST pattern (``*`` any, ``%`` any but the separator) as a regular expression."""
    import re

    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(r"[^.]*")
        else:
            out.append(re.escape(ch))
    text = "".join(out)
    if pattern.upper().startswith("INBOX"):
        return re.compile(r"(?i:INBOX)" + text[5:] + r"\Z")
    return re.compile(text + r"\Z")
