"""The IMAP server's bounds on client-controlled sizes and its per-session memory, over
StringTransport and the real folder store: sequence sets are ranges (a set spanning four
billion numbers costs what its ranges cost), FETCH/STORE/COPY/MOVE/SEARCH/UID EXPUNGE touch
only messages that exist; FETCH item lists, SEARCH nesting and key counts, parenthesis depth
and literals per command are capped with a tagged BAD and a live session; sessions of one
process share the folder's message records (a session keeps its UIDs as ``array('I')``)."""

from __future__ import annotations

import os
import time
import tracemalloc
from array import array
from pathlib import Path

import pytest

from pop3coexist.imap.parse import BadSyntax, SeqSet, parse_seqset, tokenize
from pop3coexist.store.folders import RACY_WINDOW
from tests.support import workcount
from tests.unit.test_imap_server import HOST, Env, say

BUDGET = 200_000  # lines of server code: some 20 times what the dozen commands take


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _age_folder(env: Env) -> None:
    """Date the INBOX's new/, cur/ and uid list back past RACY_WINDOW (no sleeping): its
    stat signature is then trusted, as it is for any folder not changed in the last seconds."""
    root = env.store.mailbox_folder(HOST, "ted")
    past = time.time() - RACY_WINDOW - 60
    for name in ("new", "cur", "dovecot-uidlist"):
        if (root / name).exists():
            os.utime(root / name, (past, past))


