"""FETCH, STORE and SEARCH over an ``IFolderView`` (RFC 3501 sections 6.4.4-6.4.6).

``compile_fetch`` / ``compile_search`` turn parsed tokens into plans (raising BadSyntax);
``fetch_many``, ``store_flags`` and ``search`` are blocking (run off the reactor): they read
message files through the view and return the response octets / UIDs. A message sent to the
client is its canonical CRLF form (``canonical.LineEnds``), the same octets POP3 sends, so
RFC822.SIZE (``,W=``) and BODY[] always agree.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import Any

from pop3coexist.canonical import LineEnds
from pop3coexist.errors import StoreError
from pop3coexist.imap.message import Part, bodystructure, decoded, envelope, literal
from pop3coexist.imap.parse import Atom, BadSyntax, format_date, parse_date, parse_seqset

_SECTION = re.compile(r"(BODY(?:\.PEEK)?|BINARY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?\Z",
                      re.I)


def canonical_bytes(data: bytes) -> bytes:
    """The canonical CRLF form of a stored file's bytes (canonical.py)."""
    ends = LineEnds()
    text = ends.feed(data) + ends.finish()
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


@dataclass
class Item:
    """One FETCH item: ``name`` as it is echoed, ``kind``, the section's part numbers, part
    kind and header names, the partial range, and whether it sets \\Seen."""

    name: str
    kind: str
    spec: tuple[int, ...] = ()
    part: str = ""
    fields: tuple[str, ...] = ()
    start: int | None = None
    length: int | None = None
    seen: bool = False


_MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
           "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
           "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}
_SIMPLE = {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "UID",
           "RFC822", "RFC822.HEADER", "RFC822.TEXT"}


def compile_fetch(spec: Any, uid: bool) -> list[Item]:
    """The items of a FETCH (an atom, a macro or a list); UID FETCH always includes UID."""
    raw = spec if isinstance(spec, list) else [spec]
    names: list[str] = []
    for r in raw:
        if not isinstance(r, Atom):
            raise BadSyntax("bad FETCH item")
        up = r.upper()
        if up in _MACROS and not isinstance(spec, list):
            names += _MACROS[up]
        else:
            names.append(str(r))
    items: list[Item] = []
    if uid and not any(n.upper() == "UID" for n in names):
        items.append(Item("UID", "UID"))
    for n in names:
        up = n.upper()
        if up in _SIMPLE:
            items.append(Item(up, up, seen=up in ("RFC822", "RFC822.TEXT")))
            continue
        m = _SECTION.match(n)
        if not m:
            raise BadSyntax(f"unknown FETCH item {n[:40]}")
        word, section, start, length = m.groups()
        peek = word.upper().endswith(".PEEK")
        spec_nums: list[int] = []
        part = ""
        fields: tuple[str, ...] = ()
        sec = section.strip()
        head, _, rest = sec.partition(" ")
        pieces = head.split(".") if head else []
        while pieces and pieces[0].isdigit():
            spec_nums.append(int(pieces.pop(0)))
        part = ".".join(pieces).upper()
        if part not in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            raise BadSyntax(f"bad section {section[:40]}")
        if part == "MIME" and not spec_nums:
            raise BadSyntax("MIME needs a part number")
        if part.startswith("HEADER.FIELDS"):
            lst = rest.strip()
            if not (lst.startswith("(") and lst.endswith(")")):
                raise BadSyntax("HEADER.FIELDS needs a list")
            fields = tuple(f.strip('"') for f in lst[1:-1].split())
        echo = f"BODY[{section}]" + (f"<{start}>" if start is not None else "")
        items.append(Item(echo, "SECTION", tuple(spec_nums), part, fields,
                          int(start) if start is not None else None,
                          int(length) if length is not None else None, seen=not peek))
    return items


def sets_seen(items: list[Item]) -> bool:
    """True when a FETCH of these items sets \\Seen (BODY[...] without PEEK, RFC822...)."""
    return any(i.seen for i in items)


def _read(view: Any, msg: Any) -> bytes:
    with view.open(msg) as f:
        return canonical_bytes(f.read())


