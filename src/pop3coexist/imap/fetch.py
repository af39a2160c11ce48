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
from pop3coexist.imap.common import Refuse
from pop3coexist.imap.message import Part, bodystructure, decoded, envelope, literal
from pop3coexist.imap.parse import (
    Atom,
    BadSyntax,
    SeqSet,
    format_date,
    parse_date,
    parse_seqset,
)

_SECTION = re.compile(r"(BODY(?:\.PEEK)?|BINARY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?\Z",
                      re.I)


def canonical_bytes(data: bytes) -> bytes:
    """The canonical CRLF form of a stored file's bytes (canonical.py). A file that is already
    in that form (every line end CRLF, the last line ended, no ``From `` line first: what
    APPEND and most Maildir writers store) is returned as it is, found by C-speed counts."""
    if data.endswith(b"\r\n") and not data.startswith(b"From "):
        crlf = data.count(b"\r\n")
        if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
            return data
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


MAX_FETCH_ITEMS = 64  # items in one FETCH list: each may copy the whole message
ANSWER_COPIES = 2  # the items of one message's answer copy at most this many times its size
ANSWER_SLACK = 1 << 20  # ... plus this many octets (small messages, headers, structures)


def answer_budget(size: int) -> int:
    """The most octets one message's FETCH answer may hold: ANSWER_COPIES times its
    canonical size plus ANSWER_SLACK. Items past it (``BODY[]<0> BODY[]<1> ...``, each a
    near-whole copy) are refused with ``NO [LIMIT]`` instead of holding up to
    MAX_FETCH_ITEMS copies of a large message in memory at once; ``BODY[HEADER]
    BODY[TEXT]``, ``BODY[] RFC822`` and partial fetches in separate commands stay within it."""
    return ANSWER_COPIES * size + ANSWER_SLACK


def compile_fetch(spec: Any, uid: bool) -> list[Item]:
    """The items of a FETCH (an atom, a macro or a list); UID FETCH always includes UID. An
    item named twice is answered once; more than MAX_FETCH_ITEMS items is BadSyntax (each
    item of a section may hold a copy of the message, built in memory)."""
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
    if len(names) > MAX_FETCH_ITEMS:
        raise BadSyntax(f"more than {MAX_FETCH_ITEMS} FETCH items")
    seen_names: set[str] = set()
    names = [n for n in names if not (n.upper() in seen_names or seen_names.add(n.upper()))]
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
        while pieces and pieces[0].isascii() and pieces[0].isdigit():
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


class NotCached(Exception):
    """``fetch_one(cached=True)``: the message cannot be read without waiting for the disk."""


def _read(view: Any, msg: Any, cached: bool = False) -> bytes:
    if cached:
        f = view.open_cached(msg)
        if f is None:
            raise NotCached()
    else:
        f = view.open(msg)
    with f:
        return canonical_bytes(f.read())


def format_flags(flags: frozenset[str], recent: bool) -> bytes:
    """The inside of a flag list: the flags sorted, then ``\\Recent`` when the session has
    it (RFC 3501 section 2.3.2; a session-only flag, never stored)."""
    names = sorted(flags)
    if recent:
        names.append("\\Recent")
    return " ".join(names).encode("utf-8")


