"""A conformance suite for aliases and distribution lists that every ``auth.method`` must pass,
run against the real server (twistd) with real clients: smtplib and swaks in, poplib and mpop
out, an aiosmtpd smart host for the outside addresses (README "Aliases and lists").

Use it as tests/support/conformance.py is used for checkers: subclass ``AliasConformance`` in
a test module (name it ``Test...``) and give it a fixture ``aenv`` returning an ``AliasEnv``:

- ``server``: a running ``ServerProcess`` whose ``[smarthost]`` is ``smarthost`` (no TLS) and
  whose local domain is ``domain``;
- ``people``: three ``Person`` s with mailboxes there (``address`` receives, ``login`` and
  ``password`` log in over POP3);
- ``smarthost``: the ``tests.support.smarthost.SmartHost`` outside mail reaches.

Each test uses its own alias and list names (``tag``), so the cases share one server. Every
case reads the people's mailboxes empty first (``drain``).
"""

from __future__ import annotations

import itertools
import os
import poplib
import smtplib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.programs import require_program
from tests.support.server import ServerProcess
from tests.support.smarthost import SmartHost, wait_until

_n = itertools.count(1)


@dataclass
class Person:
    address: str
    login: str
    password: str


@dataclass
class AliasEnv:
    server: ServerProcess
    domain: str
    people: list[Person]
    smarthost: SmartHost


def pop_all(server: ServerProcess, person: Person) -> list[bytes]:
    """Every message in ``person``'s mailbox (poplib), deleted after reading."""
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    try:
        p.user(person.login)
        p.pass_(person.password)
        count, _ = p.stat()
        out = []
        for i in range(count):
            out.append(b"\r\n".join(p.retr(i + 1)[1]) + b"\r\n")
            p.dele(i + 1)
        return out
    finally:
        p.quit()


def mpop_all(server: ServerProcess, person: Person, workdir: Path) -> list[bytes]:
    """Every message in ``person``'s mailbox, fetched and deleted by mpop into a Maildir."""
    exe = require_program("mpop")
    secret = workdir / f"secret-{next(_n)}"
    secret.write_text(person.password + "\n")
    secret.chmod(0o600)
    maildir = workdir / f"Maildir-{next(_n)}"
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True)
    cmd = [exe, "--host=127.0.0.1", f"--port={server.port('pop3')}", f"--user={person.login}",
           "--auth=user", f"--passwordeval=cat {secret}", "--tls=off",
           f"--delivery=maildir,{maildir}", "--keep=off", "--only-new=off",
           "--received-header=off", "--timeout=30", "-q"]
    result = subprocess.run(cmd, capture_output=True, timeout=90)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def send(server: ServerProcess, sender: str, rcpts: list[str], subject: str,
         port: str = "smtp") -> None:
    """One message by smtplib to ``rcpts`` (every RCPT must be accepted)."""
    with smtplib.SMTP("127.0.0.1", server.port(port), local_hostname="client.test",
                      timeout=30) as s:
        refused = s.sendmail(sender, rcpts, f"From: <{sender}>\r\nSubject: {subject}\r\n\r\n"
                             f"body of {subject}\r\n".encode())
        assert not refused, refused


def with_subject(messages: list[bytes], subject: str) -> list[bytes]:
    return [m for m in messages if f"Subject: {subject}".encode() in m]


