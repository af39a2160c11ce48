"""FETCH and refresh without thread hops (``interfaces.ICachedFolderView``), over
StringTransport and the real folder store: an unchanged folder is told from three cached
``fstat`` calls, a small message is read on the reactor when the kernel has its path cached,
and what the client receives is the same octets either way; ``canonical_bytes`` returns a
file already in canonical CRLF form as it is and agrees with ``canonical.LineEnds`` on every
input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from pop3coexist import fsutil
from pop3coexist.canonical import LineEnds
from pop3coexist.imap import fetch as fetchmod
from pop3coexist.interfaces import ICachedFolderView
from tests.unit.test_imap_limits import _age_folder
from tests.unit.test_imap_server import Env, say


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _counting(env: Env) -> list:
    """Wrap the factory's run_blocking to record each function sent to a thread."""
    calls: list = []
    inner = env.factory.run_blocking

    def run(f, *args):  # noqa: ANN001, ANN202
        calls.append(getattr(f, "__name__", repr(f)))
        return inner(f, *args)

    env.factory.run_blocking = run
    return calls


def _slow(text: bytes) -> bytes:
    ends = LineEnds()
    out = ends.feed(text) + ends.finish()
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out.replace(b"\n", b"\r\n")


@pytest.mark.skipif(not fsutil._cached_open_works, reason="no openat2 RESOLVE_CACHED here")
def test_fetch_of_an_unchanged_folder_makes_no_thread_hop(env: Env) -> None:
    """On a folder unchanged for RACY_WINDOW, ``FETCH n BODY.PEEK[]`` of a small message goes
    to no thread (neither the change check nor the read), answers the stored octets in CRLF
    form with the tagged reply, and a FETCH that sets \\Seen still renames in a thread."""
    env.deliver("one", "x")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    _age_folder(env)
    say(proto, t, b"n NOOP")  # the view's last sync is the aged folder's
    verifyObject(ICachedFolderView, proto.sel.view)
    calls = _counting(env)
    out = say(proto, t, b"f FETCH 1 BODY.PEEK[]")
    body = b"From: a@example.test\r\nSubject: one\r\n\r\nx\r\n"
    assert out == b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nf OK FETCH completed\r\n" % (len(body), body)
    assert calls == []
    out = say(proto, t, b"g FETCH 1 (FLAGS BODY[])")
    assert b"FLAGS (\\Seen \\Recent)" in out and out.endswith(b"g OK FETCH completed\r\n")
    assert "fetch_many" in calls


def test_a_change_is_still_seen_at_the_next_command(env: Env) -> None:
    """With the cached check in place a message delivered meanwhile is told at the next
    NOOP (``EXISTS``): an aged folder that changes is no longer "unchanged"."""
    env.deliver("one")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    _age_folder(env)
    say(proto, t, b"n NOOP")
    env.deliver("two")
    assert b"* 2 EXISTS" in say(proto, t, b"n2 NOOP")


def test_fetch_falls_back_to_the_thread_when_not_cached(env: Env, monkeypatch) -> None:
    """When the kernel cannot open the path without the disk (``open_cached`` None), the
    check and the read go to the thread and the answer is the same."""
    env.deliver("one", "x")
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    _age_folder(env)
    say(proto, t, b"n NOOP")
    monkeypatch.setattr("pop3coexist.store.folders.open_cached", lambda path: None)
    monkeypatch.setattr("pop3coexist.fsutil.open_cached", lambda path: None)
    calls = _counting(env)
    out = say(proto, t, b"f FETCH 1 BODY.PEEK[]")
    assert out.endswith(b"x\r\n)\r\nf OK FETCH completed\r\n")
    assert calls == ["sync_if_changed", "fetch_many"]


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"From ", b"\x1a", b" "]),
                max_size=12).map(b"".join))
def test_canonical_fast_path_agrees_with_line_ends(text: bytes) -> None:
    """``fetch.canonical_bytes`` (with its already-CRLF shortcut) equals the canonical form
    built by ``canonical.LineEnds`` for any mix of CR, LF, CRLF, Ctrl-Z and a From_ line."""
    assert fetchmod.canonical_bytes(text) == _slow(text)


def test_partial_copies_of_one_message_are_bounded_by_octets(env: Env, monkeypatch) -> None:
    """``BODY.PEEK[]<0> BODY.PEEK[]<1> ...`` (each item a near-whole copy of the message) is
    refused with ``NO [LIMIT]`` once one message's answer would pass ANSWER_COPIES times its
    size plus the slack; the session goes on, and two whole copies (``BODY[] RFC822``) or
    separate partial fetches of the same message are answered."""
    monkeypatch.setattr(fetchmod, "ANSWER_SLACK", 0)
    env.deliver("big", "y" * 20000)
    proto, t = env.logged_in()
    say(proto, t, b"s SELECT INBOX")
    items = b" ".join(b"BODY.PEEK[]<%d>" % i for i in range(8))
    out = say(proto, t, b"f FETCH 1 (" + items + b")")
    assert out.startswith(b"f NO [LIMIT] ") and b"* 1 FETCH" not in out, out[:200]
    out = say(proto, t, b"h FETCH 1 (BODY.PEEK[] BODY.PEEK[TEXT])")
    assert out.endswith(b"h OK FETCH completed\r\n")
    for i in range(4):
        assert say(proto, t, b"p%d FETCH 1 BODY.PEEK[]<%d.5000>" % (i, i * 5000)).endswith(
            b"p%d OK FETCH completed\r\n" % i)
