"""The DATA stream (smtp/incoming.py, smtp/received.py): SMTP smuggling variants byte by byte,
dot-unstuffing, line length, chunk boundaries, and the spool file's life."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3coexist.smtp.incoming import MessageReader, SpoolWriter, clean_spool
from pop3coexist.smtp.received import HopCounter, received_header, with_keyword
from tests.support.dialogue import take
from tests.support.smtp_fakes import HOST, make_factory, open_session

SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<ann@pop.contoso.test>\r\nDATA\r\nforged\r\n"
# Every way of writing an end-of-data that is not CRLF . CRLF
VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\n\r\n.\r\n"[:0] + b"\r\n.\n\r\n",
]


def run(chunks: list[bytes], peer: str = "203.0.113.5", bare_newline: str = "reject"):
    factory, store, _, queue, _ = make_factory()
    if bare_newline != factory.config.smtp.bare_newline:
        import dataclasses

        factory.config = dataclasses.replace(
            factory.config, smtp=dataclasses.replace(factory.config.smtp, bare_newline=bare_newline)
        )
    proto, t = open_session(factory, peer)
    take(t)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n")
    take(t)
    for chunk in chunks:
        proto.dataReceived(chunk)
    return take(t), store, proto


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bytewise", [False, True])
def test_smuggling_variant_never_ends_data(variant: bytes, bytewise: bool) -> None:
    """A bare-CR/LF end marker never ends DATA: the smuggled commands stay message text, the
    message is refused (550 5.5.2) at the real CRLF.CRLF, and no second message exists."""
    data = b"Subject: s\r\n\r\nhello" + variant + SMUGGLED + b".\r\n"
    chunks = [bytes([b]) for b in data] if bytewise else [data]
    out, store, _ = run(chunks)
    if variant == b"\r\n\x00.\r\n":  # NUL is no bare line end: an ordinary (odd) line
        assert out.startswith(b"250 2.0.0 Ok: queued as ")
        assert len(store.messages(f"ted@{HOST}")) == 1
    else:
        assert out == b"550 5.5.2 Message refused: bare CR or LF in data (RFC 5321 section 2.3.8)\r\n"
        assert store.messages(f"ted@{HOST}") == []
    assert store.messages(f"ann@{HOST}") == []
    assert list(store.spool_dir().iterdir()) == []


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bytewise", [False, True])
def test_smuggling_variant_normalize_mode(variant: bytes, bytewise: bool) -> None:
    """With bare_newline = "normalize" a bare LF is a line end inside the message, yet no
    variant ends DATA: the smuggled commands are stored as text of the one message (or the
    message is refused for a bare CR), and no second message exists."""
    data = b"Subject: s\r\n\r\nhello" + variant + SMUGGLED + b".\r\n"
    chunks = [bytes([b]) for b in data] if bytewise else [data]
    out, store, _ = run(chunks, bare_newline="normalize")
    bare_cr = variant.replace(b"\r\n", b"").count(b"\r") > 0
    if bare_cr:
        assert out == b"550 5.5.2 Message refused: bare CR in data (RFC 5321 section 2.3.8)\r\n"
        assert store.messages(f"ted@{HOST}") == []
    else:
        assert out.startswith(b"250 2.0.0 Ok: queued as "), out
        [msg] = store.messages(f"ted@{HOST}")
        assert b"MAIL FROM:<evil@x.test>\nRCPT TO:<ann@pop.contoso.test>\nDATA\nforged\n" in msg
    assert store.messages(f"ann@{HOST}") == []
    assert list(store.spool_dir().iterdir()) == []


@pytest.mark.parametrize("bytewise", [False, True])
def test_lf_only_message_is_normalised(bytewise: bool) -> None:
    """A client that sends LF-only text (curl, scripts) gets its message stored with LF line
    ends; a dot after a bare LF is text, not stuffing; a long LF-only body is no long line."""
    body = b"From: a@b.test\nSubject: lf\n\n" + b"x" * 70 + b"\n" * 1 + (b"y" * 70 + b"\n") * 200 + b".keep\n"
    data = body + b"\r\n.\r\n"
    chunks = [bytes([b]) for b in data] if bytewise else [data]
    out, store, _ = run(chunks, bare_newline="normalize")
    assert out.startswith(b"250 2.0.0 Ok: queued as "), out
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.split(b"\n", 4)[4] == body + b"\n"  # after Return-Path and Received


@pytest.mark.parametrize("bytewise", [False, True])
def test_exact_bytes_stored_whatever_the_chunking(bytewise: bool) -> None:
    """Dot-unstuffing and CRLF->LF give the same stored bytes however the stream is cut."""
    body = (b"From: a@b.test\r\nSubject: t\r\n\r\n..one dot\r\n...two\r\n.\tx\r\n"
            b"\r\nlast line\r\n")
    data = body + b".\r\nNOOP\r\n"
    chunks = [bytes([b]) for b in data] if bytewise else [data]
    out, store, _ = run(chunks)
    assert out.startswith(b"250 2.0.0 Ok: queued as ") and out.endswith(b"\r\n250 2.0.0 OK\r\n")
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.split(b"\n", 4)[4] == (b"From: a@b.test\nSubject: t\n\n.one dot\n..two\n\tx\n"
                                      b"\nlast line\n")
    # POP3 turns LF into CRLF and stuffs again: the client's bytes come back exactly
    assert msg.split(b"\n", 4)[4].replace(b"\n", b"\r\n") == body.replace(b"\r\n.", b"\r\n")


def test_empty_message_and_dot_right_after_data() -> None:
    """``DATA`` then ``.`` at once is an empty message (just our Received header)."""
    out, store, _ = run([b".\r\n"])
    assert out.startswith(b"250 2.0.0 ")
    [msg] = store.messages(f"ted@{HOST}")
    assert msg.startswith(b"Return-Path: <a@b.test>\nReceived: ") and msg.count(b"\n") == 4


@pytest.mark.parametrize("bytewise", [False, True])
def test_line_length_limit(bytewise: bool) -> None:
    """998 octets per line pass (a stuffed dot not counted); 999 get 550 5.6.0, nothing stored."""
    ok = b"x" * 998 + b"\r\n." + b"y" * 998 + b"\r\n.\r\n"
    out, store, _ = run([bytes([b]) for b in ok] if bytewise else [ok])
    assert out.startswith(b"250 2.0.0 ")
    bad = b"x" * 999 + b"\r\n.\r\n"
    out, store, _ = run([bytes([b]) for b in bad] if bytewise else [bad])
    assert out == b"550 5.6.0 Message refused: a line is longer than 998 octets (RFC 5321 section 4.5.3.1.6)\r\n"
    assert store.messages(f"ted@{HOST}") == []


def test_endless_line_in_data_is_not_buffered() -> None:
    """10 MB without a line end: refused, memory does not hold it, the end is still found."""
    chunk = b"z" * 65536
    factory, store, _, _, _ = make_factory()
    proto, t = open_session(factory)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ted@pop.contoso.test>\r\nDATA\r\n")
    take(t)
    for _ in range(160):
        proto.dataReceived(chunk)
        assert len(proto._buf) < 70000
    proto.dataReceived(b"\r\n.\r\nNOOP\r\n")
    assert take(t) == (b"550 5.6.0 Message refused: a line is longer than 998 octets "
                       b"(RFC 5321 section 4.5.3.1.6)\r\n250 2.0.0 OK\r\n")
    assert list(store.spool_dir().iterdir()) == []


def test_reader_end_offset() -> None:
    """feed() returns how much of the chunk belongs to the message; the rest is the next command."""
    class Sink:
        data = b""

        def write(self, d: bytes) -> None:
            self.data += d

        def abort(self) -> None:
            pass

    sink = Sink()
    reader = MessageReader(sink, 1000, 30)
    assert reader.feed(b"a\r\n") is None
    assert reader.feed(b"b\r\n.") is None
    assert reader.feed(b"\r\nQUIT\r\n") == 2
    # "a" is no header field: the empty line that starts the body comes first (RFC 5322 2.1)
    assert sink.data == b"\na\nb\n" and reader.error is None


def test_spool_writer_writes_in_large_chunks(tmp_path: Path) -> None:
    """Small writes are collected; abort removes the file; clean_spool removes leftovers."""
    w = SpoolWriter(tmp_path, "id1")
    for _ in range(100):
        w.write(b"x" * 100)
    assert w.path.stat().st_size == 0  # still buffered
    w.finish()
    assert w.path.stat().st_size == 10000
    w.abort()
    assert not w.path.exists()
    left = SpoolWriter(tmp_path, "id2")
    left.close()
    (tmp_path / "other-file").write_bytes(b"")
    assert clean_spool(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["other-file"]


def test_received_header_and_keywords() -> None:
    """RFC 3848 keywords; a hostile HELO cannot break out of the header; one recipient named."""
    assert [with_keyword(False, False, False), with_keyword(True, False, False),
            with_keyword(True, True, False), with_keyword(True, False, True),
            with_keyword(True, True, True)] == ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"]
    h = received_header(helo="evil)\n(x", client_ip="192.0.2.1", hostname=HOST, protocol="ESMTPS",
                        queue_id="Q1", recipient="ted@pop.contoso.test", tls="TLSv1.3:X", when=0)
    assert h == (b"Received: from evil???x ([192.0.2.1])\n\tby pop.contoso.test (pop3coexist) with "
                 b"ESMTPS (TLSv1.3:X) id Q1\n\tfor <ted@pop.contoso.test>; Thu, 01 Jan 1970 00:00:00 +0000\n")


def test_hop_counter() -> None:
    """Received fields are counted in the header only, folded lines and the body ignored."""
    c = HopCounter()
    for line in [b"Received: a", b"\tb", b"RECEIVED : c", b"Subject: x", b"", b"Received: body"]:
        c.line(line)
    assert c.count == 2 and not c.in_header


def test_clean_spool_of_one_ended_process_leaves_the_others(tmp_path: Path) -> None:
    """``clean_spool(pid=N)`` (a worker process ended) removes only the spool files process N
    wrote; live processes' half-received messages stay."""
    from pop3coexist.smtp.incoming import SPOOL_SUFFIX, clean_spool

    mine = tmp_path / f"abc.4242{SPOOL_SUFFIX}"
    other = tmp_path / f"def.14242{SPOOL_SUFFIX}"
    mine.write_bytes(b"x")
    other.write_bytes(b"y")
    assert clean_spool(tmp_path, pid=4242) == 1
    assert not mine.exists() and other.exists()


