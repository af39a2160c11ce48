"""``pop3coexist-admin quarantine list | release ID | delete ID``: the messages a milter put in
quarantine (``<state_dir>/quarantine/``, store/quarantine.py).

``list`` prints one block per held message: its id (the queue id its client was told), age,
size, the milter and its reason, the sender and the recipients. ``release`` hands the message
to the outbound queue (local recipients get it in their mailboxes, others through the smart
host or MX, masquerading applied as for any mail that leaves) and asks the running server to
deliver now; ``delete`` forgets it. An unknown id is an error (exit code 1).
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from pop3coexist.config import Config
from pop3coexist.errors import AdminError


def _quarantine(config: Config) -> Any:
    from pop3coexist.store.quarantine import Quarantine

    return Quarantine(config.server.state_dir / "quarantine")


def run_quarantine(config: Config, verb: str, entry_id: str | None, out: TextIO) -> None:
    """Carry out one quarantine verb; AdminError for an unknown id."""
    q = _quarantine(config)
    if verb == "list":
        entries = q.list()
        if not entries:
            print("quarantine is empty", file=out)
            return
        now = time.time()
        for e in entries:
            env, info = e.get("envelope", {}), e.get("info", {})
            age = int(now - float(e.get("time", now)))
            print(f"{e['id']}  age {age}s  {e.get('size', 0)} octets  by {info.get('milter', '?')}:"
                  f" {info.get('reason', '')}", file=out)
            print(f"    from <{env.get('sender', '')}>  client {info.get('client', '')}", file=out)
            for r in env.get("recipients", []):
                print(f"    to <{r.get('address')}>", file=out)
        return
    assert entry_id is not None
    try:
        if verb == "release":
            from pop3coexist.policy.masquerade import wrap_queue
            from pop3coexist.store.queue import FileQueue

            queue = FileQueue(config.server.queue_dir, config.server.hostname)
            queue_id = q.release(entry_id, wrap_queue(queue, config))
            queue.request_flush()
            print(f"quarantined message {entry_id} released: queued as {queue_id}", file=out)
        else:
            q.delete(entry_id)
            print(f"quarantined message {entry_id} deleted", file=out)
    except KeyError:
        raise AdminError(f"no message {entry_id} in the quarantine") from None
