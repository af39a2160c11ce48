"""Test-side oracles for the fuzz harnesses and the stateful tests, written apart from the code
under test: the reply grammar of SMTP (RFC 5321 section 4.2) and POP3 (RFC 1939 section 3),
which reply codes each SMTP command may get, the canonical form of a stored message (line ends,
Ctrl-Z, mbox ``From `` line: README "On disk"), dot-stuffing, and a log observer that turns
every failure or error logged through Twisted into a test failure.

Nothing here imports the modules it judges, except to name the error classes a parser is
documented to raise.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from twisted.logger import LogLevel, globalLogPublisher

# --------------------------------------------------------------------------- logged failures


class LoggedFailure(AssertionError):
    """An exception or an error reached Twisted's log: a bug the client never saw."""


@contextlib.contextmanager
def no_logged_failures() -> Iterator[list[dict]]:
    """Collect every event logged with a failure or at level error/critical while the block
    runs, and raise LoggedFailure naming the first one when the block ends."""
    caught: list[dict] = []

    def observer(event: dict) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical) \
                or event.get("isError"):
            caught.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield caught
    finally:
        globalLogPublisher.removeObserver(observer)
    if caught:
        event = caught[0]
        failure = event.get("log_failure")
        text = event.get("log_format") or event.get("message") or event
        detail = failure.getTraceback() if failure is not None else ""
        raise LoggedFailure(f"logged: {text!r}\n{detail}")


# --------------------------------------------------------------------------- SMTP replies

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\x20-\x7e]*)\Z")
_ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |\Z)")

# Which codes each command may be answered with (RFC 5321 section 4.3.2; RFC 3207, 4954,
# 1870, 3461, 2920, 3463), plus the codes any command line may get: 500 (unrecognised, line
# too long, control characters, bare LF/CR), 501, 502, 421 (closing), 451 (local error).
ANY_LINE = frozenset({421, 451, 500, 501, 502})
SMTP_CODES: dict[str, frozenset[int]] = {
    "EHLO": frozenset({250, 504, 550}),
    "HELO": frozenset({250, 504, 550}),
    "MAIL": frozenset({250, 452, 455, 503, 530, 550, 552, 553, 555, 554}),
    "RCPT": frozenset({250, 251, 252, 450, 452, 455, 503, 530, 550, 551, 552, 553, 555, 554}),
    "DATA": frozenset({354, 503, 554}),
    "RSET": frozenset({250}),
    "NOOP": frozenset({250}),
    "QUIT": frozenset({221}),
    "VRFY": frozenset({250, 251, 252, 550, 551, 553, 504}),
    "EXPN": frozenset({250, 252, 550, 504}),
    "HELP": frozenset({211, 214, 504}),
    "STARTTLS": frozenset({220, 454, 503}),
    "AUTH": frozenset({334, 235, 454, 503, 504, 530, 534, 535, 538}),
    "BDAT": frozenset({250, 503, 554}),
}
LONGEST_UNENDED = 12288  # octets an unended line may grow to before it is refused (RFC 4954)
END_OF_DATA_CODES = frozenset({250, 451, 452, 550, 552, 554})
AUTH_LINE_CODES = frozenset({334, 235, 454, 535, 534, 538})


def split_smtp_replies(output: bytes) -> list[tuple[int, list[bytes]]]:
    """Parse server output into replies ``(code, [text lines])``; raise AssertionError on a
    malformed line, a multi-line reply whose lines disagree on the code, or an enhanced status
    code (RFC 3463) whose class differs from the reply's."""
    if not output:
        return []
    assert output.endswith(b"\r\n"), f"output does not end with CRLF: {output[-60:]!r}"
    replies: list[tuple[int, list[bytes]]] = []
    current: list[bytes] = []
    code = None
    for raw in output[:-2].split(b"\r\n"):
        m = _REPLY_LINE.match(raw)
        assert m, f"malformed reply line {raw!r}"
        line_code = int(m.group(1))
        if code is not None:
            assert line_code == code, f"one reply, two codes: {code} then {raw!r}"
        code = line_code
        text = m.group(3)
        e = _ENHANCED.match(text)
        if e:
            assert int(e.group(1)) == code // 100, f"enhanced code class differs: {raw!r}"
        current.append(text)
        if m.group(2) == b" ":
            replies.append((code, current))
            current, code = [], None
    assert not current, f"unfinished multi-line reply: {current!r}"
    return replies


