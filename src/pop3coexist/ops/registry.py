"""The operations by name, with their parameters: what the faces dispatch on.

``OPERATIONS["mailbox.lock"]`` is an ``Operation``: its function, whether it changes anything
(the API takes a change as ``POST /api/v1/mailbox/lock`` with a JSON object, a read as ``GET``
with query parameters), and its parameters with their types. ``run`` checks the parameters
(untrusted input from the API: unknown, missing or mistyped ones are an ``OpsError``), calls
the function and writes every change, made or refused, to the audit log
(``Context.audit``; a password never).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pop3coexist.ops import aliases, mailboxes, nodes, queue
from pop3coexist.ops.context import EXPECTED, Context, error_line, fail

# parameter types: "str", "str?" (optional), "bool", "list" (of strings), "secret" (a password:
# never audited, never in a URL)
_TYPES = {"str", "str?", "bool", "list", "secret"}


@dataclass(frozen=True)
class Operation:
    """One operation: ``name`` (``noun.verb``), ``function(ctx, **params) -> dict``,
    ``change`` (True: POST and audited), ``params`` {name: type}, ``doc`` one line."""

    name: str
    function: Callable[..., dict]
    change: bool
    params: Mapping[str, str]
    doc: str

    @property
    def path(self) -> str:
        """The API path: ``/api/v1/mailbox/lock``."""
        return "/api/v1/" + self.name.replace(".", "/")

    @property
    def method(self) -> str:
        return "POST" if self.change else "GET"


def _op(name: str, function: Callable[..., dict], change: bool, doc: str, /,
        **params: str) -> Operation:
    assert set(params.values()) <= _TYPES, params
    return Operation(name, function, change, params, doc)


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    _op("domain.list", mailboxes.domain_list, False, "domains, mailbox counts, locks"),
    _op("domain.add", mailboxes.domain_add, True, "add a local domain", name="str"),
    _op("domain.remove", mailboxes.domain_remove, True, "remove a domain and its mail",
        name="str", yes="bool"),
    _op("domain.lock", mailboxes.domain_lock, True, "lock a domain", name="str"),
    _op("domain.unlock", mailboxes.domain_unlock, True, "unlock a domain", name="str"),
    _op("mailbox.list", mailboxes.mailbox_list, False, "mailboxes, locks, quotas",
        domain="str?"),
    _op("mailbox.add", mailboxes.mailbox_add, True, "add a mailbox (password: passwordfile)",
        address="str", password="secret"),
    _op("mailbox.remove", mailboxes.mailbox_remove, True, "remove a mailbox and its mail",
        address="str", yes="bool"),
    _op("mailbox.lock", mailboxes.mailbox_lock, True, "lock a mailbox", address="str"),
    _op("mailbox.unlock", mailboxes.mailbox_unlock, True, "unlock a mailbox", address="str"),
    _op("mailbox.passwd", mailboxes.mailbox_passwd, True, "set a mailbox's password",
        address="str", password="secret"),
    _op("mailbox.quota", mailboxes.mailbox_quota, True, 'set a quota (bytes, "50MB", none)',
        address="str", size="str"),
    _op("stat", mailboxes.stat, False, "messages, bytes, locks, quota use", domain="str?"),
    _op("queue.list", queue.queue_list, False, "the outbound queue"),
    _op("queue.flush", queue.queue_flush, True, "retry every queued message now"),
    _op("queue.delete", queue.queue_delete, True, "delete a queued message (bounce: report)",
        id="str", bounce="bool"),
    _op("quarantine.list", queue.quarantine_list, False, "messages a milter held"),
    _op("quarantine.release", queue.quarantine_release, True, "deliver a held message",
        id="str"),
    _op("quarantine.delete", queue.quarantine_delete, True, "forget a held message", id="str"),
    _op("alias.list", aliases.alias_list, False, "aliases", domain="str?"),
    _op("alias.add", aliases.alias_add, True, "mail for address also goes to target",
        address="str", target="str"),
    _op("alias.remove", aliases.alias_remove, True, "remove a target or the whole alias",
        address="str", target="str?"),
    _op("list.show", aliases.list_show, False, "one list, or the lists of a domain or all",
        name="str?"),
    _op("list.add", aliases.list_add, True, "a new distribution list", list="str",
        senders="str?", owner="str?"),
    _op("list.remove", aliases.list_remove, True, "remove a list", list="str"),
    _op("list.set", aliases.list_set, True, "who may send, the owner", list="str",
        senders="str?", owner="str?"),
    _op("list.member.add", aliases.list_member_add, True, "add members", list="str",
        members="list"),
    _op("list.member.remove", aliases.list_member_remove, True, "remove members", list="str",
        members="list"),
    _op("nodes", nodes.nodes, False, "the nodes sharing state_dir"),
)}


def check_params(op: Operation, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``op.params``: unknown names, missing required ones and
    wrong types are an OpsError. Booleans default to false, optional strings to None."""
    unknown = sorted(set(params) - set(op.params))
    if unknown:
        fail(f"{op.name}: unknown parameter {unknown[0]!r}")
    out: dict[str, Any] = {}
    for name, kind in op.params.items():
        value = params.get(name)
        if value is None:
            if kind in ("str", "list"):
                fail(f"{op.name}: parameter {name!r} is required")
            if kind == "bool":
                value = False
        elif kind == "bool" and not isinstance(value, bool):
            fail(f"{op.name}: parameter {name!r} must be true or false")
        elif kind in ("str", "str?", "secret") and not isinstance(value, str):
            fail(f"{op.name}: parameter {name!r} must be a string")
        elif kind == "list" and not (isinstance(value, list)
                                     and all(isinstance(v, str) for v in value)):
            fail(f"{op.name}: parameter {name!r} must be a list of strings")
        if kind == "secret" and value is None:
            continue  # passed as None (no password offered): leave it out
        out[name] = value
    return out


def _target(op: Operation, params: Mapping[str, Any]) -> str:
    for name, kind in op.params.items():
        if kind != "secret" and isinstance(params.get(name), str):
            return str(params[name])
    return ""


def run(ctx: Context, name: str, params: Mapping[str, Any] | None = None, *,
        raw: Mapping[str, Any] | None = None) -> dict:
    """Run operation ``name`` with ``params`` (checked: ``check_params``) over ``ctx``; a
    change is audited, made or refused. ``raw`` are extra arguments passed unchecked (a
    password reader from the command). OpsError for an unknown name."""
    op = OPERATIONS.get(name)
    if op is None:
        fail(f"no operation {name}")
    checked = check_params(op, params or {})
    if raw:
        checked.update(raw)
    try:
        result = op.function(ctx, **checked)
    except EXPECTED as e:
        if op.change:
            ctx.audit(op.name, _target(op, checked), f"error: {error_line(e)}")
        raise
    if op.change:
        ctx.audit(op.name, _target(op, checked))
    return result
