"""The canonical form of a stored message: one rule for line ends, shared by the POP3 size
(``store.maildir.crlf_size``: LIST, STAT, the ``,W=`` field) and the RETR/TOP stream
(``pop3.stream.DotStuffer``), so the two can never disagree.

A Maildir writer may leave any bytes in ``new/``: LF or CRLF line ends or both, a bare CR in
a line or at the end, CR CR LF from a double conversion, no final line end, NUL bytes. The
canonical form of those bytes is:

- a CRLF, a bare LF, and a run of CRs directly before an LF (``CR CR LF``) each end one line;
- any other CR (followed by something else than CR or LF, or at the end of the file) ends one
  line by itself (old Mac line ends; a client may split lines there, so it must be one);
- a last line with no line end gets one; an empty file stays empty;
- a run of Ctrl-Z (0x1A, SUB) at the very end of the file is the DOS end-of-file mark that
  Windows tools (``copy /a``, old stores such as the Windows POP3 service's) leave after the
  last line: not content, left out; a Ctrl-Z anywhere else is content;
- a first line that starts with ``From `` is an mbox envelope line (``From_``, RFC 4155
  section 2: not part of the message) that mbox tools leave at the top of a file they write
  into a Maildir: left out, so the message starts with its header section (RFC 5322 section
  2.1; a client would read a header-less message otherwise);
- every other byte, NUL included, is content, kept as it is.

POP3 then sends each line end as CRLF and doubles a leading dot (RFC 1939 section 3), and
counts the octets without that stuffing. What the SMTP side stores (LF line ends, a final LF)
comes back out byte for byte as the client sent it (CRLF). Pure functions; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["LineEnds", "canonical_size"]

_LINE_END = re.compile(rb"\r*\n|\r")
_CR_RUN_TO_LF = re.compile(rb"\r*\n")


def _to_lf(data: bytes) -> bytes:
    """``data`` (not ending in CR) with each line end of the canonical rule as one LF."""
    if b"\r" not in data:
        return data
    once = data.replace(b"\r\n", b"\n")
    if b"\r" not in once:
        return once  # plain CRLF text: the common case, without the regular expression
    return _LINE_END.sub(b"\n", data)


class LineEnds:
    """Stored bytes, chunk by chunk, to the canonical text with one LF per line end.

    ``feed(chunk)`` returns the converted bytes so far; ``finish()`` what is left at the end of
    the file (a line end for each CR the file ended with). CRs and Ctrl-Zs at the end of a
    chunk are held back as counts (a file of nothing but CRs costs no memory) until the next
    chunk shows whether an LF follows the CRs and whether the Ctrl-Zs end the file; the first
    five octets wait until it is known whether the file starts with an mbox ``From `` line.
    Chunk boundaries anywhere give the same output as one chunk.
    """

    __slots__ = ("_crs", "_subs", "_lead", "_head")

    def __init__(self) -> None:
        self._crs = 0  # CRs held back from the end of the previous chunks
        self._subs = 0  # Ctrl-Zs held back after them (dropped if the file ends there)
        self._lead = _UNDECIDED  # the mbox From_ line at the start: undecided/skipping/done
        self._head = b""  # converted text held while _lead is undecided

    def feed(self, data: bytes) -> bytes:
        """Convert one chunk; the result may be empty."""
        out = self._convert(data)
        return out if self._lead is _DONE else self._from_line(out, False)

    def finish(self) -> bytes:
        """The end of the file: each CR still held back ends one line; held Ctrl-Zs (the DOS
        end-of-file mark) are dropped."""
        out = b"\n" * self._crs
        self._crs = self._subs = 0
        return out if self._lead is _DONE else self._from_line(out, True)

    def _convert(self, data: bytes) -> bytes:
        stripped = data.rstrip(b"\x1a")
        subs = len(data) - len(stripped)
        body = stripped.rstrip(b"\r")
        crs = len(stripped) - len(body)
        if not body:
            if self._subs and crs:
                # the held Ctrl-Zs are followed by a CR: content, not the end of the file
                out = b"\n" * self._crs + b"\x1a" * self._subs
                self._crs, self._subs = crs, subs
                return out
            if self._subs:
                self._subs += subs
            else:
                self._crs += crs
                self._subs = subs
            return b""
        out = _to_lf(body)
        if self._subs:
            # held CRs end a line each (a Ctrl-Z follows them); the Ctrl-Zs are content
            out = b"\n" * self._crs + b"\x1a" * self._subs + out
        elif self._crs and not _CR_RUN_TO_LF.match(body):
            # held CRs run into an LF (CR CR LF: one line end) or each end a line
            out = b"\n" * self._crs + out
        self._crs, self._subs = crs, subs
        return out

    def _from_line(self, text: bytes, final: bool) -> bytes:
        """Leave out a first line that starts with ``From `` (the mbox envelope line)."""
        if self._lead is _UNDECIDED:
            text = self._head + text
            if len(text) < len(_FROM_) and not final and _FROM_.startswith(text):
                self._head = text  # too short to tell yet
                return b""
            self._head = b""
            if not text.startswith(_FROM_):
                self._lead = _DONE
                return text
            self._lead = _SKIPPING
        end = text.find(b"\n")
        if end < 0:
            return b""
        self._lead = _DONE
        return text[end + 1 :]


_FROM_ = b"From "
_UNDECIDED, _SKIPPING, _DONE = "undecided", "skipping", "done"


def canonical_size(chunks: Iterable[bytes]) -> int:
    """Octets of the canonical form of the bytes in ``chunks`` with CRLF line ends and without
    dot-stuffing: what a POP3 client counts after removing the stuffing (RFC 1939 LIST)."""
    ends = LineEnds()
    size = lines = 0
    last = b""
    for text in _texts(ends, chunks):
        size += len(text)
        lines += text.count(b"\n")
        last = text[-1:]
    if last not in (b"", b"\n"):
        size += 1  # the line end added after an unended last line (counted as CRLF below)
        lines += 1
    return size + lines  # every LF goes out as CRLF: one more octet each


def _texts(ends: LineEnds, chunks: Iterable[bytes]) -> Iterable[bytes]:
    for chunk in chunks:
        text = ends.feed(chunk)
        if text:
            yield text
    text = ends.finish()
    if text:
        yield text