def fetch_one(view: Any, msg: Any, items: list[Item], set_seen: bool,
              flags: frozenset[str] | None = None, recent: bool = False,
              cached: bool = False) -> tuple[bytes | None, frozenset[str]]:
    """The inside of one ``* n FETCH (...)`` and the message's flags afterwards (``flags``:
    what the session knows, default the record's; ``recent``: the session's \\Recent, put
    in the FLAGS list as it is built: nothing is ever substituted in the answer's bytes,
    which hold message content). The answer is None when the message is gone. ``cached``:
    read through ``ICachedFolderView.open_cached`` (on the reactor: no set_seen, ``msg.size``
    known), raising NotCached when the file cannot be opened without the disk."""
    if flags is None:
        flags = msg.flags
    try:
        needs_data = any(i.kind not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE")
                         for i in items)
        data = _read(view, msg, cached) if needs_data else None
        if set_seen and "\\Seen" not in flags:
            flags = view.set_flags(msg, set(flags) | {"\\Seen"})
            if not any(i.kind == "FLAGS" for i in items):
                items = [*items, Item("FLAGS", "FLAGS")]
        parsed: list[Part] = []

        def tree() -> Part:  # parsed only for what needs the MIME structure
            if not parsed:
                parsed.append(Part(data))
            return parsed[0]

        out: list[bytes] = []
        budget = answer_budget(len(data)) if data is not None else 0
        for i in items:
            if data is not None and sum(map(len, out)) > budget:
                raise Refuse(f"the FETCH items would copy the message more than "
                             f"{ANSWER_COPIES} times", "LIMIT")
            if i.kind == "UID":
                out.append(b"UID %d" % msg.uid)
            elif i.kind == "FLAGS":
                out.append(b"FLAGS (" + format_flags(flags, recent) + b")")
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
        if data is not None and sum(map(len, out)) > budget:
            raise Refuse(f"the FETCH items would copy the message more than {ANSWER_COPIES} "
                         "times", "LIMIT")
        return b" ".join(out), flags
    except (StoreError, FileNotFoundError):
        return None, flags


BATCH_BYTES = 4 << 20  # octets of FETCH answers built per trip to a thread


def fetch_many(view: Any, msgs: list, items: list[Item], set_seen: bool
               ) -> list[tuple[bytes | None, frozenset[str]]]:
    """``fetch_one`` for the first of ``msgs`` ((record, session flags, \\Recent) triples;
    blocking): at least one, and no more once BATCH_BYTES of answers are built (the caller
    asks again for the rest)."""
    out: list[tuple[bytes | None, frozenset[str]]] = []
    total = 0
    for m, flags, recent in msgs:
        blob, flags = fetch_one(view, m, items, set_seen, flags, recent)
        out.append((blob, flags))
        total += len(blob or b"")
        if total >= BATCH_BYTES:
            break
    return out


CACHED_MAX = 256 << 10  # octets: the largest message FETCH reads on the reactor


def fetch_cached(view: Any, msgs: list, items: list[Item]) -> list[tuple[bytes | None,
                                                                          frozenset[str]]]:
    """``fetch_many`` without a thread, for the leading ``msgs`` the reactor may read: each
    of known size up to CACHED_MAX whose file opens without waiting for the disk
    (``ICachedFolderView.open_cached``); stops at the first other one (the caller takes the
    rest to a thread). Never sets \\Seen (that renames files: the thread's work)."""
    out: list[tuple[bytes | None, frozenset[str]]] = []
    total = 0
    for m, flags, recent in msgs:
        if m.size is None or m.size > CACHED_MAX:
            break
        try:
            blob, flags = fetch_one(view, m, items, False, flags, recent, cached=True)
        except NotCached:
            break
        if blob is None:
            break  # gone or renamed: the thread's look-up decides
        out.append((blob, flags))
        total += len(blob)
        if total >= BATCH_BYTES:
            break
    return out


def store_flags(view: Any, msgs: list, mode: str, flags: list[str]) -> list[frozenset[str]]:
    """STORE: replace (FLAGS), add (+FLAGS) or remove (-FLAGS) flags (blocking) on
    (record, flags the session knows) pairs; returns each message's flags afterwards (a
    message gone meanwhile keeps its old flags in the session until the next refresh)."""
    given = {f for f in flags if f.lower() != "\\recent"}
    result: list[frozenset[str]] = []
    for m, known in msgs:
        current = set(known)
        if mode == "FLAGS":
            new = given
        elif mode == "+FLAGS":
            new = current | given
        else:
            low = {f.lower() for f in given}
            new = {f for f in current if f.lower() not in low}
        now = frozenset(known)
        if new != current:
            try:
                now = view.set_flags(m, new)
            except StoreError:
                pass
        result.append(now)
    return result


# -- SEARCH ------------------------------------------------------------------------------

_FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
              "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True),
              "SEEN": ("\\Seen", True), "UNANSWERED": ("\\Answered", False),
              "UNDELETED": ("\\Deleted", False), "UNDRAFT": ("\\Draft", False),
              "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False)}


