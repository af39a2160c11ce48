"""Sieve scripts (RFC 5228): the lexer, the parser and the validator (no I/O, no Twisted).

``parse(text)`` turns a script into a list of ``Command`` nodes or raises ``SieveSyntaxError``
with the line (1-based) and a message; ManageSieve's PUTSCRIPT and CHECKSCRIPT, the admin tool
and the per-recipient rules stage all call it, so a script that one accepts the others run.

The grammar is RFC 5228 section 8 (tokens: identifiers, tags, numbers with K/M/G, quoted
strings with ``\\`` escapes, ``text:`` multi-line strings with dot-unstuffing, ``#`` and
``/* */`` comments). The validator then checks every command and test against ``SPECS``:
its kind (control, action, test), the extension it needs (named in ``require``: using one
not required, or requiring one not in ``EXTENSIONS``, is an error), its tagged arguments
(with their own argument types and mutually exclusive groups), its positional arguments and
its tests. ``EXTENSIONS`` is what the server supports (the ManageSieve "SIEVE" capability);
``REFUSED`` names the well-known ones it does not, with the reason the error gives.

Why not sievelib's parser (checked 1.6.0): it keeps strings with their quotes and escapes
(every consumer must unquote), knows only the ``i;octet`` and ``i;ascii-casemap``
comparators, has no ``ereject`` and no ``string`` test, and extending it means adding
classes to its module globals. A validator written against the RFCs is about as long and
gives exact line numbers for every error. sievelib stays a test dependency: its ManageSieve
client is one of the real clients of the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# What `require` accepts (RFC 5228 section 3.2) and ManageSieve's SIEVE capability lists.
EXTENSIONS = (
    "fileinto", "reject", "ereject", "envelope", "vacation", "copy", "body", "variables",
    "relational", "comparator-i;ascii-numeric", "comparator-i;octet",
    "comparator-i;ascii-casemap", "imap4flags",
)

# Well-known extensions that are refused, with the reason (README "Rules and out-of-office").
REFUSED = {
    "regex": "regular expressions can take exponential time on crafted mail (draft, not an RFC)",
    "enotify": "no notification method (mailto, xmpp) is offered",
    "mailbox": "not implemented (fileinto creates a missing folder, as :create would)",
    "mboxmetadata": "not implemented",
    "servermetadata": "no server metadata is exposed",
    "include": "one active script per mailbox; scripts do not include others",
    "editheader": "rules do not rewrite messages",
    "date": "not implemented",
    "index": "not implemented",
    "duplicate": "not implemented",
    "spamtest": "no spam score is computed (the content check stage refuses spam)",
    "spamtestplus": "no spam score is computed",
    "virustest": "no virus score is computed",
    "environment": "not implemented",
    "subaddress": "addresses with +detail are not delivered separately",
    "vacation-seconds": "replies are limited per day (:days), never per second",
    "encoded-character": "not implemented",
    "foreverypart": "not implemented",
    "mime": "not implemented",
    "extracttext": "not implemented",
    "special-use": "not implemented",
    "fcc": "not implemented",
    "imapsieve": "POP3 has no IMAP events",
}

MAX_NESTING = 15  # blocks inside blocks (Pigeonhole's default too)
MAX_SCRIPT_SIZE = 1024 * 1024  # octets the parser looks at, whatever the quota says


MAX_MESSAGE = 300  # characters of an error message (it may quote the script)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """An error message that quotes a script, made one printable line: every character
    that is not printable (CR, LF, NUL, other controls, Unicode line and format characters)
    written as its Python escape (``\\n``, ``\\x00``, ``\\u2028``), at most ``limit``
    characters (then ``...``). ManageSieve replies, the admin tool's one-line errors and the
    log all show messages through it."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class SieveSyntaxError(ValueError):
    """A script that cannot run: ``line`` (1-based) and ``message`` (no line prefix; one
    printable line, see ``one_line``, whatever part of the script it quotes)."""

    def __init__(self, line: int, message: str) -> None:
        message = one_line(message)
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


# --------------------------------------------------------------------------- the tree


@dataclass
class StringList:
    """A string or a string list (``single``: written as one string, not in brackets)."""

    values: list[str]
    single: bool = False
    lines: list[int] = field(default_factory=list)  # the line of each string


