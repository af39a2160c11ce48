"""``WebApp``: the request handling every web front-end shares (a ``twisted.web`` resource).

A front-end subclasses ``WebApp`` and declares routes with ``route(method, pattern,
handler, auth=True)``: ``pattern`` is a regular expression over the URL path (its named
groups are passed to the handler), ``handler`` an ``async def handler(req) -> Response``
that gets a ``WebRequest``. For every request WebApp:

1. finds the session from the cookie (``sessions.SessionStore``); a request without one gets
   an anonymous session (its CSRF token is the log-in form's);
2. refuses a POST whose ``csrf_token`` field is not the session's token: 403 with a page
   saying why (``csrf``), before the handler runs;
3. ends a logged-in session whose account changed (``check_session``: the password was
   changed, the account disabled, locked or removed; asked at most every ``recheck``
   seconds), and sends a route with ``auth=True`` and no logged-in user to the log-in page
   (a GET) or refuses it with 403 (anything else);
4. reads the body (at most ``max_body`` bytes, else 413): ``application/x-www-form-urlencoded``
   and ``multipart/form-data`` (files with their names and types, ``WebRequest.files``);
5. sets the security headers (``headers.apply``) on every response, errors included, and
   ``Cache-Control: no-store`` when a user is logged in;
6. turns an exception into a 500 page (logged with the path, never the body or cookie).

``/static/NAME`` serves the shared stylesheet (``render.Renderer.static_file``).
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from pop3coexist.errors import AuthUnavailable
from pop3coexist.interfaces import ICredentialStamp
from pop3coexist.web import csrf, headers

log = Logger()


@dataclass
class Upload:
    """One uploaded file of a multipart/form-data body."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Response:
    """What a handler returns: a body (bytes) with status and headers, or a redirect."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    headers: dict[bytes, bytes] = field(default_factory=dict)
    csp: str | None = None  # a stricter policy for this response (None: headers.CSP)
    frame: bool = False  # meant for a frame of our own pages (X-Frame-Options SAMEORIGIN)


_LOCAL_PATH = re.compile(r"/(?![/\\])[!-~]*\Z")
MAX_FIELDS = 1000  # form fields (or multipart parts) of one request body at most


def redirect(location: str, status: int = 303) -> Response:
    """A redirect to a path of this site (303 See Other after a POST). Anything that is not
    a plain path of this site (a scheme, ``//host``, ``/\\host`` which browsers read as
    ``//host``, white space or control characters) becomes ``/``: never an open redirect."""
    if not _LOCAL_PATH.match(location) or "\\" in location:
        location = "/"
    return Response(status=status, headers={b"Location": location.encode("ascii")})


class WebRequest:
    """One request as a handler sees it: ``method``, ``path``, ``query`` and ``form`` (str ->
    list of str), ``files`` (list of Upload), ``session`` (``sessions.Session``), ``user``
    (the logged-in account or None), ``peer`` (client address), ``secure`` (HTTPS), and
    ``raw`` (the twisted.web request). ``new_session`` is set by ``WebApp.log_in``."""

    def __init__(self, raw: Any, session: Any, form: dict[str, list[str]],
                 files: list[Upload]) -> None:
        self.raw = raw
        self.method = raw.method.decode("ascii", "replace")
        self.path = raw.path.decode("utf-8", "replace")
        self.query = _query_of(raw.uri)
        self.form = form
        self.files = files
        self.session = session
        self.peer = _peer(raw)
        self.secure = raw.isSecure()

    @property
    def user(self) -> str | None:
        return self.session.user if self.session is not None else None

    def arg(self, name: str, default: str = "") -> str:
        """The first value of a form field, or of a query parameter, or ``default``."""
        for source in (self.form, self.query):
            if source.get(name):
                return source[name][0]
        return default

    def args(self, name: str) -> list[str]:
        """Every value of a form field (checkboxes)."""
        return self.form.get(name, [])


def _query_of(uri: bytes) -> dict[str, list[str]]:
    q = urllib.parse.urlsplit(uri.decode("utf-8", "replace")).query
    return urllib.parse.parse_qs(q, keep_blank_values=True)


def _peer(raw: Any) -> str:
    """The client's address: the TCP peer, or, when that is one of the site's
    ``trusted_proxies``, the last address of X-Forwarded-For (the one the proxy added)."""
    addr = raw.getClientAddress()
    host = getattr(addr, "host", None) or "unix"
    proxies = raw.channel.site.trusted_proxies if isinstance(raw, LimitedRequest) else ()
    if proxies and host != "unix":
        try:
            trusted = any(ipaddress.ip_address(host) in net for net in proxies)
        except ValueError:
            trusted = False
        forwarded = raw.getHeader(b"x-forwarded-for") if trusted else None
        if forwarded:
            last = forwarded.decode("latin-1").split(",")[-1].strip()
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                pass
    return host


Handler = Callable[[WebRequest], Awaitable[Response]]


class LimitedRequest(server.Request):
    """A twisted.web request that keeps at most ``site.max_body`` bytes of body (more: 413)
    and leaves the body's parsing to WebApp (``parsePOSTFormSubmission`` off)."""

    too_big = False
    web_user: str | None = None  # the logged-in user, once the session is known

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        kw["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kw)
        self._received = 0

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body", 25 * 1024 * 1024)

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's name)
        if length is not None and length > self._limit():
            self.too_big = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self._received += len(data)
        if self._received > self._limit():
            self.too_big = True
        if not self.too_big:
            super().handleContentChunk(data)


def make_site(app: WebApp, max_body: int, trusted_proxies: tuple = ()) -> server.Site:
    """The twisted.web Site of ``app``: ``LimitedRequest``, no server version header, and
    request logs without query strings (the access log never shows a token).
    ``trusted_proxies``: ``ipaddress`` networks of reverse proxies whose X-Forwarded-For names
    the client (``_peer``)."""
    site = server.Site(app, logFormatter=_log_line)
    site.requestFactory = LimitedRequest
    site.max_body = max_body
    site.trusted_proxies = tuple(trusted_proxies)
    site.displayTracebacks = False
    return site


def _printable(raw: bytes, limit: int = 400) -> str:
    """Request bytes safe for a log line: control characters (a forged line, a terminal
    escape), quotes and non-UTF-8 octets replaced by ``?``, cut at ``limit``."""
    text = raw[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() and c not in '"\\\ufffd' else "?" for c in text)


def _log_line(timestamp: str, request: Any) -> str:
    path = _printable(request.path)
    return (f'"{_peer(request)}" - - {timestamp} "{_printable(request.method, 20)} '
            f'{path}" {request.code} {request.sentLength or "-"}')


class WebApp(resource.Resource):
    """See the module docstring. ``sessions`` is a ``SessionStore``; ``renderer`` a
    ``render.Renderer``; ``login_path`` where an anonymous browser is sent."""

    isLeaf = True

    def __init__(self, sessions: Any, renderer: Any, login_path: str = "/login", *,
                 checker: Any = None, still_allowed: Callable[[str], Any] | None = None,
                 recheck: float = 10.0) -> None:
        """``checker``: the IAccountChecker whose accounts log in here; when it provides
        ``ICredentialStamp`` a session ends once its account's stamp differs from the one
        taken at log-in, or ``still_allowed(account)`` (may return a Deferred) says False;
        both are asked at most every ``recheck`` seconds per session (0: every request)."""
        super().__init__()
        self.sessions = sessions
        self.renderer = renderer
        self.login_path = login_path
        self.stamps = checker if ICredentialStamp.providedBy(checker) else None
        self.still_allowed = still_allowed
        self.recheck = recheck
        self._routes: list[tuple[str, re.Pattern, Handler, bool]] = []

    def route(self, method: str, pattern: str, handler: Handler, auth: bool = True) -> None:
        """Serve ``method`` requests whose path matches ``pattern`` (whole) with ``handler``;
        ``auth``: only for a logged-in session."""
        self._routes.append((method, re.compile(pattern + r"\Z"), handler, auth))

    # -- log-in and log-out (the front-end checks the password, WebApp rotates the session)

    async def log_in(self, req: WebRequest, account: str) -> bool:
        """Give ``req``'s browser a NEW session for ``account`` (the old id is destroyed),
        with the account's credential stamp as it is now; False (and no session) when the
        account cannot log in any more (its stamp is None: removed or locked meanwhile).
        When the stamp cannot be read now, it is taken at the session's first check."""
        stamp = None
        if self.stamps is not None:
            try:
                stamp = await defer.maybeDeferred(self.stamps.credential_stamp, account)
            except AuthUnavailable:
                stamp = None
            else:
                if stamp is None:
                    return False
        req.session = self.sessions.login(req.session, account)
        req.session.stamp = stamp
        req.session.checked = self.sessions.clock.seconds()
        req.raw.setHeader(b"Set-Cookie", self.sessions.set_cookie(req.session, req.secure))
        return True

    async def check_session(self, session: Any) -> bool:
        """False when ``session``'s account changed since its log-in (see ``__init__``);
        True when it did not, when nothing is checked, or when the accounts cannot be read
        now (asked again after ``recheck`` seconds: a directory outage logs nobody out)."""
        if session.user is None or (self.stamps is None and self.still_allowed is None):
            return True
        now = self.sessions.clock.seconds()
        if session.checked and now - session.checked < self.recheck:
            return True
        session.checked = now
        try:
            if self.stamps is not None:
                stamp = await defer.maybeDeferred(self.stamps.credential_stamp, session.user)
                if stamp is None:
                    return False
                if session.stamp is None:
                    session.stamp = stamp
                elif stamp != session.stamp:
                    return False
            if self.still_allowed is not None:
                return bool(await defer.maybeDeferred(self.still_allowed, session.user))
        except AuthUnavailable:
            return True
        return True

    def log_out(self, req: WebRequest) -> None:
        """Destroy ``req``'s session and clear its cookie."""
        self.sessions.logout(req.session)
        req.session = None
        req.raw.setHeader(b"Set-Cookie", self.sessions.set_cookie(None, req.secure))

    def page(self, req: WebRequest, template: str, status: int = 200, /,
             **context: Any) -> Response:
        """A rendered page; every template gets ``user``, ``csrf_token`` and ``path``."""
        body = self.renderer.render(
            template, user=req.user, csrf_token=req.session.csrf if req.session else "",
            path=req.path, **context)
        return Response(body, status)

    def error_page(self, req: WebRequest | None, status: int, message: str) -> Response:
        """A small error page (403, 404, 413, 500...) in the site's frame."""
        body = self.renderer.render("error.html", user=req.user if req else None,
                                    csrf_token="", path="", status=status,
                                    reason=http.RESPONSES.get(status, b"").decode(),
                                    message=message)
        return Response(body, status)

    # -- twisted.web

    def render(self, request: Any) -> Any:
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._crashed, request)
        d.addCallback(self._write, request)
        d.addErrback(self._write_failed, request)
        return server.NOT_DONE_YET

    def _write_failed(self, failure: Any, request: Any) -> None:
        """A response that could not be written (a bad header value): a plain 500, so the
        browser is never left waiting on an open connection."""
        log.failure("web: {method} {path}: the response could not be written", failure,
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("utf-8", "replace"))
        if request._disconnected or request.finished:
            return
        try:
            self._write(Response(b"Internal server error", 500,
                                 content_type="text/plain; charset=utf-8"), request)
        except Exception:  # pragma: no cover - nothing more can be said
            request.loseConnection()

    def _crashed(self, failure: Any, request: Any) -> Response:
        log.failure("web: {method} {path} failed", failure,
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("utf-8", "replace"))
        return self.error_page(None, 500, "Something went wrong on the server. Please try "
                                          "again; if it keeps failing, tell the administrator.")

    def _write(self, resp: Response, request: Any) -> None:
        if request._disconnected:
            return
        session_user = request.web_user
        request.setResponseCode(resp.status)
        # no-store on every response but those that say how to cache (static files): a page
        # carries a CSRF token or a Set-Cookie even before log-in
        headers.apply(request, bool(session_user) or b"Cache-Control" not in resp.headers,
                      resp.csp or headers.CSP, frame=resp.frame)
        ctype = resp.content_type
        if not ctype.isascii() or not ctype.isprintable():
            ctype = "application/octet-stream"
        request.setHeader(b"Content-Type", ctype.encode("ascii"))
        for k, v in resp.headers.items():
            request.setHeader(k, v)
        request.setHeader(b"Content-Length", str(len(resp.body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(resp.body)
        request.finish()

    async def _handle(self, request: Any) -> Response:
        request.setHeader(b"Server", b"pop3coexist")
        cookie = request.getCookie(self.sessions.cookie_name.encode("ascii"))
        cookie_id = cookie.decode("ascii", "replace") if cookie else None
        session = self.sessions.get(cookie_id)
        if session is not None and session.user is not None \
                and not await self.check_session(session):
            log.info("web: session of {user} ended: its password changed or the account can "
                     "no longer log in", user=session.user)
            self.sessions.destroy(session)
            session = None
        if request.too_big:
            return self.error_page(None, 413, "The upload is larger than this server takes.")
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        if method in ("GET", "HEAD") and path.startswith("/static/"):
            found = self.renderer.static_file(path[len("/static/"):])
            if found is None:
                return self.error_page(None, 404, "No such file.")
            return Response(found[0], content_type=found[1],
                            headers={b"Cache-Control": b"public, max-age=3600"})
        match = None
        allowed = False
        for r_method, pattern, handler, auth in self._routes:
            m = pattern.match(path)
            if m is None:
                continue
            allowed = True
            if r_method == method or (r_method == "GET" and method == "HEAD"):
                match = (m, handler, auth)
                break
        if match is None:
            if allowed:
                resp = self.error_page(None, 405, "That is not something this page does.")
                methods = {r for r, p, _, _ in self._routes if p.match(path)}
                if "GET" in methods:
                    methods.add("HEAD")
                resp.headers[b"Allow"] = ", ".join(sorted(methods)).encode("ascii")
                return resp
            return self.error_page(None, 404, "There is no such page.")
        m, handler, auth = match
        if session is None:
            # a POST from a page loaded before its anonymous session was pushed out or timed
            # out: the same id again, whose token the form carries (sessions.revive)
            revived = self.sessions.revive(cookie_id) if method == "POST" else None
            session = revived or self.sessions.new()
            if revived is None:
                request.setHeader(b"Set-Cookie", self.sessions.set_cookie(session,
                                                                           request.isSecure()))
        request.web_user = session.user
        form: dict[str, list[str]] = {}
        files: list[Upload] = []
        if method == "POST":
            try:
                form, files = parse_body(request)
            except ValueError:
                return self.error_page(None, 400, "The form could not be read.")
            if not csrf.token_ok(session, (form.get(csrf.FIELD) or [""])[0]):
                log.info("web: {method} {path} from {peer} refused: no valid CSRF token",
                         method=method, path=path, peer=_peer(request))
                return self.error_page(None, 403, "This form has expired or did not come from "
                                                  "this site. Go back, reload the page and try "
                                                  "again.")
        req = WebRequest(request, session, form, files)
        if auth and session.user is None:
            if method in ("GET", "HEAD"):
                return redirect(self.login_path)
            return self.error_page(req, 403, "Please log in first.")
        resp = await handler(req, **m.groupdict())
        request.web_user = req.user
        return resp


def parse_body(request: Any) -> tuple[dict[str, list[str]], list[Upload]]:
    """(form fields, uploaded files) of a POST body; ValueError when it cannot be read,
    including a body of more than MAX_FIELDS fields or parts (bounded work for a body that
    anyone, logged in or not, can send before its CSRF token is checked)."""
    request.content.seek(0)
    body = request.content.read()
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
    kind = ctype.split(";")[0].strip().lower()
    try:
        if kind == "multipart/form-data":
            return _multipart(body, ctype)
        if kind in ("application/x-www-form-urlencoded", ""):
            text = body.decode("utf-8")
            return urllib.parse.parse_qs(text, keep_blank_values=True,
                                         max_num_fields=MAX_FIELDS), []
    except ValueError:
        raise
    except Exception as e:  # RecursionError, UnicodeError...: a body we will not read
        raise ValueError(f"unreadable body: {type(e).__name__}") from None
    raise ValueError(f"unsupported body type {kind}")


def _multipart(body: bytes, ctype: str) -> tuple[dict[str, list[str]], list[Upload]]:
    if "\r" in ctype or "\n" in ctype:
        raise ValueError("bad content type")
    if body.count(b"\n--") > MAX_FIELDS + 1:  # every part (nested too) starts so
        raise ValueError("too many parts")
    head = f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\n\r\n".encode("latin-1")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("not multipart")
    form: dict[str, list[str]] = {}
    files: list[Upload] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            if filename or data:
                files.append(Upload(str(name), filename, part.get_content_type(), data))
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            value = data.decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise ValueError("a field is not UTF-8") from None
        form.setdefault(str(name), []).append(value)
    return form, files
