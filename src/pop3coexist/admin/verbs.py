"""The command's face of the operations (ops/): parsed arguments -> an operation's name and
parameters, and an operation's result -> the lines the command prints.

The same two functions serve a local run (``ops.registry.run`` over this machine's state) and
a remote one (``pop3coexist-admin --server URL``: the admin API of another server, with
admin/remote.py), so both print the same lines and exit with the same codes.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pop3coexist.errors import AdminError

PROG = "pop3coexist-admin"

#: the nouns whose verbs are operations (the others, check-config, backup, dkim, ... need the
#: local state or files and run only here)
NOUNS = frozenset({"domain", "mailbox", "stat", "queue", "quarantine", "alias", "list",
                   "nodes"})


def call_for(args: argparse.Namespace) -> tuple[str, dict[str, Any], bool] | None:
    """``(operation name, parameters, needs a password)`` for the verb ``args`` names, or
    None when it is not an operation (``mailbox scram-keys``, ``check-config``, ...)."""
    noun, verb = args.noun, getattr(args, "verb", None)
    if noun not in NOUNS:
        return None
    if noun in ("stat", "nodes"):
        return noun, ({"domain": args.domain} if noun == "stat" else {}), False
    if noun == "domain":
        params: dict[str, Any] = {} if verb == "list" else {"name": args.name}
        if verb == "remove":
            params["yes"] = args.yes
        return f"domain.{verb}", params, False
    if noun == "mailbox":
        if verb == "scram-keys":
            return None
        if verb == "list":
            return "mailbox.list", {"domain": args.domain}, False
        params = {"address": args.address}
        if verb == "remove":
            params["yes"] = args.yes
        if verb == "quota":
            params["size"] = args.size
        return f"mailbox.{verb}", params, verb in ("add", "passwd")
    if noun == "queue":
        if verb == "delete":
            return "queue.delete", {"id": args.id, "bounce": args.bounce}, False
        return f"queue.{verb}", {}, False
    if noun == "quarantine":
        return f"quarantine.{verb}", ({} if verb == "list" else {"id": args.id}), False
    if noun == "alias":
        if verb == "list":
            return "alias.list", {"domain": args.domain}, False
        params = {"address": args.address}
        if verb == "add" or args.target is not None:
            params["target"] = args.target
        return f"alias.{verb}", params, False
    # list
    if verb == "show":
        return "list.show", {"name": args.name}, False
    if verb == "member":
        return f"list.member.{args.member_verb}", {"list": args.list,
                                                   "members": list(args.members)}, False
    params = {"list": args.list}
    if verb in ("add", "set"):
        params.update(senders=args.senders, owner=args.owner)
    return f"list.{verb}", params, False


def read_password(from_stdin: bool) -> str:
    """One line of standard input (``--password-stdin``) or a prompt asked twice; AdminError
    when there is no terminal, the two differ, or the password is empty."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        if not sys.stdin.isatty():
            raise AdminError("no terminal to prompt for the password: use --password-stdin")
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Password again: ")
        if password != again:
            raise AdminError("the passwords do not match")
    if not password:
        raise AdminError("empty passwords are not allowed")
    return password


def _human_time(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def show(name: str, result: dict, out: TextIO, err: TextIO | None = None) -> None:
    """Print ``result`` of operation ``name`` as the command always has: a change's messages
    on ``out`` and its warnings on ``err`` (standard error); a listing as a table."""
    err = err or sys.stderr

    def say(text: str) -> None:
        print(text, file=out)

    if name == "nodes":
        from pop3coexist.admin.nodes import format_nodes

        format_nodes(result["nodes"], out)
        return
    printer = _PRINTERS.get(name)
    if printer is not None:
        printer(result, say)
        return
    for line in result.get("messages", []):
        say(line)
    for warning in result.get("warnings", []):
        print(f"{PROG}: warning: {warning}", file=err)


def _domains(result: dict, say: Callable[[str], None]) -> None:
    for d in result["domains"]:
        say(f"{d['domain']}\t{d['mailboxes']} mailboxes{' (locked)' if d['locked'] else ''}")


def _mailboxes(result: dict, say: Callable[[str], None]) -> None:
    for m in result["mailboxes"]:
        say(f"{m['address']}{' (locked)' if m['locked'] else ''}")


def _stat(result: dict, say: Callable[[str], None]) -> None:
    say(f"{'mailbox':40} {'messages':>8} {'bytes':>12} {'locked':>6}  quota")
    for m in result["mailboxes"]:
        quota, size = m["quota"], m["bytes"]
        use = "none" if quota is None else f"{size}/{quota} ({100 * size // max(quota, 1)}%)"
        locked = "yes" if m["locked"] else "no"
        say(f"{m['address']:40} {m['messages']:8} {size:12} {locked:>6}  {use}")
    total = result["total"]
    say(f"{'total':40} {total['messages']:8} {total['bytes']:12}")


def _queue(result: dict, say: Callable[[str], None]) -> None:
    if not result["messages"]:
        say("queue is empty")
        return
    for e in result["messages"]:
        say(f"{e['id']}  age {e['age']}s  from <{e['sender']}>")
        for r in e["recipients"]:
            nxt = r.get("next_attempt")
            when = f"  next {_human_time(nxt)}" if nxt else ""
            reply = f"  last: {r['last_reply']}" if r.get("last_reply") else ""
            say(f"    {r['address']}  {r['state']}{when}{reply}")


def _quarantine(result: dict, say: Callable[[str], None]) -> None:
    if not result["messages"]:
        say("quarantine is empty")
        return
    for e in result["messages"]:
        say(f"{e['id']}  age {e['age']}s  {e['size']} octets  by {e['milter']}: {e['reason']}")
        say(f"    from <{e['sender']}>  client {e['client']}")
        for r in e["recipients"]:
            say(f"    to <{r}>")


def _aliases(result: dict, say: Callable[[str], None]) -> None:
    for a in result["aliases"]:
        say(f"{a['address']}\t{', '.join(a['targets'])}")


def _lists(result: dict, say: Callable[[str], None]) -> None:
    one = result.get("list")
    if one is not None:
        say(f"list {one['address']}")
        say(f"senders: {one['senders']}")
        say(f"owner: {one['owner'] or 'the postmaster'} (bounces to {one['bounces']})")
        say(f"members: {len(one['members'])}")
        for member in one["members"]:
            say(f"  {member}")
        return
    for li in result["lists"]:
        say(f"{li['address']}\t{li['members']} members\tsenders {li['senders']}")


_PRINTERS: dict[str, Callable[[dict, Callable[[str], None]], None]] = {
    "domain.list": _domains, "mailbox.list": _mailboxes, "stat": _stat,
    "queue.list": _queue, "quarantine.list": _quarantine, "alias.list": _aliases,
    "list.show": _lists,
}
