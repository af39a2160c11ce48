"""Test-side IMAP oracles (written here, apart from src/pop3coexist/imap): how a client's bytes
frame into commands (RFC 3501 section 4.3 literals, RFC 7888 LITERAL+), how a server's output
frames into responses, and the checks every IMAP transcript must pass.

- ``frame_commands(data, max_literal)``: the complete commands in ``data`` (each a line, with
  each ``{n}``/``{n+}`` literal's n octets and the line after it joined in), as the server must
  read them; a literal above ``max_literal``, or past the ``max_literals``-th of one command
  (the server's cap, ``imap.common.MAX_LITERALS``), ends its command there (refused; a
  LITERAL+ one's octets are skipped, and what follows them on the line starts the next
  command, as for any refused command). Every framing limit of the server is a parameter
  here: a limit the oracle does not know frames the rest of a refused command differently.
  With ``sasl=True`` the lines answering an ``AUTHENTICATE`` are no commands and carry no
  literals (RFC 3501 section 6.2.2: a SASL answer is one line of base64, or ``*``): PLAIN one
  line (none with an initial response), LOGIN two (one with it), CRAM-MD5 one, SCRAM three;
  ``*`` or a line that is not base64 ends the exchange. The server frames a line after an
  AUTHENTICATE that way when the exchange has begun by the time it reads the line, as a
  command when AUTHENTICATE was refused or is still queued behind a slower command, so a
  transcript may follow either framing (``check_any``).
- ``split_responses(output)``: the server's response lines, each with the literals it carries.
- ``check_transcript(commands, output)``: every output line ends in CRLF and is ``* ...``,
  ``+ ...`` or ``<tag> OK|NO|BAD ...``; the tags of the tagged replies come in the order of the
  commands that carried them (a subsequence: a SASL answer or IDLE's DONE is no command), at
  most one per command. Raises AssertionError naming the transcript.
"""

from __future__ import annotations

import re

LITERAL = re.compile(rb"\{(\d{1,19})(\+?)\}\Z")
TAGGED = re.compile(rb"([^\s(){%*\"\\+]+) (OK|NO|BAD)( .*)?\Z", re.S)


_SASL_LINES = {b"PLAIN": 1, b"LOGIN": 2, b"CRAM-MD5": 1, b"SCRAM-SHA-256": 3}
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}\Z")


def _sasl_lines(command: bytes) -> int:
    """How many lines answer this command as SASL answers (0: it is no AUTHENTICATE)."""
    words = command.split()
    if len(words) < 3 or words[1].upper() != b"AUTHENTICATE":
        return 0
    return max(_SASL_LINES.get(words[2].upper(), 0) - (len(words) > 3), 0)


def frame_commands(data: bytes, max_literal: int, max_line: int = 65536,
                   sasl: bool = False, max_literals: int = 64) -> list[bytes]:
    """The complete commands in ``data``; see the module docstring."""
    out: list[bytes] = []
    buf = b""
    literals = 0  # in the command being read
    pos = 0
    n = len(data)
    raw = 0  # SASL answer lines still expected (``sasl``)
    while pos < n:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        if len(line) > max_line:
            break  # the server says BYE and closes
        pos = end + 2
        if raw:
            answer = line.strip()
            raw = 0 if answer == b"*" or not _BASE64.match(answer) or len(answer) % 4 \
                else raw - 1
            continue
        buf += line
        m = LITERAL.search(line)
        if m:
            size = int(m.group(1))
            literals += 1
            if len(buf) + size > max_literal or literals > max_literals:
                out.append(buf)
                buf = b""
                literals = 0
                if m.group(2):
                    pos += size
                continue
            if pos + size > n:
                break
            buf += b"\r\n" + data[pos:pos + size]
            pos += size
            continue
        out.append(buf)
        if sasl:
            raw = _sasl_lines(buf)
        buf = b""
        literals = 0
    return out


def split_responses(output: bytes) -> list[bytes]:
    """The server's responses, each one line plus the literals it carries (CRLFs kept out of
    the last line). A response that is cut short is returned as it is."""
    out: list[bytes] = []
    pos = 0
    n = len(output)
    cur = b""
    while pos < n:
        end = output.find(b"\r\n", pos)
        if end < 0:
            raise AssertionError(f"output does not end in CRLF: {output[pos:][:200]!r}")
        line = output[pos:end]
        pos = end + 2
        cur += line
        m = LITERAL.search(line)
        if m and not m.group(2):
            size = int(m.group(1))
            cur += b"\r\n" + output[pos:pos + size]
            pos += size
            continue
        out.append(cur)
        cur = b""
    if cur:
        out.append(cur)
    return out


def tag_of(command: bytes) -> bytes:
    return command.split(b" ", 1)[0]


def check_transcript(commands: list[bytes], output: bytes) -> list[bytes]:
    """Check the transcript; return the tags of the tagged replies in order."""
    tags = []
    for resp in split_responses(output):
        if resp.startswith((b"* ", b"+ ")) or resp == b"+":
            continue
        m = TAGGED.match(resp)
        assert m, f"not an IMAP response: {resp[:200]!r}\ncommands: {commands[:20]!r}"
        tags.append(m.group(1))
    sent = [tag_of(c) for c in commands]
    i = 0
    for t in tags:
        while i < len(sent) and sent[i] != t:
            i += 1
        assert i < len(sent), f"tagged reply {t!r} out of order or unasked: {tags!r} for {sent!r}"
        i += 1
    return tags


def check_any(data: bytes, max_literal: int, output: bytes, max_literals: int = 64
              ) -> list[bytes]:
    """``check_transcript`` of ``output`` against the commands of ``data`` framed as plain
    commands, or else (when ``data`` holds an AUTHENTICATE) framed with its SASL answer lines
    taken out (``frame_commands(..., sasl=True)``); raises the first framing's AssertionError
    when neither holds."""
    try:
        return check_transcript(frame_commands(data, max_literal, max_literals=max_literals),
                                output)
    except AssertionError:
        if b"AUTHENTICATE" not in data.upper():
            raise
        try:
            return check_transcript(frame_commands(data, max_literal, sasl=True,
                                                   max_literals=max_literals), output)
        except AssertionError:
            pass
        raise