def smtp_expected_replies(chunks: list[bytes], replies: list[tuple[int, list[bytes]]]) -> None:
    """Check that ``replies`` (after the greeting) answer the client input ``chunks`` one for
    one and in order: every complete command line gets exactly one reply whose code is one its
    verb may get; a 354 turns the following bytes into message content up to CRLF.CRLF, which
    then gets one reply; a 334 makes the next line an AUTH response; after 220 to STARTTLS the
    rest of that chunk is discarded (RFC 3207 section 4.2); after 221 or 421 nothing more.
    Each chunk is taken to be fully answered before the next one arrives. Raise AssertionError
    on any mismatch."""
    it = iter(replies)
    state = "command"
    closed = False
    partial = b""  # an unended line carried into the next chunk
    tail = b""  # the last bytes of message content (to find CRLF.CRLF across chunks)

    def next_reply(what: str) -> int:
        try:
            code, _ = next(it)
        except StopIteration:
            raise AssertionError(f"no reply for {what}") from None
        return code

    for chunk in chunks:
        if closed:
            break
        pos = 0
        while not closed:
            if state == "data":
                seen = tail + chunk[pos:]
                k = seen.find(b"\r\n.\r\n")
                if k < 0:
                    tail = seen[-4:]
                    break
                pos += k + 5 - len(tail)
                code = next_reply("the end of DATA")
                assert code in END_OF_DATA_CODES | {421}, f"end of DATA answered {code}"
                state = "command"
                closed = code == 421
                continue
            if pos >= len(chunk):
                break
            end = chunk.find(b"\n", pos)
            if end < 0:
                partial += chunk[pos:]
                break
            line = partial + chunk[pos:end]
            partial = b""
            pos = end + 1
            if state == "auth":
                code = next_reply(f"AUTH response {line[:40]!r}")
                assert code in AUTH_LINE_CODES | ANY_LINE, f"AUTH response answered {code}"
                state = "auth" if code == 334 else "command"
            else:
                verb = line.split(b" ", 1)[0].rstrip(b"\r").upper().decode("latin-1")
                code = next_reply(f"command {line[:40]!r}")
                allowed = SMTP_CODES.get(verb, frozenset()) | ANY_LINE
                assert code in allowed, f"{verb or 'line'} {line[:40]!r} answered {code}"
                if code == 354:
                    state = "data"
                    tail = b"\r\n"  # the line end before the first content line
                elif code == 334:
                    state = "auth"
                elif code == 220 and verb == "STARTTLS":
                    pos = len(chunk)  # the rest of this chunk was sent in clear: dropped
            closed = code in (221, 421)
    extra = list(it)
    if extra and not closed and state != "data" and len(partial) > LONGEST_UNENDED:
        extra.pop(0)  # an unended line past the longest buffer is refused before its end
    if extra and extra[-1][0] == 421 and not closed:
        extra.pop()  # the closing notice after too many errors (RFC 5321 section 3.8)
    assert not extra, f"replies without a command: {extra[:3]!r}"


# --------------------------------------------------------------------------- canonical form


def canonical(data: bytes) -> bytes:
    """The canonical form of stored bytes with CRLF line ends and no stuffing: CRLF, LF,
    CR CR LF and a bare CR each end a line; an unended last line gets a CRLF; Ctrl-Zs that
    end the file and a first line starting with ``From `` are left out (README "On disk")."""
    lines = re.split(rb"\r*\n|\r", data.rstrip(b"\x1a"))
    if lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    return b"".join(line + b"\r\n" for line in lines)