def test_received_date_is_the_formatted_second_of_the_time() -> None:
    """The Received field's date, memoised per whole second, is what email.utils gives for
    that time in UTC (times within one second, across seconds, before 1970-01-02, far ahead),
    and the memo stays bounded."""
    import datetime
    import email.utils
    import random

    from pop3coexist.smtp import received

    rng = random.Random(17)
    base = 1_764_547_059.0
    for _ in range(500):
        when = rng.choice([base, 3600.0, 4_102_444_800.0]) + rng.choice([0, 1, 59, 86400]) \
            + rng.random()
        want = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
        assert received.received_date(when) == want
    assert len(received._DATES) <= 64


def test_spool_writer_names_its_file_as_str_and_path(tmp_path: Path) -> None:
    """The spool file's name is kept as a str (``file``: the os calls take it as it is) with
    this process's pid, and ``path`` is the same name as a Path; a spool folder gone since the
    store checked it is made again by the first write."""
    import os

    folder = tmp_path / "spool"
    folder.mkdir()
    w = SpoolWriter(folder, "q9", lazy=True)
    assert w.file == f"{folder}/q9.{os.getpid()}.smtp-spool"
    assert w.path == Path(w.file)
    folder.rmdir()
    w.write(b"hello\n")
    w.finish()
    assert Path(w.file).read_bytes() == b"hello\n"
    w.abort()
    assert not w.path.exists()


