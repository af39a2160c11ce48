"""IMAP4rev1 with Python's imaplib against the real server (twistd): log-in on IMAP (STARTTLS)
and IMAPS, every command and extension the server announces, and the POP3/IMAP coexistence
rules on one Maildir (a POP3 deletion reaches a live IMAP session as EXPUNGE; a message read
and flagged over IMAP keeps its POP3 UIDL; UIDs and UIDVALIDITY survive a restart)."""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import ssl
import time

import pytest

from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import SieveScripts
from tests.support.server import ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration

USER = "ted@pop.contoso.test"
PASSWORD = "ted's imap pass"

# ID (RFC 2971) is valid in every state; imaplib.xatom would otherwise record it as valid only
# in the state of its first use, for the whole process (and so for later tests).
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("imap"))
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    srv.add_mailbox("locked@pop.contoso.test", "locked pass")
    srv.admin("mailbox", "lock", "locked@pop.contoso.test")
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


def _send(srv: ServerProcess, subject: str, body: str = "Hello.") -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp")) as c:
        c.sendmail("alice@example.test", [USER],
                   f"From: Alice <alice@example.test>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n\r\n{body}\r\n")


def _login(srv: ServerProcess) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
    m.login(USER, PASSWORD)
    return m


def _ctx(srv: ServerProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(srv.certs.ca_cert))
    ctx.check_hostname = False
    return ctx


def _wait_for(m: imaplib.IMAP4, count: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        typ, data = m.select("INBOX")
        if int(data[0]) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"INBOX never reached {count} messages")


def test_tls_logins_and_refusals(server: ServerProcess) -> None:
    """STARTTLS and IMAPS both log in with the POP3 password (verified certificate); a wrong
    password and a locked mailbox get NO [AUTHENTICATIONFAILED]; AUTHENTICATE PLAIN works."""
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    assert "STARTTLS" in m.capabilities
    m.starttls(_ctx(server))
    m.login(USER, PASSWORD)
    m.logout()
    s = imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=_ctx(server))
    s.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
    assert s.state == "AUTH"
    s.logout()
    for user, pw in ((USER, "wrong"), ("locked@pop.contoso.test", "locked pass")):  # refused
        m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login(user, pw)
        m.logout()


def test_every_command(server: ServerProcess) -> None:
    """imaplib drives each command: CAPABILITY NOOP ID NAMESPACE ENABLE LIST (SPECIAL-USE
    folders made at first log-in) LSUB CREATE RENAME DELETE SUBSCRIBE UNSUBSCRIBE STATUS
    APPEND (APPENDUID, LITERAL+) SELECT EXAMINE FETCH SEARCH STORE COPY (COPYUID) MOVE
    EXPUNGE UID-forms CLOSE UNSELECT GETQUOTAROOT GETQUOTA, with the RFC's replies."""
    _send(server, "first")
    m = _login(server)
    assert m.enable("CONDSTORE")[0] == "OK"  # nothing to enable: an empty * ENABLED
    _wait_for(m, 1)
    caps = set(m.capabilities)
    assert {"IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ID", "LITERAL+", "ENABLE",
            "SPECIAL-USE", "QUOTA"} <= caps
    assert m.noop()[0] == "OK"
    assert m.xatom("ID", '("name" "imaplib")')[0] == "OK"
    assert m.namespace() == ("OK", [b'(("" ".")) NIL NIL'])
    typ, listing = m.list()
    text = b"\n".join(listing)
    for name, attr in (("Sent", b"\\Sent"), ("Drafts", b"\\Drafts"), ("Trash", b"\\Trash"),
                       ("Junk", b"\\Junk")):
        assert re.search(rb"\(.*" + re.escape(attr) + rb".*\) \".\" " + name.encode(), text)
    assert b"Sent" in b"\n".join(m.lsub()[1])
    assert m.create("Projects.2026")[0] == "OK"
    assert m.create("Projects.2026")[0] == "NO"
    assert m.rename("Projects.2026", "Projects.Y2026")[0] == "OK"
    assert m.subscribe("Projects.Y2026")[0] == "OK"
    assert m.unsubscribe("Projects.Y2026")[0] == "OK"
    assert b'"." Projects.Y2026' in b"\n".join(m.list('""', "Projects.*")[1])
    assert m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)")[0] == "OK"
    typ, data = m.append("Drafts", "(\\Draft $Work)", None,
                         b"From: ted@pop.contoso.test\r\nSubject: draft\r\n\r\nx\r\n")
    assert typ == "OK" and b"APPENDUID" in data[0]
    typ, data = m.select("INBOX")
    assert typ == "OK"
    typ, data = m.fetch("1", "(UID FLAGS RFC822.SIZE BODY.PEEK[] ENVELOPE BODYSTRUCTURE "
                             "BODY.PEEK[HEADER.FIELDS (SUBJECT)] INTERNALDATE)")
    head, body = data[0]
    size = int(re.search(rb"RFC822.SIZE (\d+)", head).group(1))
    assert len(body) == size and b"Subject: first" in body
    assert b"\\Seen" not in head
    assert m.search(None, "SUBJECT", "first")[1] == [b"1"]
    assert m.search(None, "UNSEEN")[1] == [b"1"]
    assert m.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert m.uid("SEARCH", None, "FLAGGED")[0] == "OK"
    typ, data = m.copy("1", "Projects.Y2026")
    assert typ == "OK"
    assert m.response("COPYUID")[1][0] is not None
    typ, data = m.select("Projects.Y2026", readonly=True)  # EXAMINE
    assert data == [b"1"]
    assert m.fetch("1", "(FLAGS)")[1][0].count(b"\\Flagged") == 1
    m.select("Projects.Y2026")
    assert m._simple_command("MOVE", "1", "Trash")[0] == "OK"
    assert m._simple_command("UNSELECT")[0] == "OK"
    m.select("Trash")
    m.store("1:*", "+FLAGS", "(\\Deleted)")
    typ, data = m.expunge()
    assert typ == "OK" and data[0] is not None
    assert m.close()[0] == "OK"
    assert m.delete("Projects.Y2026")[0] == "OK"
    typ, data = m.getquotaroot("INBOX")
    assert typ == "OK"
    assert m.getquota('""')[0] == "OK"
    m.logout()


