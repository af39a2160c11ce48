"""Issue 11 re-run, fault 11 (documentation that can drift from the code): the README's
admin verb list is the real `pop3coexist-admin` parser's, and every SMTP reply code the
ESMTP front-end can send has a row in the README's "Replies a client can rely on" table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pop3coexist.admin.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _readme_verbs() -> dict[str, set[str]]:
    """``{"domain": {"add", ...}, "check-config": set()}`` from the README's admin block."""
    block = README.split("## Administration", 1)[1].split("```", 2)[1]
    verbs: dict[str, set[str]] = {}
    noun = ""
    for line in block.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" "):
            noun, _, line = line.partition(" ")
            verbs[noun] = set()
        for part in line.split("|"):
            words = part.split()
            # "quota USER@DOMAIN SIZE|none": "none" is a value, not a verb
            if (words and re.fullmatch(r"[a-z][a-z-]*", words[0]) and noun != "stat"
                    and words[0] != "none"):
                verbs[noun].add(words[0])
    verbs["check-config"] = set()
    return verbs


def test_readme_admin_verbs_are_the_parsers() -> None:
    """Every noun and verb README's admin block lists is one `pop3coexist-admin --help`
    knows, and every one the parser knows is listed."""
    parser_verbs = {noun: set(_subcommands(sub)) for noun, sub in _subcommands(build_parser()).items()}
    assert _readme_verbs() == parser_verbs


SOURCES = ["smtp/server.py", "smtp/auth.py", "smtp/incoming.py", "policy/relay.py",
           "policy/gateway.py", "store/maildir.py", "identity/passwordfile.py"]
_CODE_RE = re.compile(r"\b([245]\d\d)(?:, |[ -])\"?([245]\.\d{1,3}\.\d{1,3})")


def _codes_in_code() -> set[str]:
    found = set()
    for name in SOURCES:
        text = (ROOT / "src" / "pop3coexist" / name).read_text()
        for code, enhanced in _CODE_RE.findall(text):
            if code[0] == enhanced[0] and code[0] in "45":  # failures; 2xx are no "case"
                found.add(f"{code} {enhanced}")
    return found


def _reply_table() -> str:
    return README.split("## Replies a client can rely on", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("code", sorted(_codes_in_code()))
def test_each_reply_code_the_server_sends_has_a_readme_row(code: str) -> None:
    """A code a client can get (found in the front-end and policy sources) is in a row of the
    README's reply table, so that a client author can rely on it."""
    assert f"`{code}" in _reply_table(), f"{code} has no row in README's reply table"