def unstuff_multiline(body: bytes) -> bytes:
    """The content of a POP3 multi-line response body (after its first line, with the
    terminating ``.CRLF``): checks that every line ends in CRLF and that no line but the
    terminator is a lone dot or starts with an unstuffed dot; returns the lines unstuffed."""
    assert body.endswith(b".\r\n"), f"no terminator: {body[-20:]!r}"
    content = body[:-3]
    if not content:
        return b""
    assert content.endswith(b"\r\n"), f"last line without CRLF: {content[-20:]!r}"
    out = []
    for line in content[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in {line[:60]!r}"
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed dot line {line[:60]!r}"
            line = line[1:]
        out.append(line + b"\r\n")
    return b"".join(out)


def top_of(canon: bytes, n: int) -> bytes:
    """What TOP msg n sends (unstuffed): the header lines, the empty line, n body lines."""
    lines = canon.split(b"\r\n")[:-1] if canon else []
    out = []
    i = 0
    while i < len(lines) and lines[i] != b"":
        out.append(lines[i])
        i += 1
    if i < len(lines):
        out.append(b"")
        out.extend(lines[i + 1 : i + 1 + n])
    return b"".join(line + b"\r\n" for line in out)


# --------------------------------------------------------------------------- POP3 responses

_STATUS = re.compile(rb"(\+OK|-ERR|\+)(?:( [\x20-\x7e]*))?\Z")
_MULTI_ALWAYS = frozenset({b"CAPA", b"RETR", b"TOP"})
_MULTI_WITHOUT_ARGS = frozenset({b"LIST", b"UIDL", b"AUTH"})
POP3_LINE_MAX = 4096


class Pop3Transcript:
    """Walks POP3 server output against the client's input (RFC 1939 section 3): one
    response per complete line, in order; a multi-line response (CAPA, RETR, TOP, LIST, UIDL,
    AUTH without arguments) ends with a lone dot and is dot-stuffed; ``RETR n``'s unstuffed
    body is exactly the octets its ``+OK`` line and ``LIST`` announced. ``responses`` holds
    ``(command line, status line, unstuffed body or None)``."""

    def __init__(self) -> None:
        self.responses: list[tuple[bytes, bytes, bytes | None]] = []
        self.list_sizes: dict[int, int] = {}

    def check(self, chunks: list[bytes], output: bytes) -> None:
        """Raise AssertionError where ``output`` (after the greeting) does not answer
        ``chunks`` (each answered in full before the next arrives)."""
        out = 0
        sasl = False
        closed = False
        partial = b""
        for chunk in chunks:
            if closed:
                break
            pos = 0
            while pos < len(chunk) and not closed:
                end = chunk.find(b"\n", pos)
                if end < 0:
                    partial += chunk[pos:]
                    if len(partial) > POP3_LINE_MAX:
                        partial = b"x" * (POP3_LINE_MAX + 1)  # refused when its end comes
                    break
                line = partial + chunk[pos:end]
                partial = b""
                pos = end + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                status, out = self._status(output, out, line)
                verb, _, rest = line.partition(b" ")
                verb = verb.upper()
                args = rest.split()
                body = None
                if sasl:
                    sasl = status.startswith(b"+ ") or status == b"+"
                    assert status.startswith((b"+", b"-ERR")), status
                elif status.startswith(b"+OK") and len(line) <= POP3_LINE_MAX and (
                        verb in _MULTI_ALWAYS or (verb in _MULTI_WITHOUT_ARGS and not args)):
                    body, out = self._body(output, out)
                    self._judge(verb, args, status, body)
                elif status.startswith(b"+OK") and verb == b"LIST" and len(args) == 1:
                    n, size = status.split()[1:3]
                    self.list_sizes[int(n)] = int(size)
                elif status.startswith(b"+ ") or status == b"+":
                    assert verb == b"AUTH", f"continuation for {line[:40]!r}"
                    sasl = True
                self.responses.append((line, status, body))
                if verb == b"STLS" and status.startswith(b"+OK") and not sasl:
                    partial = b""
                    break  # the rest of the chunk was sent in clear: dropped (RFC 2595 3.1)
                if verb == b"QUIT" and not sasl and (
                        status.startswith(b"+OK") or b"were not removed" in status):
                    closed = True  # signed off (a failed UPDATE says so and closes too)
        assert out == len(output), f"responses without a command: {output[out:out + 80]!r}"

    @staticmethod
    def _status(output: bytes, out: int, line: bytes) -> tuple[bytes, int]:
        end = output.find(b"\r\n", out)
        assert end >= 0, f"no response for {line[:40]!r}"
        status = output[out:end]
        assert _STATUS.match(status), f"malformed status line {status[:80]!r} for {line[:40]!r}"
        return status, end + 2

    @staticmethod
    def _body(output: bytes, out: int) -> tuple[bytes, int]:
        if output.startswith(b".\r\n", out):
            return b"", out + 3
        k = output.find(b"\r\n.\r\n", out)
        assert k >= 0, f"multi-line response without its end: {output[out:out + 80]!r}"
        return unstuff_multiline(output[out : k + 5]), k + 5

    def _judge(self, verb: bytes, args: list[bytes], status: bytes, body: bytes) -> None:
        if verb == b"LIST":
            for row in body.split(b"\r\n")[:-1]:
                n, size = row.split(b" ")
                self.list_sizes[int(n)] = int(size)
            total = sum(int(row.split(b" ")[1]) for row in body.split(b"\r\n")[:-1])
            assert status.split()[1:2] == [str(len(body.split(b"\r\n")) - 1).encode()], status
            assert f"({total} octets)".encode() in status, (status, total)
        elif verb == b"RETR":
            announced = int(status.split()[1])
            assert len(body) == announced, f"RETR sent {len(body)} octets, +OK said {announced}"
            n = int(args[0])
            if n in self.list_sizes:
                assert len(body) == self.list_sizes[n], (len(body), self.list_sizes[n])
