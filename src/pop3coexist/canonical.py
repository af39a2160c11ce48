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
    """Stored bytes, chunk by chunk, to the same text with one LF per canonical line end.

    ``feed(chunk)`` returns the converted bytes so far; ``finish()`` what is left at the end of
    the file (a line end for each CR the file ended with). CRs at the end of a chunk are held
    back as a count (a file of nothing but CRs costs no memory) until the next chunk shows
    whether an LF follows them. Chunk boundaries anywhere give the same output as one chunk.
    """

    __slots__ = ("_crs",)

    def __init__(self) -> None:
        self._crs = 0  # CRs held back from the end of the previous chunks

    def feed(self, data: bytes) -> bytes:
        """Convert one chunk; the result may be empty."""
        body = data.rstrip(b"\r")
        held = len(data) - len(body)
        if not body:
            self._crs += held
            return b""
        out = _to_lf(body)
        if self._crs:
            # held CRs run into an LF (CR CR LF: one line end) or each end a line
            if not _CR_RUN_TO_LF.match(body):
                out = b"\n" * self._crs + out
        self._crs = held
        return out

    def finish(self) -> bytes:
        """The end of the file: each CR still held back ends one line."""
        out, self._crs = b"\n" * self._crs, 0
        return out


def canonical_size(chunks: Iterable[bytes]) -> int:
    """Octets of the canonical form of the bytes in ``chunks`` with CRLF line ends and without
    dot-stuffing: what a POP3 client counts after removing the stuffing (RFC 1939 LIST)."""
    ends = LineEnds()
    size = lines = 0
    last = b""
    for chunk in chunks:
        text = ends.feed(chunk)
        if text:
            size += len(text)
            lines += text.count(b"\n")
            last = text[-1:]
    text = ends.finish()
    if text:
        size += len(text)
        lines += len(text)
        last = b"\n"
    if last not in (b"", b"\n"):
        size += 1  # the line end added after an unended last line (counted as CRLF below)
        lines += 1
    return size + lines  # every LF goes out as CRLF: one more octet each