def test_seqset_is_ranges_not_numbers() -> None:
    """``1:4294967295`` parses to one clipped range with the same work (executed lines) as
    ``1:10`` and under 100 KB of memory: nothing is done per number; ``*`` is the largest
    number, ``5:2`` equals ``2:5``, a range wholly past the end names the last message (RFC
    3501 section 6.4.8), overlapping ranges merge; 0, 4294967296 and junk are BadSyntax."""
    with workcount.lines() as small:
        parse_seqset("1:10", 10)
    tracemalloc.start()
    with workcount.lines(budget=10 * small.lines) as huge:
        s = parse_seqset("1:4294967295", 10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert huge.lines == small.lines and peak < 100_000
    assert s.ranges == [(1, 10)] and s.highest == 4294967295
    assert parse_seqset("5:2", 9) == parse_seqset("2:5", 9) == [2, 3, 4, 5]
    assert parse_seqset("*", 7) == [7] and parse_seqset("4:*", 7) == [4, 5, 6, 7]
    assert parse_seqset("100:*", 7).ranges == [(7, 7)]
    assert parse_seqset("1:3,2:6,9", 20).ranges == [(1, 6), (9, 9)]
    assert 5 in parse_seqset("1:3,5", 9) and 4 not in parse_seqset("1:3,5", 9)
    assert parse_seqset("*", 0).ranges == []
    assert parse_seqset("2:4,7", 9).select(array("I", [1, 3, 4, 7, 8])) == [3, 4, 7]
    assert isinstance(s, SeqSet)
    for bad in ("0", "1:0", "4294967296", "1:", ":3", "a", "1,,2", "01", "+1", "1 2"):
        with pytest.raises(BadSyntax):
            parse_seqset(bad, 5)


def test_huge_sets_touch_only_existing_messages(env: Env) -> None:
    """UID FETCH/STORE/SEARCH/COPY/MOVE/EXPUNGE over ``1:4294967295`` answer for the three
    messages there are, at once; ``UID FETCH 10:*`` names the last one; a sequence number past
    the end is BAD; SEARCH with a reversed sequence range and a huge UID range works. The work
    is counted, not timed: the whole exchange runs within a budget of executed server lines
    (BUDGET) that any per-number pass over a huge range would exceed."""
    for n in range(3):
        env.deliver(f"m{n}")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    with workcount.lines(budget=BUDGET) as work:
        assert say(proto, t, b"f1 UID FETCH 1:4294967295 (FLAGS)") == (
            b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\n* 2 FETCH (UID 2 FLAGS (\\Recent))\r\n"
            b"* 3 FETCH (UID 3 FLAGS (\\Recent))\r\nf1 OK FETCH completed\r\n")
        assert say(proto, t, b"f2 UID FETCH 10:* UID") == \
            b"* 3 FETCH (UID 3)\r\nf2 OK FETCH completed\r\n"
        assert say(proto, t, b"f3 FETCH 1:4294967295 UID") == b"f3 BAD no such message\r\n"
        assert say(proto, t, b"f4 FETCH 3:1 UID") == (
            b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\n* 3 FETCH (UID 3)\r\nf4 OK FETCH completed\r\n")
        assert say(proto, t, b"q1 SEARCH 3:2 UID 1:4294967295") == \
            b"* SEARCH 2 3\r\nq1 OK SEARCH completed\r\n"
        assert say(proto, t, b"w1 UID STORE 2:4294967295 +FLAGS.SILENT (\\Deleted)") == \
            b"w1 OK STORE completed\r\n"
        out = say(proto, t, b"c1 UID COPY 1:4294967295 Trash")
        assert out.startswith(b"c1 OK [COPYUID ") and b" 1:3 1:3] COPY completed" in out
        assert say(proto, t, b"e1 UID EXPUNGE 3:4294967295") == \
            b"* 3 EXPUNGE\r\ne1 OK EXPUNGE completed\r\n"
        out = say(proto, t, b"m1 UID MOVE 1:4294967295 Trash")
        assert b"* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nm1 OK MOVE completed\r\n" in out
        assert say(proto, t, b"f5 UID FETCH 1:4294967295 UID") == b"f5 OK FETCH completed\r\n"
    print(f"{work.lines} server lines for the huge-set exchange")
    assert not work.exceeded


def test_client_sizes_are_capped_with_bad(env: Env) -> None:
    """More than 64 FETCH items, SEARCH nested 17 deep (NOT chains or parentheses), more than
    256 SEARCH keys, parentheses nested 17 deep and more than 64 literals in one command each
    get a tagged BAD naming the limit; the session goes on (NOOP answers)."""
    env.deliver("one")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    items = b" ".join(b"BODY.PEEK[]<%d>" % i for i in range(65))
    assert say(proto, t, b"f1 FETCH 1 (" + items + b")") == \
        b"f1 BAD more than 64 FETCH items\r\n"
    assert say(proto, t, b"f2 FETCH 1 (UID UID FLAGS uid)") == \
        b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\nf2 OK FETCH completed\r\n"
    assert say(proto, t, b"q1 SEARCH " + b"NOT " * 17 + b"ALL") == \
        b"q1 BAD SEARCH nested deeper than 16\r\n"
    assert say(proto, t, b"q2 SEARCH " + b"OR " * 3000 + b"ALL " * 3001) == \
        b"q2 BAD SEARCH nested deeper than 16\r\n"
    assert say(proto, t, b"q3 SEARCH " + b"ALL " * 257) == b"q3 BAD more than 256 SEARCH keys\r\n"
    assert say(proto, t, b"q4 SEARCH " + b"(" * 17 + b"ALL" + b")" * 17) == \
        b"q4 BAD parentheses nested deeper than 16\r\n"
    assert say(proto, t, b"q5 SEARCH " + b"(" * 10 + b"ALL" + b")" * 10) == \
        b"* SEARCH 1\r\nq5 OK SEARCH completed\r\n"
    with pytest.raises(BadSyntax):
        tokenize(b"(" * 100000)
    line = b"".join(b"SUBJECT {1+}\r\nx " for _ in range(65))
    out = say(proto, t, b"q6 SEARCH " + line + b"ALL")
    assert out.startswith(b"q6 BAD more than 64 literals in one command\r\n")
    assert say(proto, t, b"n NOOP").endswith(b"n OK NOOP completed\r\n")


def test_sessions_share_the_folder_records_and_still_see_each_others_flags(env: Env) -> None:
    """Two sessions on an unchanged folder hold the same message list (the store's shared
    snapshot) and a session's UIDs as array('I'); a STORE by one still reaches the other as
    ``FETCH (FLAGS ...)`` at its NOOP, each keeps its own \\Recent (only the first SELECT
    claims the new message), and the records' own flags are never changed by a session."""
    env.deliver("one")
    env.deliver("two")
    a, ta = env.logged_in()
    say(a, ta, b"s SELECT INBOX")
    _age_folder(env)
    b, tb = env.logged_in()
    out_b = say(b, tb, b"s SELECT INBOX")
    assert b"* 0 RECENT" in out_b
    say(a, ta, b"n NOOP")  # a syncs the aged folder: the snapshot b published
    assert a.sel.snap is b.sel.snap and isinstance(b.sel.uids, array)
    record = b.sel.snap[0]
    assert say(a, ta, b"w STORE 1 +FLAGS (\\Flagged)") == \
        b"* 1 FETCH (FLAGS (\\Flagged \\Recent))\r\nw OK STORE completed\r\n"
    assert record.flags == frozenset()
    assert say(b, tb, b"n NOOP") == b"* 1 FETCH (FLAGS (\\Flagged))\r\nn OK NOOP completed\r\n"
    assert say(a, ta, b"n2 NOOP") == b"n2 OK NOOP completed\r\n"


def test_memory_per_idle_session_is_small(env: Env) -> None:
    """40 sessions SELECTed on one 400-message folder (unchanged, so its records are shared)
    cost under 12 KiB of Python heap each (it was about 500 octets a message a session:
    200 KiB here), measured with tracemalloc."""
    for n in range(400):
        env.deliver(f"m{n}")
    first, t0 = env.logged_in()
    say(first, t0, b"s SELECT INBOX")
    _age_folder(env)
    say(first, t0, b"n NOOP")
    sessions = [env.logged_in() for _ in range(40)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for proto, t in sessions:
        assert b"* 400 EXISTS" in say(proto, t, b"s SELECT INBOX")
        say(proto, t, b"i IDLE")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / len(sessions) < 12 * 1024, grown / len(sessions)


def test_a_refused_command_never_echoes_a_tag_the_client_did_not_send(env: Env) -> None:
    """Found by the imap_session campaign: a command with a 72-octet tag refused at its
    literal (too large, or past 64 literals) was answered with the tag cut to 64 octets, a
    tag no command had. A tag the server will not echo (longer than 64 octets, or with a
    character RFC 3501 section 9 does not allow in a tag) now gets an untagged ``* BAD`` on
    every path, the literal refusals as the ordinary parse; a valid tag still gets its tagged
    reply, and the session goes on."""
    proto, t = env.logged_in()
    long_tag = b"K" * 71 + b"c"
    out = say(proto, t, long_tag + b" SEARCH TEXT {99999999}")
    assert out == b"* NO [TOOBIG] literal too large\r\n" and long_tag[:64] not in out
    assert say(proto, t, long_tag + b" NOOP") == b"* BAD missing tag or command\r\n"
    line = b"".join(b"SUBJECT {1+}\r\nx " for _ in range(65))
    out = say(proto, t, long_tag + b" SEARCH " + line + b"ALL")
    assert out.startswith(b"* BAD more than 64 literals in one command\r\n")
    assert say(proto, t, b"K" * 64 + b" SEARCH TEXT {99999999}") == \
        b"K" * 64 + b" NO [TOOBIG] literal too large\r\n"
    assert say(proto, t, b"n NOOP").endswith(b"n OK NOOP completed\r\n")


def test_digits_that_are_not_ascii_are_not_numbers(env: Env) -> None:
    """Found by the imap_session campaign: ``FETCH 1 BODY[1.²]`` crashed the command
    (``str.isdigit`` is true for '²' and other Unicode digits, ``int`` refuses '²' and reads
    '٣' as 3). Protocol numbers are ASCII digits only, on every path that took isdigit (an
    IMAP section part, an SMTP SIZE parameter, ManageSieve HAVESPACE, milter reply codes,
    web mail uids, Sieve match variables). Here: a tagged BAD, the session goes on."""
    env.deliver("one")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    for section in ("1.\u00b2", "\u0663", "1.\u0663.MIME"):
        out = say(proto, t, b"f FETCH 1 BODY[" + section.encode() + b"]")
        assert out.startswith(b"f BAD "), out
    assert say(proto, t, b"n NOOP").endswith(b"n OK NOOP completed\r\n")