def test_pop3_delete_is_an_imap_expunge_and_uidl_survives_imap(server: ServerProcess) -> None:
    """A message read and flagged over IMAP keeps its POP3 UIDL; a message deleted over POP3
    (while the IMAP session is selected) reaches that session as ``* n EXPUNGE`` at its next
    NOOP; UIDs do not change for the messages that stay."""
    for n in range(3):
        _send(server, f"coexist {n}")
    m = _login(server)
    m.select("INBOX")
    count = int(m.select("INBOX")[1][0])
    p = poplib.POP3("127.0.0.1", server.port("pop3"))
    p.user(USER)
    p.pass_(PASSWORD)
    before = dict(line.split() for line in p.uidl()[1])
    p.quit()
    typ, data = m.fetch("1:*", "(UID BODY[HEADER.FIELDS (SUBJECT)])")  # sets \Seen
    uids = [int(re.search(rb"UID (\d+)", d[0]).group(1)) for d in data if isinstance(d, tuple)]
    m.store("1", "+FLAGS", "(\\Answered)")
    p = poplib.POP3("127.0.0.1", server.port("pop3"))
    p.user(USER)
    p.pass_(PASSWORD)
    after = dict(line.split() for line in p.uidl()[1])
    assert after == before  # same UIDLs after IMAP renamed the files with flags
    p.dele(2)
    p.quit()
    typ, data = m.noop()
    assert b"2" in [r for r in m.untagged_responses.get("EXPUNGE", [])] or \
        m.select("INBOX")[1] == [str(count - 1).encode()]
    typ, data = m.uid("FETCH", "1:*", "(UID)")
    now = [int(re.search(rb"UID (\d+)", d).group(1)) for d in data]
    assert now == [uids[0], *uids[2:]]
    m.logout()


def test_uids_survive_restart(server: ServerProcess) -> None:
    """UIDVALIDITY and each message's UID are the same after the server restarts (the
    dovecot-uidlist file is the only record)."""
    m = _login(server)
    typ, data = m.status("INBOX", "(UIDVALIDITY)")
    validity = data[0]
    m.select("INBOX")
    uids = m.uid("SEARCH", None, "ALL")[1]
    m.logout()
    server.stop()
    server.start()
    m = _login(server)
    assert m.status("INBOX", "(UIDVALIDITY)")[1][0] == validity
    m.select("INBOX")
    assert m.uid("SEARCH", None, "ALL")[1] == uids
    m.logout()


