"""Content filtering through real milters (issue 13 items 1-3), against the real server
(twistd) on OS-picked loopback ports:

- ClamAV (``clamd`` + ``clamav-milter``) with a signature the fixture writes: a message with
  the marker in an attachment is rejected with the milter's own reply and the postmaster gets
  the infected-mail notice; a clean one is delivered with ClamAV's headers; a message over
  the milter's MaxFileSize is scanned only up to it and delivered;
- the same with ``OnInfected Quarantine``: 250, held in ``<state_dir>/quarantine``, released
  and deleted with ``pop3coexist-admin quarantine``;
- rspamd (proxy worker, milter mode): GTUBE is rejected with rspamd's reply; a clean message
  reaches the mailbox with rspamd's ``Authentication-Results`` and ``X-Spam-Status``;
- a milter that is down: ``default_action = "tempfail"`` answers MAIL with 451 4.7.1 and the
  retry after the milter comes back is delivered; ``"accept"`` (another listener: the list is
  per listener) delivers unscanned and logs it.
"""

from __future__ import annotations

import itertools
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.programs import free_port
from tests.support.scanners import GTUBE, SIGNATURE, VIRUS_MARKER, ClamAV, Rspamd
from tests.support.server import HOSTNAME
from tests.support.smarthost import wait_until
from tests.support.smtp_fakes import make_server

pytestmark = pytest.mark.integration

PASSWORD = "Milt3r pass word"
TED = f"ted@{HOSTNAME}"
ANN = f"ann@{HOSTNAME}"
_n = itertools.count(1)


def message(subject: str, attachment: bytes | None = None, body: str = "Hello.\n") -> bytes:
    """A MIME message from someone@example.org to ted, with an optional attachment."""
    m = EmailMessage()
    m["From"] = "someone@example.org"
    m["To"] = TED
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject}@example.org>"
    m["Date"] = "Mon, 30 Nov 2026 10:00:00 +0000"
    m.set_content(body)
    if attachment is not None:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream",
                         filename="file.bin")
    return m.as_bytes().replace(b"\n", b"\r\n")


def mailbox(server, address: str, marker: str, timeout: float = 20.0) -> bytes | None:
    """The message in ``address``'s new/ holding ``marker`` (polled), or None."""
    folder = server.state_dir / "mailroot" / HOSTNAME / address.split("@")[0] / "new"
    deadline = time.monotonic() + timeout
    while True:
        for path in sorted(folder.iterdir()) if folder.exists() else []:
            data = path.read_bytes()
            if marker.encode() in data:
                return data
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def send(server, data: bytes, role: str = "smtp", login: bool = False) -> tuple[int, bytes]:
    """Send ``data`` to ted; (code, text) of the reply to the end of DATA, or of the first
    refused command."""
    with smtplib.SMTP("127.0.0.1", server.port(role), local_hostname="client.example.org",
                      timeout=120) as s:
        s.ehlo()
        if login:
            s.login(ANN, PASSWORD)
        code, text = s.mail("someone@example.org" if not login else ANN)
        if code != 250:
            return code, text
        code, text = s.rcpt(TED)
        if code != 250:
            return code, text
        return s.data(data)


@pytest.fixture(scope="module")
def clamav(tmp_path_factory):
    scanner = ClamAV(tmp_path_factory.mktemp("clamav")).start()
    yield scanner
    scanner.stop()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    scanner = Rspamd(tmp_path_factory.mktemp("rspamd")).start()
    yield scanner
    scanner.stop()