@dataclass
class Tag:
    name: str  # lower case, with the colon: ":contains"


@dataclass
class Number:
    value: int


Argument = StringList | Tag | Number


@dataclass
class Command:
    """One command or test: its name (lower case), arguments, tests, block and line. After
    validation ``tags`` maps each tag to its argument (None when it takes none) and
    ``positional`` holds the rest in order."""

    name: str
    line: int
    arguments: list[Argument] = field(default_factory=list)
    tests: list[Command] = field(default_factory=list)
    block: list[Command] | None = None
    tags: dict[str, Argument | None] = field(default_factory=dict)
    positional: list[Argument] = field(default_factory=list)

    def strings(self, index: int) -> list[str]:
        """The positional argument ``index`` as a list of strings."""
        arg = self.positional[index]
        assert isinstance(arg, StringList)
        return arg.values

    def tag_strings(self, tag: str) -> list[str] | None:
        arg = self.tags.get(tag)
        return arg.values if isinstance(arg, StringList) else None

    def tag_number(self, tag: str) -> int | None:
        arg = self.tags.get(tag)
        return arg.value if isinstance(arg, Number) else None


# --------------------------------------------------------------------------- the lexer


_TOKEN = re.compile(
    rb"""
    (?P<ws>[ \t\r\n]+)
  | (?P<hash>\#[^\n]*)
  | (?P<bracket>/\*)
  | (?P<multiline>text:[ \t]*(?:\#[^\n]*)?\r?\n)
  | (?P<string>")
  | (?P<tag>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+[KkMmGg]?)
  | (?P<identifier>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<special>[\[\](){};,])
    """,
    re.VERBOSE,
)
_UNITS = {b"k": 1 << 10, b"m": 1 << 20, b"g": 1 << 30}


@dataclass
class _Token:
    kind: str  # identifier, tag, number, string, multiline, or the special character itself
    value: object
    line: int


def _tokens(data: bytes) -> list[_Token]:
    out: list[_Token] = []
    pos, line, end = 0, 1, len(data)
    while pos < end:
        m = _TOKEN.match(data, pos)
        if m is None:
            near = data[pos:pos + 10].decode("utf-8", "replace").split("\n")[0]
            raise SieveSyntaxError(line, f"unexpected character near {near!r}")
        kind = m.lastgroup
        text = m.group(0)
        if kind == "ws" or kind == "hash":
            line += text.count(b"\n")
            pos = m.end()
            continue
        if kind == "bracket":
            close = data.find(b"*/", m.end())
            if close < 0:
                raise SieveSyntaxError(line, "unterminated /* comment")
            line += data.count(b"\n", pos, close)
            pos = close + 2
            continue
        if kind == "string":
            start_line = line
            chars = bytearray()
            i = m.end()
            while True:
                if i >= end:
                    raise SieveSyntaxError(start_line, "unterminated quoted string")
                c = data[i]
                if c == 0x22:  # "
                    break
                if c == 0x5C and i + 1 < end:  # backslash: the next octet as itself
                    i += 1
                    c = data[i]
                if c == 0x0A:
                    line += 1
                chars.append(c)
                i += 1
            out.append(_Token("string", _decode(bytes(chars), start_line), start_line))
            pos = i + 1
            continue
        if kind == "multiline":
            start_line = line
            line += 1
            i = m.end()
            lines: list[bytes] = []
            while True:
                nl = data.find(b"\n", i)
                if nl < 0:
                    raise SieveSyntaxError(start_line, "text: without the closing '.' line")
                raw = data[i:nl]
                line += 1
                i = nl + 1
                if raw.rstrip(b"\r") == b".":
                    break
                if raw.startswith(b".."):
                    raw = raw[1:]
                lines.append(raw.rstrip(b"\r") + b"\r\n")
            out.append(_Token("string", _decode(b"".join(lines), start_line), start_line))
            line -= 1  # the newline after "." is counted by the whitespace that follows
            pos = i - 1
            continue
        if kind == "number":
            digits, unit = text, 1
            if text[-1:].lower() in _UNITS:
                digits, unit = text[:-1], _UNITS[text[-1:].lower()]
            value = int(digits) * unit
            if value > 2**63 - 1:
                raise SieveSyntaxError(line, f"number {text.decode()} is too large")
            out.append(_Token("number", value, line))
        elif kind == "special":
            out.append(_Token(text.decode(), text.decode(), line))
        else:
            out.append(_Token(kind, text.decode("ascii").lower(), line))
        pos = m.end()
    return out


