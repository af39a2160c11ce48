"""The same Sieve scripts over the same messages give the same verdicts here as in Dovecot's
Pigeonhole (Debian ``dovecot-sieve``: its ``sieve-test`` compiles and runs a script over a
message and prints the actions, without carrying them out).

Each case of ``CASES`` is a script, a message and an envelope. Both sides' results are brought
to one form: a set of ``("keep",)`` (stored in the mailbox: keep, implicit keep, fileinto
"INBOX"), ``("fileinto", folder)``, ``("redirect", address)``, ``("vacation",)``,
``("reject",)``; a run-time error is the implicit keep (RFC 5228 section 2.10.6), and a script
that does not compile is ``("error", line)``: the two parsers must refuse the same scripts at
the same line. ``discard`` is left out of the form (a discarded message is one with no keep).
Cases Pigeonhole 0.5 cannot run (``ereject``: unknown to it; the null sender: ``sieve-test -f``
takes no ``<>``) are in the unit tier only.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pop3coexist.policy.sieve import SieveSyntaxError, parse
from pop3coexist.policy.sieve_run import MailContext, SieveRuntimeError, run
from tests.support.programs import require_program

pytestmark = pytest.mark.integration

SENDER = "ann@example.org"
RCPT = "ted@pop.contoso.test"

PLAIN = (
    "From: Ann Example <ann@example.org>\r\n"
    "To: Ted <ted@pop.contoso.test>, bob@pop.contoso.test\r\n"
    "Cc: list@lists.example.net\r\n"
    "Subject: Weekly report 42 =?utf-8?q?caf=C3=A9?=\r\n"
    "Message-ID: <42@example.org>\r\n"
    "Received: from a by b; Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    "Received: from c by d; Mon, 30 Nov 2026 10:00:01 +0000\r\n"
    "X-Spam-Score: 7\r\n"
    "\r\n"
    "Hello Ted,\r\nthe numbers are in.\r\n"
)
MULTIPART = (
    "From: shop@example.com\r\n"
    "To: ted@pop.contoso.test\r\n"
    "Subject: Your order\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/alternative; boundary=\"b1\"\r\n"
    "\r\n"
    "--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
    "quoted-printable\r\n\r\nYour order ships today. Tracking: ZX9=\r\n\r\n"
    "--b1\r\nContent-Type: application/octet-stream\r\n\r\nsecret-binary-word\r\n"
    "--b1--\r\n"
)

REQ = ('require ["fileinto", "reject", "envelope", "vacation", "copy", "body", "variables", '
       '"relational", "comparator-i;ascii-numeric", "imap4flags"];\n')

# (id, script, message, envelope sender)
CASES = [
    ("empty script: implicit keep", "", PLAIN, SENDER),
    ("header :contains, case-insensitive", REQ + 'if header :contains "subject" "REPORT" '
     '{ fileinto "Reports"; }', PLAIN, SENDER),
    ("header :is needs the whole value", REQ + 'if header :is "subject" "Weekly" '
     '{ fileinto "Reports"; }', PLAIN, SENDER),
    ("RFC 2047 decoded before matching", REQ + 'if header :contains "subject" "café" '
     '{ fileinto "Decoded"; }', PLAIN, SENDER),
    ("i;octet is case-sensitive", REQ + 'if header :contains :comparator "i;octet" "subject" '
     '"weekly" { discard; }', PLAIN, SENDER),
    ("address :domain over To", REQ + 'if address :domain "to" "POP.contoso.test" '
     '{ fileinto "Local"; }', PLAIN, SENDER),
    ("address :localpart :matches", REQ + 'if address :localpart :matches "cc" "li?t" '
     '{ fileinto "Lists"; } else { discard; }', PLAIN, SENDER),
    ("envelope from :domain", REQ + 'if envelope :domain "from" "example.org" '
     '{ redirect "archive@example.net"; }', PLAIN, SENDER),
    ("envelope to :localpart", REQ + 'if envelope :localpart "to" "ted" { keep; } '
     'else { discard; }', PLAIN, SENDER),
    ("envelope :matches from", REQ + 'if envelope :matches "from" "*@*.org" '
     '{ fileinto "${2}"; }', PLAIN, SENDER),
    ("redirect :copy keeps", REQ + 'redirect :copy "phone@example.net";', PLAIN, SENDER),
    ("redirect twice is once", REQ + 'redirect "a@example.net"; redirect "a@example.net";',
     PLAIN, SENDER),
    ("exists and not", REQ + 'if allof (exists "x-spam-score", not exists "x-nope") '
     '{ fileinto "Junk"; }', PLAIN, SENDER),
    ("anyof with size", REQ + 'if anyof (size :over 10K, header :contains "from" "ann") '
     '{ fileinto "Either"; }', PLAIN, SENDER),
    ("size :under", REQ + 'if size :under 100 { discard; }', PLAIN, SENDER),
    ("elsif chain and stop", REQ + 'if header :contains "subject" "nothing" { discard; }\n'
     'elsif header :contains "subject" "weekly" { fileinto "Weekly"; stop; }\n'
     'else { discard; }\nfileinto "NotReached";', PLAIN, SENDER),
    ("relational :value with ascii-numeric", REQ + 'if header :value "ge" :comparator '
     '"i;ascii-numeric" "x-spam-score" "5" { fileinto "Junk"; }', PLAIN, SENDER),
    ("relational :count of Received", REQ + 'if header :count "eq" :comparator '
     '"i;ascii-numeric" "received" "2" { fileinto "TwoHops"; }', PLAIN, SENDER),
    ("match variables into a folder name", REQ + 'if header :matches "subject" "* report *" '
     '{ fileinto "${1}-${2}"; }', PLAIN, SENDER),
    ("set modifiers", REQ + 'set :upperfirst :lower "f" "ARCHIVE"; fileinto "${f}";',
     PLAIN, SENDER),
    ("string test", REQ + 'set "n" "12"; if string :value "gt" :comparator '
     '"i;ascii-numeric" "${n}" "9" { fileinto "Numeric"; }', PLAIN, SENDER),
    ("body :text over a multipart", REQ + 'if body :text :contains "ships today" '
     '{ fileinto "Orders"; }', MULTIPART, "shop@example.com"),
    ("body :text skips non-text parts", REQ + 'if body :text :contains "secret-binary" '
     '{ discard; }', MULTIPART, "shop@example.com"),
    ("body :raw sees everything", REQ + 'if body :raw :contains "secret-binary" '
     '{ fileinto "Raw"; }', MULTIPART, "shop@example.com"),
    ("vacation keeps", REQ + 'vacation :days 3 :subject "Away" "I am away";', PLAIN, SENDER),
    ("reject", REQ + 'if header :contains "from" "ann" { reject "not from you"; }', PLAIN,
     SENDER),
    ("reject with keep is an error: keep", REQ + 'keep;\nreject "no";', PLAIN, SENDER),
    ("fileinto INBOX is keep", REQ + 'fileinto "INBOX";', PLAIN, SENDER),
    ("imap4flags hasflag", REQ + 'addflag "\\\\Flagged"; if hasflag :is "\\\\flagged" '
     '{ fileinto "Flagged"; }', PLAIN, SENDER),
    ("keep then discard is keep", REQ + 'keep; discard;', PLAIN, SENDER),
    # scripts that must not compile, at the same line on both sides
    ("error: missing semicolon", 'require "fileinto";\nif true {\n  fileinto "x"\n}\n',
     PLAIN, SENDER),
    ("error: extension not required", 'if true {\n  fileinto "x";\n}\n', PLAIN, SENDER),
    ("error: unknown extension", 'require ["fileinto",\n "frobnicate"];\nkeep;\n', PLAIN,
     SENDER),
    ("error: else without if", 'keep;\n\nelse { discard; }\n', PLAIN, SENDER),
    ("error: unterminated block", 'if true {\n keep;\n', PLAIN, SENDER),
    ("error: test as a command", 'keep;\nheader "a" "b";\n', PLAIN, SENDER),
    ("error: unknown tag", 'if header :bogus "a" "b" { keep; }\n', PLAIN, SENDER),
]


def ours(script: str, message: str, sender: str) -> set[tuple]:
    """Our parser and interpreter's verdict in the common form."""
    try:
        commands = parse(script)
    except SieveSyntaxError as e:
        return {("error", e.line)}
    mail = MailContext.from_bytes(sender, RCPT, message.encode("utf-8"))
    try:
        result = run(commands, mail)
    except SieveRuntimeError:
        return {("keep",)}
    out: set[tuple] = set()
    if result.implicit_keep:
        out.add(("keep",))
    for a in result.actions:
        if a.kind == "keep" or (a.kind == "fileinto" and a.argument.upper() == "INBOX"):
            out.add(("keep",))
        elif a.kind == "fileinto":
            out.add(("fileinto", a.argument))
        elif a.kind == "redirect":
            out.add(("redirect", a.argument.lower()))
        elif a.kind == "vacation":
            out.add(("vacation",))
        elif a.kind in ("reject", "ereject"):
            out.add(("reject",))
    return out