def test_idle_reports_new_mail(server: ServerProcess) -> None:
    """IDLE (RFC 2177): mail delivered by SMTP during IDLE is announced as ``* n EXISTS``
    without a command; DONE ends it with a tagged OK."""
    m = _login(server)
    m.select("INBOX")
    tag = m._new_tag()
    m.send(tag + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    _send(server, "during idle")
    m.sock.settimeout(15)
    line = m.readline()
    assert re.match(rb"\* \d+ EXISTS", line), line
    m.send(b"DONE\r\n")
    while True:
        line = m.readline()
        if line.startswith(tag):
            assert b"OK" in line
            break
    m.logout()


def test_sieve_fileinto_files_into_a_folder(server: ServerProcess) -> None:
    """A Sieve ``fileinto "Lists/Work"`` stores the message in the IMAP folder Lists.Work
    (made when missing) with the script's imap4flags, and not in INBOX; other mail still goes
    to INBOX."""
    scripts = SieveScripts(MaildirStore(server.state_dir / "mailroot"))
    scripts.put_script("pop.contoso.test", "ted", "lists",
                       'require ["fileinto", "imap4flags"];\n'
                       'if header :contains "subject" "[work]" {\n'
                       '  fileinto :flags "\\\\Flagged" "Lists/Work";\n}\n')
    scripts.set_active("pop.contoso.test", "ted", "lists")
    m = _login(server)
    before = int(m.select("INBOX")[1][0])
    _send(server, "[work] filed")
    _send(server, "plain mail")
    _wait_for(m, before + 1)
    end = time.monotonic() + 10
    while time.monotonic() < end and m.select("Lists.Work")[0] != "OK":
        time.sleep(0.05)
    typ, data = m.select("Lists.Work")
    assert typ == "OK" and data == [b"1"]
    typ, data = m.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"\\Flagged" in data[0][0] and b"[work] filed" in data[0][1]
    m.select("INBOX")
    assert m.search(None, "SUBJECT", '"[work] filed"')[1] == [b""]
    m.logout()


def test_scram_sha_256_login(server: ServerProcess) -> None:
    """AUTHENTICATE SCRAM-SHA-256 (RFC 7677) driven by scramp: the server proves it knows the
    keys (scramp checks the server signature), the client logs in; a wrong password gets NO
    [AUTHENTICATIONFAILED]."""
    from scramp import ScramClient

    def drive(password: str):  # noqa: ANN202
        client = ScramClient(["SCRAM-SHA-256"], USER, password)
        steps = iter(range(3))

        def answer(challenge: bytes) -> bytes:
            step = next(steps)
            if step == 0:
                return client.get_client_first().encode()
            if step == 1:
                client.set_server_first(challenge.decode())
                return client.get_client_final().encode()
            client.set_server_final(challenge.decode())
            return b""
        return answer

    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    assert "AUTH=SCRAM-SHA-256" in m.capabilities
    assert m.authenticate("SCRAM-SHA-256", drive(PASSWORD))[0] == "OK"
    m.logout()
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.authenticate("SCRAM-SHA-256", drive("wrong password"))
    m.logout()


def test_served_by_worker_processes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With ``server.workers = 2`` the IMAP and IMAPS listeners are served by every process:
    eight sessions at once log in and read the same INBOX, and the connection limit per client
    (shared by the processes) refuses the ninth with BYE."""
    require_installed_plugin()
    srv = ServerProcess(tmp_path_factory.mktemp("imapworkers"), server_config="workers = 2",
                        imap_config="max_connections_per_client = 8")
    srv.write_config()
    srv.add_mailbox(USER, PASSWORD)
    srv.start()
    try:
        _send(srv, "to all")
        sessions = [_login(srv) for _ in range(8)]
        for m in sessions:
            assert m.select("INBOX", readonly=True) == ("OK", [b"1"])
        with pytest.raises((imaplib.IMAP4.error, ConnectionError, OSError), match="UNAVAILABLE"):
            extra = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
            extra.login(USER, PASSWORD)
        for m in sessions:
            m.logout()
    finally:
        srv.stop_cleanly(PASSWORD)
