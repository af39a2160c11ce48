"""IMAP defects the property tests found, kept as byte-level checks over the real session and
the real Maildir store (tests/fuzz/test_imap_stateful.py's set-up, one input each)."""

from __future__ import annotations

import re

import pytest

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


def test_sasl_answer_ending_like_a_literal_is_one_line():
    """A SASL answer line that ends in ``{1+}`` is one line of the exchange, not a command
    with a literal (RFC 3501 section 6.2.2): the server answers the AUTHENTICATE (bad base64)
    and then each following command once, in order. The fuzz oracle once framed that line as
    a literal and reported a reply "out of order" (corpus
    regression-sasl-answer-ending-in-literal); ``check_any`` accepts the SASL framing."""
    from tests.fuzz import imap_oracles

    machine = ImapSession()
    try:
        machine.fill([b"Subject: s\r\n\r\nhello\r\n"])
        body = (b"a AUTHENTICATE PLAIN\r\nAHRlZEBwb+AuY29u{1+}\r\n"
                b"x SUBJECT {1+}\r\nx y NOOP\r\ne LOGOUT\r\n")
        machine.proto.dataReceived(body)
        out = machine.take()
    finally:
        machine.teardown()
    tags = imap_oracles.check_any(body, 4096, out)
    assert tags[0] == b"a" and tags[-1] == b"e", out
    assert b"a BAD bad base64" in out, out
    assert imap_oracles.frame_commands(body, 4096, sasl=True)[1].startswith(b"x SUBJECT {1+}")


def test_fuzz_rig_puts_the_mailbox_back_exactly():
    """The imap_session harness restores ted's Maildir between inputs (hard links from its
    template, only the folders whose mtime changed): after inputs that move messages to cur/,
    append, create, rename and delete folders and expunge, the mailbox holds exactly the
    template's entries, each file the template's own inode, each folder the template's mtime
    (an hour old), so every input starts alike."""
    import os

    from tests.fuzz import harnesses

    run = harnesses.HARNESSES["imap_session"]
    run(b"\x00\x03x FETCH 1 BODY[]\r\n")
    rig = harnesses._imap_rig
    for data in (b"\x00\x03a STORE 1:* +FLAGS (\\Deleted $Junk)\r\nb EXPUNGE\r\n",
                 b"\x00\x01c APPEND INBOX {3+}\r\nabc\r\nd CREATE x.y\r\ne RENAME Sent S2\r\n",
                 b"\x00\x01f DELETE Junk\r\ng SUBSCRIBE q\r\n"):
        run(data)
        assert not rig.changed() or rig._racy  # racy folders are always compared
        assert rig._walk(rig.box) == rig.manifest
        for rel in rig.manifest:  # stamped an hour old again: the store's cached path is fuzzed
            assert os.stat(rig.box / rel).st_mtime_ns == rig.stamp, rel
        for rel, entries in rig.manifest.items():
            for name, is_dir in entries.items():
                if not is_dir:
                    assert os.lstat(rig.box / rel / name).st_ino == rig.inodes[f"{rel}/{name}"]


def _forge_same_tick_change(folder) -> None:
    """Link a stray file into ``folder`` and give the folder back its mtime, as a change
    made in the clock tick of the last reset looks on a file system with coarse stamps."""
    import os

    st = os.stat(folder)
    (folder / "stray").write_bytes(b"x")
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_fuzz_rig_sees_a_change_made_in_the_clock_tick_of_its_reset(monkeypatch):
    """A change to a folder within the clock tick in which the rig recorded that folder's
    mtime leaves the mtime as it was (Linux stamps with a coarse clock where the file system
    has no fine-grained timestamps): the mtime check alone misses it, so the rig compares a
    folder recorded less than ``racy_window_ns`` after its last change entry by entry, and
    the next input still starts from the template (no input depends on the one before)."""
    import os

    from tests.fuzz import harnesses

    run = harnesses.HARNESSES["imap_session"]
    run(b"\x00\x00a NOOP\r\n")
    rig = harnesses._imap_rig
    cur = rig.box / "cur"
    monkeypatch.setattr(rig, "racy_window_ns", 0)
    rig.reset()
    _forge_same_tick_change(cur)
    assert not rig.changed(), "the forged change shows in the mtime: the test proves nothing"
    os.unlink(cur / "stray")
    monkeypatch.setattr(rig, "racy_window_ns", 10**15)
    rig.reset()
    _forge_same_tick_change(cur)
    assert rig.changed()
    run(b"\x00\x00b NOOP\r\n")
    assert not (cur / "stray").exists()
    assert rig._walk(rig.box) == rig.manifest


