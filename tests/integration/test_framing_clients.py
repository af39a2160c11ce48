"""Line framing against the real server (twistd) on OS-picked loopback ports (issue 11).

Fault 3, SMTP command lines: a bare LF ends a command at once (``bare_newline = "normalize"``,
the default), over a raw socket and smtplib; the HELO name stored in the Received header has no
LF; with ``"reject"`` the line is refused at once and the session goes on; a bare CR is refused.

Fault 5, Maildir files of every shape dropped into new/: poplib's unstuffed octets equal LIST's
count for each; a raw client that reads exactly LIST's count of unstuffed octets finds the
terminator right after and stays in step for the next pipelined command; curl and mpop get the
canonical form (CRLF lines, a final CRLF added). Passwords go through files, never argv.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import HOSTNAME
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Fr4ming-pass"  # no white space: curl reads it from a netrc file
TED = f"ted@{HOSTNAME}"

SHAPES: list[tuple[bytes, bytes]] = [
    # (stored bytes, canonical form a client gets), written out here
    (b"Subject: no final newline\n\nlast line", b"Subject: no final newline\r\n\r\nlast line\r\n"),
    (b"Subject: cr at end\n\nbody\r", b"Subject: cr at end\r\n\r\nbody\r\n"),
    (b"Subject: bare cr\n\nab\rcd\n", b"Subject: bare cr\r\n\r\nab\r\ncd\r\n"),
    (b"Subject: mixed\r\n\nb1\r\nb2\n", b"Subject: mixed\r\n\r\nb1\r\nb2\r\n"),
    (b"", b""),
    (b"Subject: dots\n\n.\n..\n.x", b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n"),
    (b"Subject: ends like DATA\r\n\r\nbody\r\n.\r\n", b"Subject: ends like DATA\r\n\r\nbody\r\n.\r\n"),
    (b"Subject: cr-dot\n\nx\r.\rQUIT\r", b"Subject: cr-dot\r\n\r\nx\r\n.\r\nQUIT\r\n"),
    (b"Subject: cr cr lf\r\r\n\r\r\nbody\r\r\n", b"Subject: cr cr lf\r\n\r\nbody\r\n"),
    (b"Subject: nul\n\na\x00b\n", b"Subject: nul\r\n\r\na\x00b\r\n"),
    # longer lines are in the unit tests: poplib refuses lines over 2048 octets
    (b"Subject: long\n\n" + b"y" * 2000, b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\n"),
    # a Windows store (CRLF and a Ctrl-Z that marks the end of the file), an mbox tool's file
    (b"Subject: dos\r\n\r\nbody\r\n\x1a", b"Subject: dos\r\n\r\nbody\r\n"),
    (b"From a@b.test Mon Jan  1 00:00:00 2024\nSubject: mbox\n\n>From x\n",
     b"Subject: mbox\r\n\r\n>From x\r\n"),
    # size fields in the name that do not describe the file (see NAME_FIELDS)
    (b"Subject: wrong S and W\n\nbody\n", b"Subject: wrong S and W\r\n\r\nbody\r\n"),
    (b"Subject: only W\n\nbody\n", b"Subject: only W\r\n\r\nbody\r\n"),
]
# stored bytes -> size fields the dropped file's name carries (wrong ones: not to be believed)
NAME_FIELDS = {
    b"Subject: wrong S and W\n\nbody\n": ",S=5,W=7",
    b"Subject: only W\n\nbody\n": ",W=99",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server (bare_newline at its default) with the mailbox ted."""
    srv = make_server(tmp_path_factory.mktemp("framing"))
    srv.write_config()
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


