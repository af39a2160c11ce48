"""``pop3coexist-admin vacation USER@DOMAIN on --subject S --file BODY [--days N]
[--from ADDRESS] | off | show``: out-of-office for an administrator who does not write Sieve.

``on`` writes the Sieve script ``vacation`` (RFC 5230) into the mailbox's scripts
(``store.sievestore``) and makes it the active one; the script the user had active is named
in a comment of the new one (``# previous-active: NAME``), so ``off`` can make it active
again. ``off`` removes the ``vacation`` script (and activates the previous one when it still
exists). ``show`` prints the active script's name and text. The body file is UTF-8 text;
the script is checked with the same parser as ManageSieve and delivery before it is written.
The running server sees the change at its next delivery.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pop3coexist.errors import AdminError
from pop3coexist.policy.sieve import SieveSyntaxError, parse
from pop3coexist.store.sievestore import NoSuchScript, SieveScripts

SCRIPT = "vacation"
PREVIOUS = "# previous-active: "


def add_parser(top: Any) -> None:
    """Register ``vacation`` on the admin command's sub-parsers."""
    v = top.add_parser("vacation", help="out-of-office reply (writes a Sieve script)")
    v.add_argument("address", metavar="USER@DOMAIN")
    verbs = v.add_subparsers(dest="verb", required=True)
    on = verbs.add_parser("on", help="reply to mail from now on")
    on.add_argument("--file", type=Path, required=True, help="the reply's text (UTF-8)")
    on.add_argument("--subject", default=None, help="subject of the reply (default: Auto: ...)")
    on.add_argument("--days", type=int, default=None, help="one reply per sender per N days")
    on.add_argument("--from", dest="from_", default=None, help="From: of the reply")
    verbs.add_parser("off", help="stop replying (the previous script is active again)")
    verbs.add_parser("show", help="print the active script")


def _string(text: str) -> str:
    """A Sieve quoted string (RFC 5228 section 2.4.2)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script_text(body: str, subject: str | None, days: int | None, from_: str | None,
                previous: str | None) -> str:
    """The Sieve script of ``vacation on``."""
    lines = ["# written by pop3coexist-admin vacation; `vacation ... off` removes it"]
    if previous:
        lines.append(PREVIOUS + previous)
    lines.append('require "vacation";')
    args = []
    if days is not None:
        args.append(f":days {days}")
    if subject is not None:
        args.append(":subject " + _string(" ".join(subject.split())))
    if from_ is not None:
        args.append(":from " + _string(from_))
    stuffed = "\n".join("." + ln if ln.startswith(".") else ln for ln in body.splitlines())
    lines.append("vacation " + " ".join(args) + (" " if args else "") + "text:\n" + stuffed +
                 "\n.\n;")
    return "\n".join(lines) + "\n"


def run(config: Any, store: Any, args: argparse.Namespace, out: Any) -> None:
    """Carry out ``vacation``; AdminError (one line) when it cannot."""
    address = args.address.strip()
    box, at, domain = address.rpartition("@")
    if not at or not box or not domain:
        raise AdminError(f"{address!r} is not USER@DOMAIN")
    box, domain = box.lower(), domain.lower()
    scripts = SieveScripts(store)
    listed = scripts.list_scripts(domain, box)  # NoSuchMailbox for an unknown mailbox
    active = next((name for name, on, _ in listed if on), None)
    if args.verb == "show":
        found = scripts.active_script(domain, box)
        if found is None:
            print(f"{box}@{domain}: no active script (every message is kept)", file=out)
        else:
            print(f"{box}@{domain}: active script \"{found[0]}\"", file=out)
            print(found[1].rstrip("\n"), file=out)
        return
    if args.verb == "off":
        if SCRIPT not in {name for name, _, _ in listed}:
            raise AdminError(f"{box}@{domain} has no vacation script")
        text = scripts.get_script(domain, box, SCRIPT)
        previous = next((ln[len(PREVIOUS):].strip() for ln in text.splitlines()
                         if ln.startswith(PREVIOUS)), None)
        if active == SCRIPT:
            scripts.set_active(domain, box, "")
            if previous:
                try:
                    scripts.set_active(domain, box, previous)
                except NoSuchScript:
                    previous = None
        scripts.delete_script(domain, box, SCRIPT)
        tail = f"; \"{previous}\" is active again" if previous and active == SCRIPT else ""
        print(f"{box}@{domain}: out-of-office off{tail}", file=out)
        return
    try:
        body = args.file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError(f"{args.file}: the reply's text is not UTF-8") from None
    if not body.strip():
        raise AdminError(f"{args.file} is empty: the reply needs a text")
    if args.days is not None and args.days < 1:
        raise AdminError("--days must be 1 or more")
    previous = active if active and active != SCRIPT else None
    if active == SCRIPT:  # on again: keep the first previous script
        old = scripts.get_script(domain, box, SCRIPT)
        previous = next((ln[len(PREVIOUS):].strip() for ln in old.splitlines()
                         if ln.startswith(PREVIOUS)), None)
    text = script_text(body, args.subject, args.days, args.from_, previous)
    try:
        parse(text)
    except SieveSyntaxError as e:
        raise AdminError(f"the vacation script does not parse: {e}") from None
    scripts.put_script(domain, box, SCRIPT, text)
    scripts.set_active(domain, box, SCRIPT)
    note = f" (\"{previous}\" was active: `vacation ... off` restores it)" if previous else ""
    print(f"{box}@{domain}: out-of-office on{note}", file=out)
