"""FETCH's view of a message (imap/message.py, imap/fetch.py, imap/parse.py) as pure
functions: byte-exact MIME sections of a multipart message, BODYSTRUCTURE and ENVELOPE
shapes (RFC 3501 section 7.4.2), the canonical CRLF form of an LF file, the tokenizer
(quoted escapes, literals, flags, bracketed fetch items) and sequence sets."""

from __future__ import annotations

import pytest

from pop3coexist.imap.fetch import canonical_bytes, compile_fetch
from pop3coexist.imap.message import Part, bodystructure, envelope, quote
from pop3coexist.imap.parse import BadSyntax, format_seqset, parse_seqset, tokenize

MULTI = (b"From: Ann <ann@example.test>\r\nTo: ted@pop.contoso.test, b@x.test\r\n"
         b"Subject: parts\r\nMIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
         b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
         b"--XX\r\nContent-Type: application/pdf; name=a.pdf\r\n"
         b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
         b"\r\nQUJD\r\n--XX--\r\n")


def test_sections_are_byte_exact() -> None:
    """BODY[1], BODY[2.MIME], BODY[HEADER.FIELDS], BODY[TEXT] and a missing part."""
    p = Part(MULTI)
    assert p.section([1], "", []) == b"hello"
    assert p.section([2], "MIME", []) == (b"Content-Type: application/pdf; name=a.pdf\r\n"
                                          b"Content-Transfer-Encoding: base64\r\n"
                                          b"Content-Disposition: attachment; filename=a.pdf\r\n\r\n")
    assert p.section([2], "", []) == b"QUJD"
    assert p.section([], "HEADER.FIELDS", ["subject", "TO"]) == \
        b"To: ted@pop.contoso.test, b@x.test\r\nSubject: parts\r\n\r\n"
    assert p.section([], "TEXT", []).startswith(b"preamble\r\n--XX\r\n")
    assert p.section([3], "", []) is None
    assert p.section([], "", []) == MULTI


def test_bodystructure_and_envelope() -> None:
    """The multipart BODYSTRUCTURE names both parts with their parameters and disposition;
    ENVELOPE lists the addresses split into name, mailbox and host."""
    p = Part(MULTI)
    assert bodystructure(p, False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 5 1)'
        b'("APPLICATION" "PDF" ("NAME" "a.pdf") NIL NIL "BASE64" 4) "MIXED")')
    assert b'("ATTACHMENT" ("FILENAME" "a.pdf"))' in bodystructure(p, True)
    assert envelope(p) == (b'(NIL "parts" (("Ann" NIL "ann" "example.test")) '
                           b'(("Ann" NIL "ann" "example.test")) (("Ann" NIL "ann" "example.test")) '
                           b'((NIL NIL "ted" "pop.contoso.test")(NIL NIL "b" "x.test")) '
                           b'NIL NIL NIL NIL)')


def test_canonical_form_and_quoting() -> None:
    """An LF file is sent with CRLF line ends and a final line end; a string that cannot be
    quoted becomes a literal."""
    assert canonical_bytes(b"Subject: a\n\nbody") == b"Subject: a\r\n\r\nbody\r\n"
    assert canonical_bytes(b"From x\nSubject: a\n\nb\n") == b"Subject: a\r\n\r\nb\r\n"
    assert quote('say "hi"') == b'"say \\"hi\\""'
    assert quote("Caf\u00e9") == b"{5}\r\nCaf\xc3\xa9"


def test_tokenizer_and_sets() -> None:
    """Quoted escapes, a literal, nested lists, a flag, a bracketed fetch item; sets with *;
    bad input raises BadSyntax."""
    assert tokenize(b'"a\\"b" {3}\r\nxyz (\\Seen (x)) BODY.PEEK[HEADER.FIELDS (A B)]<0.5>') == [
        b'a"b', b"xyz", ["\\Seen", ["x"]], "BODY.PEEK[HEADER.FIELDS (A B)]<0.5>"]
    for bad in (b'"open', b"(a", b"a)", b"{5}\r\nab"):
        with pytest.raises(BadSyntax):
            tokenize(bad)
    assert parse_seqset("1:3,5,*", 7) == [1, 2, 3, 5, 7]
    assert parse_seqset("4:2", 9) == [2, 3, 4]
    assert format_seqset([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
    with pytest.raises(BadSyntax):
        parse_seqset("0:2", 5)
    items = compile_fetch(tokenize(b"FAST")[0], uid=True)
    assert [i.kind for i in items] == ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    with pytest.raises(BadSyntax):
        compile_fetch(tokenize(b"BODY[FOO]")[0], uid=False)