class Lines:
    """A raw client socket that reads replies with a deadline (no sleeps)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)  # socket.timeout if the server does not answer
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def smtp_reply(self) -> list[bytes]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def close(self) -> None:
        self.sock.close()


def stored_with(server, marker: bytes, timeout: float = 10.0) -> bytes:
    new = server.state_dir / "mailroot" / HOSTNAME / "ted" / "new"
    deadline = time.monotonic() + timeout
    while True:
        for p in new.iterdir():
            data = p.read_bytes()
            if marker in data:
                return data
        assert time.monotonic() < deadline, f"no message with {marker!r}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- fault 3: SMTP


def test_bare_lf_commands_answered_at_once_and_helo_name_is_clean(server) -> None:
    """Raw socket: ``EHLO a.example<LF>`` and ``NOOP<LF>`` are answered at once (the socket's
    10 s timeout is far below the idle timeout), pipelined LF and CRLF commands in order, and the
    stored Received header names ``a.example`` with no LF in it."""
    c = Lines(server.port("smtp"))
    try:
        assert c.line().startswith(b"220 ")
        c.send(b"EHLO a.example\n")
        reply = c.smtp_reply()
        assert reply[0] == b"250-pop.contoso.test Hello [127.0.0.1]" and reply[-1].startswith(b"250 ")
        c.send(b"NOOP\n")
        assert c.smtp_reply() == [b"250 2.0.0 OK"]
        c.send(b"MAIL FROM:<a@example.test>\nRCPT TO:<ted@pop.contoso.test>\r\nDATA\n")
        assert c.smtp_reply() == [b"250 2.1.0 Sender <a@example.test> OK"]
        assert c.smtp_reply() == [b"250 2.1.5 Recipient <ted@pop.contoso.test> OK"]
        assert c.smtp_reply() == [b"354 End data with <CR><LF>.<CR><LF>"]
        c.send(b"Subject: framing-raw\r\n\r\nhello\r\n.\r\nQUIT\n")
        assert c.smtp_reply()[0].startswith(b"250 2.0.0 Ok: queued as ")
        assert c.smtp_reply() == [b"221 2.0.0 pop.contoso.test closing connection"]
    finally:
        c.close()
    data = stored_with(server, b"framing-raw")
    assert data.startswith(b"Return-Path: <a@example.test>\nReceived: from a.example ([127.0.0.1])\n\tby pop.contoso.test ")


def test_smtplib_bare_lf_and_bare_cr(server) -> None:
    """smtplib: a command sent with a bare LF gets its reply at once; one with a bare CR inside
    gets 500 5.5.2 and the session still sends mail."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), local_hostname="client.test", timeout=10) as s:
        s.send(b"HELO lf.example\n")
        assert s.getreply() == (250, b"pop.contoso.test Hello [127.0.0.1]")
        s.send(b"HELO cr\r.example\r\n")
        assert s.getreply() == (500, b"5.5.2 Syntax error: bare <CR> received (RFC 5321 section 2.3.8)")
        s.ehlo()
        s.sendmail("a@example.test", [TED], b"Subject: framing-smtplib\r\n\r\nhi\r\n")
    assert stored_with(server, b"framing-smtplib").startswith(
        b"Return-Path: <a@example.test>\nReceived: from client.test ")