class _Collect:
    """A SpoolWriter stand-in that keeps what is written (the reader's output)."""

    def __init__(self) -> None:
        self.data = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True


class _ReferenceReader(MessageReader):
    """``MessageReader`` with its content and header steps as they were before issue 17's
    fewer-passes rewrite: the reference the property below compares against."""

    def _content(self, body: bytes, line_start: bool = True) -> None:
        from pop3coexist.errors import MailError

        if not body or self.error is not None:
            return
        crlf = body.count(b"\r\n")
        bare_cr = body.count(b"\r") != crlf
        bare_lf = body.count(b"\n") != crlf
        if bare_cr or (bare_lf and not self.allow_bare_lf):
            what = "CR or LF" if not self.allow_bare_lf else "CR"
            self.error_now(MailError(550, "5.5.2",
                                     f"Message refused: bare {what} in data (RFC 5321 section 2.3.8)"))
            return
        lead_dot = line_start and body[:1] == b"."
        dots = body.count(b"\r\n.") + (1 if lead_dot else 0)
        unstuffed = body
        if dots:
            if lead_dot:
                unstuffed = unstuffed[1:]
            unstuffed = unstuffed.replace(b"\r\n.", b"\r\n")
        out = unstuffed.replace(b"\r\n", b"\n")
        lines = out.split(b"\n")
        lines.pop()
        if max(map(len, lines)) > self.max_line:
            self.error_now(self._too_long())
            return
        self.size += len(body) - dots
        if self.size > self.max_size:
            self.error_now(MailError(552, "5.3.4",
                                     f"Message too big: the limit is {self.max_size} octets"))
            return
        if self.hops.in_header:
            out = self._header_section(out)
            if self.hops.count + 1 > self.max_hops:
                self.error_now(MailError(554, "5.4.6",
                                         f"Too many hops ({self.hops.count} Received headers): "
                                         "probably a mail loop"))
                return
        self.sink.write(out)

    def _header_section(self, out: bytes) -> bytes:
        from pop3coexist.smtp.incoming import BODY, DROP_FIELDS, END, FIELD
        from pop3coexist.smtp.received import field_name

        lines = out.split(b"\n")
        tail = lines.pop()
        kept: list[bytes] = []
        for i, line in enumerate(lines):
            kind = self.hops.line(line)
            if kind == BODY:
                kept.append(b"")
                kept.extend(lines[i:])
                break
            if kind == FIELD:
                self._dropping = field_name(line) in DROP_FIELDS
            elif kind == END:
                kept.append(line)
                kept.extend(lines[i + 1 :])
                break
            if not self._dropping:
                kept.append(line)
        kept.append(tail)
        return b"\n".join(kept)