def pigeonhole(folder: Path, script: str, message: str, sender: str) -> set[tuple]:
    """Pigeonhole's verdict (sieve-test's printed result) in the common form."""
    (folder / "case.sieve").write_text(script)
    (folder / "case.eml").write_bytes(message.encode("utf-8"))
    for name in ("case.sieve", "case.eml"):
        os.chmod(folder / name, 0o644)
    proc = subprocess.run(
        ["sieve-test", "-c", str(folder / "dovecot.conf"), "-f", sender,
         "-a", RCPT, "-r", RCPT, str(folder / "case.sieve"), str(folder / "case.eml")],
        capture_output=True, text=True, timeout=60, cwd=folder,
    )
    text = proc.stdout + proc.stderr
    if "failed to compile sieve script" in text:
        lines = [int(m) for m in re.findall(r"case: line (\d+): error", text)]
        assert lines, text
        return {("error", lines[0])}
    assert "final result" in text, text
    out: set[tuple] = set()
    section = ""
    for line in text.splitlines():
        if line.startswith("Performed actions:"):
            section = "actions"
        elif line.startswith("Implicit keep:"):
            section = "implicit"
        m = re.match(r"^ \* (.*)$", line)
        if not m or not section:
            continue
        what = m.group(1)
        if what.startswith("store message in folder: "):
            folder_name = what.split(": ", 1)[1]
            out.add(("keep",) if folder_name.upper() == "INBOX" else ("fileinto", folder_name))
        elif what.startswith("redirect message to: "):
            out.add(("redirect", what.split(": ", 1)[1].strip("<>").lower()))
        elif what.startswith("send vacation message"):
            out.add(("vacation",))
        elif what.startswith("reject message"):
            out.add(("reject",))
    if "resolved with successful implicit keep" in text:
        out = {("keep",)}
    return out


