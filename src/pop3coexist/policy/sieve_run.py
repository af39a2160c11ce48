"""The Sieve interpreter: one parsed script (``policy.sieve``) over one message for one
recipient gives a ``Result``, the list of actions to take (no I/O: executing them is
``policy.rules``'s job, after the whole script has run, so an error part-way takes nothing).

Semantics follow RFC 5228 (section 2.10: implicit keep, cancelled by keep, fileinto, redirect
without :copy, discard, reject, ereject; duplicate keep/fileinto/redirect actions collapse),
with RFC 5173 (body), 5229 (variables and match variables), 5230 (vacation: only recorded
here), 5231 (relational :count/:value), 5232 (imap4flags, the internal variable only),
3894 (:copy), 5429 (reject, ereject: incompatible with keep, fileinto and vacation), 4790
(comparators i;octet, i;ascii-casemap, i;ascii-numeric).

Limits (``Limits``): steps (commands and tests evaluated, plus the work of each match,
counted in units of 1000 characters compared), wall time (a monotonic deadline), actions
and redirects. Going past a limit, or any other run-time error, raises ``SieveRuntimeError``
with the line: the caller then keeps the message (implicit keep, section 2.10.6).

``:matches`` is a linear-time wildcard matcher (no regular expressions: crafted mail cannot
make it backtrack exponentially); its wildcards fill ``${1}`` ... ``${9}``.
"""

from __future__ import annotations

import email
import email.policy
import re
import time
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message as EmailMessage
from email.utils import getaddresses

from pop3coexist.policy.sieve import Command, Number, one_line, required_extensions


class SieveRuntimeError(Exception):
    """A script that failed while running (line, message); the message is kept."""

    def __init__(self, line: int, message: str) -> None:
        message = one_line(message)  # it may quote the script or the message
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Per run: ``steps`` (see the module docstring), ``seconds`` of wall time, ``actions``
    in the result, ``redirects`` among them."""

    steps: int = 200_000
    seconds: float = 1.0
    actions: int = 32
    redirects: int = 4


@dataclass
class Action:
    """One action. ``kind``: keep, fileinto, redirect, discard, reject, ereject, vacation;
    ``argument``: the folder, address or reason text; ``copy``: redirect/fileinto :copy;
    ``flags``: keep/fileinto flags (imap4flags); ``options``: vacation's (``days``,
    ``subject``, ``from``, ``addresses``, ``mime``, ``handle``)."""

    kind: str
    argument: str = ""
    copy: bool = False
    flags: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class Result:
    """What the script decided: the explicit actions in order, and whether the implicit keep
    still stands (RFC 5228 section 2.10.2)."""

    actions: list[Action] = field(default_factory=list)
    implicit_keep: bool = True
    flags: tuple[str, ...] = ()

    @property
    def keeps(self) -> bool:
        """True when the message is stored in the mailbox (keep, fileinto or implicit keep)."""
        return self.implicit_keep or any(a.kind in ("keep", "fileinto") for a in self.actions)

    def of(self, kind: str) -> list[Action]:
        return [a for a in self.actions if a.kind == kind]


@dataclass
class MailContext:
    """The message as the script sees it: the envelope (``sender`` "" for <>, ``recipient``
    as given at RCPT), the header section and body as bytes, the size in octets."""

    sender: str
    recipient: str
    header_bytes: bytes
    body_bytes: bytes
    size: int
    _headers: EmailMessage | None = None
    _full: EmailMessage | None = None

    @classmethod
    def from_bytes(cls, sender: str, recipient: str, data: bytes) -> MailContext:
        """Split a message (CRLF or LF lines) into its header section and body."""
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = data.find(sep)
            if i >= 0 and (sep == b"\n\n" or b"\n\n" not in data[:i]):
                return cls(sender, recipient, data[:i + len(sep) // 2], data[i + len(sep):],
                           len(data))
        return cls(sender, recipient, data, b"", len(data))

    @property
    def headers(self) -> EmailMessage:
        if self._headers is None:
            self._headers = email.message_from_bytes(self.header_bytes + b"\n",
                                                     policy=email.policy.compat32)
        return self._headers

    @property
    def full(self) -> EmailMessage:
        if self._full is None:
            self._full = email.message_from_bytes(self.header_bytes + b"\r\n" + self.body_bytes,
                                                  policy=email.policy.compat32)
        return self._full

    def header_values(self, name: str) -> list[str]:
        """Every value of the header field ``name``: unfolded, RFC 2047 decoded, trimmed."""
        out = []
        for raw in self.headers.get_all(name, []) or []:
            out.append(decode_value(raw))
        return out


def decode_value(raw: object) -> str:
    """A header field value unfolded and with RFC 2047 encoded words decoded."""
    text = re.sub(r"\r?\n[ \t]", " ", str(raw))
    try:
        text = str(make_header(decode_header(text)))
    except Exception:  # a malformed encoded word: compare what is there
        pass
    return text.strip()


# --------------------------------------------------------------------------- comparators

_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _fold(comparator: str, text: str) -> str:
    return text.translate(_UPPER) if comparator == "i;ascii-casemap" else text


def _numeric(text: str) -> float:
    """RFC 4790 section 9.1.1: the leading digits' value; no digit: positive infinity."""
    m = re.match(r"[0-9]+", text)
    return int(m.group(0)) if m else float("inf")