MAX_SEARCH_DEPTH = 16  # nesting of NOT / OR / parentheses in one SEARCH
MAX_SEARCH_KEYS = 256  # search keys in one SEARCH


def compile_search(args: list, depth: int = 0, budget: list[int] | None = None) -> list:
    """SEARCH keys as a list of (key, argument) nodes; raises BadSyntax (also for more than
    MAX_SEARCH_KEYS keys or nesting deeper than MAX_SEARCH_DEPTH: the matcher recurses)."""
    if budget is None:
        budget = [MAX_SEARCH_KEYS]
    tokens = list(args)
    tokens.reverse()  # popped from the end: linear in the number of keys
    out = []
    while tokens:
        out.append(_one(tokens, depth, budget))
    if not out:
        raise BadSyntax("SEARCH needs a key")
    return out


def _take(tokens: list) -> Any:
    if not tokens:
        raise BadSyntax("SEARCH key needs an argument")
    return tokens.pop()


def _one(tokens: list, depth: int, budget: list[int]) -> tuple:
    budget[0] -= 1
    if budget[0] < 0:
        raise BadSyntax(f"more than {MAX_SEARCH_KEYS} SEARCH keys")
    if depth >= MAX_SEARCH_DEPTH:
        raise BadSyntax(f"SEARCH nested deeper than {MAX_SEARCH_DEPTH}")
    t = _take(tokens)
    if isinstance(t, list):
        return ("AND", compile_search(t, depth + 1, budget))
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
        return ("NOT", _one(tokens, depth + 1, budget))
    if key == "OR":
        return ("OR", _one(tokens, depth + 1, budget), _one(tokens, depth + 1, budget))
    if key in ("LARGER", "SMALLER"):
        try:  # RFC 3501 section 9: number = 1*DIGIT (ASCII digits only: no sign, no "_")
            text = str(_take(tokens))
            if not (text.isascii() and text.isdigit()):
                raise ValueError(text)
            return (key, int(text))
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
        spec = _take(tokens)
        if not isinstance(spec, str):
            raise BadSyntax("UID needs a sequence set")
        parse_seqset(str(spec), 1)  # syntax checked now: BAD before any message is read
        return ("UID", str(spec))
    if re.fullmatch(r"[0-9*:,]+", key):
        parse_seqset(key, 1)
        return ("SEQ", key)
    raise BadSyntax(f"unknown SEARCH key {key[:30]}")


def search(sel: Any, query: list, uids: list[int], flags: list[frozenset[str]]) -> list[int]:
    """The UIDs (of ``uids``, in order, ``flags`` aligned with them: the session's) that
    match every node (blocking). Sequence and UID sets are parsed once (parse.SeqSet)."""
    out = []
    largest_uid = uids[-1] if uids else 0
    sets: dict[tuple[str, int], SeqSet] = {}
    for pos, uid in enumerate(uids):
        msg = sel.msg(uid)
        if msg is None:
            continue
        cache: dict[str, Any] = {"sets": sets, "flags": flags[pos]}
        try:
            if all(_match(n, sel, msg, pos + 1, len(uids), largest_uid, cache) for n in query):
                out.append(uid)
        except (StoreError, FileNotFoundError):
            continue
    return out


def _seqset(cache: dict, text: str, largest: int) -> SeqSet:
    """The parsed set, once per SEARCH (``cache["sets"]`` is shared by all messages)."""
    sets = cache["sets"]
    key = (text, largest)
    if key not in sets:
        sets[key] = parse_seqset(text, largest)
    return sets[key]


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
        return (name.lower() in {f.lower() for f in cache["flags"]}) == want
    if key == "RECENT":
        return msg.uid in sel.recent
    if key == "NEW":
        return msg.uid in sel.recent and "\\Seen" not in cache["flags"]
    if key == "OLD":
        return msg.uid not in sel.recent
    if key == "UID":
        return msg.uid in _seqset(cache, arg, largest)
    if key == "SEQ":
        return seq in _seqset(cache, arg, count)
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
