"""Header-section edits (pop3coexist.headers): the milter actions' semantics over stored bytes."""

from __future__ import annotations

import pytest

from pop3coexist import headers

MSG = (b"Received: from a\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\n"
       b"Subject: hi\nX-Spam: old\nx-spam: older\n\nbody line\n\nSubject: not a header\n")


def test_split_keeps_folded_lines_with_their_field_and_stops_at_the_empty_line() -> None:
    """A continuation line belongs to its field; the empty line starts the rest."""
    fields, rest = headers.split(MSG)
    assert [headers.field_name(f) for f in fields] == ["received", "subject", "x-spam", "x-spam"]
    assert rest.startswith(b"\nbody line")
    assert headers.values(MSG, "RECEIVED") == ["from a\tby b; Mon, 1 Jan 2024 00:00:00 +0000"]


def test_add_insert_and_prepend_place_the_field_as_the_milter_actions_do() -> None:
    """ADDHEADER appends after the last field, INSHEADER counts from 0, prepend is the top;
    the body (and a 'Subject:' line inside it) is untouched."""
    added = headers.add_header(MSG, "X-Scanned", "yes")
    assert headers.split(added)[0][-1] == b"X-Scanned: yes\n"
    inserted = headers.insert_header(MSG, 1, "X-One", "1")
    assert headers.split(inserted)[0][1] == b"X-One: 1\n"
    top = headers.prepend_header(MSG, "Authentication-Results", "mx.test; spf=pass")
    assert top.startswith(b"Authentication-Results: mx.test; spf=pass\nReceived:")
    for edited in (added, inserted, top):
        assert edited.endswith(b"\n\nbody line\n\nSubject: not a header\n")


def test_change_counts_occurrences_from_one_without_regard_to_case_and_none_deletes() -> None:
    """CHGHEADER: the 2nd X-Spam (any case) changes; an empty value deletes; a missing
    occurrence changes nothing."""
    changed = headers.change_header(MSG, "X-SPAM", 2, "new")
    assert headers.values(changed, "x-spam") == ["old", "new"]
    deleted = headers.change_header(MSG, "x-spam", 1, None)
    assert headers.values(deleted, "x-spam") == ["older"]
    assert headers.change_header(MSG, "x-spam", 3, "z") == MSG


def test_remove_headers_by_value_predicate() -> None:
    """Only the fields whose unfolded value the predicate accepts go (RFC 8601 section 5's
    removal of forged Authentication-Results of our own host name)."""
    msg = b"Authentication-Results: mx.test; spf=pass\nAuthentication-Results: other.test; x\n\nb\n"
    out = headers.remove_headers(msg, "authentication-results",
                                 lambda v: v.split(";")[0].strip() == "mx.test")
    assert out == b"Authentication-Results: other.test; x\n\nb\n"


def test_replace_body_keeps_the_header_section_and_the_message_line_ends() -> None:
    """REPLBODY: CRLF in the new body becomes LF in an LF message; CRLF messages stay CRLF."""
    assert headers.replace_body(MSG, b"new\r\nbody\r\n").endswith(b"x-spam: older\n\nnew\nbody\n")
    crlf = b"Subject: a\r\n\r\nold\r\n"
    assert headers.replace_body(crlf, b"n\r\n") == b"Subject: a\r\n\r\nn\r\n"
    assert headers.add_header(crlf, "X", "1") == b"Subject: a\r\nX: 1\r\n\r\nold\r\n"


def test_a_message_whose_first_line_is_no_field_keeps_it_as_body() -> None:
    """Adding to a message with no header section puts the empty line between (RFC 5322 2.1)."""
    assert headers.prepend_header(b"just text\n", "X", "1") == b"X: 1\n\njust text\n"


@pytest.mark.parametrize("name, value", [
    ("Bad Name", "v"), ("Bad:Name", "v"), ("", "v"),
    ("X", "a\nForged: yes"), ("X", "a\r\nForged: yes"), ("X", "a\n"), ("X", "a\rb"),
])
def test_a_field_that_would_forge_another_is_refused(name: str, value: str) -> None:
    """Names outside RFC 5322 ftext and values with a line end that is no fold raise."""
    with pytest.raises(ValueError):
        headers.add_header(MSG, name, value)


def test_a_folded_value_keeps_its_fold_in_the_message_line_ends() -> None:
    """A value with a proper fold (line end + white space) is kept folded."""
    out = headers.add_header(b"A: 1\r\n\r\nb\r\n", "X", "a\n b")
    assert b"X: a\r\n b\r\n" in out