class AliasConformance:
    """The cases (see the module docstring)."""

    @pytest.fixture
    def env(self, aenv: AliasEnv) -> AliasEnv:
        for person in aenv.people:
            pop_all(aenv.server, person)
        return aenv

    def admin(self, env: AliasEnv, *args: str) -> subprocess.CompletedProcess:
        return env.server.admin(*args)

    def tag(self) -> str:
        return f"c{os.getpid() % 1000}x{next(_n)}"

    def test_alias_to_a_mailbox_and_to_an_outside_address(self, env: AliasEnv) -> None:
        """An admin alias with two targets: the mailbox gets one copy, with the envelope sender
        unchanged (Return-Path); the outside target gets it through the queue and the smart
        host, MAIL FROM unchanged."""
        tag = self.tag()
        alias = f"{tag}@{env.domain}"
        outside = f"{tag}@outside.test"
        ted = env.people[0]
        self.admin(env, "alias", "add", alias, ted.address)
        self.admin(env, "alias", "add", alias.upper(), outside)
        listed = self.admin(env, "alias", "list", env.domain).stdout
        assert f"{alias}\t{ted.address}, {outside}" in listed
        send(env.server, "alice@example.test", [alias], f"alias-{tag}")
        got = with_subject(pop_all(env.server, ted), f"alias-{tag}")
        assert len(got) == 1 and got[0].startswith(b"Return-Path: <alice@example.test>")
        msg = wait_until(lambda: [m for m in env.smarthost.received if outside in m.rcpt_tos],
                         what="the outside target")[0]
        assert msg.mail_from == "alice@example.test"
        assert f"alias-{tag}".encode() in msg.content and b"Return-Path" not in msg.content

    def test_alias_to_a_list(self, env: AliasEnv) -> None:
        """An alias may point at a list: its members get the list copy."""
        tag = self.tag()
        lst, alias = f"{tag}-list@{env.domain}", f"{tag}@{env.domain}"
        a, b, _ = env.people
        self.admin(env, "list", "add", lst)
        self.admin(env, "list", "member", "add", lst, a.address, b.address)
        self.admin(env, "alias", "add", alias, lst)
        send(env.server, "alice@example.test", [alias], f"to-list-{tag}")
        for person in (a, b):
            [got] = with_subject(pop_all(env.server, person), f"to-list-{tag}")
            assert f"List-Id: <{tag}-list.{env.domain}>".encode() in got

    def test_list_one_copy_per_person_list_id_and_owner_sender(self, env: AliasEnv,
                                                               tmp_path: Path) -> None:
        """A list with a nested list, sent by swaks to both lists and to one member directly:
        each person gets exactly one copy (mpop reads it), the list copy carries List-Id (RFC
        2919) and Return-Path <owner-LIST@DOMAIN>; the outside member gets one copy from the
        smart host with MAIL FROM owner-LIST@DOMAIN."""
        tag = self.tag()
        top, sub = f"{tag}@{env.domain}", f"{tag}-sub@{env.domain}"
        a, b, c = env.people
        outside = f"{tag}@outside.test"
        self.admin(env, "list", "add", top)
        self.admin(env, "list", "add", sub)
        self.admin(env, "list", "member", "add", top, a.address, b.address, sub, outside)
        self.admin(env, "list", "member", "add", sub, b.address, c.address, outside)
        shown = self.admin(env, "list", "show", top).stdout
        assert f"  {sub}" in shown and "senders: anyone" in shown
        swaks = require_program("swaks")
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(env.server.port("smtp")),
             "--from", "alice@example.test", "--to", f"{top},{sub},{c.address}",
             "--header", f"Subject: list-{tag}", "--body", "one copy each"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        for person in (a, b):
            [got] = with_subject(mpop_all(env.server, person, tmp_path), f"list-{tag}")
            head = got.split(b"\n\n")[0]
            assert head.startswith(f"Return-Path: <owner-{tag}@{env.domain}>".encode()), head
            assert head.count(b"List-Id:") == 1 and f"<{tag}.{env.domain}>".encode() in head
        # c was named directly too: the direct copy wins, without List-Id, sender unchanged
        [got] = with_subject(pop_all(env.server, c), f"list-{tag}")
        assert got.startswith(b"Return-Path: <alice@example.test>") and b"List-Id" not in got
        msgs = wait_until(lambda: [m for m in env.smarthost.received if outside in m.rcpt_tos],
                          what="the outside member")
        assert len(msgs) == 1 and msgs[0].mail_from == f"owner-{tag}@{env.domain}"
        assert b"List-Id: <" in msgs[0].content

    def test_a_list_loop_expands_once(self, env: AliasEnv) -> None:
        """A list that includes itself and a second list that includes the first: one copy per
        person, the server goes on (a later message is delivered too)."""
        tag = self.tag()
        one, two = f"{tag}-one@{env.domain}", f"{tag}-two@{env.domain}"
        a, b, _ = env.people
        self.admin(env, "list", "add", one)
        self.admin(env, "list", "add", two)
        self.admin(env, "list", "member", "add", one, one, two, a.address)
        self.admin(env, "list", "member", "add", two, one, b.address, a.address)
        send(env.server, "alice@example.test", [one], f"loop-{tag}")
        send(env.server, "alice@example.test", [two], f"loop2-{tag}")
        for person in (a, b):
            got = pop_all(env.server, person)
            assert len(with_subject(got, f"loop-{tag}")) == 1
            assert len(with_subject(got, f"loop2-{tag}")) == 1

    def test_senders_rule_answers_at_rcpt(self, env: AliasEnv) -> None:
        """--senders members: a stranger gets 550 5.7.1 at RCPT, a member's address is taken;
        --senders authenticated: an anonymous client gets 550 5.7.1, a logged-in one 250."""
        tag = self.tag()
        lst = f"{tag}@{env.domain}"
        a, b, _ = env.people
        self.admin(env, "list", "add", lst, "--senders", "members")
        self.admin(env, "list", "member", "add", lst, a.address, b.address)
        with smtplib.SMTP("127.0.0.1", env.server.port("smtp"), timeout=30) as s:
            s.ehlo("client.test")
            assert s.mail("stranger@example.test")[0] == 250
            code, text = s.rcpt(lst)
            assert (code, text[:5]) == (550, b"5.7.1"), text
            s.rset()
            assert s.mail(a.address)[0] == 250
            assert s.rcpt(lst)[0] == 250
        self.admin(env, "list", "set", lst, "--senders", "authenticated")
        with smtplib.SMTP("127.0.0.1", env.server.port("smtp"), timeout=30) as s:
            s.ehlo("client.test")
            s.mail(a.address)
            code, text = s.rcpt(lst)
            assert (code, text[:5]) == (550, b"5.7.1"), text
        with smtplib.SMTP("127.0.0.1", env.server.port("submission"), timeout=30) as s:
            s.ehlo("client.test")
            s.starttls()
            s.ehlo("client.test")
            s.login(a.login, a.password)
            assert s.mail(a.address)[0] == 250
            assert s.rcpt(lst)[0] == 250
            assert s.data(f"Subject: auth-{tag}\r\n\r\nhi\r\n".encode())[0] == 250
        assert with_subject(pop_all(env.server, b), f"auth-{tag}")

    def test_bounces_go_to_the_owner_and_reports_reach_an_alias_sender(self, env: AliasEnv) -> None:
        """An outside member the smart host refuses: the failure report goes to
        owner-LIST@DOMAIN, which reaches the configured owner (not the sender); a report to a
        sender that is an alias (the queue's local hop) reaches the alias's mailbox."""
        tag = self.tag()
        lst, alias = f"{tag}@{env.domain}", f"{tag}-me@{env.domain}"
        a, b, c = env.people
        bad = f"{tag}-gone@outside.test"
        env.smarthost.rcpt_replies[bad] = "550 5.1.1 no such user"
        self.admin(env, "list", "add", lst, "--owner", c.address)
        self.admin(env, "list", "member", "add", lst, a.address, bad)
        send(env.server, "alice@example.test", [lst], f"bounce-{tag}")
        report = wait_until(lambda: [m for m in pop_all(env.server, c) if bad.encode() in m],
                            timeout=30, what="the owner's failure report")
        assert b"Return-Path: <>" in report[0]
        assert len(with_subject(pop_all(env.server, a), f"bounce-{tag}")) == 1
        assert not [m for m in env.smarthost.received if "alice@example.test" in m.rcpt_tos]
        self.admin(env, "alias", "add", alias, b.address)
        bad2 = f"{tag}-gone2@outside.test"
        env.smarthost.rcpt_replies[bad2] = "550 5.1.1 no such user"
        send(env.server, alias, [bad2], f"report-{tag}")
        got = wait_until(lambda: [m for m in pop_all(env.server, b) if bad2.encode() in m],
                         timeout=30, what="the report to the alias sender")
        assert b"Return-Path: <>" in got[0]

    def test_admin_verbs_exit_codes(self, env: AliasEnv) -> None:
        """CONTRACT exit codes: a refused change is exit 1 with one line on stderr, a usage
        error exit 2; nothing changes."""
        tag = self.tag()
        a = env.people[0]
        cases = [
            ("alias", "add", a.address, "x@outside.test"),  # a mailbox
            ("alias", "add", f"{tag}@nowhere.test", a.address),  # no such domain
            ("alias", "add", f"{tag}@{env.domain}", "not an address"),
            ("alias", "remove", f"{tag}@{env.domain}"),
            ("list", "add", f"owner-{tag}@{env.domain}"),
            ("list", "member", "add", f"{tag}@{env.domain}", a.address),  # no such list
            ("list", "set", f"{tag}@{env.domain}", "--senders", "members"),
            ("list", "remove", f"{tag}@{env.domain}"),
        ]
        for args in cases:
            r = env.server.admin(*args, check=False)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("pop3coexist-admin: error:")
        r = env.server.admin("list", "set", f"{tag}@{env.domain}", "--senders", "nobody",
                             check=False)
        assert r.returncode == 2
        assert f"{tag}@" not in env.server.admin("alias", "list").stdout
