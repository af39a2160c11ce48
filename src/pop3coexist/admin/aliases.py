"""``pop3coexist-admin alias`` and ``list``: the aliases and distribution lists kept beside the
mailboxes (store/aliases.py; README "Aliases and lists").

::

    alias add ADDRESS TARGET | remove ADDRESS [TARGET] | list [DOMAIN]
    list  add LIST@DOMAIN [--senders anyone|members|authenticated] [--owner ADDRESS]
          remove LIST@DOMAIN | show [LIST@DOMAIN|DOMAIN]
          set LIST@DOMAIN [--senders ...] [--owner ADDRESS|none]
          member add LIST@DOMAIN MEMBER... | member remove LIST@DOMAIN MEMBER...

The name of an alias or list must be free: no mailbox, no account address (a password file
entry, a local account, a directory user's ``mail`` or ``proxyAddresses``), no other alias or
list, and no ``owner-`` name (``owner-LIST`` is each list's bounce address). Errors are
``AdminError`` (one line on stderr, exit 1, from admin/cli.py).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from pop3coexist.admin.blocking import wait
from pop3coexist.errors import AdminError, AuthUnavailable
from pop3coexist.interfaces import SENDERS_CHOICES
from pop3coexist.store.aliases import OWNER_PREFIX, AliasFiles, normalise_target, split


def register(top: Any) -> None:
    """Add the ``alias`` and ``list`` nouns to the admin parser's sub-parsers ``top``."""
    al = top.add_parser("alias", help="aliases (admin/aliases.py)").add_subparsers(
        dest="verb", required=True)
    add = al.add_parser("add", help="mail for ADDRESS also goes to TARGET")
    add.add_argument("address")
    add.add_argument("target", help="a mailbox, a list or an outside address")
    rm = al.add_parser("remove", help="remove one target, or the whole alias")
    rm.add_argument("address")
    rm.add_argument("target", nargs="?")
    al.add_parser("list").add_argument("domain", nargs="?")

    li = top.add_parser("list", help="distribution lists (admin/aliases.py)").add_subparsers(
        dest="verb", required=True)
    add = li.add_parser("add")
    add.add_argument("list")
    add.add_argument("--senders", choices=SENDERS_CHOICES, default="anyone",
                     help="who may send to the list (default: anyone)")
    add.add_argument("--owner", default=None, help="where owner-LIST@DOMAIN mail (bounces) goes")
    li.add_parser("remove").add_argument("list")
    li.add_parser("show").add_argument("name", nargs="?", help="LIST@DOMAIN or DOMAIN")
    st = li.add_parser("set")
    st.add_argument("list")
    st.add_argument("--senders", choices=SENDERS_CHOICES, default=None)
    st.add_argument("--owner", default=None, help='an address, or "none" for the postmaster')
    member = li.add_parser("member").add_subparsers(dest="member_verb", required=True)
    for verb in ("add", "remove"):
        m = member.add_parser(verb)
        m.add_argument("list")
        m.add_argument("members", nargs="+", metavar="MEMBER")


def _fail(message: str) -> NoReturn:
    raise AdminError(message)


def _split(text: str) -> tuple[str, str]:
    try:
        return split(text)
    except ValueError as e:
        _fail(str(e))


def _target(text: str) -> str:
    try:
        return normalise_target(text)
    except ValueError as e:
        _fail(str(e))


