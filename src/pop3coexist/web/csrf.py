"""CSRF protection: every state-changing request (every POST) must carry the token bound to
its session.

The token is the session's own random 256-bit value (``sessions.Session.csrf``), put by the
page renderer into every form as the hidden field ``csrf_token`` and compared in constant time
(``hmac.compare_digest``). A POST without a session, without the field or with another value
is refused with 403 and a page that says so; nothing is done. A new session (log-in) has a
new token. ``SameSite=Strict`` cookies are a second wall; this check does not rely on them.
Log-in forms are POSTs too: before log-in the browser gets an anonymous session whose token
the log-in form carries (log-in CSRF, RFC-less but OWASP's advice).
"""

from __future__ import annotations

import hmac
from typing import Any

FIELD = "csrf_token"


def token_ok(session: Any, given: str | bytes | None) -> bool:
    """True when ``given`` (the form's field, str or bytes) is ``session``'s CSRF token."""
    if session is None or not given:
        return False
    if isinstance(given, bytes):
        try:
            given = given.decode("ascii")
        except UnicodeDecodeError:
            return False
    return hmac.compare_digest(given.encode("ascii", "replace"), session.csrf.encode("ascii"))