def fetch_one(view: Any, msg: Any, items: list[Item], set_seen: bool) -> bytes | None:
    """The inside of one ``* n FETCH (...)`` (``\\x00RECENT\\x00`` after other flags and
    ``\\x00RECENT0\\x00`` alone stand for the session's \\Recent flag); None when the
    message is gone."""
    try:
        needs_data = any(i.kind not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE")
                         for i in items)
        data = _read(view, msg) if needs_data else None
        if set_seen and "\\Seen" not in msg.flags:
            view.set_flags(msg, set(msg.flags) | {"\\Seen"})
            if not any(i.kind == "FLAGS" for i in items):
                items = [*items, Item("FLAGS", "FLAGS")]
        parsed: list[Part] = []

        def tree() -> Part:  # parsed only for what needs the MIME structure
            if not parsed:
                parsed.append(Part(data))
            return parsed[0]

        out: list[bytes] = []
        for i in items:
            if i.kind == "UID":
                out.append(b"UID %d" % msg.uid)
            elif i.kind == "FLAGS":
                mark = b"\x00RECENT\x00" if msg.flags else b"\x00RECENT0\x00"
                out.append(b"FLAGS (" + " ".join(sorted(msg.flags)).encode() + mark + b")")
            elif i.kind == "INTERNALDATE":
                out.append(b'INTERNALDATE "' + format_date(msg.internaldate).encode() + b'"')
            elif i.kind == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % (len(data) if data is not None else view.size(msg)))
            elif i.kind == "ENVELOPE":
                out.append(b"ENVELOPE " + envelope(tree()))
            elif i.kind == "BODYSTRUCTURE":
                out.append(b"BODYSTRUCTURE " + bodystructure(tree(), True))
            elif i.kind == "BODY":
                out.append(b"BODY " + bodystructure(tree(), False))
            elif i.kind == "RFC822":
                out.append(b"RFC822 " + literal(data))
            elif i.kind == "RFC822.HEADER":
                out.append(b"RFC822.HEADER " + literal(tree().header))
            elif i.kind == "RFC822.TEXT":
                out.append(b"RFC822.TEXT " + literal(tree().body))
            else:
                if not i.spec and not i.part:
                    content = data  # BODY[]: the whole message, no parsing
                else:
                    content = tree().section(list(i.spec), i.part, list(i.fields))
                if content is None:
                    content = b""
                if i.start is not None:
                    content = content[i.start:]
                    if i.length is not None:
                        content = content[:i.length]
                out.append(i.name.encode("latin-1") + b" " + literal(content))
        return b" ".join(out)
    except (StoreError, FileNotFoundError):
        return None


BATCH_BYTES = 4 << 20  # octets of FETCH answers built per trip to a thread


def fetch_many(view: Any, msgs: list, items: list[Item], set_seen: bool) -> list[bytes | None]:
    """``fetch_one`` for the first messages of ``msgs`` (blocking): at least one, and no more
    once BATCH_BYTES of answers are built (the caller asks again for the rest)."""
    out: list[bytes | None] = []
    total = 0
    for m in msgs:
        blob = fetch_one(view, m, items, set_seen)
        out.append(blob)
        total += len(blob or b"")
        if total >= BATCH_BYTES:
            break
    return out


def store_flags(view: Any, msgs: list, mode: str, flags: list[str]) -> None:
    """STORE: replace (FLAGS), add (+FLAGS) or remove (-FLAGS) flags (blocking); a message
    gone meanwhile keeps its old flags in the session until the next refresh."""
    given = {f for f in flags if f.lower() != "\\recent"}
    for m in msgs:
        current = set(m.flags)
        if mode == "FLAGS":
            new = given
        elif mode == "+FLAGS":
            new = current | given
        else:
            low = {f.lower() for f in given}
            new = {f for f in current if f.lower() not in low}
        if new != current:
            try:
                view.set_flags(m, new)
            except StoreError:
                continue


# -- SEARCH ------------------------------------------------------------------------------

_FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
              "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True),
              "SEEN": ("\\Seen", True), "UNANSWERED": ("\\Answered", False),
              "UNDELETED": ("\\Deleted", False), "UNDRAFT": ("\\Draft", False),
              "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False)}


def compile_search(args: list) -> list:
    """SEARCH keys as a list of (key, argument) nodes; raises BadSyntax."""
    tokens = list(args)
    out = []
    while tokens:
        out.append(_one(tokens))
    if not out:
        raise BadSyntax("SEARCH needs a key")
    return out


def _take(tokens: list) -> Any:
    if not tokens:
        raise BadSyntax("SEARCH key needs an argument")
    return tokens.pop(0)