def _decode(raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SieveSyntaxError(line, "a string is not UTF-8 (RFC 5228 section 2.4.2)") from None


# --------------------------------------------------------------------------- the parser


class _Parser:
    def __init__(self, tokens: list[_Token], end_line: int) -> None:
        self.tokens = tokens
        self.i = 0
        self.end_line = end_line  # the line the script ends on

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, *kinds: str) -> _Token:
        tok = self.peek()
        if tok is None:
            raise SieveSyntaxError(self.end_line,
                                   f"the script ends where {' or '.join(kinds)} is expected")
        if tok.kind not in kinds:
            raise SieveSyntaxError(tok.line, f"{_show(tok)} where {' or '.join(kinds)} is "
                                   "expected")
        self.i += 1
        return tok

    def commands(self, depth: int, closing: bool) -> list[Command]:
        out: list[Command] = []
        while True:
            tok = self.peek()
            if tok is None:
                if closing:
                    self.take("}")
                return out
            if tok.kind == "}" and closing:
                self.i += 1
                return out
            out.append(self.command(depth))

    def command(self, depth: int) -> Command:
        name = self.take("identifier")
        cmd = Command(str(name.value), name.line)
        self.arguments(cmd, depth)
        tok = self.take(";", "{")
        if tok.kind == "{":
            if depth >= MAX_NESTING:
                raise SieveSyntaxError(tok.line, f"blocks nested more than {MAX_NESTING} deep")
            cmd.block = self.commands(depth + 1, closing=True)
        return cmd

    def arguments(self, cmd: Command, depth: int) -> None:
        while True:
            tok = self.peek()
            if tok is None:
                return
            if tok.kind == "tag":
                self.i += 1
                cmd.arguments.append(Tag(str(tok.value)))
            elif tok.kind == "number":
                self.i += 1
                cmd.arguments.append(Number(int(tok.value)))  # type: ignore[call-overload]
            elif tok.kind == "string":
                self.i += 1
                cmd.arguments.append(StringList([str(tok.value)], single=True, lines=[tok.line]))
            elif tok.kind == "[":
                self.i += 1
                first = self.take("string")
                values, lines = [str(first.value)], [first.line]
                while self.take(",", "]").kind == ",":
                    item = self.take("string")
                    values.append(str(item.value))
                    lines.append(item.line)
                cmd.arguments.append(StringList(values, lines=lines))
            else:
                break
        tok = self.peek()
        if tok is None:
            return
        if tok.kind == "identifier":
            cmd.tests.append(self.test(depth))
        elif tok.kind == "(":
            self.i += 1
            cmd.tests.append(self.test(depth))
            while self.take(",", ")").kind == ",":
                cmd.tests.append(self.test(depth))

    def test(self, depth: int) -> Command:
        if depth >= MAX_NESTING * 2:
            raise SieveSyntaxError(self.peek().line, "tests nested too deep")  # type: ignore[union-attr]
        name = self.take("identifier")
        cmd = Command(str(name.value), name.line)
        self.arguments(cmd, depth + 1)
        return cmd


def _show(tok: _Token) -> str:
    if tok.kind in ("identifier", "tag"):
        return f"{tok.kind} {tok.value}"
    if tok.kind == "number":
        return f"number {tok.value}"
    if tok.kind == "string":
        return "a string"
    return repr(tok.kind)


# --------------------------------------------------------------------------- the validator

S, SL, N = "string", "string-list", "number"  # argument types


@dataclass(frozen=True)
class Spec:
    """What one command or test takes. ``tags``: tag -> argument type (None: no argument);
    ``groups``: sets of mutually exclusive tags; ``tag_ext``: tag -> extension it needs;
    ``args``: positional types; ``tests``: "none", "one" or "list"; ``ext``: the extension."""

    kind: str  # control, action, test
    args: tuple[str, ...] = ()
    tags: dict[str, str | None] = field(default_factory=dict)
    groups: tuple[frozenset[str], ...] = ()
    tag_ext: dict[str, str] = field(default_factory=dict)
    tests: str = "none"
    ext: str | None = None
    block: bool = False