@pytest.fixture(scope="module")
def pigeonhole_dir():  # noqa: ANN201
    """A folder sieve-test can read after it drops root (to nobody), and its config."""
    require_program("sieve-test", "dovecot-sieve")
    folder = Path(tempfile.mkdtemp(prefix="pop3coexist-pigeonhole-"))
    os.chmod(folder, 0o777)
    if os.getuid() == 0:
        who = pwd.getpwnam("nobody")
        uid, gid = who.pw_uid, who.pw_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    (folder / "dovecot.conf").write_text(
        f"mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = {min(uid, 500)}\n"
        f"mail_location = maildir:{folder}/Maildir\n")
    os.chmod(folder / "dovecot.conf", 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_pigeonhole(pigeonhole_dir: Path, case: tuple) -> None:
    """One row of the shared table: our verdict equals Pigeonhole's (actions, implicit keep,
    or the line a script fails to compile at)."""
    _, script, message, sender = case
    assert ours(script, message, sender) == pigeonhole(pigeonhole_dir, script, message, sender)


def test_the_table_covers_every_kind_of_verdict() -> None:
    """The table is not trivial: keep, fileinto, redirect, vacation, reject and compile errors
    each appear in our verdicts."""
    kinds = {item[0] for case in CASES for item in ours(*case[1:])}
    assert {"keep", "fileinto", "redirect", "vacation", "reject", "error"} <= kinds
