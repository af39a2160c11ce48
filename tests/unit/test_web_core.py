"""The shared web core (pop3coexist.web): sessions, CSRF, headers, escaping, log-in throttle,
the listener rule. HTTP requests go through a real twisted.web Site over a StringTransport."""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from pop3coexist.config import is_loopback_endpoint
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.interfaces import IWebSessions
from pop3coexist.policy.throttle import AuthThrottle
from pop3coexist.web import csrf, headers, listen
from pop3coexist.web.app import Response, WebApp, make_site, redirect
from pop3coexist.web.login import LoginFailed, WebLogin
from pop3coexist.web.render import Renderer
from pop3coexist.web.sessions import SessionStore
from tests.support.fakes import FakeChecker


class EchoApp(WebApp):
    """A tiny front-end over the core: a log-in form, a page echoing a value, a POST."""

    def __init__(self, sessions, login, recheck=10.0):
        super().__init__(sessions, Renderer(), checker=login.checker, recheck=recheck)
        self.login = login
        self.route("GET", "/login", self.login_form, auth=False)
        self.route("POST", "/login", self.do_login, auth=False)
        self.route("GET", "/", self.home)
        self.route("POST", "/act", self.act)
        self.route("GET", "/echo", self.echo, auth=False)
        self.acted = 0

    async def login_form(self, req):
        return Response(req.session.csrf.encode())

    async def do_login(self, req):
        try:
            account = await self.login.authenticate(req.arg("user"), req.arg("password"),
                                                    req.peer)
        except LoginFailed:
            return self.error_page(req, 403, "refused")
        if not await self.log_in(req, account):
            return self.error_page(req, 403, "refused")
        return redirect("/")

    async def home(self, req):
        return Response(f"home {req.user}".encode())

    async def act(self, req):
        self.acted += 1
        return redirect("/")

    async def echo(self, req):
        return Response(self.renderer.env.from_string("<p>{{ v }}</p>").render(
            v=req.arg("v")).encode())


class Client:
    """Raw HTTP/1.1 requests into a Site, one connection each; keeps the cookie."""

    def __init__(self, site, secure=False, clock=None):
        self.site = site
        self.clock = clock
        self.waited = 0.0  # clock seconds the last answer was held
        self.cookie = None
        self.secure = secure

    def request(self, method, path, body=b"", headers=None, cookie=True):
        ch = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        ch.makeConnection(t)
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
        if cookie and self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if method == "POST":
            lines.append("Content-Type: application/x-www-form-urlencoded")
            lines.append(f"Content-Length: {len(body)}")
        ch.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.waited = 0.0
        while not t.value() and self.clock is not None and self.waited < 60:
            self.clock.advance(0.5)
            self.waited += 0.5
        raw = t.value()
        head, _, content = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        hdrs = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b": ")
            hdrs.setdefault(k.decode().lower(), []).append(v.decode())
        for c in hdrs.get("set-cookie", []):
            value = c.split(";")[0]
            self.cookie = None if value.endswith("=") else value
        ch.connectionLost(None)
        return status, hdrs, content


@pytest.fixture
def env():
    clock = task.Clock()
    sessions = SessionStore(clock, idle_timeout=600, max_age=3600, cookie_name="s")
    throttle = AuthThrottle(clock, base=1.0, maximum=8.0)
    checker = FakeChecker({"ted@pop.contoso.test": "secret"})
    app = EchoApp(sessions, WebLogin(checker, throttle, clock))
    return clock, sessions, throttle, app, Client(make_site(app, 1000), clock=clock)


def _login(client, password="secret"):
    _, _, token = client.request("GET", "/login")
    body = f"csrf_token={token.decode()}&user=ted@pop.contoso.test&password={password}"
    return client.request("POST", "/login", body.encode())


