"""pop3coexist-admin: every verb, its exit codes (0, 1 with one line, 2 for usage) and its effect
on the real store and password file in a temporary state folder."""

from __future__ import annotations

import io
import textwrap

import pytest

from pop3coexist.admin import cli

PW = "s3cret-Passw0rd"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "etc" / "pop3coexist.toml"
    path.parent.mkdir()
    path.write_text(
        textwrap.dedent(
            """\
            [server]
            hostname = "pop.contoso.test"
            state_dir = "../var"
            [domains]
            local = ["pop.contoso.test"]
            """
        )
    )
    (tmp_path / "var" / "mailroot" / "pop.contoso.test").mkdir(parents=True)
    return path


def admin(config, *args, stdin: str | None = None, monkeypatch=None, capsys=None):
    """Run the admin command in-process; return (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = io.StringIO()
    code = cli.run(["-c", str(config), *args], out=out)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, out.getvalue(), err


@pytest.fixture
def run(config, monkeypatch, capsys):
    def _run(*args, stdin=None):
        return admin(config, *args, stdin=stdin, monkeypatch=monkeypatch, capsys=capsys)

    return _run


def test_domain_add_list_lock_unlock_remove(run, tmp_path):
    """domain add/list/lock/unlock/remove change the mailroot; remove asks for --yes."""
    assert run("domain", "add", "Second.Test")[0] == 0
    assert (tmp_path / "var" / "mailroot" / "second.test").is_dir()
    code, out, _ = run("domain", "list")
    assert code == 0 and "second.test" in out and "pop.contoso.test" in out
    assert run("domain", "lock", "second.test")[0] == 0
    assert "(locked)" in run("domain", "list")[1]
    assert run("domain", "unlock", "second.test")[0] == 0
    code, _, err = run("domain", "remove", "second.test")
    assert code == 1 and "--yes" in err
    assert run("domain", "remove", "second.test", "--yes")[0] == 0
    assert not (tmp_path / "var" / "mailroot" / "second.test").exists()


def test_domain_add_warns_when_bare_name_logins_end(run, tmp_path):
    """Issue 11 fault 20: adding the second local domain ends bare-name log-ins; domain add
    says so in one warning line on stderr and still exits 0. A third domain, a domain that
    already exists and the first domain give no warning."""
    code, out, err = run("domain", "add", "fabrikam.test")
    assert code == 0 and out.splitlines()[0] == "domain fabrikam.test added"
    assert err.count("\n") == 1
    assert err.startswith("pop3coexist-admin: warning: ")
    assert "bare-name log-ins end" in err and "ted@pop.contoso.test, not ted" in err
    assert "exactly one local domain" in err
    code, out, err = run("domain", "add", "third.test")
    assert (code, out.splitlines()[0], err) == (0, "domain third.test added", "")
    code, _, err = run("domain", "add", "third.test")
    assert code == 1 and "warning" not in err


def test_domain_add_first_domain_gives_no_warning(tmp_path, monkeypatch, capsys):
    """On a server with no local domain yet, adding one starts bare-name log-ins: no warning."""
    path = tmp_path / "empty.toml"
    path.write_text('[server]\nhostname = "pop.contoso.test"\nstate_dir = "var"\n'
                    "[domains]\nlocal = []\n")
    code, out, err = admin(path, "domain", "add", "only.test", monkeypatch=monkeypatch, capsys=capsys)
    assert (code, out.splitlines()[0], err) == (0, "domain only.test added", "")


def test_domain_named_in_config_cannot_be_removed(run):
    """A domain listed in [domains] local cannot be removed; the error says so."""
    code, _, err = run("domain", "remove", "pop.contoso.test", "--yes")
    assert code == 1
    assert "[domains] local" in err
    assert len(err.strip().splitlines()) == 1


def test_domain_errors_are_one_line_exit_1(run):
    """Adding an existing or invalid domain: exit 1 and one line on stderr."""
    for args in (("domain", "add", "pop.contoso.test"), ("domain", "add", "no_dots"),
                 ("domain", "lock", "missing.test")):
        code, _, err = run(*args)
        assert code == 1, args
        assert err.startswith("pop3coexist-admin: error: ")
        assert len(err.strip().splitlines()) == 1


def test_usage_error_exit_2(run):
    """An unknown verb or a missing argument is a usage error: exit 2."""
    with pytest.raises(SystemExit) as info:
        run("domain", "frobnicate")
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run("mailbox", "add")
    assert info.value.code == 2


def test_mailbox_add_with_password_stdin_and_verify(run, config, tmp_path):
    """mailbox add creates the Maildir and a password entry that verifies; the password is not in argv."""
    code, out, err = run("mailbox", "add", "Ted@POP.contoso.test", "--password-stdin", stdin=PW + "\n")
    assert code == 0, err
    box = tmp_path / "var" / "mailroot" / "pop.contoso.test" / "ted"
    assert all((box / d).is_dir() for d in ("tmp", "new", "cur"))
    from pop3coexist.config import load_config
    from pop3coexist.identity.factory import make_password_file

    pw = make_password_file(load_config(config))
    assert pw.verify("ted@pop.contoso.test", PW)
    assert not pw.verify("ted@pop.contoso.test", "wrong")
    raw = (tmp_path / "var" / "passwords.json").read_text()
    assert PW not in raw
    code, _, err = run("mailbox", "add", "ted@pop.contoso.test", "--password-stdin", stdin=PW + "\n")
    assert code == 1 and "already exists" in err


def test_mailbox_add_refuses_empty_password_and_no_terminal(run):
    """An empty password, or no terminal and no --password-stdin, is refused with one line."""
    code, _, err = run("mailbox", "add", "amy@pop.contoso.test", "--password-stdin", stdin="\n")
    assert code == 1 and "empty" in err
    code, _, err = run("mailbox", "add", "amy@pop.contoso.test", stdin="")
    assert code == 1 and "--password-stdin" in err


def test_mailbox_in_unknown_domain(run):
    """A mailbox in a domain that does not exist is refused, naming the domain."""
    code, _, err = run("mailbox", "add", "x@nowhere.test", "--password-stdin", stdin=PW + "\n")
    assert code == 1 and "nowhere.test" in err


def test_mailbox_lock_passwd_quota_stat_list_remove(run, config):
    """lock/unlock, passwd, quota and stat work on an existing mailbox; remove asks for --yes."""
    assert run("mailbox", "add", "bob@pop.contoso.test", "--password-stdin", stdin=PW + "\n")[0] == 0
    assert run("mailbox", "lock", "bob@pop.contoso.test")[0] == 0
    assert "(locked)" in run("mailbox", "list")[1]
    assert run("mailbox", "unlock", "bob@pop.contoso.test")[0] == 0
    assert run("mailbox", "passwd", "bob@pop.contoso.test", "--password-stdin", stdin="N3w-password\n")[0] == 0
    from pop3coexist.config import load_config
    from pop3coexist.identity.factory import make_password_file

    assert make_password_file(load_config(config)).verify("bob@pop.contoso.test", "N3w-password")
    assert run("mailbox", "quota", "bob@pop.contoso.test", "50MB")[0] == 0
    code, out, _ = run("stat")
    assert code == 0 and "bob@pop.contoso.test" in out and "50000000" in out
    assert run("mailbox", "quota", "bob@pop.contoso.test", "none")[0] == 0
    code, _, err = run("mailbox", "quota", "bob@pop.contoso.test", "lots")
    assert code == 1
    assert run("mailbox", "remove", "bob@pop.contoso.test")[0] == 1
    assert run("mailbox", "remove", "bob@pop.contoso.test", "--yes")[0] == 0
    assert "bob@" not in run("mailbox", "list")[1]


def test_mailbox_unlock_while_domain_locked_is_refused(run):
    """As in the Windows POP3 service, a mailbox cannot be unlocked while its domain is locked."""
    assert run("mailbox", "add", "cat@pop.contoso.test", "--password-stdin", stdin=PW + "\n")[0] == 0
    assert run("domain", "lock", "pop.contoso.test")[0] == 0
    code, _, err = run("mailbox", "unlock", "cat@pop.contoso.test")
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_check_config(run, config):
    """check-config says OK for a good config."""
    code, out, _ = run("check-config")
    assert code == 0 and "OK" in out


def test_check_config_bad_file(tmp_path, capsys):
    """check-config on a bad config: exit 1 and the key named on one line."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhostname = \"a.test\"\nstate_dir = \"v\"\nbogus = 1\n")
    code = cli.run(["-c", str(bad), "check-config"], out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 1 and "[server.bogus]" in err


def test_check_config_peer_shared_domain(run, config, tmp_path):
    """--peer refuses two configs that keep mailboxes for the same domain (the seed's rule)."""
    peer = tmp_path / "peer.toml"
    peer.write_text("[server]\nhostname = \"gw.test\"\nstate_dir = \"gv\"\n[domains]\nlocal = [\"pop.contoso.test\"]\n")
    code, _, err = run("check-config", "--peer", str(peer))
    assert code == 1 and "must not share" in err


def test_queue_list_flush_delete(run, config, tmp_path):
    """queue list shows each message with its recipients' state; flush leaves a request the
    running server picks up; delete removes one message; an unknown id is one-line exit 1."""
    from pop3coexist.store.queue import FileQueue

    assert run("queue", "list")[1].strip() == "queue is empty"
    q = FileQueue(tmp_path / "var" / "queue", "pop.contoso.test")
    qid = q.enqueue_bytes(
        b"Subject: queued\n\nbody\n",
        {"sender": "ted@pop.contoso.test",
         "recipients": [{"address": "bob@example.test", "orcpt": None, "notify": None}],
         "ret": None, "envid": None, "received_from": "test", "arrival": 1.0, "hops": 1},
    )
    code, out, _ = run("queue", "list")
    assert code == 0
    assert qid in out and "from <ted@pop.contoso.test>" in out
    assert "bob@example.test" in out
    code, out, _ = run("queue", "flush")
    assert code == 0 and q.take_marker("flush")
    code, _, err = run("queue", "delete", "no-such-id")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert run("queue", "delete", qid)[0] == 0
    assert run("queue", "list")[1].strip() == "queue is empty"


def test_queue_delete_bounce_reports_to_the_sender(run, config, tmp_path):
    """queue delete ID --bounce removes the message and queues one failure report from <> to
    its sender (smtp/bounce.py); an unknown id with --bounce is one-line exit 1."""
    from pop3coexist.store.queue import FileQueue

    q = FileQueue(tmp_path / "var" / "queue", "pop.contoso.test")
    qid = q.enqueue_bytes(
        b"Subject: queued\n\nbody\n",
        {"sender": "ted@pop.contoso.test",
         "recipients": [{"address": "bob@example.test", "orcpt": None, "notify": None}],
         "ret": None, "envid": None, "received_from": "test", "arrival": 1.0, "hops": 1},
    )
    code, _, err = run("queue", "delete", "no-such-id", "--bounce")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no message" in err
    code, out, _ = run("queue", "delete", qid, "--bounce")
    assert code == 0 and out.strip() == f"message {qid} deleted (report sent)"
    [rid] = q.ids()
    report = q.load(rid)
    assert report.sender == ""
    assert [r.address for r in report.recipients] == ["ted@pop.contoso.test"]
    assert b"Final-Recipient: rfc822; bob@example.test" in q.body_path(rid).read_bytes()


def test_postmaster_mailbox_check_config_and_passwd(run, config, tmp_path):
    """The default postmaster mailbox exists for the admin tool as at start; check-config says
    where postmaster mail lands; domain add says it for the new domain; mailbox passwd gives the
    postmaster mailbox a password (password-file method) so it can be read."""
    code, out, _ = run("check-config")
    assert code == 0
    assert ("postmaster: mail for <Postmaster> and postmaster@<every domain this server is "
            "authoritative for> lands in <postmaster@pop.contoso.test> (a mailbox here)") in out
    assert "abuse" not in out
    assert (tmp_path / "var" / "mailroot" / "pop.contoso.test" / "postmaster" / "new").is_dir()
    code, out, _ = run("domain", "add", "second.test")
    assert code == 0 and "mail for postmaster@second.test lands in <postmaster@pop.contoso.test>" in out
    code, out, _ = run("mailbox", "passwd", "postmaster@pop.contoso.test", "--password-stdin", stdin=PW + "\n")
    assert code == 0 and "password of postmaster@pop.contoso.test changed" in out


def test_check_config_names_a_configured_abuse_and_remote_postmaster(run, config):
    """With domains.postmaster remote and domains.abuse set, check-config names both."""
    config.write_text(config.read_text() + 'postmaster = "hostmaster@corp.example"\n'
                      'abuse = "abuse-desk@pop.contoso.test"\n')
    code, out, _ = run("check-config")
    assert code == 0
    assert "lands in <hostmaster@corp.example> (relayed there)" in out
    assert "abuse: mail for abuse@<every domain this server is authoritative for> lands in " \
           "<abuse-desk@pop.contoso.test> (a mailbox here)" in out


def test_prepare_state_creates_the_postmaster_mailbox(config, tmp_path):
    """At start the default postmaster mailbox is created when missing (RFC 5321 4.5.1)."""
    from pop3coexist.config import load_config
    from pop3coexist.service import prepare_state

    prepare_state(load_config(config))
    assert (tmp_path / "var" / "mailroot" / "pop.contoso.test" / "postmaster" / "cur").is_dir()
