"""``pop3coexist-admin import winpop MAILROOT [--dry-run]``: bring the mail of a Windows
Server 2003 POP3 service's store along (README "Moving from Windows Server 2003 POP3").

The Windows store (Microsoft's "Mail store" page for Windows Server 2003) is
``MAILROOT\\<domain>\\P3_<mailbox>.mbx\\<name>.eml``: one folder per domain, one per mailbox,
one file per message, CRLF line ends. A copy of it (robocopy, a mounted share, an unzipped
archive) is read here, with names in any case (NTFS does not care, so copies differ).
Files other than ``*.eml`` in a mailbox folder (the service's lock files, anything else) are
counted and skipped. Each mailbox's messages keep their order: by file time, then by name
(the service delivered each into its own new file, so the file time is the arrival time; the
name breaks ties as a listing of the folder would).

Each message goes into ``new/`` of the Maildir with a unique part made from its file time and
a hash of where it came from (``<sec>.M<usec>P0Q<n>R<hash>.winpop``): the time keeps POP3's
order, the hash makes the import safe to repeat. Every message copied is recorded in the
import ledger ``<state_dir>/import/winpop.jsonl`` (source path, size, file time, target): a
second run copies only what the first did not, even for messages read and deleted since; a
run interrupted between the copy and its ledger line finds the hash in the mailbox. A file
that cannot be read is reported and skipped; a message is read whole before anything is
written and goes through ``tmp/``, so none is ever half-copied. The exit status is 1 when any
file was skipped for an error (the rest is imported).

Passwords cannot come from the Windows store (it keeps them encrypted or in Active
Directory): with ``auth.method = "passwordfile"`` every mailbox the import creates needs one,
from ``--passwords FILE`` (lines ``address<TAB>password``) or, for the one mailbox chosen with
``--mailbox``, ``--password-stdin``; checked before anything is written. With the directory
or local method the account must exist there (as for ``mailbox add``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pop3coexist.address import AddressError, is_valid_mailbox_name, normalise_domain
from pop3coexist.admin.blocking import wait
from pop3coexist.admin.owner import StateOwner
from pop3coexist.config import Config
from pop3coexist.errors import AdminError, AuthUnavailable, StoreError
from pop3coexist.fsutil import fsync_dir

LEDGER = Path("import") / "winpop.jsonl"
_MBX_RE = re.compile(r"^p3_(.+)\.mbx$", re.IGNORECASE)
_HASH_RE = re.compile(r"R([0-9a-f]{16})\.winpop(?:,|:|$)")


@dataclass
class SourceMessage:
    path: Path
    name: str
    size: int
    mtime_ns: int
    key: str  # domain/mailbox/name in lower case, size, file time: what the ledger records

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass
class SourceMailbox:
    domain: str
    mailbox: str
    folder: Path
    messages: list[SourceMessage] = field(default_factory=list)
    other_files: int = 0

    @property
    def address(self) -> str:
        return f"{self.mailbox}@{self.domain}"


@dataclass
class ImportSummary:
    """Totals of one run (per mailbox in ``boxes``: address -> (copied, bytes, already))."""

    copied: int = 0
    bytes: int = 0
    already: int = 0
    errors: list[str] = field(default_factory=list)
    boxes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    new_domains: set[str] = field(default_factory=set)  # (dry run) domains it would add


def scan(mailroot: Path, errors: list[str], notes: list[str]) -> list[SourceMailbox]:
    """The domains, mailboxes and messages of a Windows POP3 store. A folder or file that
    cannot be listed or read is skipped and named in ``errors``; a folder that is not a
    domain or mailbox of ours is skipped and named in ``notes``."""
    try:
        domains = sorted(os.scandir(mailroot), key=lambda e: e.name.lower())
    except OSError as e:
        raise AdminError(f"cannot read the Windows mail store {mailroot}: {e.strerror}")
    boxes: list[SourceMailbox] = []
    for dentry in domains:
        if not dentry.is_dir(follow_symlinks=False):
            continue
        try:
            domain = normalise_domain(dentry.name)
        except (AddressError, ValueError):
            notes.append(f"{dentry.path}: not a domain name; skipped")
            continue
        try:
            entries = sorted(os.scandir(dentry.path), key=lambda e: e.name.lower())
        except OSError as e:
            errors.append(f"{dentry.path}: cannot list it ({e.strerror}); skipped")
            continue
        for mentry in entries:
            match = _MBX_RE.match(mentry.name)
            if not match or not mentry.is_dir(follow_symlinks=False):
                continue
            mailbox = match.group(1).lower()
            if not is_valid_mailbox_name(mailbox):
                notes.append(f"{mentry.path}: {mailbox!r} is not a mailbox name here; skipped")
                continue
            box = SourceMailbox(domain, mailbox, Path(mentry.path))
            try:
                files = list(os.scandir(mentry.path))
            except OSError as e:
                errors.append(f"{mentry.path}: cannot list it ({e.strerror}); skipped")
                continue
            for fentry in files:
                if not fentry.name.lower().endswith(".eml"):
                    box.other_files += 1  # the service's lock files and anything else
                    continue
                try:
                    st = fentry.stat(follow_symlinks=False)
                except OSError as e:
                    errors.append(f"{fentry.path}: cannot read it ({e.strerror}); skipped")
                    continue
                if not fentry.is_file(follow_symlinks=False):
                    box.other_files += 1
                    continue
                key = f"{domain}/{mailbox}/{fentry.name.lower()}:{st.st_size}:{st.st_mtime_ns}"
                box.messages.append(SourceMessage(Path(fentry.path), fentry.name, st.st_size,
                                                  st.st_mtime_ns, key))
            box.messages.sort(key=lambda m: (m.mtime_ns, m.name.lower(), m.name))
            boxes.append(box)
    return boxes


def read_passwords(path: str) -> dict[str, str]:
    """``address<TAB>password`` lines (blank lines and ``#`` comments skipped); AdminError
    naming the line (never the password) when one is malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdminError(f"cannot read the password file {path}: {getattr(e, 'strerror', None) or e}")
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        address, tab, password = line.partition("\t")
        if not tab or "@" not in address or not password:
            raise AdminError(f"{path} line {number}: expected address<TAB>password")
        out[address.strip().lower()] = password
    return out


def _ledger_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    keys.add(json.loads(line)["source"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line a crash cut short
    except FileNotFoundError:
        pass
    return keys


def _present_digests(store: Any, domain: str, mailbox: str) -> set[str]:
    path = store.root / domain / mailbox
    found: set[str] = set()
    for sub in ("new", "cur"):
        try:
            names = os.listdir(path / sub)
        except FileNotFoundError:
            continue
        for name in names:
            match = _HASH_RE.search(name)
            if match:
                found.add(match.group(1))
    return found


def import_winpop(config: Config, mailroot: str, *, dry_run: bool = False,
                  password: str | None = None, passwords_file: str | None = None,
                  only: str | None = None, out: Any = None) -> ImportSummary:
    """Import a Windows POP3 store into ``config``'s state (see the module docstring).
    Prints one line per mailbox and a total to ``out``; problems to stderr. AdminError before
    anything is written when the plan cannot work (a password missing, an account unknown);
    AdminError at the end when files were skipped for errors."""
    from pop3coexist.store.maildir import MaildirStore

    out = out or sys.stdout
    owner = StateOwner(config.server.state_dir)
    summary = ImportSummary()
    notes: list[str] = []
    with owner.as_invoker():
        boxes = scan(Path(mailroot), summary.errors, notes)
        passwords = read_passwords(passwords_file) if passwords_file else {}
    if only is not None:
        wanted = only.lower()
        boxes = [b for b in boxes if b.address == wanted]
        if not boxes:
            raise AdminError(f"no mailbox {only} in {mailroot} (looked for "
                             f"<domain>\\P3_<mailbox>.mbx)")
    if password is not None:
        if only is None:
            raise AdminError("--password-stdin sets the password of one mailbox: name it with "
                             "--mailbox ADDRESS (or give --passwords FILE)")
        passwords[only.lower()] = password
    with owner.acting():
        store = MaildirStore(config.server.mailroot)
        new_boxes = [b for b in boxes if not store.mailbox_exists(b.domain, b.mailbox)]
        _check_accounts(config, store, new_boxes, passwords)
        ledger_path = config.server.state_dir / LEDGER
        done = _ledger_keys(ledger_path)
        for line in (*notes, *summary.errors):
            print(f"pop3coexist-admin: {line}", file=sys.stderr)
        if not dry_run:
            ledger_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for box in boxes:
            _import_box(config, store, box, box in new_boxes, passwords, done, ledger_path,
                        dry_run, owner, summary, out)
    verb = "would copy" if dry_run else "copied"
    print(f"total: {verb} {summary.copied} messages ({summary.bytes} bytes) into "
          f"{len(boxes)} mailboxes; {summary.already} already imported", file=out)
    if summary.errors:
        raise AdminError(f"{len(summary.errors)} file(s) or folder(s) could not be read (listed "
                         "above) and were skipped; everything else was "
                         f"{'checked' if dry_run else 'imported'}")
    return summary


def _check_accounts(config: Config, store: Any, new_boxes: list[SourceMailbox],
                    passwords: dict[str, str]) -> None:
    method = config.auth.method
    if method == "passwordfile":
        missing = [b.address for b in new_boxes if b.address not in passwords]
        if missing:
            raise AdminError(f"no password for {len(missing)} new mailbox(es), first "
                             f"{missing[0]}: give --passwords FILE (address<TAB>password lines)")
        for box in new_boxes:
            secret = passwords[box.address]
            if len(secret) > 1024 or any(c in secret for c in "\0\r\n"):
                raise AdminError(f"the password for {box.address} is not usable (at most 1024 "
                                 "characters, no NUL, CR or LF)")
        return
    if passwords:
        raise AdminError(f"with auth.method \"{method}\" passwords live in the "
                         f"{'directory' if method == 'directory' else 'system'}; drop "
                         "--passwords / --password-stdin")
    from pop3coexist.identity.factory import make_checker

    checker = make_checker(config, store)
    for box in new_boxes:
        try:
            found = wait(checker.resolve_recipient(box.address))
        except AuthUnavailable as e:
            raise AdminError(f"cannot reach the account source: {e}")
        if found is None or found.lower() != box.address:
            raise AdminError(f"no account {box.address} in the "
                             f"{'directory' if method == 'directory' else 'system accounts'}: "
                             "create it there first")


def _import_box(config: Config, store: Any, box: SourceMailbox, is_new: bool,
                passwords: dict[str, str], done: set[str], ledger_path: Path, dry_run: bool,
                owner: StateOwner, summary: ImportSummary, out: Any) -> None:
    address = box.address
    todo = [m for m in box.messages if m.key not in done]
    already = len(box.messages) - len(todo)
    if dry_run:
        if not store.domain_exists(box.domain) and box.domain not in summary.new_domains:
            summary.new_domains.add(box.domain)
            print(f"would add domain {box.domain}", file=out)
        if is_new:
            print(f"would add mailbox {address}", file=out)
        readable = []
        for message in todo:
            with owner.as_invoker():
                if os.access(message.path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
                    readable.append(message)
                    continue
            error = f"{message.path}: cannot read it; it would be skipped"
            print(f"pop3coexist-admin: {error}", file=sys.stderr)
            summary.errors.append(error)
        todo = readable
        nbytes = sum(m.size for m in todo)
        _tally(summary, address, len(todo), nbytes, already)
        print(f"{address}: would copy {len(todo)} messages ({nbytes} bytes), {already} already "
              f"imported, {box.other_files} other files skipped", file=out)
        return
    if store.add_domain(box.domain):
        print(f"domain {box.domain} added", file=out)
    if is_new:
        if config.auth.method == "passwordfile":
            from pop3coexist.identity.factory import make_password_file

            make_password_file(config).set_password(address, passwords[address])
        store.add_mailbox(box.domain, box.mailbox)
        print(f"mailbox {address} added", file=out)
    present = _present_digests(store, box.domain, box.mailbox)
    copied = nbytes = 0
    pending: list[str] = []  # ledger lines, written once their messages' folder is synced

    def commit() -> None:
        fsync_dir(store.root / box.domain / box.mailbox / "new")
        with open(ledger_path, "a", encoding="utf-8", errors="surrogateescape") as ledger:
            ledger.writelines(pending)
            ledger.flush()
            os.fsync(ledger.fileno())
        pending.clear()

    for seq, message in enumerate(todo):
        try:
            with owner.as_invoker(), open(message.path, "rb") as f:
                data = f.read()
        except OSError as e:
            error = f"{message.path}: cannot read it ({e.strerror}); skipped"
            print(f"pop3coexist-admin: {error}", file=sys.stderr)
            summary.errors.append(error)
            continue
        digest = message.digest
        target = None
        if digest not in present:
            seconds, nanos = divmod(message.mtime_ns, 1_000_000_000)
            unique = f"{seconds}.M{nanos // 1000:06d}P0Q{seq:07d}R{digest}.winpop"
            try:
                written = store.import_message(box.domain, box.mailbox, unique, data,
                                               message.mtime_ns / 1e9, check=False, sync=False)
            except StoreError as e:
                if pending:
                    commit()
                raise AdminError(f"{address}: {e} ({copied} messages copied so far; run "
                                 "the import again to go on)")
            present.add(digest)
            target = written.name if written is not None else None
            copied += 1
            nbytes += len(data)
        pending.append(json.dumps({"source": message.key, "target": address,
                                   "name": target}) + "\n")
        done.add(message.key)
        if len(pending) >= 200:
            commit()
    if pending:
        commit()
    fsync_dir(ledger_path.parent)
    _tally(summary, address, copied, nbytes, len(box.messages) - len(todo))
    print(f"{address}: copied {copied} messages ({nbytes} bytes), "
          f"{len(box.messages) - len(todo)} already imported, {box.other_files} other files "
          "skipped", file=out)


def _tally(summary: ImportSummary, address: str, copied: int, nbytes: int, already: int) -> None:
    summary.copied += copied
    summary.bytes += nbytes
    summary.already += already
    summary.boxes[address] = (copied, nbytes, already)