def test_sessions_interface_and_random_ids():
    """SessionStore provides IWebSessions; ids and CSRF tokens are 256-bit random values,
    all distinct, and repr never shows the id."""
    s = SessionStore(task.Clock())
    verifyObject(IWebSessions, s)
    made = [s.new() for _ in range(50)]
    ids = {m.id for m in made} | {m.csrf for m in made}
    assert len(ids) == 100 and all(len(m.id) >= 43 for m in made)
    assert made[0].id not in repr(made[0])


def test_login_rotates_the_session_id(env):
    """Session fixation: the id the browser had before log-in is destroyed; the logged-in
    session has a new id and a new CSRF token, and the old cookie opens nothing."""
    clock, sessions, _, app, client = env
    client.request("GET", "/login")
    before = client.cookie
    old_token = sessions.get(before.split("=", 1)[1]).csrf
    status, _, _ = _login(client)
    assert status == 303
    assert client.cookie != before
    new = sessions.get(client.cookie.split("=", 1)[1])
    assert new.user == "ted@pop.contoso.test" and new.csrf != old_token
    assert sessions.get(before.split("=", 1)[1]) is None
    fixed = Client(client.site)
    fixed.cookie = before
    status, hdrs, _ = fixed.request("GET", "/")
    assert status == 303 and hdrs["location"] == ["/login"]


def test_cookie_attributes(env):
    """The cookie is HttpOnly, SameSite=Strict, has a Path, and is Secure on HTTPS only."""
    _, sessions, _, _, _ = env
    s = sessions.new()
    plain = sessions.set_cookie(s, secure=False).decode()
    tls = sessions.set_cookie(s, secure=True).decode()
    for c in (plain, tls):
        assert "HttpOnly" in c and "SameSite=Strict" in c and "Path=/" in c
    assert "Secure" not in plain and "Secure" in tls
    assert "Max-Age=0" in sessions.set_cookie(None, True).decode()


def test_timeouts(env):
    """A session ends after idle_timeout without use, and after max_age however used."""
    clock, sessions, _, _, _ = env
    s = sessions.new("a@b")
    clock.advance(601)
    assert sessions.get(s.id) is None
    s = sessions.new("a@b")
    for _ in range(7):
        clock.advance(500)
        assert sessions.get(s.id) is s  # used every 500 s: alive for 3500 s
    clock.advance(500)
    assert sessions.get(s.id) is None  # 4000 s after log-in: past max_age


def test_post_without_or_with_wrong_csrf_is_refused(env):
    """A POST with no token, a wrong token, or another session's token gets 403 and the
    handler never runs; the right token passes."""
    _, sessions, _, app, client = env
    _login(client)
    for body in (b"", b"csrf_token=nope", f"csrf_token={sessions.new().csrf}".encode()):
        status, _, content = client.request("POST", "/act", body)
        assert status == 403 and b"expired" in content
    assert app.acted == 0
    token = sessions.get(client.cookie.split("=", 1)[1]).csrf
    status, _, _ = client.request("POST", "/act", f"csrf_token={token}".encode())
    assert status == 303 and app.acted == 1
    assert csrf.token_ok(None, "x") is False


def test_security_headers_everywhere(env):
    """Every response (pages, redirects, 404, 403, static files) has the CSP without inline
    script, nosniff, Referrer-Policy, frame denial; logged-in pages are no-store."""
    _, _, _, _, client = env
    seen = []
    for method, path in (("GET", "/login"), ("GET", "/nope"), ("POST", "/act"),
                         ("GET", "/static/style.css")):
        seen.append(client.request(method, path))
    _login(client)
    seen.append(client.request("GET", "/"))
    for _status, hdrs, _ in seen:
        csp = hdrs["content-security-policy"][0]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        for part in ("object-src 'none'", "frame-ancestors 'none'", "base-uri 'none'",
                     "form-action 'self'", "style-src 'self'"):
            assert part in csp
        assert hdrs["x-content-type-options"] == ["nosniff"]
        assert hdrs["referrer-policy"] == ["no-referrer"]
    assert seen[-1][1]["cache-control"] == ["no-store"]
    assert seen[3][0] == 200 and "text/css" in seen[3][1]["content-type"][0]
    assert headers.CSP == headers.CSP.strip()


