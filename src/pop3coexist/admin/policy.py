"""``pop3coexist-admin policy apply [--dry-run]``: the Recipient Update Service of the gateway.

Recipient policies (``[[gateway.recipient_policies]]``, config.py) give directory objects
their proxy addresses. For every policy, highest priority first (the lowest ``priority``
number), the objects its LDAP ``filter`` selects are found; each object is handled by the
first policy that selects it (as in Exchange: one policy per recipient; give the default
policy the largest number); ``policy/recipient_policies.py`` says what it changes and how
address templates work.

The changes are written with LDAP modify (delete / add of single values, so nothing else on
the object is touched) bound as ``gateway.update_bind_dn`` (default: the service account of
``[auth.directory]``). ``--dry-run`` prints the same plan and writes nothing.
"""

from __future__ import annotations

from typing import Any

from ldaptor import delta
from ldaptor.protocols import pureldap
from twisted.internet import defer

from pop3coexist.admin.blocking import wait
from pop3coexist.config import Config, read_secret
from pop3coexist.errors import AdminError
from pop3coexist.policy.recipient_policies import ATTRIBUTES, Change, plan


async def compute(config: Config, conn: Any) -> list[Change]:
    """Search with every policy (highest priority first) on a bound connection; the plan."""
    from pop3coexist import ldapfilter

    seen: set[str] = set()
    changes: list[Change] = []
    base = config.auth.directory.base_dn
    for policy in config.gateway.recipient_policies:
        entries = await conn.search(base, ldapfilter.parse_filter(policy.filter), ATTRIBUTES, 0)
        for entry in sorted(entries, key=lambda e: e.dn.lower()):
            key = entry.dn.lower()
            if key in seen:
                continue
            seen.add(key)
            changes.append(plan(entry.dn, entry.attrs, policy))
    return changes


async def write(conn: Any, change: Change) -> None:
    """One LDAP modify for one object; AdminError when the directory refuses it."""
    mods = []
    if change.delete:
        mods.append(delta.Delete("proxyAddresses", change.delete).asLDAP())
    if change.add:
        mods.append(delta.Add("proxyAddresses", change.add).asLDAP())
    answer = await conn._send(pureldap.LDAPModifyRequest(object=change.dn, modification=mods),
                              "modify")
    code = getattr(answer, "resultCode", None)
    if code != 0:
        text = getattr(answer, "errorMessage", b"") or b""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        raise AdminError(f"the directory refused to change {change.dn} (result code {code}"
                         f"{': ' + text if text else ''})")


async def apply_policies(config: Config, dry_run: bool, out: Any, reactor: Any = None,
                         checker: Any = None) -> list[Change]:
    """Bind, plan, print, and (unless ``dry_run``) write. Returns the plan."""
    gw = config.gateway
    if not gw.enabled:
        raise AdminError("this config has no [gateway] section: recipient policies belong to "
                         "the gateway")
    if not gw.recipient_policies:
        raise AdminError("no [[gateway.recipient_policies]] in this config")
    if checker is None:
        from pop3coexist.identity.directory import DirectoryChecker

        checker = DirectoryChecker(config, reactor)
    dcfg = config.auth.directory
    bind_dn = gw.update_bind_dn or dcfg.bind_dn
    secret_file = gw.update_bind_password_file if gw.update_bind_dn else dcfg.bind_password_file
    if secret_file is None:
        raise AdminError("gateway.update_bind_password_file is required with update_bind_dn")
    try:
        password = read_secret(secret_file).encode("utf-8")
    except OSError as e:
        raise AdminError(f"cannot read {secret_file}: {e.strerror}")
    try:
        conn = await checker._open()
    except Exception as e:
        raise AdminError(f"cannot reach the directory {dcfg.url}: {e}")
    try:
        code = await conn.bind(bind_dn, password)
        if code != 0:
            raise AdminError(f"the directory refused the bind as {bind_dn} (result code {code})")
        changes = await compute(config, conn)
        pending = [c for c in changes if not c.empty]
        for c in changes:
            for template in c.skipped:
                print(f"{c.dn}: policy {c.policy!r}: template {template!r} gives no address; "
                      "skipped", file=out)
        for c in pending:
            parts = [f"-{v}" for v in c.delete] + [f"+{v}" for v in c.add]
            print(f"{c.dn} (policy {c.policy!r}): {' '.join(parts)}", file=out)
            if not dry_run:
                await write(conn, c)
        verb = "would change" if dry_run else "changed"
        print(f"{verb} {len(pending)} of {len(changes)} recipient(s)", file=out)
        return changes
    finally:
        conn.close()


def run_apply(config: Config, dry_run: bool, out: Any) -> None:
    """The admin verb: run ``apply_policies`` on the reactor until it is done."""
    wait(defer.ensureDeferred(apply_policies(config, dry_run, out)))
