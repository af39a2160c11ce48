"""Real IMAP clients against the real server, and the same tests against Dovecot's imapd.

Every test takes the ``target`` fixture, parametrised over ``pop3coexist`` (twistd, on
OS-picked loopback ports) and ``dovecot`` (tests/support/dovecot.py's template): a test is
first proven against the reference server, then holds against ours. Test id = one cell of the
client x command matrix (``test_imaplib_fetch[pop3coexist]``).

Clients: Python imaplib (each command and extension issue 18 names; IDLE and the LITERAL+
APPEND go through imaplib's own ``send``/``readline``, since imaplib 3.11 has no IDLE and
sends synchronising literals only), ``curl imap://`` and ``imaps://`` (list, fetch, upload),
``neomutt`` in batch mode (reads and moves mail), ``mbsync`` (isync: two-way sync, twice).
Passwords reach the programs through files (netrc, a config file of mode 0600), never argv.
"""

from __future__ import annotations

import imaplib
import re
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.imap_targets import ImapTarget, dovecot_for_module, ours_for_module
from tests.support.programs import require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TARGETS = ["pop3coexist", "dovecot"]

# ID (RFC 2971) is valid in every state; imaplib.xatom would otherwise record it as valid only
# in the state of its first use, for the whole process (and so for later tests).
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")


@pytest.fixture(scope="module")
def _dovecot():
    yield from dovecot_for_module()


@pytest.fixture(scope="module")
def _ours():
    yield from ours_for_module(pool_size=24)


@pytest.fixture(params=TARGETS)
def target(request) -> ImapTarget:
    """The server under test: ours or Dovecot's (one module-wide instance of each)."""
    return request.getfixturevalue("_ours" if request.param == "pop3coexist" else "_dovecot")


# --------------------------------------------------------------------------- messages


def message(n: int, subject: str | None = None, body: str = "hello", sender: str = "alice@example.test") -> bytes:
    """A plain-text message with LF line ends (as our SMTP side stores them)."""
    subject = subject or f"message {n}"
    return (f"From: {sender}\nTo: bob@pop.contoso.test\nSubject: {subject}\n"
            f"Message-ID: <{n}.{time.monotonic_ns()}@example.test>\nDate: Mon, 30 Nov 2026 12:00:00 +0000\n\n"
            f"{body} {n}\n.a line starting with a dot\n").encode()


MULTIPART = (b"From: carol@example.test\nTo: bob@pop.contoso.test\nSubject: with attachment\n"
             b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XYZ\"\n\n"
             b"preamble\n--XYZ\nContent-Type: text/plain; charset=utf-8\n\nthe text part\n"
             b"--XYZ\nContent-Type: application/octet-stream; name=\"a.bin\"\n"
             b"Content-Transfer-Encoding: base64\n\nAAECAwQ=\n--XYZ--\n")


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def ctx(target: ImapTarget) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(target.cafile))


