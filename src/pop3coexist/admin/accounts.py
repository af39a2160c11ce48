"""``pop3coexist-admin admin ...``: administrator accounts (the console's log-in) and the
admin API's tokens (identity/adminaccounts.py; README "Admin console")::

    admin add NAME [--password-stdin] | passwd NAME [--password-stdin] | remove NAME | list
    admin token add NAME | token remove ID|NAME | token list

``token add`` prints the new token once, on standard output; only its hash is kept. Every
change is written to the audit log (ops/context.py) with the Unix user who made it. These
verbs work on this machine's files only (not through ``--server``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pop3coexist.config import Config
from pop3coexist.errors import AdminError


def register(top: Any) -> None:
    """Add the ``admin`` noun to the command's sub-parsers ``top``."""
    ad = top.add_parser("admin", help="console administrators and API tokens "
                        "(admin/accounts.py)").add_subparsers(dest="verb", required=True)
    for verb in ("add", "passwd"):
        p = ad.add_parser(verb)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true")
    ad.add_parser("remove").add_argument("name")
    ad.add_parser("list")
    tk = ad.add_parser("token", help="admin API tokens").add_subparsers(dest="token_verb",
                                                                        required=True)
    tk.add_parser("add", help="a new token for NAME, printed once").add_argument("name")
    tk.add_parser("remove", help="a token by id, or all of an administrator's").add_argument(
        "which", metavar="ID|NAME")
    tk.add_parser("list")


def run_verb(config: Config, args: argparse.Namespace, out: TextIO, actor: str,
             read_password: Callable[[bool], str]) -> None:
    """Carry out one ``admin`` verb; AdminError (one line) on failure."""
    from pop3coexist.identity.adminaccounts import AdminAccounts, AdminTokens, check_name
    from pop3coexist.ops.context import Context, error_line

    web = config.admin_web
    state = config.server.state_dir
    ctx = Context(config, actor=actor, via="cli")
    if args.verb == "token":
        tokens = AdminTokens(web.tokens_path(state))
        if args.token_verb == "list":
            for e in tokens.entries():
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created"] or 0))
                print(f"{e['id']}  {e['admin']}  made {made}", file=out)
            return
        action, target = f"admin.token.{args.token_verb}", (
            args.name if args.token_verb == "add" else args.which)
    else:
        accounts = AdminAccounts(web.accounts_path(state))
        if args.verb == "list":
            for name in accounts.names():
                print(name, file=out)
            return
        action, target = f"admin.{args.verb}", args.name
    try:
        if action == "admin.token.add":
            # a token may belong to a name without a console password (a script's name)
            ident, token = tokens.add(target)
            print(token, file=out)
            print(f"token {ident} for {target} added: it is shown only now", file=sys.stderr)
        elif action == "admin.token.remove":
            gone = tokens.remove(target)
            print(f"token(s) {', '.join(gone)} removed", file=out)
        elif action == "admin.remove":
            accounts.remove(target)
            print(f"administrator {target} removed", file=out)
        else:
            check_name(target)
            exists = target in accounts.names()
            if args.verb == "add" and exists:
                raise AdminError(f"administrator {target} already exists")
            if args.verb == "passwd" and not exists:
                raise AdminError(f"no administrator {target}")
            accounts.set_password(target, read_password(args.password_stdin),
                                  create=args.verb == "add")
            print(f"administrator {target} {'added' if args.verb == 'add' else 'changed'}",
                  file=out)
    except AdminError as e:
        ctx.audit(action, target, f"error: {error_line(e)}")
        raise
    ctx.audit(action, target)