def test_auth_lines_and_starttls_with_bare_lf(server) -> None:
    """Raw socket, then real TLS: AUTH PLAIN's initial response and its continuation line may
    end in a bare LF (answered at once, the right user logged in), a bare CR inside one is
    refused with 500 5.5.2 and ends the exchange; ``STARTTLS<LF>`` with commands pipelined
    after it starts TLS, drops them (no transaction exists after the handshake), and commands
    inside TLS may end in a bare LF too."""
    import base64
    import ssl

    plain = base64.b64encode(f"\0{TED}\0{PASSWORD}".encode())
    c = Lines(server.port("smtp"))
    try:
        assert c.line().startswith(b"220 ")
        c.send(b"EHLO a.example\n")
        assert c.smtp_reply()[-1].startswith(b"250 ")
        c.send(b"AUTH PLAIN\n")
        assert c.smtp_reply() == [b"334 "]
        c.send(plain[:8] + b"\r" + plain[8:] + b"\n")
        assert c.smtp_reply() == [b"500 5.5.2 Syntax error: bare <CR> received (RFC 5321 section 2.3.8)"]
        c.send(b"AUTH PLAIN\r\n")
        assert c.smtp_reply() == [b"334 "]
        c.send(plain + b"\n")
        assert c.smtp_reply() == [b"235 2.7.0 Authentication successful"]
    finally:
        c.close()
    c = Lines(server.port("smtp"))
    try:
        assert c.line().startswith(b"220 ")
        c.send(b"EHLO a.example\r\n")
        assert b"250-STARTTLS" in c.smtp_reply()
        c.send(b"STARTTLS\nMAIL FROM:<evil@example.test>\nRCPT TO:<ted@pop.contoso.test>\n")
        assert c.smtp_reply() == [b"220 2.0.0 Ready to start TLS"]
        assert c.buf == b""
        ctx = ssl.create_default_context(cafile=str(server.certs.ca_cert))
        ctx.check_hostname = False
        c.sock = ctx.wrap_socket(c.sock)
        c.send(b"RCPT TO:<ted@pop.contoso.test>\n")
        assert c.smtp_reply() == [b"503 5.5.1 Need MAIL command first"]
        c.send(b"EHLO a.example\n")
        assert c.smtp_reply()[-1].startswith(b"250 ")
        c.send(b"AUTH PLAIN " + plain + b"\n")
        assert c.smtp_reply() == [b"235 2.7.0 Authentication successful"]
        c.send(b"MAIL FROM:<>\nQUIT\n")
        assert c.smtp_reply() == [b"250 2.1.0 Sender <> OK"]
        assert c.smtp_reply() == [b"221 2.0.0 pop.contoso.test closing connection"]
    finally:
        c.close()


def test_reject_mode_refuses_bare_lf_at_once(tmp_path: Path) -> None:
    """With ``bare_newline = "reject"`` (real server, raw socket): a bare-LF command is refused
    at once with 500 5.5.2, not acted on, and the session goes on with CRLF commands."""
    srv = make_server(tmp_path / "srv", tls=False, smtp_config='bare_newline = "reject"')
    srv.write_config()
    with srv:
        c = Lines(srv.port("smtp"))
        try:
            assert c.line().startswith(b"220 ")
            c.send(b"EHLO a.example\n")
            assert c.smtp_reply() == [b"500 5.5.2 Syntax error: bare <LF> received; end command lines "
                                      b"with <CR><LF> (RFC 5321 section 2.3.8)"]
            c.send(b"MAIL FROM:<a@example.test>\r\n")
            assert c.smtp_reply() == [b"503 5.5.1 Send HELO or EHLO first"]
            c.send(b"HELO a.example\r\n")
            assert c.smtp_reply() == [b"250 pop.contoso.test Hello [127.0.0.1]"]
            c.send(b"QUIT\r\n")
            assert c.smtp_reply() == [b"221 2.0.0 pop.contoso.test closing connection"]
        finally:
            c.close()


# ----------------------------------------------------------------------------- fault 5: POP3


@pytest.fixture
def shapes_box(server):
    """Ted's mailbox emptied, then one file of each shape dropped straight into new/ (some
    with wrong or partial size fields in the name, ``NAME_FIELDS``)."""
    box = server.state_dir / "mailroot" / HOSTNAME / "ted"
    for folder in ("new", "cur"):
        for p in (box / folder).iterdir():
            p.unlink()
    for i, (stored, _) in enumerate(SHAPES):
        fields = NAME_FIELDS.get(stored, "")
        (box / "new" / f"{1700000000 + i}.M{i}P9.dropped.host{fields}").write_bytes(stored)
    return SHAPES


