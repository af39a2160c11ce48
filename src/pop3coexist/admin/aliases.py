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
list, and no ``owner-`` name (``owner-LIST`` is each list's bounce address). The verbs are
operations (ops/aliases.py); this module holds their argument parser.
"""

from __future__ import annotations

from typing import Any

from pop3coexist.interfaces import SENDERS_CHOICES


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
