"""pop3coexist-admin mailbox scram-keys: SCRAM-SHA-256 keys for password-file accounts made
before the keys existed, from the stored secrets; exit codes and messages."""

from __future__ import annotations

import json

from tests.unit.test_admin import PW, config, run  # noqa: F401 (fixtures)

TED = "ted@pop.contoso.test"


def strip_keys(config_path) -> None:  # noqa: F811
    path = config_path.parent.parent / "var" / "passwords.json"
    doc = json.loads(path.read_text())
    for entry in doc["users"].values():
        entry.pop("scram", None)
    path.write_text(json.dumps(doc))


def test_scram_keys_from_stored_secrets(run, config):  # noqa: F811
    """An account with a stored secret but no keys gets them (exit 0, one line each, and
    the closing line that SCRAM-SHA-256 is now offered); run again, nothing is left to do."""
    assert run("mailbox", "add", TED, "--password-stdin", stdin=PW + "\n")[0] == 0
    strip_keys(config)
    code, out, _err = run("mailbox", "scram-keys")
    assert code == 0
    assert f"SCRAM-SHA-256 keys made for {TED}" in out
    assert "the server offers SCRAM-SHA-256" in out
    doc = json.loads((config.parent.parent / "var" / "passwords.json").read_text())
    assert doc["users"][TED]["scram"]["i"] == 4096
    code, out, _err = run("mailbox", "scram-keys", TED)
    assert code == 0 and "already has SCRAM-SHA-256 keys" in out


def test_scram_keys_unknown_address_is_one_line_error(run):  # noqa: F811
    """An address with no password is exit 1 with one line on stderr."""
    code, _out, err = run("mailbox", "scram-keys", "nobody@pop.contoso.test")
    assert code == 1 and err.count("\n") == 1 and "nobody@pop.contoso.test" in err