def login(target: ImapTarget, address: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", target.port, timeout=30)
    m.login(address, target.password)
    return m


def ok(result: tuple) -> list:
    typ, data = result
    assert typ == "OK", result
    return data


def caps(m: imaplib.IMAP4) -> set[str]:
    return set(ok(m.capability())[0].decode().upper().split())


def flags_on_disk(target: ImapTarget, address: str, folder: str = "") -> list[str]:
    """The Maildir info flags (``:2,FS`` -> "FS") of every message in a folder, sorted."""
    box = target.maildir(address) / (f".{folder}" if folder else "")
    out = []
    for sub in ("new", "cur"):
        for f in (box / sub).iterdir():
            out.append(f.name.partition(":2,")[2] if ":2," in f.name else "")
    return sorted(out)


def count_on_disk(target: ImapTarget, address: str, folder: str = "") -> int:
    box = target.maildir(address) / (f".{folder}" if folder else "")
    return sum(1 for sub in ("new", "cur") for f in (box / sub).iterdir() if not f.name.startswith("."))


def response_code(m: imaplib.IMAP4, name: str) -> bytes:
    """The last ``[NAME ...]`` response code imaplib collected (COPYUID, APPENDUID), removed."""
    got = m.untagged_responses.pop(name, None)
    assert got, (name, m.untagged_responses)
    return got[-1]


def raw_command(m: imaplib.IMAP4, tag: str, line: bytes, *, deadline: float = 20) -> list[bytes]:
    """Send ``tag line`` through imaplib's own connection and read to the tagged reply (for
    what imaplib 3.11 cannot say: LITERAL+); returns every line read, the tagged one last."""
    m.send(tag.encode() + b" " + line)
    lines = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = m.readline()
        assert got, "connection closed"
        lines.append(got)
        if got.startswith(tag.encode() + b" "):
            return lines
    raise AssertionError(f"no tagged reply to {line!r}: {lines!r}")


# --------------------------------------------------------------------------- imaplib


def test_imaplib_capability_login(target):
    """CAPABILITY before log-in offers IMAP4rev1, STARTTLS and AUTH=PLAIN; LOGIN works (a
    wrong password gets NO and the session lives on); after log-in the extensions clients rely
    on are announced: IDLE, UIDPLUS, MOVE, NAMESPACE, ID, LITERAL+, ENABLE, SPECIAL-USE, QUOTA."""
    address = target.new_mailbox()
    m = imaplib.IMAP4("127.0.0.1", target.port, timeout=30)
    before = caps(m)
    assert {"IMAP4REV1", "STARTTLS", "AUTH=PLAIN"} <= before, before
    with pytest.raises(imaplib.IMAP4.error):
        m.login(address, "wrong password")
    ok(m.noop())
    m.login(address, target.password)
    after = caps(m)
    assert {"IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ID", "LITERAL+", "ENABLE",
            "SPECIAL-USE", "QUOTA"} <= after, after
    assert m.logout()[0] == "BYE"


def test_imaplib_authenticate_plain(target):
    """AUTHENTICATE PLAIN (RFC 4616) logs in; a wrong password gets NO."""
    address = target.new_mailbox([message(1)])
    m = imaplib.IMAP4("127.0.0.1", target.port, timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        m.authenticate("PLAIN", lambda _: f"\0{address}\0nope".encode())
    m = imaplib.IMAP4("127.0.0.1", target.port, timeout=30)
    ok(m.authenticate("PLAIN", lambda _: f"\0{address}\0{target.password}".encode()))
    assert ok(m.select("INBOX")) == [b"1"]
    m.logout()


def test_imaplib_starttls_and_imaps(target):
    """STARTTLS upgrades the clear-text port (the CA checks the certificate), then LOGIN; on
    the implicit-TLS port (993 convention) LOGIN works from the first byte."""
    address = target.new_mailbox([message(1)])
    m = imaplib.IMAP4("127.0.0.1", target.port, timeout=30)
    ok(m.starttls(ctx(target)))
    assert "STARTTLS" not in caps(m)
    m.login(address, target.password)
    assert ok(m.select("INBOX")) == [b"1"]
    m.logout()
    s = imaplib.IMAP4_SSL("127.0.0.1", target.tls_port, ssl_context=ctx(target), timeout=30)
    s.login(address, target.password)
    assert ok(s.select("INBOX", readonly=True)) == [b"1"]
    s.logout()


def test_imaplib_select_examine(target):
    """SELECT reports EXISTS and UIDVALIDITY and is read-write; EXAMINE is read-only: a
    STORE changes no stored flag and BODY[] there sets no \\Seen (the Maildir files keep
    their names)."""
    address = target.new_mailbox([message(1), message(2)])
    m = login(target, address)
    assert ok(m.select("INBOX", readonly=True)) == [b"2"]  # EXAMINE
    assert m.response("UIDVALIDITY")[1][0].isdigit()
    assert m.untagged_responses.get("READ-ONLY") is not None or m.is_readonly
    m.store("1", "+FLAGS", "(\\Flagged)")  # NO, or OK that changes nothing (Dovecot)
    ok(m.fetch("1", "(BODY[])"))
    m.close()
    assert ok(m.select("INBOX")) == [b"2"]
    assert b"\\Seen" not in ok(m.fetch("1", "(FLAGS)"))[0]
    m.logout()
    assert flags_on_disk(target, address) == ["", ""]


def test_imaplib_list_lsub_special_use(target):
    """LIST shows INBOX and the folders with their SPECIAL-USE attributes (RFC 6154: \\Sent,
    \\Drafts, \\Trash, \\Junk) once they exist; SUBSCRIBE/UNSUBSCRIBE change LSUB."""
    address = target.new_mailbox()
    m = login(target, address)
    for name in ("Sent", "Drafts", "Trash", "Junk"):
        m.create(name)  # may already exist (created at log-in): either way it exists after
    listing = b"\n".join(ok(m.list('""', "*")))
    assert re.search(rb'\) "[./]" "?INBOX"?$', listing, re.M | re.I), listing
    for name, attr in (("Sent", b"\\Sent"), ("Drafts", b"\\Drafts"), ("Trash", b"\\Trash"),
                       ("Junk", b"\\Junk")):
        line = [x for x in listing.split(b"\n") if x.rstrip(b'"').endswith(name.encode())]
        assert line and attr in line[0], (name, listing)
    ok(m.create("Projects"))
    ok(m.subscribe("Projects"))
    assert any(x.rstrip(b'"').endswith(b"Projects") for x in ok(m.lsub('""', "*")))
    ok(m.unsubscribe("Projects"))
    assert not any(x and x.rstrip(b'"').endswith(b"Projects") for x in ok(m.lsub('""', "*")) if x)
    m.logout()


def test_imaplib_status(target):
    """STATUS reports MESSAGES, RECENT, UIDNEXT, UIDVALIDITY and UNSEEN of a mailbox not
    selected; the counts follow a \\Seen flag set in another session."""
    address = target.new_mailbox([message(1), message(2), message(3)])
    m = login(target, address)
    line = ok(m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)"))[0].decode()
    got = dict(re.findall(r"(\w+) (\d+)", line.partition("(")[2]))
    assert got["MESSAGES"] == "3" and got["UNSEEN"] == "3", line
    assert int(got["UIDNEXT"]) >= 4 and int(got["UIDVALIDITY"]) > 0, line
    other = login(target, address)
    ok(other.select("INBOX"))
    ok(other.store("2", "+FLAGS", "(\\Seen)"))
    other.logout()
    line = ok(m.status("INBOX", "(UNSEEN MESSAGES)"))[0].decode()
    assert "UNSEEN 2" in line and "MESSAGES 3" in line, line
    m.logout()


def test_imaplib_fetch(target):
    """FETCH FLAGS, UID, RFC822.SIZE, BODY[] (the stored bytes exactly, CRLF line ends),
    BODY.PEEK[HEADER.FIELDS] (only those fields; no \\Seen), BODYSTRUCTURE of a multipart
    message; a BODY[] fetch sets \\Seen, which reaches the Maildir file name (``:2,S``)."""
    plain = message(1, subject="fetch me")
    address = target.new_mailbox([plain, MULTIPART])
    m = login(target, address)
    ok(m.select("INBOX"))
    data = ok(m.fetch("1:2", "(UID FLAGS RFC822.SIZE)"))
    sizes = [int(re.search(rb"RFC822.SIZE (\d+)", d).group(1)) for d in data]
    assert sorted(sizes) == sorted([len(crlf(plain)), len(crlf(MULTIPART))]), data
    assert all(b"UID " in d and b"FLAGS (" in d for d in data), data
    uids = [int(re.search(rb"UID (\d+)", d).group(1)) for d in data]
    assert uids == sorted(uids) and len(set(uids)) == 2
    peek = ok(m.fetch("1:2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))
    headers = sorted(p[1] for p in peek if isinstance(p, tuple))
    assert headers == sorted([b"From: alice@example.test\r\nSubject: fetch me\r\n\r\n",
                              b"From: carol@example.test\r\nSubject: with attachment\r\n\r\n"]), headers
    assert flags_on_disk(target, address) == ["", ""]
    bodies = ok(m.fetch("1:2", "(BODY[])"))
    got = sorted(p[1] for p in bodies if isinstance(p, tuple))
    assert got == sorted([crlf(plain), crlf(MULTIPART)])
    structure = b"".join(x if isinstance(x, bytes) else b"".join(x)
                         for x in ok(m.fetch("1:2", "(BODYSTRUCTURE)")))
    assert re.search(rb'\("text" "plain" \("charset" "utf-8"\).*"mixed"', structure, re.I | re.S), structure
    assert re.search(rb'"application" "octet-stream" \("name" "a.bin"\) NIL NIL "base64" 8', structure, re.I), structure
    assert b"\\Seen" in b"".join(ok(m.fetch("1:2", "(FLAGS)")))
    m.logout()
    assert flags_on_disk(target, address) == ["S", "S"]


def test_imaplib_store(target):
    """STORE +FLAGS, -FLAGS, FLAGS (replace) and FLAGS.SILENT change the flags; each change
    is in the Maildir info suffix where other Maildir tools read it (F, R, S, T)."""
    address = target.new_mailbox([message(1)])
    m = login(target, address)
    ok(m.select("INBOX"))
    got = ok(m.store("1", "+FLAGS", "(\\Seen \\Flagged)"))
    assert b"\\Seen" in got[0] and b"\\Flagged" in got[0]
    assert flags_on_disk(target, address) == ["FS"]
    ok(m.store("1", "-FLAGS", "(\\Flagged)"))
    assert flags_on_disk(target, address) == ["S"]
    ok(m.store("1", "FLAGS", "(\\Answered \\Deleted)"))
    assert flags_on_disk(target, address) == ["RT"]
    assert ok(m.store("1", "FLAGS.SILENT", "(\\Seen)")) in ([None], [])
    assert flags_on_disk(target, address) == ["S"]
    assert b"\\Seen" in ok(m.uid("FETCH", "1:*", "(FLAGS)"))[0]
    m.logout()


def test_imaplib_copy_uid_copy(target):
    """COPY and UID COPY copy into a folder (a Maildir++ subfolder ``.Archive``) and answer
    COPYUID (UIDPLUS, RFC 4315); the source keeps its messages."""
    address = target.new_mailbox([message(1), message(2)])
    m = login(target, address)
    ok(m.create("Archive"))
    ok(m.select("INBOX"))
    ok(m.copy("1", "Archive"))
    assert response_code(m, "COPYUID")
    uid2 = re.search(rb"UID (\d+)", ok(m.fetch("2", "(UID)"))[0]).group(1).decode()
    ok(m.uid("COPY", uid2, "Archive"))
    assert response_code(m, "COPYUID").endswith(b" " + uid2.encode() + b" 2")
    assert count_on_disk(target, address, "Archive") == 2
    assert count_on_disk(target, address) == 2
    assert ok(m.select("Archive")) == [b"2"]
    m.logout()


def test_imaplib_move_uid_move(target):
    """MOVE and UID MOVE (RFC 6851) move a message: an EXPUNGE for the source, the file in the
    target folder, none left behind."""
    address = target.new_mailbox([message(1), message(2), message(3)])
    m = login(target, address)
    m.create("Trash")  # NO [ALREADYEXISTS] when the server made it at log-in
    ok(m.select("INBOX"))
    typ, data = m._simple_command("MOVE", "1", "Trash")
    assert typ == "OK", data
    assert m.untagged_responses.get("EXPUNGE") == [b"1"], m.untagged_responses
    m.untagged_responses.pop("EXPUNGE", None)
    uid = re.search(rb"UID (\d+)", ok(m.fetch("1", "(UID)"))[0]).group(1).decode()
    typ, data = m.uid("MOVE", uid, "Trash")
    assert typ == "OK", data
    assert count_on_disk(target, address) == 1
    assert count_on_disk(target, address, "Trash") == 2
    assert ok(m.select("INBOX")) == [b"1"]
    m.logout()


def test_imaplib_expunge_uid_expunge(target):
    """EXPUNGE removes every \\Deleted message; UID EXPUNGE (UIDPLUS) only the UIDs named;
    CLOSE expunges silently; the files leave the Maildir."""
    address = target.new_mailbox([message(i) for i in range(1, 6)])
    m = login(target, address)
    ok(m.select("INBOX"))
    uids = [int(re.search(rb"UID (\d+)", d).group(1)) for d in ok(m.fetch("1:5", "(UID)"))]
    ok(m.store("1,2", "+FLAGS", "(\\Deleted)"))
    assert len(ok(m.expunge())) == 2  # one * n EXPUNGE each (the order is the server's)
    assert count_on_disk(target, address) == 3
    ok(m.store("1:3", "+FLAGS", "(\\Deleted)"))
    ok(m.uid("EXPUNGE", str(uids[3])))
    assert count_on_disk(target, address) == 2
    remaining = sorted(int(re.search(rb"UID (\d+)", d).group(1)) for d in ok(m.fetch("1:*", "(UID)")))
    assert remaining == [uids[2], uids[4]]
    ok(m.close())
    assert count_on_disk(target, address) == 0
    m.logout()


def test_imaplib_append_and_literal_plus(target):
    """APPEND with flags and a date stores the bytes exactly (APPENDUID, RFC 4315); the same
    with a LITERAL+ non-synchronising literal (RFC 7888: ``{n+}``, no continuation)."""
    address = target.new_mailbox()
    m = login(target, address)
    first = crlf(message(1, subject="appended"))
    ok(m.append("INBOX", "(\\Seen)", imaplib.Time2Internaldate(time.time()), first))
    assert re.fullmatch(rb"\d+ 1", response_code(m, "APPENDUID"))
    second = crlf(message(2, subject="literal plus"))
    lines = raw_command(m, "L1", b"APPEND INBOX (\\Flagged) {%d+}\r\n" % len(second) + second + b"\r\n")
    assert not any(x.startswith(b"+") for x in lines), lines
    assert lines[-1].startswith(b"L1 OK"), lines
    ok(m.select("INBOX"))
    bodies = [p[1] for p in ok(m.fetch("1:2", "(BODY.PEEK[])")) if isinstance(p, tuple)]
    assert bodies == [first, second]
    assert flags_on_disk(target, address) == ["F", "S"]
    m.logout()


def test_imaplib_create_delete_rename(target):
    """CREATE makes a Maildir++ folder (``.Projects``, readable by Dovecot); RENAME renames it
    with its messages; DELETE removes it; INBOX cannot be deleted."""
    address = target.new_mailbox()
    m = login(target, address)
    ok(m.create("Projects"))
    assert (target.maildir(address) / ".Projects" / "cur").is_dir()
    ok(m.append("Projects", None, None, crlf(message(1))))
    ok(m.rename("Projects", "Done"))
    assert not (target.maildir(address) / ".Projects").exists()
    assert count_on_disk(target, address, "Done") == 1
    ok(m.delete("Done"))
    assert not (target.maildir(address) / ".Done").exists()
    assert m.delete("INBOX")[0] == "NO"
    assert m.create("INBOX")[0] == "NO"
    m.logout()


def test_imaplib_idle(target):
    """IDLE (RFC 2177): an idling session hears ``* n EXISTS`` for a message delivered into
    new/ and ``* n EXPUNGE`` for one another session expunged; DONE ends it with OK."""
    address = target.new_mailbox([message(1)])
    watcher = login(target, address)
    ok(watcher.select("INBOX"))
    watcher.send(b"I1 IDLE\r\n")
    assert watcher.readline().startswith(b"+")
    target.drop(address, message(2))
    assert wait_untagged(watcher, rb"\* 2 EXISTS")
    other = login(target, address)
    ok(other.select("INBOX"))
    ok(other.store("1", "+FLAGS", "(\\Deleted)"))
    ok(other.expunge())
    other.logout()
    assert wait_untagged(watcher, rb"\* 1 EXPUNGE")
    watcher.send(b"DONE\r\n")
    assert wait_untagged(watcher, rb"I1 OK")
    assert ok(watcher.noop())
    watcher.logout()


def wait_untagged(m: imaplib.IMAP4, pattern: bytes, deadline: float = 30) -> bytes:
    """Read lines from an IDLE session until one matches ``pattern`` (or fail at the deadline)."""
    end = time.monotonic() + deadline
    seen = []
    m.sock.settimeout(deadline)
    while time.monotonic() < end:
        try:
            line = m.readline()
        except TimeoutError:
            break
        seen.append(line)
        if re.match(pattern, line):
            return line
    raise AssertionError(f"no {pattern!r} within {deadline}s: {seen!r}")


def test_imaplib_namespace_id_enable(target):
    """NAMESPACE (RFC 2342) names the personal namespace; ID (RFC 2971) answers with an ID
    list; ENABLE (RFC 5161) answers OK and enables only what the server announced."""
    address = target.new_mailbox()
    m = login(target, address)
    ns = ok(m.namespace())[0]
    assert re.match(rb'\(\("[^"]*" "[./]"\)\) ', ns), ns
    typ, data = m.xatom("ID", '("name" "imaplib" "version" "3.11")')
    assert typ == "OK", data
    assert m.untagged_responses.get("ID"), m.untagged_responses
    announced = caps(m)
    typ, data = m._simple_command("ENABLE", "CONDSTORE")
    assert typ == "OK", data
    enabled = b" ".join(x for x in m.untagged_responses.pop("ENABLED", []) if x).upper().split()
    assert (b"CONDSTORE" in enabled) == ("CONDSTORE" in announced), (enabled, announced)
    m.logout()


def test_imaplib_getquotaroot(target):
    """GETQUOTAROOT INBOX (RFC 2087) names a quota root and its STORAGE usage and limit in
    KiB; the usage counts the mailbox's messages."""
    address = target.new_mailbox([message(1, body="x" * 5000)])
    target.set_quota_1g(address)
    m = login(target, address)
    ok(m.select("INBOX"))
    typ, data = m.getquotaroot("INBOX")
    assert typ == "OK", data
    roots, quotas = data
    assert roots and roots[0].upper().startswith(b"INBOX"), data
    match = re.search(rb"STORAGE (\d+) (\d+)", b" ".join(quotas))
    assert match and int(match.group(1)) >= 4 and int(match.group(2)) >= int(match.group(1)), data
    m.logout()


def test_imaplib_search(target):
    """SEARCH ALL, UNSEEN, SUBJECT, FROM, LARGER, DELETED, HEADER and UID SEARCH give the
    message numbers and UIDs RFC 3501 section 6.4.4 defines."""
    address = target.new_mailbox([message(1, subject="apples"), message(2, subject="pears", sender="dave@example.test"),
                                  message(3, subject="apples again", body="y" * 3000)])
    m = login(target, address)
    ok(m.select("INBOX"))
    ok(m.store("2", "+FLAGS", "(\\Seen)"))
    ok(m.store("3", "+FLAGS", "(\\Deleted)"))
    assert ok(m.search(None, "ALL")) == [b"1 2 3"]
    assert ok(m.search(None, "UNSEEN")) == [b"1 3"]
    assert ok(m.search(None, "SUBJECT", "apples")) == [b"1 3"]
    assert ok(m.search(None, "FROM", "dave")) == [b"2"]
    assert ok(m.search(None, "LARGER", "2000")) == [b"3"]
    assert ok(m.search(None, "DELETED")) == [b"3"]
    assert ok(m.search(None, "HEADER", "Subject", "pears")) == [b"2"]
    assert ok(m.search(None, "NOT", "SEEN", "NOT", "DELETED")) == [b"1"]
    uids = [re.search(rb"UID (\d+)", d).group(1) for d in ok(m.fetch("1:3", "(UID)"))]
    assert ok(m.uid("SEARCH", None, "SUBJECT", "apples")) == [uids[0] + b" " + uids[2]]
    m.logout()


def test_imaplib_bad_input_keeps_session(target):
    """Bad input gets a tagged BAD (unknown command, bad sequence set, command in the wrong
    state) and the session lives on."""
    address = target.new_mailbox([message(1)])
    m = login(target, address)
    with pytest.raises(imaplib.IMAP4.error):
        m.xatom("FROBNICATE")
    with pytest.raises(imaplib.IMAP4.error):  # nothing selected: BAD
        m._simple_command("FETCH", "1", "(FLAGS)")
    ok(m.select("INBOX"))
    with pytest.raises(imaplib.IMAP4.error):
        m.fetch("x:y", "(FLAGS)")
    assert ok(m.fetch("1", "(UID)"))
    m.logout()


# --------------------------------------------------------------------------- curl


def curl_netrc(target: ImapTarget, tmp_path: Path, address: str) -> Path:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {address} password {target.password}\n")
    netrc.chmod(0o600)
    return netrc


def run_curl(netrc: Path, url: str, *args: str, input: bytes | None = None) -> bytes:
    exe = require_program("curl")
    result = subprocess.run([exe, "-sS", "--max-time", "60", "--netrc-file", str(netrc), *args, url],
                            input=input, capture_output=True, timeout=90)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_curl_imap_list_fetch_upload(target, tmp_path):
    """curl imap://: LIST the folders, FETCH a message by UID (the stored bytes, CRLF), upload
    (APPEND) a file into a folder; the upload is there byte for byte."""
    data = message(1, subject="for curl")
    address = target.new_mailbox([data])
    netrc = curl_netrc(target, tmp_path, address)
    base = f"imap://127.0.0.1:{target.port}"
    listing = run_curl(netrc, base + "/")
    assert b"INBOX" in listing, listing
    m = login(target, address)
    ok(m.select("INBOX"))
    uid = re.search(rb"UID (\d+)", ok(m.fetch("1", "(UID)"))[0]).group(1).decode()
    got = run_curl(netrc, f"{base}/INBOX;UID={uid}")
    assert got == crlf(data)
    upload = tmp_path / "upload.eml"
    up = crlf(message(2, subject="uploaded by curl"))
    upload.write_bytes(up)
    run_curl(netrc, f"{base}/INBOX", "-T", str(upload))
    ok(m.noop())
    ok(m.select("INBOX"))
    bodies = [p[1] for p in ok(m.fetch("1:*", "(BODY.PEEK[])")) if isinstance(p, tuple)]
    assert up in bodies and len(bodies) == 2
    m.logout()


def test_curl_imaps_and_starttls(target, tmp_path):
    """curl imaps:// (implicit TLS, the CA checks the server) fetches a message; imap:// with
    --ssl-reqd uses STARTTLS and does the same."""
    data = message(1, subject="for curl over TLS")
    address = target.new_mailbox([data])
    netrc = curl_netrc(target, tmp_path, address)
    got = run_curl(netrc, f"imaps://127.0.0.1:{target.tls_port}/INBOX;MAILINDEX=1", "--cacert", str(target.cafile))
    assert got == crlf(data)
    got = run_curl(netrc, f"imap://127.0.0.1:{target.port}/INBOX;MAILINDEX=1", "--ssl-reqd", "--cacert",
                   str(target.cafile))
    assert got == crlf(data)