class AliasAdmin:
    """The verbs over one Admin (admin/cli.py: its store, config and output)."""

    def __init__(self, admin: Any) -> None:
        self.admin = admin
        self.store = admin.store
        self.files = AliasFiles(self.store.root)

    def say(self, text: str) -> None:
        self.admin.say(text)

    def _need_domain(self, domain: str) -> None:
        if not self.store.domain_exists(domain):
            _fail(f"domain {domain} does not exist (pop3coexist-admin domain add {domain})")

    def _need_free(self, local: str, domain: str) -> None:
        """The name is free for a new alias or list (module docstring)."""
        address = f"{local}@{domain}"
        if local.startswith(OWNER_PREFIX):
            _fail(f"{address}: names starting with {OWNER_PREFIX!r} are the lists' bounce "
                  "addresses")
        if local == "postmaster":
            _fail(f"{address}: postmaster mail is set with [domains] postmaster in the config")
        if self.store.mailbox_exists(domain, local):
            _fail(f"{address} is a mailbox")
        data = self.files.read(domain)
        if local in data["aliases"]:
            _fail(f"{address} is already an alias")
        if local in data["lists"]:
            _fail(f"{address} is already a list")
        from pop3coexist.identity.factory import make_checker

        checker = make_checker(self.admin.config, self.store)
        try:
            owner = wait(checker.resolve_recipient(address))
        except AuthUnavailable as e:
            _fail(f"cannot reach the account source to check {address}: {e}")
        finally:
            from pop3coexist.interfaces import IClosable

            if IClosable.providedBy(checker):
                checker.close()
        if owner is not None:
            _fail(f"{address} belongs to the account whose mailbox is {owner}")

    # -- aliases

    def alias_add(self, address: str, target: str) -> None:
        local, domain = _split(address)
        self._need_domain(domain)
        key, goal = f"{local}@{domain}", _target(target)
        if goal == key:
            _fail(f"{key} cannot be an alias of itself")
        data = self.files.read(domain)
        if goal in data["aliases"].get(local, []):
            _fail(f"{key} already goes to {goal}")
        if local not in data["aliases"]:
            self._need_free(local, domain)
        with self.files.changing(domain) as data:
            targets = data["aliases"].setdefault(local, [])
            if goal not in targets:
                targets.append(goal)
        self.say(f"alias {key} -> {goal} added")

    def alias_remove(self, address: str, target: str | None) -> None:
        local, domain = _split(address)
        self._need_domain(domain)
        key = f"{local}@{domain}"
        goal = _target(target) if target else None
        with self.files.changing(domain) as data:
            targets = data["aliases"].get(local)
            if targets is None:
                _fail(f"{key} is not an alias")
            if goal is None:
                del data["aliases"][local]
            elif goal not in targets:
                _fail(f"{key} does not go to {goal}")
            else:
                targets.remove(goal)
                if not targets:
                    del data["aliases"][local]
        self.say(f"alias {key} -> {goal} removed" if goal else f"alias {key} removed")

    def alias_list(self, domain: str | None) -> None:
        for d in self._domains(domain):
            for local, targets in sorted(self.files.read(d)["aliases"].items()):
                self.say(f"{local}@{d}\t{', '.join(targets)}")

    def _domains(self, domain: str | None) -> list[str]:
        if domain:
            from pop3coexist.address import AddressError, normalise_domain

            try:
                name = normalise_domain(domain)
            except AddressError as e:
                _fail(str(e))
            self._need_domain(name)
            return [name]
        return self.store.list_domains()

    # -- lists

    def list_add(self, name: str, senders: str, owner: str | None) -> None:
        local, domain = _split(name)
        self._need_domain(domain)
        self._need_free(local, domain)
        owner_key = _target(owner) if owner else None
        with self.files.changing(domain) as data:
            data["lists"][local] = {"members": [], "senders": senders, "owner": owner_key}
        self.say(f"list {local}@{domain} added (senders: {senders}; bounces to "
                 f"{OWNER_PREFIX}{local}@{domain} -> {owner_key or 'the postmaster'})")

    def _list(self, name: str) -> tuple[str, str]:
        local, domain = _split(name)
        self._need_domain(domain)
        if local not in self.files.read(domain)["lists"]:
            _fail(f"{local}@{domain} is not a list (pop3coexist-admin list add {local}@{domain})")
        return local, domain

    def list_remove(self, name: str) -> None:
        local, domain = self._list(name)
        with self.files.changing(domain) as data:
            data["lists"].pop(local, None)
        self.say(f"list {local}@{domain} removed")

    def list_set(self, name: str, senders: str | None, owner: str | None) -> None:
        if senders is None and owner is None:
            _fail("nothing to set: give --senders and/or --owner")
        local, domain = self._list(name)
        owner_key = None if owner is None or owner.lower() == "none" else _target(owner)
        with self.files.changing(domain) as data:
            entry = data["lists"][local]
            if senders is not None:
                entry["senders"] = senders
            if owner is not None:
                entry["owner"] = owner_key
        entry = self.files.read(domain)["lists"][local]
        self.say(f"list {local}@{domain}: senders {entry['senders']}, owner "
                 f"{entry['owner'] or 'the postmaster'}")

    def member_change(self, name: str, members: list[str], add: bool) -> None:
        local, domain = self._list(name)
        wanted = [_target(m) for m in members]
        with self.files.changing(domain) as data:
            current = data["lists"][local]["members"]
            for member in wanted:
                if add:
                    if member in current:
                        _fail(f"{member} is already a member of {local}@{domain}")
                    current.append(member)
                else:
                    if member not in current:
                        _fail(f"{member} is not a member of {local}@{domain}")
                    current.remove(member)
        verb = "added to" if add else "removed from"
        self.say(f"{len(wanted)} member(s) {verb} {local}@{domain}")

    def list_show(self, name: str | None) -> None:
        if name and "@" in name:
            local, domain = self._list(name)
            entry = self.files.read(domain)["lists"][local]
            self.say(f"list {local}@{domain}")
            self.say(f"senders: {entry['senders']}")
            self.say(f"owner: {entry['owner'] or 'the postmaster'} "
                     f"(bounces to {OWNER_PREFIX}{local}@{domain})")
            self.say(f"members: {len(entry['members'])}")
            for member in entry["members"]:
                self.say(f"  {member}")
            return
        for d in self._domains(name):
            for local, entry in sorted(self.files.read(d)["lists"].items()):
                self.say(f"{local}@{d}\t{len(entry['members'])} members\tsenders "
                         f"{entry['senders']}")


def run_verb(admin: Any, args: argparse.Namespace) -> None:
    """Run the ``alias`` or ``list`` verb ``args`` names, over ``admin`` (admin/cli.py)."""
    a = AliasAdmin(admin)
    if args.noun == "alias":
        if args.verb == "add":
            a.alias_add(args.address, args.target)
        elif args.verb == "remove":
            a.alias_remove(args.address, args.target)
        else:
            a.alias_list(args.domain)
        return
    if args.verb == "add":
        a.list_add(args.list, args.senders, args.owner)
    elif args.verb == "remove":
        a.list_remove(args.list)
    elif args.verb == "show":
        a.list_show(args.name)
    elif args.verb == "set":
        a.list_set(args.list, args.senders, args.owner)
    else:
        a.member_change(args.list, args.members, args.member_verb == "add")