def start_server(root: Path, milters: str):
    srv = make_server(root, extra_config=milters, tls=False)
    srv.write_config()
    for box in (TED, ANN):
        srv.add_mailbox(box, PASSWORD)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, clamav, rspamd):
    """A server whose MX listener runs ClamAV (a virus scanner, OnInfected Reject), then
    rspamd."""
    milters = (f'[[milter]]\nname = "clamav"\nsocket = "{clamav.milter("Reject")}"\n'
               'virus_scanner = true\nlisteners = ["smtp"]\n'
               f'[[milter]]\nname = "rspamd"\nsocket = "{rspamd.socket}"\nlisteners = ["smtp"]\n'
               'content_timeout = "60s"\n')
    srv = start_server(tmp_path_factory.mktemp("scanned"), milters)
    yield srv
    srv.stop_cleanly(PASSWORD)


def test_clamav_rejects_the_marker_in_an_attachment_and_tells_the_postmaster(scanned) -> None:
    """The test signature in a base64 attachment: 550 with clamav-milter's own text naming the
    signature, nothing delivered; the postmaster's mailbox gets the notice with the sender, the
    recipient, the verdict and the queue id; the log has the verdict."""
    subject = f"infected-{next(_n)}"
    code, text = send(scanned, message(subject, f"xx {VIRUS_MARKER} yy".encode()))
    assert code == 550, text
    assert b"5.7.1" in text and SIGNATURE.encode() in text
    assert mailbox(scanned, TED, subject, timeout=1) is None
    notice = mailbox(scanned, f"postmaster@{HOSTNAME}", "Infected mail rejected")
    assert notice is not None, scanned.log_tail()
    assert b"Sender:     <someone@example.org>" in notice
    assert f"Recipients: <{TED}>".encode() in notice
    assert SIGNATURE.encode() in notice
    queue_id = notice.split(b"Queue id:")[1].split()[0].decode()
    assert f"milter {queue_id}: reject by clamav" in scanned.log_text()


def test_a_clean_message_passes_both_scanners_with_their_headers(scanned) -> None:
    """A clean attachment: 250; the mailbox copy carries ClamAV's X-Virus-Status: Clean and
    rspamd's Authentication-Results and X-Spam-Status."""
    subject = f"clean-{next(_n)}"
    code, text = send(scanned, message(subject, b"just a harmless file\n"))
    assert code == 250, text
    data = mailbox(scanned, TED, subject)
    assert data is not None
    head = data.split(b"\n\n", 1)[0]
    assert b"X-Virus-Status: Clean" in head
    assert b"Authentication-Results:" in head
    assert b"X-Spam-Status: No" in head


def test_rspamd_rejects_gtube(scanned) -> None:
    """GTUBE in the body: rspamd's milter answers with its own reply (554 5.7.1), which the
    client gets; nothing is delivered and no virus notice is sent (rspamd is no virus
    scanner)."""
    subject = f"gtube-{next(_n)}"
    code, text = send(scanned, message(subject, body=f"Spam test.\n{GTUBE}\n"))
    assert code == 554 and b"5.7.1" in text, text
    assert mailbox(scanned, TED, subject, timeout=1) is None
    assert "reject by rspamd (554 5.7.1" in scanned.log_text()


def test_a_message_over_clamav_maxfilesize_is_scanned_only_up_to_it(scanned) -> None:
    """clamav-milter reads a message only up to its MaxFileSize (100K here: it answers
    the rest of the body with SMFIR_SKIP) and passes it: a clean 256K message is delivered
    marked Clean, and so is one whose marker lies past the limit (README: set MaxFileSize to
    at least ``smtp.max_message_size``)."""
    for tail in (b"", f"{VIRUS_MARKER}\n".encode()):
        subject = f"big-{next(_n)}"
        payload = b"".join(b"line %06d of a big clean file\n" % i for i in range(8000)) + tail
        code, text = send(scanned, message(subject, payload))
        assert code == 250, text
        data = mailbox(scanned, TED, subject)
        assert data is not None
        assert b"X-Virus-Status: Clean" in data.split(b"\n\n", 1)[0]


