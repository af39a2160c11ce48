"""The ``pop3coexist-admin`` command (README "Administration").

Works on the same state the running server uses (the mailroot, the password file, the queue),
so changes take effect without a restart. Exit codes: 0 success, 1 failure (one clear line on
stderr), 2 usage error. Passwords are never taken from argv: a prompt or --password-stdin.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pop3coexist.admin.blocking import wait
from pop3coexist.admin.verbs import read_password as _read_password
from pop3coexist.config import Config, load_config, locate
from pop3coexist.errors import AdminError, AuthUnavailable, ConfigError, StoreError

PROG = "pop3coexist-admin"
DEFAULT_CONFIG = "etc/pop3coexist.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: usage error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Administer pop3coexist domains, mailboxes and the queue.")
    p.add_argument("-c", "--config", default=None,
                   help=f"config file (default: $POP3COEXIST_CONFIG or {DEFAULT_CONFIG})")
    remote = p.add_argument_group("another server's admin API (README \"Admin console\")")
    remote.add_argument("--server", default=None, metavar="URL",
                        help="run the verb on the server at URL (https://host:port/)")
    remote.add_argument("--token-file", default=None, metavar="FILE",
                        help="its API token (default: $POP3COEXIST_ADMIN_TOKEN)")
    remote.add_argument("--ca", default=None, metavar="FILE", help="CA certificates (PEM) to "
                        "verify the server with (default: the system's)")
    remote.add_argument("--cert", default=None, metavar="FILE",
                        help="a client certificate (PEM) instead of a token")
    remote.add_argument("--key", default=None, metavar="FILE",
                        help="the client certificate's private key (default: in --cert)")
    top = p.add_subparsers(dest="noun", required=True, parser_class=_Parser)

    d = top.add_parser("domain", help="mail domains").add_subparsers(dest="verb", required=True)
    for verb in ("add", "lock", "unlock"):
        d.add_parser(verb).add_argument("name")
    rm = d.add_parser("remove")
    rm.add_argument("name")
    rm.add_argument("--yes", action="store_true", help="really delete the domain and its mail")
    d.add_parser("list")

    m = top.add_parser("mailbox", help="mailboxes").add_subparsers(dest="verb", required=True)
    add = m.add_parser("add")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true")
    rm = m.add_parser("remove")
    rm.add_argument("address")
    rm.add_argument("--yes", action="store_true", help="really delete the mailbox and its mail")
    ls = m.add_parser("list")
    ls.add_argument("domain", nargs="?")
    for verb in ("lock", "unlock"):
        m.add_parser(verb).add_argument("address")
    pw = m.add_parser("passwd")
    pw.add_argument("address")
    pw.add_argument("--password-stdin", action="store_true")
    sk = m.add_parser("scram-keys", help="SCRAM-SHA-256 keys from stored secrets (admin/scram.py)")
    sk.add_argument("address", nargs="?")
    q = m.add_parser("quota")
    q.add_argument("address")
    q.add_argument("size", help='bytes, "50MB", or none')

    st = top.add_parser("stat", help="mailboxes, messages, bytes, locks, quota use")
    st.add_argument("domain", nargs="?")

    qu = top.add_parser("queue", help="the outbound queue").add_subparsers(dest="verb", required=True)
    qu.add_parser("list")
    qu.add_parser("flush")
    qd = qu.add_parser("delete")
    qd.add_argument("id")
    qd.add_argument("--bounce", action="store_true", help="send a failure report to the sender")

    qq = top.add_parser("quarantine", help="messages a milter held (ops/queue.py)")
    qv = qq.add_subparsers(dest="verb", required=True)
    qv.add_parser("list")
    for verb in ("release", "delete"):
        qv.add_parser(verb).add_argument("id")

    top.add_parser("nodes", help="the nodes sharing state_dir (admin/nodes.py)")
    from pop3coexist.admin.accounts import register as register_accounts

    register_accounts(top)  # admin add|remove|list|passwd, admin token add|remove|list

    cc = top.add_parser("check-config", help="validate the config and the state it names")
    cc.add_argument("--peer", default=None, help="the other side's config (coexistence checks)")

    from pop3coexist.admin.aliases import register as register_aliases

    register_aliases(top)  # alias ..., list ... (admin/aliases.py)

    po = top.add_parser("policy", help="gateway recipient policies (admin/policy.py)")
    pa = po.add_subparsers(dest="verb", required=True).add_parser(
        "apply", help="stamp the policies' proxy addresses in the directory")
    pa.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")

    # -- backup, restore, import (admin/backup.py, admin/winpop.py)
    bk = top.add_parser("backup", help="an online backup of the state (admin/backup.py)")
    bk.add_argument("file", help="a new archive file, or - for standard output")
    bk.add_argument("--since", default=None,
                    help="incremental: files changed since a time or an earlier backup FILE")
    bk.add_argument("--format", choices=("zstd", "tar"), default=None,
                    help="zstd (default) or plain tar (the default for a name ending .tar)")
    rs = top.add_parser("restore", help="restore a backup (into an empty or a running state)")
    rs.add_argument("file", help="the archive, or - for standard input")
    rs.add_argument("--verify", action="store_true", help="check every checksum; restore nothing")
    im = top.add_parser("import", help="import mail from another server").add_subparsers(
        dest="verb", required=True)
    wp = im.add_parser("winpop", help="a Windows Server 2003 POP3 store (admin/winpop.py)")
    wp.add_argument("mailroot", help="a copy of the store: MAILROOT/<domain>/P3_<mailbox>.mbx/")
    wp.add_argument("--dry-run", action="store_true", help="show what would be copied; write nothing")
    wp.add_argument("--passwords", default=None, metavar="FILE",
                    help="passwords of new mailboxes: address<TAB>password lines")
    wp.add_argument("--mailbox", default=None, metavar="ADDRESS", help="import this mailbox only")
    wp.add_argument("--password-stdin", action="store_true",
                    help="the password of the --mailbox, on standard input")
    dk = top.add_parser("dkim", help="DKIM signing keys (admin/dkim.py)").add_subparsers(
        dest="verb", required=True)
    kg = dk.add_parser("keygen", help="write a key and print the DNS record to publish")
    kg.add_argument("domain")
    kg.add_argument("selector")
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    from pop3coexist.admin import vacation  # out-of-office (admin/vacation.py)

    vacation.add_parser(top)
    return p


# --------------------------------------------------------------------------- helpers


def _fail(message: str) -> NoReturn:
    raise AdminError(message)


class Admin:
    """The local verbs that are not operations (check-config, scram-keys, vacation, ...),
    over the state one config names; the operations (ops/) get ``context``."""

    def __init__(self, config: Config, out: Any = None, actor: str = "?") -> None:
        self.config = config
        self.out = out or sys.stdout
        from pop3coexist.ops.context import Context
        from pop3coexist.smtp.bounce import delete_with_report

        self.context = Context(config, bounce=delete_with_report, actor=actor, via="cli")
        self.store = self.context.store

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def _pwfile(self) -> Any:
        return self.context.password_file()

    # -- check-config

    def check_config(self, peer: str | None) -> None:
        """Check the config and the files it names (the TLS pair is loaded and matched); print
        each warning (``Config.warnings``, an expired certificate) to stderr and "OK"."""
        from pop3coexist.tls import load_tls_files, server_options

        warnings = list(self.config.warnings)
        if not (self.config.tls.self_signed and self.config.tls.certificate
                and not self.config.tls.certificate.exists()):
            loaded = load_tls_files(self.config.tls)
            server_options(self.config.tls)
            warnings.extend(loaded.warnings if loaded else ())
        from pop3coexist.service import check_dkim_keys

        check_dkim_keys(self.config)  # [[dkim]]: each key file reads and signs
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        if self.config.auth.method == "passwordfile" and self.config.server.password_file.exists():
            try:
                self._pwfile().check()
            except StoreError as e:
                _fail(f"password file {self.config.server.password_file}: {e}")
        from pop3coexist.policy.gateway import check_connectors, check_pair

        problem = check_connectors(self.config)
        if problem:
            _fail(problem)
        if peer is not None:

            problem = check_pair(self.config, load_config(peer))
            if problem:
                _fail(problem)
        from pop3coexist.policy.relay import describe_roles

        for line in describe_roles(self.config, self.store.list_domains()):
            self.say(line)
        for warning in self._role_login_warnings():
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        self.say(f"{self.config.path}: OK")

    def _role_login_warnings(self) -> list[str]:
        """With ``auth.method = "directory"`` or ``"local"``, a postmaster (or abuse) target in
        a domain of this server that no account owns can receive but never be read: nobody
        can log in to it (the password lives in the directory or the system). One warning
        line for each such target; a directory that cannot be reached is a warning too."""
        method = self.config.auth.method
        if method not in ("directory", "local"):
            return []
        from pop3coexist.identity.factory import make_checker
        from pop3coexist.policy.relay import RoleAddresses, primary_domain

        domains = self.store.list_domains()
        here = {d.lower() for d in (*self.config.domains.local, *domains)}
        roles = RoleAddresses.from_config(self.config)
        where = "directory" if method == "directory" else "system"
        out: list[str] = []
        checker = None
        for name, target in (("postmaster", roles.postmaster_for(primary_domain(self.config,
                                                                                 domains))),
                             ("abuse", roles.abuse)):
            if target is None or target.domain not in here:
                continue
            address = f"{target.local}@{target.domain}"
            try:
                checker = checker or make_checker(self.config, self.store)
                found = wait(checker.resolve_recipient(address))
            except AuthUnavailable as e:
                out.append(f"cannot check that {name} mail (<{address}>) can be read: the "
                           f"{where} cannot be reached ({e})")
                continue
            if found is None:
                out.append(
                    f"{name} mail lands in <{address}>, which no {where} account owns: it is "
                    f"kept, but nobody can log in to read it (auth.method = \"{method}\"). "
                    f"Point [domains] {name} at an account that exists, for example "
                    f"{name} = \"admin@{target.domain}\"")
            elif found.lower() != address.lower():
                out.append(f"{name} mail lands in <{address}>, an address of the account "
                           f"whose mailbox is <{found}>: set [domains] {name} = \"{found}\" "
                           f"so that it lands where that account reads")
        return out


def _unix_user() -> str:
    """Who runs the command, for the audit log: the real user (``sudo``: the one who asked)."""
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo}(sudo)" if uid == 0 and sudo else name


def run(argv: Sequence[str], out: Any = None) -> int:
    """Parse and run one command; return the exit code (errors go to stderr)."""
    args = build_parser().parse_args(list(argv))
    if args.server:  # the same verbs through another server's admin API (admin/remote.py)
        from pop3coexist.admin.remote import run_remote

        return run_remote(args, out or sys.stdout)
    path = args.config or os.environ.get("POP3COEXIST_CONFIG") or DEFAULT_CONFIG
    owner = None
    try:
        config = load_config(path)
        if args.noun in ("backup", "restore", "import"):  # they read or write state themselves
            _run_state_verb(config, args, out)
            return 0
        from pop3coexist.admin.owner import StateOwner

        # run as root: act as the state's owner, so the server can read what is written
        owner = StateOwner(config.server.state_dir)
        owner.enter()
        if args.noun == "check-config":
            from pop3coexist.startup import check_state_dir

            check_state_dir(config.server.state_dir, config.server.local_dir)  # before Admin() writes
            Admin(config, out).check_config(args.peer)
            return 0
        if args.noun == "dkim":
            from pop3coexist.admin.dkim import keygen

            keygen(config, args.domain, args.selector, args.bits, out or sys.stdout)
            return 0
        if args.noun == "admin":  # admin accounts and API tokens (admin/accounts.py)
            from pop3coexist.admin.accounts import run_verb as run_admin_verb

            run_admin_verb(config, args, out or sys.stdout, _unix_user(), _read_password)
            return 0
        admin = Admin(config, out, _unix_user())
        from pop3coexist.admin.verbs import call_for, show

        call = call_for(args)
        if call is not None:  # an operation (ops/): the same code the admin API runs
            from pop3coexist.ops.registry import run as run_operation

            name, params, needs_password = call
            raw: dict[str, Any] = {}
            if needs_password and (args.password_stdin or config.auth.method == "passwordfile"):
                raw["password"] = lambda: _read_password(args.password_stdin)
            show(name, run_operation(admin.context, name, params, raw=raw), admin.out)
            return 0
        noun = args.noun
        if noun == "mailbox":  # scram-keys
            from pop3coexist.admin.scram import run_scram_keys

            run_scram_keys(config, admin._pwfile(), args.address, admin.say)
        elif noun == "policy":
            from pop3coexist.admin.policy import run_apply

            run_apply(config, args.dry_run, admin.out)
        elif noun == "vacation":
            from pop3coexist.admin import vacation

            vacation.run(config, admin.store, args, admin.out)
        return 0
    except (AdminError, ConfigError, StoreError, ValueError) as e:
        from pop3coexist.ops.context import error_line

        if isinstance(e, ConfigError):  # a check after parsing: name the config file and line
            text = locate(os.path.abspath(path), str(e) or "ConfigError").splitlines()[0]
        else:
            text = error_line(e)
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    finally:
        if owner is not None:
            owner.leave()


def _run_state_verb(config: Config, args: argparse.Namespace, out: Any) -> None:
    """backup, restore and import winpop (admin/backup.py, admin/winpop.py)."""
    if args.noun == "backup":
        from pop3coexist.admin.backup import backup

        backup(config, args.file, since=args.since,
               compress=None if args.format is None else args.format == "zstd", out=out)
    elif args.noun == "restore":
        from pop3coexist.admin.backup import restore, verify

        if args.verify:
            verify(args.file, out)
        else:
            restore(config, args.file, out)
    else:
        from pop3coexist.admin.winpop import import_winpop

        password = _read_password(True) if args.password_stdin else None
        import_winpop(config, args.mailroot, dry_run=args.dry_run, password=password,
                      passwords_file=args.passwords, only=args.mailbox, out=out)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
