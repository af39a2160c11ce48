"""`pop3coexist-admin vacation USER@DOMAIN on|off|show` (admin/vacation.py): the script it
writes parses and does what it says, the user's own active script comes back with `off`, and
bad input is one line on stderr with exit code 1 (CONTRACT section 4)."""

from __future__ import annotations

import pytest

from pop3coexist.policy.sieve import parse
from pop3coexist.policy.sieve_run import MailContext, run
from pop3coexist.store.maildir import MaildirStore
from pop3coexist.store.sievestore import SieveScripts
from tests.unit.test_admin import config  # noqa: F401 (a fixture)
from tests.unit.test_admin import run as admin_run  # noqa: F401 (a fixture)

D = "pop.contoso.test"


def test_on_off_show_and_the_previous_script(admin_run, tmp_path) -> None:  # noqa: ANN001, F811
    """on writes and activates "vacation" (text with a leading dot, a quoted subject, :days),
    remembering the active script; show prints it; off removes it and reactivates the old."""
    assert admin_run("mailbox", "add", f"ted@{D}", "--password-stdin", stdin="pw\n")[0] == 0
    scripts = SieveScripts(MaildirStore(tmp_path / "var" / "mailroot"))
    scripts.put_script(D, "ted", "mine", "keep;\n")
    scripts.set_active(D, "ted", "mine")
    body = tmp_path / "away.txt"
    body.write_text("Away.\n.signature line\n")
    code, out, err = admin_run("vacation", f"ted@{D}", "on", "--file", str(body),
                               "--subject", 'Re: "plans"', "--days", "3")
    assert code == 0 and '"mine" was active' in out, err
    name, text, _ = scripts.active_script(D, "ted")
    assert name == "vacation"
    result = run(parse(text), MailContext.from_bytes("a@x.example", f"ted@{D}",
                                                      b"To: ted@pop.contoso.test\r\n\r\nx\r\n"))
    [action] = result.actions
    assert action.kind == "vacation" and action.argument == "Away.\r\n.signature line\r\n"
    assert action.options["subject"] == 'Re: "plans"' and action.options["days"] == 3
    code, out, _ = admin_run("vacation", f"ted@{D}", "show")
    assert code == 0 and 'active script "vacation"' in out
    code, out, _ = admin_run("vacation", f"ted@{D}", "off")
    assert code == 0 and '"mine" is active again' in out
    assert scripts.active_script(D, "ted")[0] == "mine"
    assert [n for n, _, _ in scripts.list_scripts(D, "ted")] == ["mine"]


def test_errors_are_one_line_and_exit_1(admin_run, tmp_path) -> None:  # noqa: ANN001, F811
    """Unknown mailbox, no vacation to turn off, an empty or non-UTF-8 body: exit 1 with one
    line; a missing --file is a usage error (exit 2)."""
    assert admin_run("mailbox", "add", f"ted@{D}", "--password-stdin", stdin="pw\n")[0] == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    for args, words in [
        (("vacation", f"nobody@{D}", "show"), "no such domain or mailbox"),
        (("vacation", f"ted@{D}", "off"), "has no vacation script"),
        (("vacation", f"ted@{D}", "on", "--file", str(empty)), "is empty"),
        (("vacation", f"ted@{D}", "on", "--file", str(latin)), "is not UTF-8"),
        (("vacation", f"ted@{D}", "on", "--file", str(latin), "--days", "0"), "not UTF-8"),
    ]:
        code, _, err = admin_run(*args)
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        admin_run("vacation", f"ted@{D}", "on")
    assert e.value.code == 2