def _one(tokens: list) -> tuple:
    t = _take(tokens)
    if isinstance(t, list):
        return ("AND", compile_search(t))
    if isinstance(t, bytes):
        raise BadSyntax("unexpected string in SEARCH")
    key = t.upper()
    if key in ("ALL", "NEW", "OLD", "RECENT"):
        return (key, None)
    if key in _FLAG_KEYS:
        return ("FLAG", _FLAG_KEYS[key])
    if key in ("KEYWORD", "UNKEYWORD"):
        word = _take(tokens)
        if isinstance(word, list):
            raise BadSyntax(f"{key} needs a flag")
        return ("FLAG", (word.decode("utf-8", "replace") if isinstance(word, bytes) else
                         str(word), key == "KEYWORD"))
    if key == "NOT":
        return ("NOT", _one(tokens))
    if key == "OR":
        return ("OR", _one(tokens), _one(tokens))
    if key in ("LARGER", "SMALLER"):
        try:
            return (key, int(str(_take(tokens))))
        except ValueError:
            raise BadSyntax(f"{key} needs a number") from None
    if key in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
        return (key, parse_date(_take(tokens)))
    if key in ("FROM", "TO", "CC", "BCC", "SUBJECT", "BODY", "TEXT"):
        v = _take(tokens)
        return (key, (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).lower())
    if key == "HEADER":
        name = _take(tokens)
        v = _take(tokens)
        return (key, ((name.decode() if isinstance(name, bytes) else str(name)).lower(),
                      (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).lower()))
    if key == "UID":
        return ("UID", str(_take(tokens)))
    if re.fullmatch(r"[0-9*:,]+", key):
        return ("SEQ", key)
    raise BadSyntax(f"unknown SEARCH key {key[:30]}")


def search(sel: Any, query: list, uids: list[int]) -> list[int]:
    """The UIDs (of ``uids``, in order) that match every node (blocking)."""
    out = []
    largest_uid = uids[-1] if uids else 0
    for pos, uid in enumerate(uids):
        msg = sel.msgs[uid]
        cache: dict[str, Any] = {}
        try:
            if all(_match(n, sel, msg, pos + 1, len(uids), largest_uid, cache) for n in query):
                out.append(uid)
        except (StoreError, FileNotFoundError):
            continue
    return out


def _content(sel: Any, msg: Any, cache: dict) -> Part:
    if "part" not in cache:
        cache["data"] = _read(sel.view, msg)
        cache["part"] = Part(cache["data"])
    return cache["part"]


def _sent_day(part: Part) -> float | None:
    value = part.get("date")
    if not value:
        return None
    try:
        t = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import calendar

    return float(calendar.timegm((t.year, t.month, t.day, 0, 0, 0)))


def _match(node: tuple, sel: Any, msg: Any, seq: int, count: int, largest: int,
           cache: dict) -> bool:
    key = node[0]
    arg = node[1] if len(node) > 1 else None
    if key == "ALL":
        return True
    if key == "AND":
        return all(_match(n, sel, msg, seq, count, largest, cache) for n in arg)
    if key == "NOT":
        return not _match(arg, sel, msg, seq, count, largest, cache)
    if key == "OR":
        return _match(node[1], sel, msg, seq, count, largest, cache) or \
            _match(node[2], sel, msg, seq, count, largest, cache)
    if key == "FLAG":
        name, want = arg
        return (name.lower() in {f.lower() for f in msg.flags}) == want
    if key == "RECENT":
        return msg.uid in sel.recent
    if key == "NEW":
        return msg.uid in sel.recent and "\\Seen" not in msg.flags
    if key == "OLD":
        return msg.uid not in sel.recent
    if key == "UID":
        return msg.uid in set(parse_seqset(arg, max(largest, 1)))
    if key == "SEQ":
        return seq in set(parse_seqset(arg, max(count, 1)))
    if key in ("LARGER", "SMALLER"):
        size = sel.view.size(msg)
        return size > arg if key == "LARGER" else size < arg
    if key in ("BEFORE", "ON", "SINCE"):
        import calendar
        import time as _time

        t = _time.gmtime(msg.internaldate)
        day = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return day < arg if key == "BEFORE" else day == arg if key == "ON" else day >= arg
    part = _content(sel, msg, cache)
    if key in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        day = _sent_day(part)
        if day is None:
            return False
        return day < arg if key == "SENTBEFORE" else day == arg if key == "SENTON" \
            else day >= arg
    if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return arg in decoded(part.get(key.lower())).lower()
    if key == "HEADER":
        name, value = arg
        v = part.get(name)
        return v is not None and value in decoded(v).lower()
    if key == "BODY":
        return arg in part.body.decode("utf-8", "replace").lower()
    if key == "TEXT":
        return arg in cache["data"].decode("utf-8", "replace").lower()
    return False
