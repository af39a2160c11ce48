"""The outbound queue and the quarantine: list, flush, delete (with or without a failure
report), release. Each returns JSON-able data or raises ``context.OpsError``.

Ages are computed here, by the server's clock, so that a remote face shows what the server
sees.
"""

from __future__ import annotations

import time

from pop3coexist.ops.context import Context, done, fail


def queue_list(ctx: Context) -> dict:
    """``{"messages": [{"id", "age": seconds, "sender", "size", "recipients": [{"address",
    "state", "next_attempt": unix time or None, "last_reply"}]}]}``, oldest first."""
    now = time.time()
    rows = []
    for e in ctx.queue().entries():
        rows.append({
            "id": e["id"], "age": int(now - float(e.get("arrival", now))),
            "sender": e.get("sender", ""), "size": e.get("size"),
            "recipients": [{"address": r.get("address"), "state": r.get("state"),
                            "next_attempt": r.get("next_attempt") or None,
                            "last_reply": r.get("last_reply") or ""}
                           for r in e.get("recipients", [])],
        })
    return {"messages": rows}


def queue_flush(ctx: Context) -> dict:
    """Ask the running server to retry every queued message now (a marker its delivery runner
    polls every few seconds, and ``Context.flush`` at once when the server itself runs
    this)."""
    ctx.queue().request_flush()
    if ctx.flush is not None:
        ctx.flush()
    return done("queue flush requested")


def queue_delete(ctx: Context, id: str, bounce: bool = False) -> dict:  # noqa: A002
    """Delete a queued message; with ``bounce`` first queue a failure report to its sender
    for every recipient not yet delivered (``Context.bounce``)."""
    try:
        if bounce:
            if ctx.bounce is None:
                fail("failure reports cannot be sent from here")
            ctx.bounce(ctx.queue(), id)
        else:
            ctx.queue().delete(id)
    except KeyError:
        fail(f"no message {id} in the queue")
    return done(f"message {id} deleted{' (report sent)' if bounce else ''}", id=id)


def _quarantine(ctx: Context):  # noqa: ANN202
    from pop3coexist.store.quarantine import Quarantine

    return Quarantine(ctx.config.server.state_dir / "quarantine")


def quarantine_list(ctx: Context) -> dict:
    """``{"messages": [{"id", "age", "size", "milter", "reason", "sender", "client",
    "recipients": [addresses]}]}``: the messages a milter held."""
    now = time.time()
    rows = []
    for e in _quarantine(ctx).list():
        env, info = e.get("envelope", {}), e.get("info", {})
        rows.append({"id": e["id"], "age": int(now - float(e.get("time", now))),
                     "size": e.get("size", 0), "milter": info.get("milter", "?"),
                     "reason": info.get("reason", ""), "sender": env.get("sender", ""),
                     "client": info.get("client", ""),
                     "recipients": [r.get("address") for r in env.get("recipients", [])]})
    return {"messages": rows}


def quarantine_release(ctx: Context, id: str) -> dict:  # noqa: A002
    """Hand a held message to the outbound queue (masquerading applied as for any mail that
    leaves) and ask the server to deliver now. ``queue_id`` in the result."""
    from pop3coexist.policy.masquerade import wrap_queue

    queue = ctx.queue()
    try:
        queue_id = _quarantine(ctx).release(id, wrap_queue(queue, ctx.config))
    except KeyError:
        fail(f"no message {id} in the quarantine")
    queue.request_flush()
    return done(f"quarantined message {id} released: queued as {queue_id}", id=id,
                queue_id=queue_id)


def quarantine_delete(ctx: Context, id: str) -> dict:  # noqa: A002
    """Forget a held message."""
    try:
        _quarantine(ctx).delete(id)
    except KeyError:
        fail(f"no message {id} in the quarantine")
    return done(f"quarantined message {id} deleted", id=id)
