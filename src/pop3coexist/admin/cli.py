"""The ``pop3coexist-admin`` command (README "Administration").

Works on the same state the running server uses (the mailroot, the password file, the queue),
so changes take effect without a restart. Exit codes: 0 success, 1 failure (one clear line on
stderr), 2 usage error. Passwords are never taken from argv: a prompt or --password-stdin.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from pop3coexist.address import AddressError, is_valid_mailbox_name, normalise_domain
from pop3coexist.admin.blocking import wait
from pop3coexist.config import Config, load_config, locate, parse_size
from pop3coexist.errors import AdminError, AuthUnavailable, ConfigError, NoSuchMailbox, StoreError

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

    qq = top.add_parser("quarantine", help="messages a milter held (admin/quarantine.py)")
    qv = qq.add_subparsers(dest="verb", required=True)
    qv.add_parser("list")
    for verb in ("release", "delete"):
        qv.add_parser(verb).add_argument("id")

    top.add_parser("nodes", help="the nodes sharing state_dir (admin/nodes.py)")

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


def _split_address(text: str) -> tuple[str, str]:
    """USER@DOMAIN -> (mailbox, domain), lower case, or AdminError."""
    if "@" not in text:
        _fail(f"{text!r} is not USER@DOMAIN")
    local, _, domain = text.rpartition("@")
    try:
        domain = normalise_domain(domain)
    except AddressError as e:
        _fail(f"{text!r}: {e}")
    local = local.lower()
    if not is_valid_mailbox_name(local):
        _fail(f"{text!r}: mailbox names are 1-64 characters of letters, digits and .!#$%&'*+=?^_`{{|}}~-")
    return local, domain


def _domain(text: str) -> str:
    try:
        return normalise_domain(text)
    except AddressError as e:
        _fail(str(e))


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        if not sys.stdin.isatty():
            _fail("no terminal to prompt for the password: use --password-stdin")
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Password again: ")
        if password != again:
            _fail("the passwords do not match")
    if not password:
        _fail("empty passwords are not allowed")
    return password


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


class Admin:
    """The verbs, over the store, the password file and the queue named by one config."""

    def __init__(self, config: Config, out: Any = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        from pop3coexist.store.maildir import MaildirStore

        self.store = MaildirStore(config.server.mailroot)
        # The domains the config names exist from the start, for the server and for us.
        for domain in config.domains.local:
            if not self.store.domain_exists(domain):
                self.store.add_domain(domain)
        from pop3coexist.policy.relay import role_mailboxes

        for domain, mailbox in role_mailboxes(config, config.domains.local):
            self.store.add_mailbox(domain, mailbox)  # as at start: postmaster can receive

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def _pwfile(self) -> Any:
        from pop3coexist.identity.factory import make_password_file

        return make_password_file(self.config)

    def _need_domain(self, domain: str) -> None:
        if not self.store.domain_exists(domain):
            _fail(f"domain {domain} does not exist (pop3coexist-admin domain add {domain})")

    # -- domains

    def domain_add(self, name: str) -> None:
        """Add a local domain. When it is the second one, warn on stderr (the exit code stays
        0) that bare-name log-ins end: a bare name (``ted``) logs in only while the server has
        exactly one local domain (README "Log-in names")."""
        domain = _domain(name)
        before = self.store.list_domains()
        if self.config.auth.method == "local":
            others = [d for d in before if d != domain]
            if others:
                _fail(f"auth.method \"local\" allows one mail domain only; {others[0]} exists")
        if not self.store.add_domain(domain):
            _fail(f"domain {domain} already exists")
        self.say(f"domain {domain} added")
        from pop3coexist.policy.relay import RoleAddresses, primary_domain, role_mailboxes

        domains = self.store.list_domains()
        for box_domain, mailbox in role_mailboxes(self.config, domains):
            if box_domain == domain and self.store.add_mailbox(box_domain, mailbox):
                self.say(f"mailbox {mailbox}@{domain} added (postmaster mail lands there)")
        roles = RoleAddresses.from_config(self.config)
        target = roles.postmaster_for(primary_domain(self.config, domains))
        if target is not None:
            self.say(f"mail for postmaster@{domain} lands in <{target}> unless a mailbox "
                      f"postmaster@{domain} exists (RFC 5321 section 4.5.1)")
        if len(before) == 1 and domain not in before:
            print(
                f"{PROG}: warning: the server now has two local domains, so bare-name log-ins "
                f"end: users must log in with their full address (ted@{before[0]}, not ted) for "
                "POP3 and SMTP AUTH; a bare name works only while there is exactly one local domain",
                file=sys.stderr,
            )

    def domain_remove(self, name: str, yes: bool) -> None:
        domain = _domain(name)
        if domain in self.config.domains.local:
            _fail(f"domain {domain} is named in [domains] local of {self.config.path}; remove it there first")
        self._need_domain(domain)
        if not yes:
            _fail(f"removing {domain} deletes all its mailboxes and mail: add --yes")
        if self.config.auth.method == "passwordfile":
            self._pwfile().remove_domain(domain)
        self.store.remove_domain(domain)
        self.say(f"domain {domain} removed")

    def domain_list(self) -> None:
        for domain in self.store.list_domains():
            flags = " (locked)" if self.store.is_domain_locked(domain) else ""
            self.say(f"{domain}\t{len(self.store.list_mailboxes(domain))} mailboxes{flags}")

    def domain_lock(self, name: str, locked: bool) -> None:
        domain = _domain(name)
        self._need_domain(domain)
        self.store.set_domain_locked(domain, locked)
        self.say(f"domain {domain} {'locked' if locked else 'unlocked'}")

    # -- mailboxes

    def mailbox_add(self, address: str, password_stdin: bool) -> None:
        local, domain = _split_address(address)
        self._need_domain(domain)
        if self.store.mailbox_exists(domain, local):
            _fail(f"mailbox {local}@{domain} already exists")
        method = self.config.auth.method
        if method == "passwordfile":
            password = _read_password(password_stdin)
            self._pwfile().set_password(f"{local}@{domain}", password)
        else:
            if password_stdin:
                _fail(f"with auth.method \"{method}\" the password lives in the "
                      f"{'directory' if method == 'directory' else 'system'}; drop --password-stdin")
            self._check_account(f"{local}@{domain}")
        self.store.add_mailbox(domain, local)
        self.say(f"mailbox {local}@{domain} added")

    def _check_account(self, address: str) -> None:
        from pop3coexist.identity.factory import make_checker

        checker = make_checker(self.config, self.store)
        try:
            found = wait(checker.resolve_recipient(address))
        except AuthUnavailable as e:
            _fail(f"cannot reach the account source: {e}")
        where = "directory" if self.config.auth.method == "directory" else "system accounts"
        if found is None:
            _fail(f"no account {address} in the {where}")
        if found.lower() != address.lower():
            _fail(f"{address} belongs to the account whose mailbox is {found}")

    def mailbox_remove(self, address: str, yes: bool) -> None:
        local, domain = _split_address(address)
        if not self.store.mailbox_exists(domain, local):
            _fail(f"mailbox {local}@{domain} does not exist")
        if not yes:
            _fail(f"removing {local}@{domain} deletes its mail: add --yes")
        # the log-in goes first: a failure half-way leaves mail that nobody can log in to,
        # never a log-in without its mail
        if self.config.auth.method == "passwordfile":
            pw = self._pwfile()
            if pw.exists(f"{local}@{domain}"):
                pw.remove(f"{local}@{domain}")
        self.store.remove_mailbox(domain, local)
        self.say(f"mailbox {local}@{domain} removed")

    def mailbox_list(self, domain: str | None) -> None:
        domains = [_domain(domain)] if domain else self.store.list_domains()
        for d in domains:
            self._need_domain(d)
            for mb in self.store.list_mailboxes(d):
                flags = " (locked)" if self.store.is_mailbox_locked(d, mb) else ""
                self.say(f"{mb}@{d}{flags}")

    def mailbox_lock(self, address: str, locked: bool) -> None:
        local, domain = _split_address(address)
        if not self.store.mailbox_exists(domain, local):
            _fail(f"mailbox {local}@{domain} does not exist")
        self.store.set_mailbox_locked(domain, local, locked)
        self.say(f"mailbox {local}@{domain} {'locked' if locked else 'unlocked'}")

    def mailbox_passwd(self, address: str, password_stdin: bool) -> None:
        local, domain = _split_address(address)
        method = self.config.auth.method
        if method != "passwordfile":
            where = "the directory" if method == "directory" else "the system (passwd)"
            _fail(f"with auth.method \"{method}\" the password of {local}@{domain} lives in {where}; change it there")
        if not self.store.mailbox_exists(domain, local):
            _fail(f"mailbox {local}@{domain} does not exist")
        password = _read_password(password_stdin)
        self._pwfile().set_password(f"{local}@{domain}", password)
        self.say(f"password of {local}@{domain} changed")

    def mailbox_quota(self, address: str, size: str) -> None:
        local, domain = _split_address(address)
        if not self.store.mailbox_exists(domain, local):
            _fail(f"mailbox {local}@{domain} does not exist")
        if size.lower() == "none":
            limit = None
        else:
            try:
                limit = parse_size(size)
            except ValueError as e:
                _fail(str(e))
        self.store.set_quota(domain, local, limit)
        self.say(f"quota of {local}@{domain}: {'none' if limit is None else limit}")

    # -- stat

    def stat(self, domain: str | None) -> None:
        domains = [_domain(domain)] if domain else self.store.list_domains()
        self.say(f"{'mailbox':40} {'messages':>8} {'bytes':>12} {'locked':>6}  quota")
        total_m = total_b = 0
        for d in domains:
            self._need_domain(d)
            for mb in self.store.list_mailboxes(d):
                messages, size = self.store.usage(d, mb)
                total_m += messages
                total_b += size
                quota = self.store.get_quota(d, mb)
                use = "none" if quota is None else f"{size}/{quota} ({100 * size // max(quota, 1)}%)"
                locked = "yes" if self.store.is_mailbox_locked(d, mb) else "no"
                self.say(f"{mb + '@' + d:40} {messages:8} {size:12} {locked:>6}  {use}")
        self.say(f"{'total':40} {total_m:8} {total_b:12}")

    # -- queue

    def _queue(self) -> Any:
        from pop3coexist.store.queue import FileQueue

        return FileQueue(self.config.server.queue_dir, self.config.server.hostname)

    def queue_list(self) -> None:
        entries = self._queue().entries()
        if not entries:
            self.say("queue is empty")
            return
        now = time.time()
        for e in entries:
            age = int(now - float(e.get("arrival", now)))
            self.say(f"{e['id']}  age {age}s  from <{e.get('sender', '')}>")
            for r in e.get("recipients", []):
                nxt = r.get("next_attempt")
                when = f"  next {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(nxt))}" if nxt else ""
                reply = f"  last: {r['last_reply']}" if r.get("last_reply") else ""
                self.say(f"    {r.get('address')}  {r.get('state')}{when}{reply}")

    def queue_flush(self) -> None:
        self._queue().request_flush()
        self.say("queue flush requested")

    def queue_delete(self, ident: str, bounce: bool) -> None:
        from pop3coexist.smtp.bounce import delete_with_report

        try:
            if bounce:
                delete_with_report(self._queue(), ident)
            else:
                self._queue().delete(ident)
        except KeyError:
            _fail(f"no message {ident} in the queue")
        self.say(f"message {ident} deleted{' (report sent)' if bounce else ''}")

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


def run(argv: Sequence[str], out: Any = None) -> int:
    """Parse and run one command; return the exit code (errors go to stderr)."""
    args = build_parser().parse_args(list(argv))
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
        admin = Admin(config, out)
        noun, verb = args.noun, getattr(args, "verb", None)
        if noun == "domain":
            if verb == "add":
                admin.domain_add(args.name)
            elif verb == "remove":
                admin.domain_remove(args.name, args.yes)
            elif verb == "list":
                admin.domain_list()
            else:
                admin.domain_lock(args.name, verb == "lock")
        elif noun == "mailbox":
            if verb == "add":
                admin.mailbox_add(args.address, args.password_stdin)
            elif verb == "remove":
                admin.mailbox_remove(args.address, args.yes)
            elif verb == "list":
                admin.mailbox_list(args.domain)
            elif verb in ("lock", "unlock"):
                admin.mailbox_lock(args.address, verb == "lock")
            elif verb == "passwd":
                admin.mailbox_passwd(args.address, args.password_stdin)
            elif verb == "quota":
                admin.mailbox_quota(args.address, args.size)
            elif verb == "scram-keys":
                from pop3coexist.admin.scram import run_scram_keys

                run_scram_keys(config, admin._pwfile(), args.address, admin.say)
        elif noun == "stat":
            admin.stat(args.domain)
        elif noun in ("alias", "list"):
            from pop3coexist.admin.aliases import run_verb

            run_verb(admin, args)
        elif noun == "policy":
            from pop3coexist.admin.policy import run_apply

            run_apply(config, args.dry_run, admin.out)
        elif noun == "vacation":
            from pop3coexist.admin import vacation

            vacation.run(config, admin.store, args, admin.out)
        elif noun == "nodes":
            from pop3coexist.admin.nodes import run_nodes

            run_nodes(config, admin.out)
        elif noun == "quarantine":
            from pop3coexist.admin.quarantine import run_quarantine

            run_quarantine(config, verb, None if verb == "list" else args.id, admin.out)
        elif noun == "queue":
            if verb == "list":
                admin.queue_list()
            elif verb == "flush":
                admin.queue_flush()
            else:
                admin.queue_delete(args.id, args.bounce)
        return 0
    except (AdminError, ConfigError, StoreError, ValueError) as e:
        text = str(e) or e.__class__.__name__
        if isinstance(e, ConfigError):  # a check after parsing: name the config file and line
            text = locate(os.path.abspath(path), text)
        if isinstance(e, NoSuchMailbox):
            text = f"no such domain or mailbox: {text}"
        print(f"{PROG}: error: {text.splitlines()[0]}", file=sys.stderr)
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