def _order(comparator: str, a: str, b: str) -> int:
    if comparator == "i;ascii-numeric":
        x, y = _numeric(a), _numeric(b)
    else:
        x, y = _fold(comparator, a), _fold(comparator, b)  # type: ignore[assignment]
    return (x > y) - (x < y)


def _relation(rel: str, order: int) -> bool:
    return {"gt": order > 0, "ge": order >= 0, "lt": order < 0, "le": order <= 0,
            "eq": order == 0, "ne": order != 0}[rel]


def _glob(pattern: str, text: str, comparator: str) -> list[str] | None:
    """``:matches``: ``*`` any run, ``?`` one character, ``\\`` quotes the next one. Linear
    backtracking over the last ``*`` only (O(len(pattern) * len(text))). Returns the
    wildcards' values (RFC 5229 section 3.2) or None."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            tokens.append(("lit", pattern[i + 1]))
            i += 2
            continue
        tokens.append(("*", "") if c == "*" else ("?", "") if c == "?" else ("lit", c))
        i += 1
    wild = [k for k, (kind, _) in enumerate(tokens) if kind != "lit"]
    index = {k: n for n, k in enumerate(wild)}
    caps: list[list[int]] = [[0, 0] for _ in wild]
    t = _fold(comparator, text)
    lits = [(kind, _fold(comparator, ch)) for kind, ch in tokens]
    pi = ti = 0
    star_pi, star_ti = -1, 0
    n, m = len(t), len(lits)
    while ti < n:
        if pi < m and (lits[pi][0] == "?" or (lits[pi][0] == "lit" and lits[pi][1] == t[ti])):
            if lits[pi][0] == "?":
                caps[index[pi]] = [ti, ti + 1]
            pi += 1
            ti += 1
        elif pi < m and lits[pi][0] == "*":
            star_pi, star_ti = pi, ti
            caps[index[pi]] = [ti, ti]
            pi += 1
        elif star_pi >= 0:
            star_ti += 1
            caps[index[star_pi]][1] = star_ti
            ti, pi = star_ti, star_pi + 1
        else:
            return None
    while pi < m and lits[pi][0] == "*":
        caps[index[pi]] = [n, n]
        pi += 1
    if pi != m:
        return None
    return [text[a:b] for a, b in caps]


# --------------------------------------------------------------------------- the interpreter


class _Stop(Exception):
    pass


_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


class Interpreter:
    """Runs one script; ``run(context)`` gives the Result or raises SieveRuntimeError."""

    def __init__(self, commands: list[Command], limits: Limits | None = None,
                 clock=time.monotonic) -> None:
        self.commands = commands
        self.limits = limits or Limits()
        self.clock = clock
        self.extensions = required_extensions(commands)
        self.variables_on = "variables" in self.extensions

    def run(self, mail: MailContext) -> Result:
        self.mail = mail
        self.result = Result()
        self.variables: dict[str, str] = {}
        self.match: list[str] = []
        self.flags: list[str] = []
        self.steps = 0
        self.deadline = self.clock() + self.limits.seconds
        try:
            self.block(self.commands)
        except _Stop:
            pass
        except RecursionError:
            raise SieveRuntimeError(0, "the script nests too deep") from None
        self.result.flags = tuple(self.flags)
        return self.result

    # -- bookkeeping
    def step(self, line: int, cost: int = 1) -> None:
        self.steps += cost
        if self.steps > self.limits.steps:
            raise SieveRuntimeError(line, f"the script ran past its limit of "
                                    f"{self.limits.steps} steps")
        if self.clock() > self.deadline:
            raise SieveRuntimeError(line, f"the script ran past its limit of "
                                    f"{self.limits.seconds:g} s")

    def expand(self, text: str) -> str:
        """Variable substitution (RFC 5229 section 3) when "variables" is required."""
        if not self.variables_on or "${" not in text:
            return text

        def one(m: re.Match) -> str:
            name = m.group(1)
            if name.isascii() and name.isdigit():
                k = int(name)
                return self.match[k] if k < len(self.match) else ""
            if "." in name:  # a namespace: none is supported, so it expands to ""
                return ""
            if not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
                return m.group(0)
            return self.variables.get(name.lower(), "")

        return _VAR.sub(one, text)

    def strings(self, cmd: Command, index: int) -> list[str]:
        return [self.expand(s) for s in cmd.strings(index)]

    def tag_string(self, cmd: Command, tag: str) -> str | None:
        values = cmd.tag_strings(tag)
        return None if values is None else self.expand(values[0])

    # -- commands
    def block(self, commands: list[Command]) -> None:
        skip_rest_of_chain = False
        for cmd in commands:
            self.step(cmd.line)
            name = cmd.name
            if name == "require":
                continue
            if name == "if":
                skip_rest_of_chain = False
            if name in ("if", "elsif", "else"):
                if name != "if" and skip_rest_of_chain:
                    continue
                if name == "else" or self.test(cmd.tests[0]):
                    skip_rest_of_chain = True
                    self.block(cmd.block or [])
                continue
            getattr(self, "do_" + name)(cmd)

    def do_stop(self, cmd: Command) -> None:
        raise _Stop()

    def add(self, action: Action) -> None:
        for done in self.result.actions:
            if (done.kind, done.argument) == (action.kind, action.argument) and \
                    action.kind in ("keep", "fileinto", "redirect", "discard"):
                if action.kind in ("keep", "fileinto"):
                    done.flags = action.flags  # the last flags win (RFC 5232 section 5)
                if not action.copy:
                    done.copy = False
                    self.result.implicit_keep = False
                return
        kinds = {a.kind for a in self.result.actions}
        rejecting = action.kind in ("reject", "ereject")
        if rejecting and kinds & {"keep", "fileinto", "redirect", "vacation", "reject", "ereject"}:
            raise SieveRuntimeError(action.line, f"{action.kind} cannot be used with "
                                    f"{', '.join(sorted(kinds))} (RFC 5429 section 2.1)")
        if kinds & {"reject", "ereject"} and action.kind in ("keep", "fileinto", "redirect",
                                                              "vacation"):
            raise SieveRuntimeError(action.line, f"{action.kind} cannot follow a reject "
                                    "(RFC 5429 section 2.1)")
        if action.kind == "vacation" and "vacation" in kinds:
            raise SieveRuntimeError(action.line, "a second vacation action (RFC 5230 section 4)")
        if len(self.result.actions) >= self.limits.actions:
            raise SieveRuntimeError(action.line, f"more than {self.limits.actions} actions")
        if action.kind == "redirect" and len(self.result.of("redirect")) >= self.limits.redirects:
            raise SieveRuntimeError(action.line, f"more than {self.limits.redirects} redirects")
        self.result.actions.append(action)
        if action.kind != "vacation" and not action.copy:
            self.result.implicit_keep = False

    def current_flags(self, cmd: Command) -> tuple[str, ...]:
        given = cmd.tag_strings(":flags")
        if given is None:
            return tuple(self.flags)
        return tuple(_flag_list([self.expand(v) for v in given]))

    def do_keep(self, cmd: Command) -> None:
        self.add(Action("keep", flags=self.current_flags(cmd), line=cmd.line))

    def do_discard(self, cmd: Command) -> None:
        self.add(Action("discard", line=cmd.line))

    def do_fileinto(self, cmd: Command) -> None:
        folder = self.strings(cmd, 0)[0]
        self.add(Action("fileinto", folder, copy=":copy" in cmd.tags,
                        flags=self.current_flags(cmd), line=cmd.line))

    def do_redirect(self, cmd: Command) -> None:
        target = self.strings(cmd, 0)[0].strip()
        local, at, domain = target.rpartition("@")
        if not (local and at and domain) or any(c in target for c in " \t\r\n<>,;"):
            raise SieveRuntimeError(cmd.line, f"redirect: \"{target}\" is not an address")
        self.add(Action("redirect", target, copy=":copy" in cmd.tags, line=cmd.line))

    def do_reject(self, cmd: Command) -> None:
        self.add(Action("reject", self.strings(cmd, 0)[0], line=cmd.line))

    def do_ereject(self, cmd: Command) -> None:
        self.add(Action("ereject", self.strings(cmd, 0)[0], line=cmd.line))

    def do_vacation(self, cmd: Command) -> None:
        addresses = cmd.tag_strings(":addresses")
        options = {
            "days": cmd.tag_number(":days"),
            "subject": self.tag_string(cmd, ":subject"),
            "from": self.tag_string(cmd, ":from"),
            "addresses": [self.expand(a) for a in addresses] if addresses else [],
            "mime": ":mime" in cmd.tags,
            "handle": self.tag_string(cmd, ":handle"),
        }
        self.add(Action("vacation", self.strings(cmd, 0)[0], options=options, line=cmd.line))

    def do_set(self, cmd: Command) -> None:
        name = cmd.strings(0)[0].lower()
        value = self.expand(cmd.strings(1)[0])
        tags = cmd.tags
        if ":lower" in tags:
            value = value.lower()
        if ":upper" in tags:
            value = value.upper()
        if ":lowerfirst" in tags:
            value = value[:1].lower() + value[1:]
        if ":upperfirst" in tags:
            value = value[:1].upper() + value[1:]
        if ":quotewildcard" in tags:
            value = re.sub(r"([*?\\])", r"\\\1", value)
        if ":length" in tags:
            value = str(len(value))
        self.variables[name] = value

    def do_setflag(self, cmd: Command) -> None:
        self.flags = _flag_list(self.strings(cmd, 0))

    def do_addflag(self, cmd: Command) -> None:
        self.flags = _flag_list(self.flags + self.strings(cmd, 0))

    def do_removeflag(self, cmd: Command) -> None:
        gone = {f.lower() for f in _flag_list(self.strings(cmd, 0))}
        self.flags = [f for f in self.flags if f.lower() not in gone]

    # -- tests
    def test(self, cmd: Command) -> bool:
        self.step(cmd.line)
        name = cmd.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(cmd.tests[0])
        if name == "allof":
            return all(self.test(t) for t in cmd.tests)
        if name == "anyof":
            return any(self.test(t) for t in cmd.tests)
        if name == "exists":
            return all(self.mail.headers.get_all(h) for h in self.strings(cmd, 0))
        if name == "size":
            limit = cmd.positional[0]
            assert isinstance(limit, Number)
            if ":over" in cmd.tags:
                return self.mail.size > limit.value
            return self.mail.size < limit.value
        if name == "header":
            values = [v for h in self.strings(cmd, 0) for v in self.mail.header_values(h)]
            return self.compare(cmd, values, self.strings(cmd, 1))
        if name == "address":
            values = []
            for h in self.strings(cmd, 0):
                for _, addr in getaddresses(self.mail.header_values(h)):
                    if addr:
                        values.append(self.address_part(cmd, addr))
            return self.compare(cmd, values, self.strings(cmd, 1))
        if name == "envelope":
            values = []
            for part in self.strings(cmd, 0):
                part = part.lower()
                if part == "from":
                    addr = self.mail.sender
                elif part == "to":
                    addr = self.mail.recipient
                else:
                    raise SieveRuntimeError(cmd.line, f"envelope part \"{part}\" is not "
                                            "supported")
                # the null reverse-path is "" whatever the address part (RFC 5228 5.4)
                values.append(self.address_part(cmd, addr) if addr else "")
            return self.compare(cmd, values, self.strings(cmd, 1))
        if name == "string":
            values = self.strings(cmd, 0)
            if ":count" in cmd.tags:
                values = [v for v in values if v != ""]
            return self.compare(cmd, values, self.strings(cmd, 1))
        if name == "body":
            return self.compare(cmd, self.body_texts(cmd), self.strings(cmd, 0), body=True)
        if name == "hasflag":
            return self.compare(cmd, list(self.flags), self.strings(cmd, 0))
        raise SieveRuntimeError(cmd.line, f"unknown test {name}")  # the validator stops these

    def address_part(self, cmd: Command, address: str) -> str:
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        if ":localpart" in cmd.tags:
            return local
        if ":domain" in cmd.tags:
            return domain
        return address

    def body_texts(self, cmd: Command) -> list[str]:
        if ":raw" in cmd.tags:
            return [self.mail.body_bytes.decode("utf-8", "replace")]
        types = cmd.tag_strings(":content")
        wanted = [self.expand(t).lower() for t in types] if types is not None else ["text"]
        out: list[str] = []
        for part in self.mail.full.walk():
            if part.is_multipart():
                if types is None:
                    continue
            ctype = part.get_content_type().lower()
            main = ctype.split("/")[0]
            if not any(w == "" or w == ctype or (("/" not in w) and w == main)
                       for w in wanted):
                continue
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "us-ascii"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
            if ctype == "text/html" and types is None:
                text = re.sub(r"<[^>]*>", " ", text)
            out.append(text)
        return out

    def compare(self, cmd: Command, values: list[str], keys: list[str],
                body: bool = False) -> bool:
        comparator = (cmd.tag_strings(":comparator") or ["i;ascii-casemap"])[0].lower()
        count = cmd.tag_strings(":count")
        value_rel = cmd.tag_strings(":value")
        self.step(cmd.line, 1 + sum(len(v) for v in values) * max(1, len(keys)) // 1000)
        if count is not None:
            rel = count[0].lower()
            n = str(len(values))
            return any(_relation(rel, _order(comparator, n, k)) for k in keys)
        if value_rel is not None:
            rel = value_rel[0].lower()
            return any(_relation(rel, _order(comparator, v, k)) for v in values for k in keys)
        if ":contains" in cmd.tags:
            return any(_fold(comparator, k) in _fold(comparator, v)
                       for v in values for k in keys)
        if ":matches" in cmd.tags:
            for v in values:
                for k in keys:
                    caps = _glob(k, v, comparator)
                    if caps is not None:
                        if self.variables_on and not body:
                            self.match = [v] + caps
                        return True
            return False
        if body:  # RFC 5173: :is on a body compares the whole text
            return any(_fold(comparator, k) == _fold(comparator, v.strip("\r\n"))
                       for v in values for k in keys)
        if comparator == "i;ascii-numeric":
            return any(_order(comparator, v, k) == 0 for v in values for k in keys)
        return any(_fold(comparator, k) == _fold(comparator, v) for v in values for k in keys)


def _flag_list(values: list[str]) -> list[str]:
    """Flags from strings of space-separated names, without duplicates (case-insensitive)."""
    out: list[str] = []
    seen: set[str] = set()
    for value in values:
        for flag in value.split():
            if flag.lower() not in seen:
                seen.add(flag.lower())
                out.append(flag)
    return out


def run(commands: list[Command], mail: MailContext, limits: Limits | None = None) -> Result:
    """Run ``commands`` over ``mail``; the Result, or SieveRuntimeError (keep the message)."""
    return Interpreter(commands, limits).run(mail)

