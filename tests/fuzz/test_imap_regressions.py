"""IMAP defects the property tests found, kept as byte-level checks over the real session and
the real Maildir store (tests/fuzz/test_imap_stateful.py's set-up, one input each)."""

from __future__ import annotations

import re

from tests.fuzz.imap_oracles import split_responses
from tests.fuzz.test_imap_stateful import ImapSession


def _fetch_body(stored: bytes) -> bytes:
    machine = ImapSession()
    try:
        machine.fill([stored])
        machine.login(True)
        machine.select(False)
        machine.proto.dataReceived(b"F1 FETCH 1 (BODY.PEEK[] FLAGS)\r\n")
        out = machine.take()
    finally:
        machine.teardown()
    resp = [r for r in split_responses(out) if r.startswith(b"* 1 FETCH")][0]
    m = re.search(rb"BODY\[\] \{(\d+)\}\r\n", resp)
    assert m, out
    return resp[m.end():m.end() + int(m.group(1))]


def test_fetch_body_of_an_ordinary_message():
    """The set-up itself: BODY[] of a plain message is the stored bytes with CRLF line ends."""
    assert _fetch_body(b"Subject: s\r\n\r\nhello\r\n") == b"Subject: s\r\n\r\nhello\r\n"


def test_fetch_body_keeps_a_body_that_looks_like_the_recent_marker():
    """A message whose body holds the octets ``NUL RECENT NUL`` comes back unchanged (and the
    literal's length is its length): the server's own \\Recent placeholder must never be
    looked for inside message content."""
    stored = b"Subject: s\r\n\r\n\x00RECENT\x00\r\n"
    assert _fetch_body(stored) == stored


def test_fetch_body_keeps_both_old_marker_shapes_and_flags_carry_recent():
    """Both former placeholders (``NUL RECENT NUL`` and ``NUL RECENT0 NUL``) inside a body
    come back as stored, and FLAGS still carries the session's \\Recent: the flag is put in
    the FLAGS list when it is built, never substituted into reply bytes."""
    stored = b"Subject: s\r\n\r\na\x00RECENT0\x00b \x00RECENT\x00\r\n"
    machine = ImapSession()
    try:
        machine.fill([stored])
        machine.login(True)
        machine.select(False)
        machine.proto.dataReceived(b"F1 FETCH 1 (FLAGS BODY.PEEK[])\r\n")
        out = machine.take()
    finally:
        machine.teardown()
    resp = [r for r in split_responses(out) if r.startswith(b"* 1 FETCH")][0]
    assert b"FLAGS (\\Recent)" in resp, resp
    m = re.search(rb"BODY\[\] \{(\d+)\}\r\n", resp)
    assert m and resp[m.end():m.end() + int(m.group(1))] == stored