def test_fuzz_rig_ends_each_session_without_state_for_the_next():
    """After an input, the rig runs the fake clock's pending calls out and empties the
    failed-log-in throttle (a success marks the source trusted, failures delay it), so the
    next input meets the same server; a timer still pending hours after the session closed
    fails the input as a leak."""
    import pytest

    from tests.fuzz import harnesses

    run = harnesses.HARNESSES["imap_session"]
    run(b"\x00\x01a NOOP\r\nb LOGIN ted@pop.contoso.test wrong\r\n")
    rig = harnesses._imap_rig
    assert rig.factory.throttle._entries == {}
    assert rig.clock.getDelayedCalls() == []
    fired = []
    rig.clock.callLater(5, fired.append, 1)
    rig.end_session()
    assert fired == [1]
    late = rig.clock.callLater(10**6, fired.append, 2)
    with pytest.raises(AssertionError, match="left timers running"):
        rig.end_session()
    late.cancel()


def test_oracle_frames_a_command_past_the_literal_cap_as_the_server_does():
    """The server refuses a command at its 65th literal (``imap.common.MAX_LITERALS``) and
    reads what follows as the next command; a synchronizing ``{1}`` there gets no "+", so the
    octet after it is no literal. The fuzz oracle once framed on as if there were no cap (one
    command t1; the server's ``t2 OK`` looked unasked: corpus regress-literal-cap-framing);
    ``frame_commands`` now takes every framing limit of the server, the literal count too."""
    from pop3coexist.imap.common import MAX_LITERALS
    from tests.fuzz import imap_oracles

    body = (b"t1 SEARCH" + b" SUBJECT {1+}\r\nx" * MAX_LITERALS + b" SUBJECT {1}\r\n"
            b"t2 NOOP\r\n")
    machine = ImapSession()
    try:
        machine.fill([b"Subject: s\r\n\r\nhello\r\n"])
        machine.proto.dataReceived(body)
        out = machine.take()
    finally:
        machine.teardown()
    assert f"t1 BAD more than {MAX_LITERALS} literals".encode() in out, out
    assert b"t2 OK" in out, out
    assert imap_oracles.check_any(body, 4096, out, MAX_LITERALS) == [b"t1", b"t2"]
    with pytest.raises(AssertionError, match="unasked"):
        imap_oracles.check_any(body, 4096, out, 10**6)


@pytest.mark.parametrize(("command", "quoted"), [
    (b"d COPY 1 {24+}\r\nSubject: s\r\n\r\n\x00RECENT\x00\r\n", b"d NO [TRYCREATE] no folder "),
    (b"q3 SEARCH UID 95 \xff3:1", b"q3 BAD "),
    (b"c SELECT {8+}\r\na\rb\x00c\x7fd\x1b", b"c NO "),
])
def test_client_text_quoted_in_a_response_stays_on_its_line(command, quoted):
    """A folder name or search key the client sent (from a literal: any octets) and the server
    quotes in its NO or BAD text never splits the response (the imap_session campaign found
    ``COPY`` to a folder named by a literal holding CR LF answered with three lines, the last
    two forged by the client) nor puts a control or 8-bit octet in it: each becomes ``?``
    (RFC 3501 section 9, TEXT-CHAR), and the session goes on."""
    machine = ImapSession()
    try:
        machine.fill([b"Subject: one\r\n\r\nbody\r\n"])
        machine.login(True)
        machine.select(False)
        machine.proto.dataReceived(command + b"\r\n")
        machine.proto.dataReceived(b"n NOOP\r\n")
        out = machine.take()
    finally:
        machine.teardown()
    lines = out.split(b"\r\n")
    answer = [line for line in lines if line.startswith(quoted)]
    assert len(answer) == 1, out
    assert all(0x20 <= c <= 0x7E for c in answer[0]), answer
    assert lines[lines.index(answer[0]) + 1].startswith((b"n OK", b"* ")), out
