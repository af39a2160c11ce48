"""Server-side web sessions: implements ``interfaces.IWebSessions``.

A session is a record in this process's memory, known to the browser only by its id: 32 random
bytes (256 bits, ``secrets.token_urlsafe``) in a cookie. The cookie is ``HttpOnly``,
``SameSite=Strict``, has a ``Path``, and is ``Secure`` on every HTTPS listener (a plain-HTTP
listener is loopback only, see ``config.check_web_listeners``, and there a Secure cookie would
never come back). Nothing about the user lives in the cookie.

Session fixation is impossible: a log-in never reuses the id the browser presented; it
destroys that session and makes a new one (``login``). Before log-in a session is anonymous:
its CSRF token is derived from its id (an HMAC under a key of this store), so when anonymous
sessions are pushed out by a flood of them (anyone can make them by the thousand), the
browser's cookie still revives its anonymous session and the log-in form it loaded still
works (``revive``). Log-out destroys the session
(``logout``). A session ends when unused for ``idle_timeout`` seconds or ``max_age`` seconds
after its log-in, whichever comes first, and when the account's password changes or the
account is disabled, locked or removed (``web.app.WebApp`` compares the checker's
credential stamp, ``Session.stamp``). Ids are compared by dictionary look-up of the full
id; they never appear in logs (``Session.__repr__`` shows a short hash).

With ``server.workers`` > 1 only the main process serves the web listeners, so one table
holds every session; a restart logs everyone out (a deliberate choice: nothing to steal on
disk).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from pop3coexist.interfaces import IWebSessions

ID_BYTES = 32  # 256 bits
_ID_CHARS = len(secrets.token_urlsafe(ID_BYTES))  # 43
_ID_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


@dataclass(eq=False)
class Session:
    """One browser's session: ``user`` (None before log-in), the CSRF token bound to it,
    ``created`` and ``seen`` (clock seconds), and ``data`` for the front-end (a dict)."""

    id: str
    csrf: str
    created: float
    seen: float
    user: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # the account's credential stamp taken at log-in (interfaces.ICredentialStamp; None: not
    # taken yet, or the checker gives none) and when it was last compared (clock seconds)
    stamp: bytes | None = None
    checked: float = 0.0

    def __repr__(self) -> str:
        tag = hashlib.sha256(self.id.encode()).hexdigest()[:8]
        return f"<Session #{tag} user={self.user!r}>"


@implementer(IWebSessions)
class SessionStore:
    """The sessions of one front-end (web mail or a console: each has its own store and
    cookie name). ``clock`` gives ``seconds()`` (the reactor, or ``task.Clock`` in tests)."""

    def __init__(self, clock: Any, *, idle_timeout: float = 1800.0, max_age: float = 43200.0,
                 max_sessions: int = 10000, cookie_name: str = "pop3coexist_session",
                 path: str = "/") -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.max_sessions = max_sessions
        self.cookie_name = cookie_name
        self.path = path
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently seen first
        self._anonymous: OrderedDict[str, None] = OrderedDict()  # ids without a user, oldest first
        self._key = secrets.token_bytes(32)  # anonymous sessions' CSRF tokens (revive)

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self, user: str | None = None) -> Session:
        """A new session with a fresh id and CSRF token. Past ``max_sessions`` the longest
        idle session WITHOUT a user is dropped first (anyone can make anonymous sessions by
        the thousand: they must never push a logged-in user out); only when every session
        is logged in does the longest idle one go."""
        now = self.clock.seconds()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            self._drop_one()
        sid = secrets.token_urlsafe(ID_BYTES)
        token = secrets.token_urlsafe(ID_BYTES) if user is not None else self._anonymous_token(sid)
        s = Session(sid, token, now, now, user)
        self._sessions[s.id] = s
        if user is None:
            self._anonymous[s.id] = None
        return s

    def _anonymous_token(self, session_id: str) -> str:
        """The CSRF token of the anonymous session ``session_id``: an HMAC of the id under
        this store's key, so the same id always has the same token (``revive``)."""
        mac = hmac.new(self._key, session_id.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def revive(self, session_id: str | None) -> Session | None:
        """The anonymous session of a browser whose cookie names a session this store no
        longer has (pushed out by a flood of anonymous sessions, timed out, or logged out):
        a new anonymous session with the SAME id, so a log-in form the browser loaded before
        still carries a valid token (the token of an anonymous session is derived from its
        id, ``_anonymous_token``: a signed double-submit cookie, OWASP's CSRF cheat sheet).
        None for a malformed id. Such an id opens nothing but a log-in form: a log-in always
        makes a new id (``login``), so a revived id planted by someone else is worthless."""
        if (not session_id or len(session_id) != _ID_CHARS
                or not _ID_ALPHABET.issuperset(session_id) or session_id in self._sessions):
            return None
        now = self.clock.seconds()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            self._drop_one()
        s = Session(session_id, self._anonymous_token(session_id), now, now)
        self._sessions[s.id] = s
        self._anonymous[s.id] = None
        return s

    def get(self, session_id: str | None) -> Session | None:
        """The live session of ``session_id`` (and it counts as used now), or None when the id
        is unknown, malformed or the session timed out (it is then destroyed)."""
        if not session_id or len(session_id) > 100:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self.clock.seconds()
        if now - s.seen > self.idle_timeout or now - s.created > self.max_age:
            self.destroy(s)
            return None
        s.seen = now
        self._sessions.move_to_end(s.id)
        if s.id in self._anonymous:
            self._anonymous.move_to_end(s.id)
        return s

    def _drop_one(self) -> None:
        """Drop the longest idle anonymous session, else the longest idle one."""
        if self._anonymous:
            sid = next(iter(self._anonymous))
            self._sessions.pop(sid, None)
            del self._anonymous[sid]
        else:
            self._sessions.popitem(last=False)

    def login(self, old: Session | None, user: str) -> Session:
        """The session after a successful log-in of ``user``: always a NEW id and CSRF token
        (``old``, the session the browser came with, is destroyed), so an id planted before
        log-in is worthless after it."""
        if old is not None:
            self.destroy(old)
        return self.new(user)

    def logout(self, session: Session | None) -> None:
        """Destroy ``session`` (log-out)."""
        if session is not None:
            self.destroy(session)

    def destroy(self, session: Session) -> None:
        """Forget ``session``: its id no longer opens anything."""
        self._sessions.pop(session.id, None)
        self._anonymous.pop(session.id, None)

    def _expire(self, now: float) -> None:
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.seen > self.idle_timeout:
                self._sessions.popitem(last=False)
                self._anonymous.pop(oldest.id, None)
            else:
                break

    def set_cookie(self, session: Session | None, secure: bool) -> bytes:
        """The value of a ``Set-Cookie`` header carrying ``session``'s id, or clearing the
        cookie (``Max-Age=0``) when ``session`` is None. ``secure``: the listener is HTTPS."""
        attrs = [f"Path={self.path}", "HttpOnly", "SameSite=Strict"]
        if secure:
            attrs.append("Secure")
        if session is None:
            return "; ".join([f"{self.cookie_name}=", "Max-Age=0", *attrs]).encode("ascii")
        return "; ".join([f"{self.cookie_name}={session.id}", *attrs]).encode("ascii")