def test_escaping(env):
    """Template values are HTML-escaped: a script tag in a parameter comes back as text."""
    _, _, _, _, client = env
    _, _, content = client.request("GET", "/echo?v=%3Cscript%3Ealert(1)%3C/script%3E%22")
    assert b"<script>" not in content and b"&lt;script&gt;" in content and b"&#34;" in content


def test_failed_web_logins_feed_the_shared_throttle(env):
    """A failed web log-in counts in the throttle it was given (POP3's in web mail): the
    failure delay holds the answer, and a success clears it."""
    clock, _, throttle, _, client = env
    status, _, _ = _login(client, "wrong")
    assert status == 403 and client.waited == 1.0  # held by the failure delay (base 1 s)
    assert throttle.failures("127.0.0.1") == 1
    status, _, _ = _login(client, "wrong")
    assert status == 403 and client.waited == 2.0  # doubled
    assert throttle.failures("127.0.0.1") == 2
    throttle.failure_delay("127.0.0.1")  # a POP3 failure from there counts in the same row
    assert throttle.admit_delay("127.0.0.1") > 0  # and the next check, web or POP3, waits
    status, _, _ = _login(client)
    assert status == 303 and throttle.failures("127.0.0.1") == 0


def test_large_body_refused(env):
    """A body over max_body is answered 413 and never parsed."""
    _, _, _, _, client = env
    status, _, _ = client.request("POST", "/act", b"x" * 2000)
    assert status == 413


@pytest.mark.parametrize("desc,loop", [
    ("tcp:8080:interface=127.0.0.1", True), ("tcp:8080:interface=127.0.0.5", True),
    ("tcp6:8080:interface=\\:\\:1", True), ("unix:/run/x.sock", True),
    ("tcp:8080", False), ("tcp:8080:interface=0.0.0.0", False),
    ("tcp:8080:interface=192.0.2.1", False)])
def test_loopback_rule(desc, loop):
    """Plain HTTP is allowed on loopback and unix sockets only."""
    assert is_loopback_endpoint(desc) is loop


def test_listeners_refuse_plain_off_loopback():
    """listen.listeners refuses a plain listener off loopback (ConfigError naming the key)
    and wraps tls_listen entries in TLS."""
    with pytest.raises(ConfigError, match=r"\[web.listen\]"):
        listen.listeners("web", "web", ("tcp:80",), (), object(), None)
    from twisted.internet.ssl import CertificateOptions

    out = listen.listeners("web", "web", ("tcp:8080:interface=127.0.0.1",), ("tcp:8443",),
                           object(), CertificateOptions())
    assert [r for r, _, _ in out] == ["web", "web_tls"]


def test_config_error_names_file_line_and_key(tmp_path):
    """A non-loopback plain [web] listen is a config error naming the file, line and key."""
    from pop3coexist.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nhostname = "h.test"\nstate_dir = "var"\n\n[web]\n'
                   'listen = ["tcp:8080"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert re.search(r"c\.toml:6: \[web\.listen\]", str(e.value)), str(e.value)


@pytest.fixture
def stamped():
    clock = task.Clock()
    clock.advance(1000)
    sessions = SessionStore(clock, idle_timeout=600, max_age=3600, cookie_name="s")
    checker = FakeChecker({"ted@pop.contoso.test": "secret"})
    app = EchoApp(sessions, WebLogin(checker, AuthThrottle(clock, base=1.0, maximum=8.0),
                                     clock), recheck=10.0)
    return clock, sessions, checker, app, Client(make_site(app, 1000), clock=clock)