_MATCH = {":is": None, ":contains": None, ":matches": None, ":count": S, ":value": S}
_MATCH_GROUP = frozenset(_MATCH)
_COMPARATOR = {":comparator": S}
_ADDRESS_PART = {":localpart": None, ":domain": None, ":all": None}
_ADDRESS_GROUP = frozenset(_ADDRESS_PART)
_REL = {":count": "relational", ":value": "relational"}
_COPY = {":copy": None}
_FLAGS = {":flags": SL}


def _match_spec(args: tuple[str, ...], address: bool = False, ext: str | None = None,
                extra: dict[str, str | None] | None = None,
                extra_groups: tuple[frozenset[str], ...] = (),
                extra_ext: dict[str, str] | None = None) -> Spec:
    tags: dict[str, str | None] = {**_MATCH, **_COMPARATOR}
    groups: tuple[frozenset[str], ...] = (_MATCH_GROUP,)
    if address:
        tags.update(_ADDRESS_PART)
        groups += (_ADDRESS_GROUP,)
    tags.update(extra or {})
    return Spec("test", args, tags, groups + extra_groups, {**_REL, **(extra_ext or {})},
                ext=ext)


SPECS: dict[str, Spec] = {
    # controls (RFC 5228 section 3)
    "require": Spec("control", (SL,)),
    "if": Spec("control", tests="one", block=True),
    "elsif": Spec("control", tests="one", block=True),
    "else": Spec("control", block=True),
    "stop": Spec("control"),
    # actions (section 4 and the extensions)
    "keep": Spec("action", tags=dict(_FLAGS), tag_ext={":flags": "imap4flags"}),
    "discard": Spec("action"),
    "redirect": Spec("action", (S,), tags=dict(_COPY), tag_ext={":copy": "copy"}),
    "fileinto": Spec("action", (S,), tags={**_COPY, **_FLAGS},
                     tag_ext={":copy": "copy", ":flags": "imap4flags"}, ext="fileinto"),
    "reject": Spec("action", (S,), ext="reject"),
    "ereject": Spec("action", (S,), ext="ereject"),
    "vacation": Spec("action", (S,), tags={":days": N, ":subject": S, ":from": S,
                                           ":addresses": SL, ":mime": None, ":handle": S},
                     ext="vacation"),
    "set": Spec("action", (S, S), tags={":lower": None, ":upper": None, ":lowerfirst": None,
                                        ":upperfirst": None, ":quotewildcard": None,
                                        ":length": None},
                groups=(frozenset({":lower", ":upper"}),
                        frozenset({":lowerfirst", ":upperfirst"})), ext="variables"),
    "setflag": Spec("action", (SL,), ext="imap4flags"),
    "addflag": Spec("action", (SL,), ext="imap4flags"),
    "removeflag": Spec("action", (SL,), ext="imap4flags"),
    # tests (section 5 and the extensions)
    "address": _match_spec((SL, SL), address=True),
    "envelope": _match_spec((SL, SL), address=True, ext="envelope"),
    "header": _match_spec((SL, SL)),
    "string": _match_spec((SL, SL), ext="variables"),
    "body": _match_spec((SL,), ext="body", extra={":raw": None, ":content": SL, ":text": None},
                        extra_groups=(frozenset({":raw", ":content", ":text"}),)),
    "hasflag": _match_spec((SL,), ext="imap4flags"),
    "exists": Spec("test", (SL,)),
    "size": Spec("test", (N,), tags={":over": None, ":under": None},
                 groups=(frozenset({":over", ":under"}),)),
    "true": Spec("test"),
    "false": Spec("test"),
    "not": Spec("test", tests="one"),
    "allof": Spec("test", tests="list"),
    "anyof": Spec("test", tests="list"),
}

COMPARATORS = {"i;octet": None, "i;ascii-casemap": None,
               "i;ascii-numeric": "comparator-i;ascii-numeric"}
