"""Running the reactor from the blocking ``pop3coexist-admin`` command.

The admin verbs are plain blocking code; the few that need Twisted (a directory look-up, the
LDAP writes of ``policy apply``) start the reactor with ``wait`` until their Deferred fires.
Shared by the operations (ops/), ``admin/cli.py`` and ``admin/policy.py``.
"""

from __future__ import annotations

from typing import Any


def wait(d: Any) -> Any:
    """Run the reactor until a Deferred fires (directory look-ups); return or raise."""
    from twisted.internet import reactor
    from twisted.python.failure import Failure

    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))
        reactor.run(installSignalHandlers=False)
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
