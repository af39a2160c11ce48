"""Out-of-office and simple filing rules in web mail, written as a Sieve script.

The settings page keeps its state in the mailbox's Sieve script ``webmail`` (the same store
ManageSieve and ``pop3coexist-admin vacation`` use, ``store.sievestore.SieveScripts``): the
script begins with a comment line ``# webmail-settings: {json}`` that this module reads back,
then the Sieve it generates, checked by the same parser as ManageSieve and delivery
(``policy.sieve.parse``) before it is written. Saving makes ``webmail`` the active script;
the script that was active before (written with ManageSieve, say) is named so the page can
say it was replaced. Turning everything off deactivates and removes ``webmail``.

Rules (``Rule``): when the From, To, or Subject field (or any of To/Cc) contains a text
(``:contains``, case-insensitive), then move the message into a folder (``fileinto``),
discard it, or forward it (``redirect``, with ``:copy`` when a copy is kept). They run in
order; each ends with ``stop``. The out-of-office reply (RFC 5230 ``vacation``) comes after
them with its subject, text and ``:days``. (A date range would need the Sieve ``date``
extension, which this server's Sieve does not implement: the reply is on until turned off.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pop3coexist.policy.sieve import SieveSyntaxError, parse
from pop3coexist.store.sievestore import NoSuchScript

SCRIPT = "webmail"
MARK = "# webmail-settings: "
FIELDS = {"from": '"from"', "to": '["to", "cc"]', "subject": '"subject"'}
ACTIONS = ("fileinto", "discard", "redirect", "redirect_copy")


@dataclass
class Rule:
    """``field`` (from, to, subject) contains ``text``: ``action`` (fileinto, discard,
    redirect, redirect_copy) with ``target`` (a folder or an address)."""

    field: str
    text: str
    action: str
    target: str = ""


@dataclass
class Settings:
    """Everything the settings page edits."""

    vacation: bool = False
    subject: str = ""
    text: str = ""
    days: int = 7
    rules: list[Rule] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.vacation and not self.rules


def _string(text: str) -> str:
    """A Sieve quoted string (RFC 5228 section 2.4.2)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _multiline(text: str) -> str:
    stuffed = "\n".join("." + ln if ln.startswith(".") else ln for ln in text.splitlines())
    return "text:\n" + stuffed + "\n.\n"


def script_text(s: Settings) -> str:
    """The Sieve script of ``s`` (its first line carries ``s`` as JSON)."""
    needs = set()
    body: list[str] = []
    for r in s.rules:
        test = f"header :contains {FIELDS[r.field]} {_string(r.text)}"
        if r.action == "fileinto":
            needs.add("fileinto")
            act = f"fileinto {_string(r.target)};"
        elif r.action == "discard":
            act = "discard;"
        elif r.action == "redirect":
            act = f"redirect {_string(r.target)};"
        else:
            needs.add("copy")
            act = f"redirect :copy {_string(r.target)};"
        body.append(f"if {test} {{\n  {act}\n  stop;\n}}")
    if s.vacation:
        needs.add("vacation")
        args = [f":days {s.days}"]
        if s.subject.strip():
            args.append(":subject " + _string(" ".join(s.subject.split())))
        body.append("vacation " + " ".join(args) + " " + _multiline(s.text) + ";")
    state = json.dumps(asdict(s), ensure_ascii=True)
    lines = [MARK + state, "# written by web mail: edit it there (Settings)"]
    if needs:
        lines.append("require [" + ", ".join(_string(n) for n in sorted(needs)) + "];")
    return "\n".join(lines + body) + "\n"


def validate(s: Settings, folder_ok: Any, address_ok: Any) -> list[str]:
    """The problems of ``s`` for the user (empty when it can be saved). ``folder_ok(name)``
    and ``address_ok(text)`` check rule targets."""
    problems = []
    if s.vacation and not s.text.strip():
        problems.append("The out-of-office reply needs a text.")
    if not 1 <= s.days <= 365:
        problems.append("Reply to each sender once every 1 to 365 days.")
    for n, r in enumerate(s.rules, 1):
        if r.field not in FIELDS or r.action not in ACTIONS:
            problems.append(f"Rule {n}: choose a field and an action.")
        elif not r.text.strip():
            problems.append(f"Rule {n}: the text to look for is empty.")
        elif r.action == "fileinto" and not folder_ok(r.target):
            problems.append(f"Rule {n}: there is no folder {r.target!r}.")
        elif r.action.startswith("redirect") and not address_ok(r.target):
            problems.append(f"Rule {n}: {r.target!r} is not a mail address.")
    if not problems:
        try:
            parse(script_text(s))
        except SieveSyntaxError as e:
            problems.append(f"The rules do not make a valid Sieve script: {e}")
    return problems


def load(scripts: Any, domain: str, box: str) -> tuple[Settings, str | None]:
    """(the settings stored in ``webmail``, or empty ones; the name of the active script
    when another one is active, so ``webmail`` is not in force). Blocking."""
    active = next((name for name, on, _ in scripts.list_scripts(domain, box) if on), None)
    try:
        text = scripts.get_script(domain, box, SCRIPT)
    except NoSuchScript:
        return Settings(), active
    first = text.splitlines()[0] if text else ""
    settings = Settings()
    if first.startswith(MARK):
        try:
            raw = json.loads(first[len(MARK):])
            rules = [Rule(**r) for r in raw.pop("rules", [])]
            settings = Settings(**raw, rules=rules)
        except (ValueError, TypeError):
            settings = Settings()
    return settings, (active if active != SCRIPT else None)


def save(scripts: Any, domain: str, box: str, s: Settings) -> str | None:
    """Write and activate ``webmail`` for ``s`` (or remove it when ``s`` is empty); returns
    the name of the script that was active before and is now replaced, if any. Blocking."""
    active = next((name for name, on, _ in scripts.list_scripts(domain, box) if on), None)
    if s.empty:
        if active == SCRIPT:
            scripts.set_active(domain, box, "")
        try:
            scripts.delete_script(domain, box, SCRIPT)
        except NoSuchScript:
            pass
        return None
    scripts.put_script(domain, box, SCRIPT, script_text(s))
    scripts.set_active(domain, box, SCRIPT)
    return active if active and active != SCRIPT else None