def test_poplib_octets_equal_list_for_every_shape(server, shapes_box) -> None:
    """poplib: LIST's count of each message equals the octets poplib counts after unstuffing
    RETR, the lines are the canonical form, and STAT's total is their sum; the same holds in a
    second session, after the first moved the files to cur/ with the size in their names."""
    for _session in range(2):
        pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
        try:
            pop.user(TED)
            pop.pass_(PASSWORD)
            assert pop.stat() == (len(SHAPES), sum(len(c) for _, c in SHAPES))
            for i, (_, canonical) in enumerate(shapes_box, start=1):
                listed = int(pop.list(i).split()[2])
                resp, lines, octets = pop.retr(i)
                assert resp == b"+OK %d octets" % listed
                assert octets == listed == len(canonical)
                assert b"".join(line + b"\r\n" for line in lines) == canonical
        finally:
            pop.quit()


def test_raw_client_reading_exactly_list_count_stays_in_step(server, shapes_box) -> None:
    """A client that trusts the count: after '+OK n octets' it reads unstuffed lines until it
    has n octets, then must find the '.' line at once; the next pipelined command's reply
    follows. Also TOP n 0 ends where it should, and the log-in lines end in a bare LF (POP3's
    command framing takes a bare LF as a line end)."""
    c = Lines(server.port("pop3"))
    try:
        assert c.line().startswith(b"+OK ")
        c.send(f"USER {TED}\nPASS {PASSWORD}\n".encode())  # POP3 commands may end in a bare LF
        assert c.line() == b"+OK send PASS"
        assert c.line().startswith(b"+OK ")
        for i, (_, canonical) in enumerate(shapes_box, start=1):
            c.send(b"RETR %d\r\nTOP %d 0\r\nNOOP\r\n" % (i, i))
            head = c.line()
            assert head.startswith(b"+OK ") and head.endswith(b" octets")
            n = int(head.split()[1])
            got = b""
            while len(got) < n:
                line = c.line()
                got += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            assert got == canonical and len(got) == n
            assert c.line() == b"."
            assert c.line().startswith(b"+OK")  # TOP
            while c.line() != b".":
                pass
            assert c.line() == b"+OK"  # NOOP: still in step
        c.send(b"QUIT\r\n")
        assert c.line().startswith(b"+OK ")
    finally:
        c.close()


def test_curl_gets_the_canonical_form(server, shapes_box, tmp_path: Path) -> None:
    """curl pop3:// retrieves each shape as its canonical form, byte for byte (curl removes
    the dot-stuffing)."""
    exe = require_program("curl")
    rc = tmp_path / "netrc"
    rc.write_text(f"machine 127.0.0.1 login {TED} password {PASSWORD}\n")
    rc.chmod(0o600)
    for i, (_, canonical) in enumerate(shapes_box, start=1):
        got = subprocess.run([exe, "-sS", "--max-time", "30", "--netrc-file", str(rc),
                              f"pop3://127.0.0.1:{server.port('pop3')}/{i}"],
                             capture_output=True, timeout=60)
        assert got.returncode == 0, got.stderr
        # an empty message: curl writes the CRLF it takes to precede the '.' line
        assert got.stdout == (canonical or b"\r\n"), i


def test_mpop_retrieves_every_shape(server, shapes_box, tmp_path: Path) -> None:
    """mpop (which checks what it reads against the sizes) retrieves and deletes every shape;
    each delivered file is the canonical form with LF line ends (mpop's Maildir convention)."""
    exe = require_program("mpop")
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    maildir = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True)
    cmd = [
        exe, "--host=127.0.0.1", f"--port={server.port('pop3')}", f"--user={TED}", "--auth=user",
        f"--passwordeval=cat {secret}", "--tls=off", f"--delivery=maildir,{maildir}",
        "--keep=off", "--only-new=off", "--received-header=off", "--timeout=30", "-q",
    ]
    result = subprocess.run(cmd, capture_output=True, timeout=90)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    got = sorted(p.read_bytes() for p in (maildir / "new").iterdir())
    assert got == sorted(c.replace(b"\r\n", b"\n") for _, c in SHAPES)