RELATIONS = ("gt", "ge", "lt", "le", "eq", "ne")
ENVELOPE_PARTS = ("from", "to")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse(text: str | bytes, max_size: int = MAX_SCRIPT_SIZE) -> list[Command]:
    """Parse and validate a Sieve script; return its commands. Raises ``SieveSyntaxError``
    (line and message) for any error of RFC 5228 section 8 or of the supported extensions."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > max_size:
        raise SieveSyntaxError(1, f"the script is larger than {max_size} octets")
    tokens = _tokens(data)
    commands = _Parser(tokens, data.count(b"\n") + 1).commands(0, closing=False)
    _Validator().block(commands, top=True)
    return commands


def check(text: str | bytes) -> str | None:
    """None when the script is valid, else its error (``"line N: message"``)."""
    try:
        parse(text)
    except SieveSyntaxError as e:
        return str(e)
    return None


def required_extensions(commands: list[Command]) -> set[str]:
    """The extensions the script's ``require`` commands name."""
    out: set[str] = set()
    for cmd in commands:
        if cmd.name == "require":
            out.update(v.lower() for v in cmd.strings(0))
    return out


class _Validator:
    def __init__(self) -> None:
        self.required: set[str] = set()

    def block(self, commands: list[Command], top: bool = False) -> None:
        previous: str | None = None
        may_require = top
        for cmd in commands:
            spec = self.spec(cmd)
            if spec.kind == "test":
                raise SieveSyntaxError(cmd.line, f"{cmd.name} is a test, not a command")
            if cmd.name == "require" and not may_require:
                raise SieveSyntaxError(cmd.line, "require must come before any other command "
                                       "(RFC 5228 section 3.2)")
            if cmd.name != "require":
                may_require = False
            if cmd.name in ("elsif", "else") and previous not in ("if", "elsif"):
                raise SieveSyntaxError(cmd.line, f"{cmd.name} must follow if or elsif")
            self.command(cmd, spec)
            if cmd.name == "require":
                self.do_require(cmd)
            previous = cmd.name

    def spec(self, cmd: Command) -> Spec:
        spec = SPECS.get(cmd.name)
        if spec is None:
            raise SieveSyntaxError(cmd.line, f"unknown command or test '{cmd.name}'")
        if spec.ext is not None and spec.ext not in self.required:
            raise SieveSyntaxError(cmd.line, f"{cmd.name} needs require \"{spec.ext}\"")
        return spec

    def do_require(self, cmd: Command) -> None:
        arg = cmd.positional[0]
        assert isinstance(arg, StringList)
        for name, line in zip(arg.values, arg.lines or [cmd.line] * len(arg.values),
                              strict=True):
            ext = name.lower()
            if ext in EXTENSIONS:
                self.required.add(ext)
            elif ext in REFUSED:
                raise SieveSyntaxError(line, f"extension \"{name}\" is not supported: "
                                       f"{REFUSED[ext]}")
            else:
                raise SieveSyntaxError(line, f"unknown extension \"{name}\"")

    def command(self, cmd: Command, spec: Spec) -> None:
        self.arguments(cmd, spec)
        if spec.tests == "none" and cmd.tests:
            inner = SPECS.get(cmd.tests[0].name)
            if inner is not None and inner.kind != "test":
                raise SieveSyntaxError(cmd.tests[0].line, f"{cmd.tests[0].name} is not a test "
                                       "(is a '{' missing before it?)")
            raise SieveSyntaxError(cmd.line, f"{cmd.name} takes no test")
        if spec.tests == "one" and len(cmd.tests) != 1:
            raise SieveSyntaxError(cmd.line, f"{cmd.name} needs exactly one test")
        if spec.tests == "list" and not cmd.tests:
            raise SieveSyntaxError(cmd.line, f"{cmd.name} needs a list of tests")
        for test in cmd.tests:
            tspec = self.spec(test)
            if tspec.kind != "test":
                raise SieveSyntaxError(test.line, f"{test.name} is not a test")
            self.command(test, tspec)
        if spec.kind != "test":
            if spec.block and cmd.block is None:
                raise SieveSyntaxError(cmd.line, f"{cmd.name} needs a block {{ ... }}")
            if not spec.block and cmd.block is not None:
                raise SieveSyntaxError(cmd.line, f"{cmd.name} takes no block; a ';' is missing")
            if cmd.block is not None:
                self.block(cmd.block)

    def arguments(self, cmd: Command, spec: Spec) -> None:
        args = list(cmd.arguments)
        i = 0
        while i < len(args) and isinstance(args[i], Tag):
            tag = args[i].name  # type: ignore[union-attr]
            if tag not in spec.tags:
                raise SieveSyntaxError(cmd.line, f"{cmd.name} has no tag {tag}")
            need = spec.tag_ext.get(tag)
            if need is not None and need not in self.required:
                raise SieveSyntaxError(cmd.line, f"{tag} needs require \"{need}\"")
            if tag in cmd.tags:
                raise SieveSyntaxError(cmd.line, f"{cmd.name}: {tag} given twice")
            for group in spec.groups:
                if tag in group and group & set(cmd.tags):
                    other = sorted(group & set(cmd.tags))[0]
                    raise SieveSyntaxError(cmd.line, f"{cmd.name}: {tag} and {other} exclude "
                                           "each other")
            kind = spec.tags[tag]
            value: Argument | None = None
            if kind is not None:
                if i + 1 >= len(args) or not _is(args[i + 1], kind):
                    raise SieveSyntaxError(cmd.line, f"{cmd.name}: {tag} needs a {kind}")
                value = args[i + 1]
                i += 1
            cmd.tags[tag] = value
            i += 1
        rest = args[i:]
        if any(isinstance(a, Tag) for a in rest):
            raise SieveSyntaxError(cmd.line, f"{cmd.name}: tagged arguments must come first")
        if len(rest) != len(spec.args):
            raise SieveSyntaxError(cmd.line, f"{cmd.name} takes {len(spec.args)} positional "
                                   f"argument(s), not {len(rest)}")
        for arg, kind in zip(rest, spec.args, strict=True):
            if not _is(arg, kind):
                raise SieveSyntaxError(cmd.line, f"{cmd.name}: a {kind} is expected")
        cmd.positional = rest
        self.semantics(cmd)

    def semantics(self, cmd: Command) -> None:
        """The per-command checks that need the argument values (RFC text, not grammar)."""
        comparator = cmd.tag_strings(":comparator")
        if comparator is not None:
            name = comparator[0].lower()
            if name not in COMPARATORS:
                raise SieveSyntaxError(cmd.line, f"unknown comparator \"{comparator[0]}\"")
            need = COMPARATORS[name]
            if need is not None and need not in self.required:
                raise SieveSyntaxError(cmd.line, f"comparator {name} needs require \"{need}\"")
            if name == "i;ascii-numeric" and (":contains" in cmd.tags or ":matches" in cmd.tags):
                raise SieveSyntaxError(cmd.line, "i;ascii-numeric does not do substring "
                                       "matches (RFC 4790 section 9.1)")
        for rel in (":count", ":value"):
            value = cmd.tag_strings(rel)
            if value is not None and value[0].lower() not in RELATIONS:
                raise SieveSyntaxError(cmd.line, f"{rel} \"{value[0]}\" is not one of "
                                       f"{', '.join(RELATIONS)} (RFC 5231)")
        if cmd.name == "envelope":
            for part in cmd.strings(0):
                if part.lower() not in ENVELOPE_PARTS and "${" not in part:
                    raise SieveSyntaxError(cmd.line, f"envelope part \"{part}\" is not "
                                           "supported (from, to)")
        if cmd.name == "vacation":
            days = cmd.tag_number(":days")
            if days is not None and days < 0:
                raise SieveSyntaxError(cmd.line, "vacation :days must not be negative")
        if cmd.name == "set":
            name = cmd.strings(0)[0]
            if not _VARIABLE_NAME.match(name):
                raise SieveSyntaxError(cmd.line, f"\"{name}\" is not a variable name "
                                       "(RFC 5229 section 3)")
        if cmd.name in ("redirect",):
            target = cmd.strings(0)[0]
            if "${" not in target and not _looks_like_address(target):
                raise SieveSyntaxError(cmd.line, f"redirect: \"{target}\" is not an address")
        if cmd.name == "size" and not cmd.tags:
            raise SieveSyntaxError(cmd.line, "size needs :over or :under")


def _looks_like_address(text: str) -> bool:
    local, at, domain = text.strip().rpartition("@")
    return bool(at and local and domain and " " not in text.strip() and "." in domain)


def _is(arg: Argument, kind: str) -> bool:
    if kind == N:
        return isinstance(arg, Number)
    if kind == S:
        return isinstance(arg, StringList) and arg.single
    return isinstance(arg, StringList)