def test_a_password_change_ends_the_session_at_the_next_recheck(stamped):
    """OWASP ASVS 3.3.3: once the account's password changed, its logged-in session is
    served only until the next re-check (``recheck`` seconds), then destroyed: a GET goes to
    the log-in page with a new anonymous cookie and the old cookie opens nothing again."""
    clock, sessions, checker, _, client = stamped
    assert _login(client)[0] == 303
    old = client.cookie
    assert client.request("GET", "/")[2] == b"home ted@pop.contoso.test"
    checker.accounts["ted@pop.contoso.test"] = "changed"
    clock.advance(5)
    assert client.request("GET", "/")[0] == 200  # not asked again within 10 s
    clock.advance(6)
    status, hdrs, _ = client.request("GET", "/")
    assert status == 303 and hdrs["location"] == ["/login"] and client.cookie != old
    assert sessions.get(old.split("=", 1)[1]) is None
    client.cookie = old
    assert client.request("GET", "/")[0] == 303


def test_removed_account_ends_the_session_and_an_outage_does_not(stamped):
    """A session survives while the accounts cannot be read (AuthUnavailable: asked again
    later, nobody logged out by an outage) and ends once the account is gone."""
    clock, _, checker, _, client = stamped
    assert _login(client)[0] == 303
    checker.fail = AuthUnavailable("directory down")
    clock.advance(11)
    assert client.request("GET", "/")[0] == 200
    checker.fail = None
    del checker.accounts["ted@pop.contoso.test"]
    clock.advance(11)
    assert client.request("GET", "/")[0] == 303


def test_an_unchanged_account_keeps_its_session(stamped):
    """Re-checks of an unchanged account never end its session, and with ``recheck`` 0 the
    account is asked at every request."""
    clock, _, checker, app, client = stamped
    app.recheck = 0.0
    assert _login(client)[0] == 303
    for _ in range(5):
        clock.advance(1)
        assert client.request("GET", "/")[0] == 200
    checker.accounts["ted@pop.contoso.test"] = "changed"
    assert client.request("GET", "/")[0] == 303


def test_a_stamp_unreadable_at_log_in_is_taken_at_the_first_check(stamped):
    """A log-in while the stamp cannot be read still logs in; the stamp is taken at the
    first re-check, and a change after that still ends the session."""
    clock, _, checker, app, client = stamped
    real = checker.credential_stamp
    checker.credential_stamp = lambda a: defer.fail(AuthUnavailable("down"))
    assert _login(client)[0] == 303
    checker.credential_stamp = real
    clock.advance(11)
    assert client.request("GET", "/")[0] == 200
    checker.accounts["ted@pop.contoso.test"] = "changed"
    clock.advance(11)
    assert client.request("GET", "/")[0] == 303


def test_connection_limits_per_address_total_and_trusted_proxies(env):
    """Web listeners count connections like the mail listeners (``listen.LimitedFactory`` over
    the real ConnectionLimiter): past the per-address limit one more connection gets a 503
    with Retry-After and is closed while the others go on; closing one frees its place; a
    trusted reverse proxy counts only in the total; the total holds for everyone."""
    import ipaddress

    from pop3coexist.policy.connlimit import ConnectionLimiter

    _, _, _, app, _ = env
    limiter = ConnectionLimiter(4, 2)
    factory = listen.LimitedFactory(make_site(app, 1000), limiter,
                                    (ipaddress.ip_network("10.0.0.0/8"),))

    def connect(host):
        addr = IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 80))
        proto.makeConnection(t)
        return proto, t

    first, _second = connect("192.0.2.1"), connect("192.0.2.1")
    _busy, t = connect("192.0.2.1")
    assert t.value().startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in t.value()
    assert t.disconnecting and not first[1].disconnecting
    first[0].connectionLost(None)
    ok, ok_t = connect("192.0.2.1")
    assert ok_t.value() == b"" and not ok_t.disconnecting
    proxied = [connect("10.1.2.3"), connect("10.1.2.3")]  # the total is now 4
    assert all(not t.disconnecting for _, t in proxied)
    assert connect("198.51.100.7")[1].value().startswith(b"HTTP/1.1 503 ")
    ok.dataReceived(b"GET /echo?v=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok_t.value().startswith(b"HTTP/1.1 200 ")