@pytest.fixture(scope="module")
def quarantining(tmp_path_factory, clamav):
    """A server with ClamAV set to OnInfected Quarantine."""
    milters = (f'[[milter]]\nname = "clamav"\nsocket = "{clamav.milter("Quarantine")}"\n'
               'virus_scanner = true\n')
    srv = start_server(tmp_path_factory.mktemp("quarantine"), milters)
    yield srv
    srv.stop_cleanly(PASSWORD)


def test_quarantine_holds_the_message_until_released_or_deleted(quarantining) -> None:
    """OnInfected Quarantine: the client gets 250 and the message is held, not delivered;
    ``quarantine list`` shows it with sender, recipient and reason; ``release`` delivers it to
    ted; a second one is removed with ``delete``; an unknown id is exit code 1."""
    srv = quarantining
    first, second = f"held-{next(_n)}", f"held-{next(_n)}"
    for subject in (first, second):
        code, text = send(srv, message(subject, f"{VIRUS_MARKER}".encode()))
        assert code == 250, text
    assert mailbox(srv, TED, first, timeout=1) is None
    listing = srv.admin("quarantine", "list").stdout
    ids = [line.split()[0] for line in listing.splitlines() if not line.startswith(" ")]
    assert len(ids) == 2, listing
    assert "from <someone@example.org>" in listing and f"to <{TED}>" in listing
    assert "by clamav" in listing
    notice = mailbox(srv, f"postmaster@{HOSTNAME}", "Infected mail quarantined")
    assert notice is not None
    released = srv.admin("quarantine", "release", ids[0])
    assert "released" in released.stdout
    assert mailbox(srv, TED, first) is not None
    srv.admin("quarantine", "delete", ids[1])
    assert srv.admin("quarantine", "list").stdout.strip() == "quarantine is empty"
    bad = srv.admin("quarantine", "delete", "nosuchid", check=False)
    assert bad.returncode == 1 and "no message nosuchid" in bad.stderr


@pytest.fixture(scope="module")
def down(tmp_path_factory):
    """A server whose milters are not running: the MX listener's with default_action
    tempfail, the submission listener's with accept (the list is per listener)."""
    port = free_port()
    milters = (f'[[milter]]\nname = "scanner"\nsocket = "inet:127.0.0.1:{port}"\n'
               'default_action = "tempfail"\nlisteners = ["smtp"]\nconnect_timeout = "5s"\n'
               f'[[milter]]\nname = "optional"\nsocket = "inet:127.0.0.1:{port}"\n'
               'default_action = "accept"\nlisteners = ["submission"]\nconnect_timeout = "5s"\n')
    srv = start_server(tmp_path_factory.mktemp("down"), milters)
    srv.milter_port = port
    yield srv
    srv.stop_cleanly(PASSWORD)


def test_milter_down_accept_delivers_unscanned_and_logs_it(down) -> None:
    """default_action accept: the submission listener's milter is down; the message is
    delivered and the log says it was not scanned."""
    subject = f"unscanned-{next(_n)}"
    code, text = send(down, message(subject), role="submission", login=True)
    assert code == 250, text
    assert mailbox(down, TED, subject) is not None
    log = down.log_text()
    assert "milter optional unavailable" in log and "not scanned by optional" in log


def test_milter_down_tempfail_defers_and_the_retry_is_delivered(down, clamav) -> None:
    """default_action tempfail: MAIL gets 451 4.7.1 while the milter is down (nothing is
    accepted, so nothing can be lost); once the milter is up on its address, the client's
    retry is scanned and delivered."""
    subject = f"retry-{next(_n)}"
    code, text = send(down, message(subject))
    assert code == 451 and b"4.7.1" in text, text
    assert "milter scanner unavailable" in down.log_text()
    clamav.milter("Reject", port=down.milter_port)
    code, text = wait_until(lambda: (lambda r: r if r[0] == 250 else None)(
        send(down, message(subject))), timeout=30, what="a retry accepted")
    data = mailbox(down, TED, subject)
    assert data is not None and b"X-Virus-Status: Clean" in data
