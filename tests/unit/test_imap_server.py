"""The IMAP server (imap/server.py) byte for byte over StringTransport, over the real folder
store in a temporary Maildir: one test per command group and extension (CAPABILITY, STARTTLS,
LOGIN with a literal, AUTHENTICATE PLAIN with SASL-IR and with a continuation, LOGINDISABLED,
the connection limit, ID, NAMESPACE, ENABLE, LIST/LSUB with SPECIAL-USE, CREATE, RENAME,
DELETE, SUBSCRIBE, STATUS, APPEND with LITERAL+ and APPENDUID, SELECT/EXAMINE, FETCH, SEARCH,
STORE, COPY/MOVE with COPYUID, UID EXPUNGE, CLOSE, UNSELECT, IDLE on a task.Clock, QUOTA),
pipelining kept in order, bad input answered BAD with the session alive, and a POP3 deletion
reaching a selected session as EXPUNGE."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from twisted.internet import task

from pop3coexist.config import Config, DomainsConfig, ImapConfig, ServerConfig
from pop3coexist.imap import server as imap_server
from pop3coexist.imap.factory import IMAPServerFactory
from pop3coexist.store.maildir import MaildirStore
from tests.support.dialogue import connect, take
from tests.support.fakes import FakeChecker, sync_run_blocking
from tests.unit.pop3_env import TLSTransport

HOST = "pop.contoso.test"
TED, PW = "ted@pop.contoso.test", "ted pw"


class Env:
    def __init__(self, tmp: Path, **imap: object) -> None:
        self.clock = task.Clock()
        self.store = MaildirStore(tmp / "mailroot")
        self.store.add_domain(HOST)
        self.store.add_mailbox(HOST, "ted")
        self.store.add_mailbox(HOST, "locked")
        self.store.set_mailbox_locked(HOST, "locked", True)
        self.checker = FakeChecker({TED: PW, f"locked@{HOST}": "pw"}, local_domains=(HOST,),
                                   offers_secrets=False)
        tls = imap.pop("tls", False)
        config = Config(server=ServerConfig(HOST, tmp), domains=DomainsConfig(local=(HOST,)),
                        imap=ImapConfig(**imap))
        self.factory = IMAPServerFactory(config, self.store, self.checker, reactor=self.clock,
                                         run_blocking=sync_run_blocking,
                                         tls_options=object() if tls else None)

    def session(self, transport=None):  # noqa: ANN001, ANN201
        proto = self.factory.buildProtocol(None)
        if transport is None:
            return proto, connect(proto, host_port=143)
        proto.makeConnection(transport)
        return proto, transport

    def logged_in(self):  # noqa: ANN201
        proto, t = self.session()
        take(t)
        proto.dataReceived(f'a0 LOGIN {TED} "{PW}"\r\n'.encode())
        assert take(t).startswith(b"a0 OK [CAPABILITY ")
        return proto, t

    def deliver(self, subject: str, body: str = "Hello") -> None:
        self.store.deliver_bytes(HOST, "ted", f"From: a@example.test\nSubject: {subject}\n\n"
                                 f"{body}\n".encode())


def say(proto, t, line: bytes) -> bytes:  # noqa: ANN001
    proto.dataReceived(line + b"\r\n")
    return take(t)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


CAPS = (b"IMAP4rev1 LITERAL+ ID ENABLE IDLE NAMESPACE UIDPLUS MOVE UNSELECT CHILDREN "
        b"SPECIAL-USE QUOTA SASL-IR")


def test_greeting_and_capability(env: Env) -> None:
    """The greeting carries the capabilities; CAPABILITY lists AUTH= mechanisms before log-in
    and none after; NOOP and an unknown command keep the session."""
    proto, t = env.session()
    assert take(t) == b"* OK [CAPABILITY " + CAPS + b" AUTH=PLAIN AUTH=LOGIN] " + \
        HOST.encode() + b" IMAP4rev1 ready\r\n"
    assert say(proto, t, b"c1 CAPABILITY") == (b"* CAPABILITY " + CAPS +
                                               b" AUTH=PLAIN AUTH=LOGIN\r\nc1 OK CAPABILITY completed\r\n")
    assert say(proto, t, b"c2 NOOP") == b"c2 OK NOOP completed\r\n"
    assert say(proto, t, b"c3 SELECT INBOX") == b"c3 BAD SELECT not allowed now\r\n"
    assert say(proto, t, b"c4 FROB") == b"c4 BAD unknown command\r\n"
    assert say(proto, t, b"nocommand") == b"* BAD missing tag or command\r\n"


def test_starttls_and_logindisabled(tmp_path: Path) -> None:
    """With require_secure_auth, LOGINDISABLED and no PLAIN/LOGIN before STARTTLS; LOGIN gets
    NO [PRIVACYREQUIRED]; STARTTLS answers OK then starts TLS; after it LOGIN works."""
    env = Env(tmp_path, require_secure_auth=True, tls=True)
    t = TLSTransport()
    proto, t = env.session(t)
    assert b"STARTTLS LOGINDISABLED]" in take(t)
    assert say(proto, t, f"l1 LOGIN {TED} x".encode()) == \
        b"l1 NO [PRIVACYREQUIRED] use STARTTLS first\r\n"
    assert say(proto, t, b"s1 STARTTLS") == b"s1 OK begin TLS negotiation now\r\n"
    assert t.tls_options is not None
    assert b"STARTTLS" not in say(proto, t, b"c1 CAPABILITY")
    assert say(proto, t, f'l2 LOGIN {TED} "{PW}"'.encode()).startswith(b"l2 OK")


def test_login_literal_authenticate_and_refusals(env: Env) -> None:
    """LOGIN with a synchronising literal password (``+`` continuation); AUTHENTICATE PLAIN
    with SASL-IR and with a continuation; a locked mailbox is refused after the delay; ``*``
    cancels AUTHENTICATE."""
    proto, t = env.session()
    take(t)
    proto.dataReceived(f"a1 LOGIN {TED} {{{len(PW)}}}\r\n".encode())
    assert take(t) == b"+ go ahead\r\n"
    proto.dataReceived(PW.encode() + b"\r\n")
    assert take(t).startswith(b"a1 OK [CAPABILITY")
    proto, t = env.session()
    take(t)
    ir = base64.b64encode(f"\0{TED}\0{PW}".encode())
    assert say(proto, t, b"a2 AUTHENTICATE PLAIN " + ir).startswith(b"a2 OK")
    proto, t = env.session()
    take(t)
    assert say(proto, t, b"a3 AUTHENTICATE PLAIN") == b"+ \r\n"
    assert say(proto, t, base64.b64encode(f"\0locked@{HOST}\0pw".encode())) == b""
    env.clock.advance(60)
    assert take(t) == b"a3 NO [AUTHENTICATIONFAILED] authentication failed\r\n"
    assert say(proto, t, b"a4 AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert say(proto, t, b"*") == b"a4 BAD authentication cancelled\r\n"
    assert say(proto, t, b"a5 AUTHENTICATE CRAM-MD5") == b"a5 NO [CANNOT] unsupported mechanism\r\n"


def test_connection_limit(tmp_path: Path) -> None:
    """Past max_connections_per_client a new session gets BYE [UNAVAILABLE] and is closed."""
    env = Env(tmp_path, max_connections_per_client=1)
    env.session()
    proto, t = env.session()
    assert take(t) == b"* BYE [UNAVAILABLE] too many connections, try later\r\n"
    assert t.disconnecting


def test_id_namespace_enable_and_special_use(env: Env) -> None:
    """ID answers the server's name; NAMESPACE one personal namespace with "."; ENABLE an
    empty ENABLED; LIST shows Sent/Drafts/Trash/Junk with their RFC 6154 attributes (made at
    the first log-in), LIST (SPECIAL-USE) only those, LSUB the subscribed ones."""
    proto, t = env.logged_in()
    assert say(proto, t, b'i1 ID ("name" "test")') == \
        b'* ID ("name" "pop3coexist" "vendor" "pop3coexist")\r\ni1 OK ID completed\r\n'
    assert say(proto, t, b"n1 NAMESPACE") == \
        b'* NAMESPACE (("" ".")) NIL NIL\r\nn1 OK NAMESPACE completed\r\n'
    assert say(proto, t, b"e1 ENABLE CONDSTORE") == b"* ENABLED\r\ne1 OK ENABLE completed\r\n"
    assert say(proto, t, b'l1 LIST "" "*"') == (
        b'* LIST (\\HasNoChildren) "." INBOX\r\n'
        b'* LIST (\\HasNoChildren \\Drafts) "." Drafts\r\n'
        b'* LIST (\\HasNoChildren \\Junk) "." Junk\r\n'
        b'* LIST (\\HasNoChildren \\Sent) "." Sent\r\n'
        b'* LIST (\\HasNoChildren \\Trash) "." Trash\r\nl1 OK LIST completed\r\n')
    assert say(proto, t, b'l2 LIST (SPECIAL-USE) "" "S%"') == \
        b'* LIST (\\HasNoChildren \\Sent) "." Sent\r\nl2 OK LIST completed\r\n'
    assert say(proto, t, b'l3 LIST "" ""') == b'* LIST (\\Noselect) "." ""\r\nl3 OK LIST completed\r\n'
    assert b'* LSUB (\\HasNoChildren \\Trash) "." Trash' in say(proto, t, b'l4 LSUB "" "*"')


def test_create_rename_delete_subscribe_status(env: Env) -> None:
    """CREATE (parents too), ALREADYEXISTS, RENAME with children, DELETE (NONEXISTENT after),
    SUBSCRIBE/UNSUBSCRIBE, STATUS items; a bad name gets NO [CANNOT]."""
    proto, t = env.logged_in()
    assert say(proto, t, b"c1 CREATE Work.2026") == b"c1 OK CREATE completed\r\n"
    assert say(proto, t, b"c2 CREATE Work") == b"c2 NO [ALREADYEXISTS] folder Work already exists\r\n"
    assert say(proto, t, b'c3 CREATE "../etc"') == b"c3 NO [CANNOT] invalid folder name '../etc'\r\n"
    assert b'* LIST (\\HasChildren) "." Work' in say(proto, t, b'l1 LIST "" "W*"')
    assert say(proto, t, b"r1 RENAME Work Jobs") == b"r1 OK RENAME completed\r\n"
    assert b'"." Jobs.2026' in say(proto, t, b'l2 LIST "" "Jobs.*"')
    assert say(proto, t, b"s1 SUBSCRIBE Jobs.2026") == b"s1 OK SUBSCRIBE completed\r\n"
    assert say(proto, t, b"s2 UNSUBSCRIBE Jobs.2026") == b"s2 OK UNSUBSCRIBE completed\r\n"
    env.deliver("one")
    assert say(proto, t, b"st STATUS INBOX (MESSAGES UNSEEN RECENT)") == \
        b"* STATUS INBOX (MESSAGES 1 UNSEEN 1 RECENT 1)\r\nst OK STATUS completed\r\n"
    assert say(proto, t, b"d1 DELETE Jobs") == \
        b"d1 NO [INUSE] folder Jobs has subfolders: delete them first\r\n"
    assert say(proto, t, b"d2 DELETE Jobs.2026") == b"d2 OK DELETE completed\r\n"
    assert say(proto, t, b"d3 DELETE Jobs.2026") == b"d3 NO [NONEXISTENT] no folder Jobs.2026\r\n"
    assert say(proto, t, b"d4 DELETE INBOX") == b"d4 NO [CANNOT] INBOX cannot be deleted\r\n"


def test_append_literal_plus_and_appenduid(env: Env) -> None:
    """APPEND with a LITERAL+ literal (no continuation) answers APPENDUID validity uid; to a
    missing folder NO [TRYCREATE]; an oversized literal NO [TOOBIG], the session goes on."""
    proto, t = env.logged_in()
    msg = b"Subject: a\r\n\r\nbody\r\n"
    out = say(proto, t, b"p1 APPEND Drafts (\\Draft) {%d+}\r\n" % len(msg) + msg)
    assert re.fullmatch(rb"p1 OK \[APPENDUID \d+ 1\] APPEND completed\r\n", out)
    out = say(proto, t, b"p2 APPEND Nowhere {%d+}\r\n" % len(msg) + msg)
    assert out == b"p2 NO [TRYCREATE] no folder Nowhere\r\n"
    env.factory.max_literal = 10
    assert say(proto, t, b"p3 APPEND Drafts {100+}") == b"p3 NO [TOOBIG] literal too large\r\n"
    proto.dataReceived(b"x" * 100)
    assert say(proto, t, b"p4 NOOP") == b"p4 OK NOOP completed\r\n"


def test_select_fetch_search_store(env: Env) -> None:
    """SELECT's untagged data; FETCH of flags, size, envelope, a header field and a partial
    body; BODY[] sets \\Seen (EXAMINE would not); SEARCH by subject, flag and UID; STORE
    replace/add/remove and .SILENT."""
    env.deliver("first", "one")
    env.deliver("second", "two")
    proto, t = env.logged_in()
    out = say(proto, t, b"s1 SELECT INBOX")
    assert out.startswith(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
                          b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] "
                          b"flags\r\n* 2 EXISTS\r\n* 2 RECENT\r\n* OK [UNSEEN 1] first unseen\r\n")
    assert b"* OK [UIDNEXT 3] predicted next UID\r\n" in out
    assert say(proto, t, b"f1 FETCH 1:2 (UID FLAGS)") == (
        b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\n* 2 FETCH (UID 2 FLAGS (\\Recent))\r\n"
        b"f1 OK FETCH completed\r\n")
    assert say(proto, t, b"f2 FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.2>)") == (
        b"* 2 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {19}\r\nSubject: second\r\n\r\n "
        b"BODY[TEXT]<0> {2}\r\ntw)\r\nf2 OK FETCH completed\r\n")
    assert b'ENVELOPE (NIL "first" ((NIL NIL "a" "example.test"))' in \
        say(proto, t, b"f3 FETCH 1 ENVELOPE")
    assert say(proto, t, b"f4 FETCH 1 BODY[TEXT]") == \
        b"* 1 FETCH (BODY[TEXT] {5}\r\none\r\n FLAGS (\\Seen \\Recent))\r\nf4 OK FETCH completed\r\n"
    assert say(proto, t, b"q1 SEARCH SUBJECT second") == b"* SEARCH 2\r\nq1 OK SEARCH completed\r\n"
    assert say(proto, t, b"q2 SEARCH UNSEEN") == b"* SEARCH 2\r\nq2 OK SEARCH completed\r\n"
    assert say(proto, t, b"q3 UID SEARCH OR SEEN UID 2") == b"* SEARCH 1 2\r\nq3 OK SEARCH completed\r\n"
    assert say(proto, t, b"q4 SEARCH FOO") == b"q4 BAD unknown SEARCH key FOO\r\n"
    assert say(proto, t, b"w1 STORE 2 FLAGS (\\Flagged $Work)") == \
        b"* 2 FETCH (FLAGS ($Work \\Flagged \\Recent))\r\nw1 OK STORE completed\r\n"
    assert say(proto, t, b"w2 STORE 2 -FLAGS.SILENT ($Work)") == b"w2 OK STORE completed\r\n"
    assert say(proto, t, b"w3 UID STORE 2 +FLAGS (\\Seen)") == \
        b"* 2 FETCH (FLAGS (\\Flagged \\Seen \\Recent) UID 2)\r\nw3 OK STORE completed\r\n"
    assert say(proto, t, b"w4 STORE 9 +FLAGS (\\Seen)") == b"w4 BAD no such message\r\n"


def test_copy_move_uid_expunge_close_unselect(env: Env) -> None:
    """COPY answers COPYUID; MOVE sends COPYUID untagged then EXPUNGE; UID EXPUNGE removes
    only the named \\Deleted messages; COPY to a missing folder NO [TRYCREATE]; CLOSE expunges
    silently; UNSELECT does not; EXAMINE is READ-ONLY and STORE there gets NO."""
    for n in range(3):
        env.deliver(f"m{n}")
    proto, t = env.logged_in()
    say(proto, t, b"s1 SELECT INBOX")
    assert re.fullmatch(rb"c1 OK \[COPYUID \d+ 1 1\] COPY completed\r\n",
                        say(proto, t, b"c1 COPY 1 Trash"))
    assert say(proto, t, b"c2 COPY 1 Nowhere") == b"c2 NO [TRYCREATE] no folder Nowhere\r\n"
    out = say(proto, t, b"m1 UID MOVE 2 Junk")
    assert re.fullmatch(rb"\* OK \[COPYUID \d+ 2 1\] moved\r\n\* 2 EXPUNGE\r\nm1 OK MOVE completed\r\n", out)
    say(proto, t, b"x0 STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    assert say(proto, t, b"x1 UID EXPUNGE 3") == b"* 2 EXPUNGE\r\nx1 OK EXPUNGE completed\r\n"
    assert say(proto, t, b"u1 UNSELECT") == b"u1 OK UNSELECT completed\r\n"
    out = say(proto, t, b"e1 EXAMINE INBOX")
    assert out.endswith(b"e1 OK [READ-ONLY] EXAMINE completed\r\n") and b"* 1 EXISTS" in out
    assert say(proto, t, b"e2 STORE 1 +FLAGS (\\Seen)") == b"e2 NO [READ-ONLY] the folder is read-only\r\n"
    say(proto, t, b"s2 SELECT INBOX")
    assert say(proto, t, b"k1 CLOSE") == b"k1 OK CLOSE completed\r\n"
    assert b"* 0 EXISTS" in say(proto, t, b"s3 SELECT INBOX")


def test_idle_reports_new_mail_and_pop3_deletion(env: Env) -> None:
    """IDLE answers ``+``; mail delivered meanwhile is ``* n EXISTS`` at the next poll; a POP3
    session deleting a message makes ``* n EXPUNGE``; DONE ends IDLE with OK."""
    env.deliver("old")
    proto, t = env.logged_in()
    say(proto, t, b"s1 SELECT INBOX")
    assert say(proto, t, b"i1 IDLE") == b"+ idling\r\n"
    env.deliver("new")
    env.clock.advance(imap_server.POLL_INTERVAL)
    assert take(t) == b"* 2 EXISTS\r\n* 2 RECENT\r\n"
    drop = env.store.open_maildrop(HOST, "ted")
    drop.commit({0})
    env.clock.advance(imap_server.POLL_INTERVAL)
    assert take(t) == b"* 1 EXPUNGE\r\n"
    assert say(proto, t, b"DONE") == b"i1 OK IDLE terminated\r\n"


def test_idle_sessions_of_a_folder_share_one_poll(env: Env) -> None:
    """Three sessions IDLE on one folder make one timer (idle.IdleHub), not one each; new mail
    reaches all three at the next poll; a change one session finds by a command (outside
    IDLE) reaches the IDLE ones at the next poll; the timer goes with the last DONE."""
    from pop3coexist.imap.idle import idle_hub

    env.deliver("old")
    sessions = [env.logged_in() for _ in range(3)]
    for proto, t in sessions:
        say(proto, t, b"s1 SELECT INBOX")
        assert say(proto, t, b"i1 IDLE") == b"+ idling\r\n"
    hub = idle_hub(env.clock)
    assert hub.folders() == 1 and len(env.clock.getDelayedCalls()) == 1 + 3  # + 3 log-out timers
    env.deliver("new")
    env.clock.advance(imap_server.POLL_INTERVAL)
    assert sorted(take(t) for _, t in sessions) == \
        [b"* 2 EXISTS\r\n* 0 RECENT\r\n"] * 2 + [b"* 2 EXISTS\r\n* 2 RECENT\r\n"]
    other, ot = env.logged_in()
    say(other, ot, b"s1 SELECT INBOX")
    say(other, ot, b"f1 STORE 1 +FLAGS (\\Flagged)")
    env.clock.advance(imap_server.POLL_INTERVAL)
    for _, t in sessions:  # (the session that saw message 1 first adds \\Recent)
        assert take(t).startswith(b"* 1 FETCH (FLAGS (\\Flagged")
    for proto, t in sessions:
        assert say(proto, t, b"DONE") == b"i1 OK IDLE terminated\r\n"
    assert hub.folders() == 0 and len(env.clock.getDelayedCalls()) == 4


def test_quota(env: Env) -> None:
    """GETQUOTAROOT names the root "" and its STORAGE in KiB over all folders; no quota: an
    empty list; SETQUOTA NO [NOPERM]."""
    proto, t = env.logged_in()
    assert say(proto, t, b"g1 GETQUOTAROOT INBOX") == \
        b'* QUOTAROOT INBOX ""\r\n* QUOTA "" ()\r\ng1 OK GETQUOTAROOT completed\r\n'
    env.store.set_quota(HOST, "ted", 10 * 1024)
    say(proto, t, b"p1 APPEND Sent {2000+}\r\n" + b"x" * 2000)
    assert say(proto, t, b'g2 GETQUOTA ""') == b'* QUOTA "" (STORAGE 2 10)\r\ng2 OK GETQUOTA completed\r\n'
    assert say(proto, t, b'g3 SETQUOTA "" (STORAGE 1)').startswith(b"g3 NO [NOPERM]")


def test_pipelined_commands_answer_in_order_and_bad_syntax(env: Env) -> None:
    """Commands sent together are answered one by one in order; a malformed one gets BAD and
    the next is still served."""
    proto, t = env.logged_in()
    proto.dataReceived(b'a NOOP\r\nb LIST "" "INBOX"\r\nc STATUS INBOX (FOO)\r\n'
                       b'd FETCH\r\ne STATUS "unterminated\r\nf NOOP\r\n')
    assert take(t) == (b"a OK NOOP completed\r\n"
                       b'* LIST (\\HasNoChildren) "." INBOX\r\nb OK LIST completed\r\n'
                       b"c BAD unknown STATUS item FOO\r\n"
                       b"d BAD FETCH not allowed now\r\n"
                       b"e BAD unterminated quoted string\r\n"
                       b"f OK NOOP completed\r\n")


def test_starttls_drops_clear_text_sent_after_it(tmp_path: Path) -> None:
    """A command pipelined after STARTTLS in the same clear-text packet (an injection, RFC
    2595 section 3.1) is never run: only STARTTLS's OK is written before the handshake, and
    nothing after it."""
    env = Env(tmp_path, tls=True)
    proto, t = env.session(TLSTransport())
    take(t)
    proto.dataReceived(f'a1 STARTTLS\r\na2 LOGIN {TED} "{PW}"\r\n'.encode())
    assert t.written_before_tls == b"a1 OK begin TLS negotiation now\r\n"
    assert take(t) == b"a1 OK begin TLS negotiation now\r\n"
    assert proto.state == "unauth"


def test_truncated_arguments_get_bad(env: Env) -> None:
    """Found by a random command fuzz: a SEARCH key missing its argument (``OR ALL``,
    ``KEYWORD``) and UID EXPUNGE without its set answer BAD, not a server failure."""
    env.deliver("one")
    proto, t = env.logged_in()
    say(proto, t, b"s1 SELECT INBOX")
    assert say(proto, t, b"q1 SEARCH OR ALL") == b"q1 BAD SEARCH key needs an argument\r\n"
    assert say(proto, t, b"q2 SEARCH KEYWORD") == b"q2 BAD SEARCH key needs an argument\r\n"
    assert say(proto, t, b"x1 UID EXPUNGE") == b"x1 BAD UID EXPUNGE uid-set\r\n"
    assert say(proto, t, b"x2 EXPUNGE 1") == b"x2 BAD EXPUNGE takes no arguments\r\n"


def test_fetch_waits_for_a_full_send_buffer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """FETCH registers a streaming producer: while the transport has it paused (a client
    reading slowly) no more messages are read or written; resuming sends the rest, then OK."""
    from twisted.internet.testing import StringTransport

    from pop3coexist.imap import fetch as fetchmod

    class Full(StringTransport):
        def write(self, data: bytes) -> None:
            super().write(data)
            if data.startswith(b"* ") and b" FETCH (" in data and self.producer is not None:
                self.producer.pauseProducing()  # the socket buffer is full after each one

    monkeypatch.setattr(fetchmod, "BATCH_BYTES", 1)
    for n in range(3):
        env.deliver(f"m{n}")
    proto, t = env.session(Full())
    take(t)
    say(proto, t, f'a0 LOGIN {TED} "{PW}"'.encode())
    say(proto, t, b"s1 EXAMINE INBOX")
    assert say(proto, t, b"f1 FETCH 1:3 (UID)") == b"* 1 FETCH (UID 1)\r\n"
    t.producer.resumeProducing()
    assert take(t) == b"* 2 FETCH (UID 2)\r\n"
    t.producer.resumeProducing()
    assert take(t) == b"* 3 FETCH (UID 3)\r\nf1 OK FETCH completed\r\n"
    assert t.producer is None


def test_expunge_held_back_during_fetch(env: Env) -> None:
    """A message POP3 deleted is not announced during FETCH (RFC 3501 section 7.4.1): FETCH
    still answers for it what the session knows (its UID) but not its body, which is gone;
    the next NOOP reports ``* 1 EXPUNGE`` and the numbers shift."""
    env.deliver("one")
    env.deliver("two")
    proto, t = env.logged_in()
    say(proto, t, b"s1 SELECT INBOX")
    env.store.open_maildrop(HOST, "ted").commit({0})
    assert say(proto, t, b"f1 FETCH 1:2 (UID)") == \
        b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\nf1 OK FETCH completed\r\n"
    assert say(proto, t, b"f0 FETCH 1 (BODY.PEEK[])") == b"f0 OK FETCH completed\r\n"
    assert say(proto, t, b"n1 NOOP") == b"* 1 EXPUNGE\r\nn1 OK NOOP completed\r\n"
    assert say(proto, t, b"f2 FETCH 1 (UID)") == b"* 1 FETCH (UID 2)\r\nf2 OK FETCH completed\r\n"


def test_a_refused_log_in_frees_its_gate_place_before_the_delay(env: Env) -> None:
    """A wrong password's check frees its place at the gate when it has its outcome, not after
    the failure delay: with one place, another unknown source is checked at once while the
    first waits out its 2 s (before, a guesser held the place through every delay)."""
    from pop3coexist.policy.throttle import LoginGate

    env.factory.gate = LoginGate(env.factory.throttle, env.clock, concurrency=1)
    guesser = env.factory.buildProtocol(None)
    tg = connect(guesser, peer="198.51.100.1", host_port=143)
    take(tg)
    assert say(guesser, tg, f'g1 LOGIN {TED} "wrong"'.encode()) == b""
    user = env.factory.buildProtocol(None)
    tu = connect(user, peer="198.51.100.2", host_port=143)
    take(tu)
    assert say(user, tu, f'u1 LOGIN {TED} "{PW}"'.encode()).startswith(b"u1 OK [CAPABILITY")
    env.clock.advance(60)
    assert take(tg) == b"g1 NO [AUTHENTICATIONFAILED] authentication failed\r\n"
