"""Fault 11: documentation that can drift from the parser. Every key the parser accepts
(``config.declared_keys()``, read from the same declarations the parser uses) must have a row
in one of README.md's key tables with the declared default, and a line (set, or commented) in
its section of etc/pop3coexist.toml; and nothing documented may be unknown to the parser."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from pop3coexist.config import declared_arrays, declared_keys, parse_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ETC = ROOT / "etc" / "pop3coexist.toml"
DECLARED = dict(declared_keys())
SECTIONS = {name.rsplit(".", 1)[0] for name in DECLARED}


def readme_rows() -> dict[str, str]:
    """``{"smtp.max_recipients": "`100`"}``: first and second cell of every README table row
    whose first cell is one backticked dotted key of a known section."""
    rows: dict[str, str] = {}
    for line in README.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        m = re.fullmatch(r"`([a-z0-9_.]+)`", cells[0])
        if m and m.group(1).rsplit(".", 1)[0] in SECTIONS | {"server"}:
            assert m.group(1) not in rows, f"README has two rows for {m.group(1)}"
            rows[m.group(1)] = cells[1]
    return rows


def etc_keys() -> set[str]:
    """Dotted names of every key in etc/pop3coexist.toml, set or in a commented line, read
    under the section header (set or commented) above it."""
    found: set[str] = set()
    section = ""
    for line in ETC.read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?\s*(#.*)?$", line)
        if header:
            section = header.group(1)
            continue
        item = re.match(r"^#?\s*([a-z0-9_]+)\s*=", line)
        if item and section:
            found.add(f"{section}.{item.group(1)}")
    return found


def expected_default(name: str) -> str:
    key = DECLARED[name]
    if key.shown:
        return key.shown
    if key.required:
        return "(required)"
    return f"`{key.toml_default()}`"


def test_every_section_is_declared():
    """The declarations cover every section the parser reads, arrays of tables included."""
    assert {"server", "pop3", "smtp", "tls", "auth", "auth.directory",
            "auth.directory.attributes", "auth.local", "domains", "domains.remote", "relay",
            "smarthost", "queue", "gateway", "gateway.connectors",
            "gateway.recipient_policies", "masquerade", "dns", "dkim",
            "sender_authentication", "milter", "sieve", "managesieve", "metrics",
            "log"} <= SECTIONS
    assert set(declared_arrays()) == {"domains.remote", "gateway.connectors",
                                      "gateway.recipient_policies", "dkim", "milter",
                                      "admin_web.peers"}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_key_has_a_readme_row_with_its_default(name):
    """Each declared key has its own README row, whose default cell shows the declared one."""
    rows = readme_rows()
    assert name in rows, f"README.md has no row for `{name}` (Configuration table)"
    assert expected_default(name) in rows[name], (
        f"README.md says the default of {name} is {rows[name]!r}; the parser's is "
        f"{expected_default(name)}")


def test_readme_documents_no_unknown_key():
    """No README row names a key the parser would refuse (a removed or misspelt key)."""
    unknown = sorted(set(readme_rows()) - set(DECLARED))
    assert not unknown, f"README.md documents keys the parser does not know: {unknown}"


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_key_is_in_the_embedded_config(name):
    """Each declared key appears in etc/pop3coexist.toml under its section, set or commented."""
    assert name in etc_keys(), f"etc/pop3coexist.toml has no line (set or commented) for {name}"


def test_embedded_config_names_no_unknown_key():
    """Every key line in etc/pop3coexist.toml (commented ones too) is one the parser knows."""
    unknown = sorted(etc_keys() - set(DECLARED))
    assert not unknown, f"etc/pop3coexist.toml names keys the parser does not know: {unknown}"


def test_commented_defaults_agree_with_the_declarations():
    """A commented ``key = value`` line shows the declared default (where one is declared and
    the line is not an example value)."""
    section = ""
    wrong = []
    for line in ETC.read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r"^#\s*([a-z0-9_]+)\s*=\s*(.*?)\s*(#.*)?$", line)
        if not m or section in declared_arrays():
            continue
        key = DECLARED.get(f"{section}.{m.group(1)}")
        if key is None or key.required or key.shown:
            continue
        value = tomllib.loads(f"v = {m.group(2)}")["v"]
        if key.convert(value) != key.convert(key.default):
            wrong.append(f"{section}.{m.group(1)} = {m.group(2)}")
    assert not wrong, f"commented defaults that are not the parser's: {wrong}"


def test_every_declared_default_is_what_an_unset_key_gets():
    """A config that sets nothing gets, for every key with a plain default, exactly the value
    its declaration converts (so the documented default is the real one)."""
    c = parse_config('[server]\nhostname = "pop.contoso.test"\nstate_dir = "var"\n')
    for name, key in DECLARED.items():
        parts = name.split(".")
        if key.required or key.shown or ".".join(parts[:-1]) in declared_arrays():
            continue
        value = c
        for part in parts:
            value = getattr(value, part)
        assert value == key.convert(key.default), name


def test_each_key_has_a_doc_line():
    """Every declaration carries a one-line description."""
    assert all(key.doc and "\n" not in key.doc for key in DECLARED.values())


def _user_read_texts() -> list[tuple[Path, str]]:
    """README, docs/, etc/ (examples included) and every module docstring under src/."""
    import ast

    out = [(README, README.read_text())]
    for folder in (ROOT / "docs", ROOT / "etc"):
        out += [(p, p.read_text(errors="replace")) for p in sorted(folder.rglob("*")) if p.is_file()]
    for p in sorted((ROOT / "src" / "pop3coexist").rglob("*.py")):
        out.append((p, ast.get_docstring(ast.parse(p.read_text())) or ""))
    return out


def test_the_repository_stands_on_its_own():
    """Fault 21: nothing a user reads points at a contract file outside the repository or
    speaks of "the seed": the Windows Server 2003 POP3 service and Exchange are named."""
    bad = [f"{p.relative_to(ROOT)}: {word!r}" for p, text in _user_read_texts()
           for word in ("CONTRACT", "../shared", "seed") if word in text
           or (word == "seed" and re.search(r"\bseed\b", text, re.IGNORECASE))]
    assert not bad, bad
    readme = README.read_text()
    assert "Windows Server 2003 POP3 service" in readme and "Exchange" in readme
    for section in ("## Configuration", "## Administration", "## On disk",
                    "## Replies a client can rely on"):
        assert section in readme
