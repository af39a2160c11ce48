"""``pop3coexist-admin --server URL VERB ...``: the operation verbs run on another server
through its admin API (ops/client.py), printed as a local run prints them (admin/verbs.py),
with the same exit codes: 0, or 1 with one line on stderr.

The credential: ``--token-file FILE`` or ``$POP3COEXIST_ADMIN_TOKEN`` (never an argument: argv
is visible to every user of the machine), or a client certificate (``--cert``, ``--key``).
``mailbox add`` asks the server how its accounts are kept and reads a password (prompt or
``--password-stdin``) only when it keeps passwords itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from pop3coexist.admin.verbs import PROG, call_for, read_password, show
from pop3coexist.errors import AdminError

TOKEN_ENV = "POP3COEXIST_ADMIN_TOKEN"


def run_remote(args: argparse.Namespace, out: TextIO) -> int:
    """Run the verb ``args`` names on ``args.server``; the exit code."""
    from pop3coexist.ops.client import ApiClient, read_token

    try:
        call = call_for(args)
        if call is None:
            raise AdminError(f"{args.noun} works on this machine's files only: run it there "
                             "(without --server)")
        token = read_token(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV)
        if not token and not args.cert:
            raise AdminError(f"no credential for {args.server}: give --token-file FILE, set "
                             f"{TOKEN_ENV}, or give --cert FILE")
        client = ApiClient(args.server, token=token or None, ca_file=args.ca,
                           certificate=args.cert, private_key=args.key)
        name, params, needs_password = call
        if needs_password:
            method = "passwordfile"
            if name == "mailbox.add":
                method = client.info().get("server", {}).get("auth_method", "passwordfile")
            if args.password_stdin or method == "passwordfile":
                params["password"] = read_password(args.password_stdin)
        show(name, client.call(name, params), out)
        return 0
    except AdminError as e:
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else 'failed'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