_PIECES = [b"a", b"b c", b".", b"..", b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"Received: x",
           b"Return-Path: <e@x>", b"return-path :y", b"X-A: 1", b"From x", b"\r\n.\r\n"]


@pytest.mark.parametrize("allow_bare_lf", [True, False])
def test_reader_passes_agree_with_the_reference(allow_bare_lf: bool) -> None:
    """The fewer-passes ``MessageReader`` (issue 17) stores the same bytes, counts the same
    size and hops, and refuses with the same reply as the reference implementation, for
    random mixes of line ends, dots, header fields and chunk splits."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400)
    @given(st.lists(st.sampled_from(_PIECES), max_size=40), st.lists(st.integers(1, 30),
           max_size=8), st.integers(4, 30))
    def check(pieces: list[bytes], cuts: list[int], max_line: int) -> None:
        data = b"".join(pieces) + b"\r\n.\r\n"
        results = []
        for cls in (MessageReader, _ReferenceReader):
            sink = _Collect()
            reader = cls(sink, 10_000, 3, max_line=max_line,  # type: ignore[arg-type]
                         allow_bare_lf=allow_bare_lf)
            rest, used = data, None
            for n in [*cuts, len(data)]:
                used = reader.feed(rest[:n])
                if used is not None:
                    break
                rest = rest[n:]
            error = reader.error.reply() if reader.error else None
            results.append((used, error, sink.aborted, reader.size, reader.hops.count,
                            sink.data if error is None else None))
        assert results[0] == results[1]

    check()
