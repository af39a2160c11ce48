"""The admin console: server-rendered HTML pages on the ``[admin_web]`` listeners (README
"Admin console"), built on the web core (``pop3coexist.web``: ``WebApp`` routing, sessions
with a new id at log-in, CSRF on every POST, CSP without inline script, the escaping renderer
and the shared stylesheet, ``WebLogin`` with a throttle).

Administrators log in with the admin accounts (identity/adminaccounts.py, through
``AdminChecker``), never with mail accounts. Pages: stat, domains, mailboxes, aliases and lists,
queue, quarantine, nodes, graphs. Every change is a POST to ``/do/<operation>`` whose form
fields are the operation's parameters (ops/registry.py): the same code ``pop3coexist-admin``
runs, audited with the administrator's name (``via=console``); the browser is sent back to the
page with a notice or the one-line error.

Several servers: a server picker on every page chooses this server or one of ``[admin_web]
peers``; for a peer every page and change goes through its admin API with the same client
``pop3coexist-admin --server`` uses (ops/client.py), naming the administrator in
``X-Pop3coexist-Admin-For`` for the peer's audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from markupsafe import Markup
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from pop3coexist.adminweb.graphs import Sampler, svg_chart
from pop3coexist.config import Config
from pop3coexist.errors import AdminError, AuthUnavailable
from pop3coexist.identity.adminaccounts import AdminAccounts
from pop3coexist.identity.stamps import stamp_of
from pop3coexist.interfaces import ICredentialStamp
from pop3coexist.ops.client import ApiClient, read_token
from pop3coexist.ops.context import EXPECTED, Context, error_line
from pop3coexist.ops.registry import OPERATIONS, run
from pop3coexist.web.app import Response, WebApp, WebRequest, redirect
from pop3coexist.web.login import LoginFailed, LoginUnavailable, WebLogin
from pop3coexist.web.render import Renderer

HERE = Path(__file__).parent
PAGES = ("stat", "domains", "mailboxes", "aliases", "queue", "quarantine", "nodes", "graphs")
LOCAL = ""  # the server picker's value for this server


@implementer(ICredentialsChecker, ICredentialStamp)
class AdminChecker:
    """Checks an administrator's name and password against the admin accounts file (scrypt, in
    a thread: tens of milliseconds of CPU); the avatar id is the name."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, accounts: AdminAccounts, blocking: Callable[..., defer.Deferred]) -> None:
        self.accounts = accounts
        self.blocking = blocking

    async def _check(self, credentials: Any) -> str:
        name = credentials.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        ok = await self.blocking(self.accounts.check, name, credentials.password)
        if not ok:
            raise UnauthorizedLogin()
        return name

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:  # noqa: N802 (cred name)
        return defer.ensureDeferred(self._check(credentials))

    def _stamp(self, name: str) -> bytes | None:
        try:
            entry = self.accounts.read().get(name)
        except (AdminError, OSError) as e:
            raise AuthUnavailable(f"the admin accounts cannot be read now: {e}") from None
        stored = entry.get("scrypt") if isinstance(entry, dict) else None
        return stamp_of(b"admin", name, stored) if isinstance(stored, str) else None

    def credential_stamp(self, account: str) -> defer.Deferred:
        """See ICredentialStamp: from the administrator's stored scrypt hash (a new one at
        every ``admin passwd``); None once the administrator is removed."""
        return self.blocking(self._stamp, account)


class AdminConsole(WebApp):
    """The console's pages (module docstring)."""

    def __init__(self, config: Config, make_context: Callable[[str, str], Context],
                 sessions: Any, login: WebLogin, blocking: Callable[..., defer.Deferred],
                 sampler: Sampler | None) -> None:
        renderer = Renderer(HERE / "templates", globals={"site_title": "pop3coexist admin",
                                                         "logout_path": "/logout"})
        # an administrator removed or given a new password is logged out at the next page
        super().__init__(sessions, renderer, login_path="/login", checker=login.checker,
                         recheck=0.0)
        self.config = config
        self.make_context = make_context
        self.login = login
        self.blocking = blocking
        self.sampler = sampler
        self.peers = {p.name: p for p in config.admin_web.peers}
        self.route("GET", "/login", self.login_form, auth=False)
        self.route("POST", "/login", self.login_post, auth=False)
        self.route("POST", "/logout", self.logout)
        self.route("GET", "/", self.home)
        self.route("POST", "/server", self.pick_server)
        self.route("POST", r"/do/(?P<name>[a-z.]+)", self.do)
        for page in PAGES:
            self.route("GET", "/" + page, getattr(self, "page_" + page))

    # -- log-in

    async def login_form(self, req: WebRequest) -> Response:
        if req.user:
            return redirect("/stat")
        return self.page(req, "console/login.html", name="")

    async def login_post(self, req: WebRequest) -> Response:
        name = req.arg("username").strip()
        try:
            account = await self.login.authenticate(name, req.arg("password"), req.peer)
        except LoginFailed:
            return self.page(req, "console/login.html", 200, name=name,
                             error="Wrong administrator name or password.")
        except LoginUnavailable:
            return self.page(req, "console/login.html", 503, name=name,
                             error="The accounts cannot be checked now; try again later.")
        if not await self.log_in(req, account):
            return self.page(req, "console/login.html", 200, name=name,
                             error="Wrong administrator name or password.")
        return redirect("/stat")

    async def logout(self, req: WebRequest) -> Response:
        self.log_out(req)
        return redirect("/login")

    async def home(self, req: WebRequest) -> Response:
        return redirect("/stat")

    # -- the server picker and the calls

    def _server(self, req: WebRequest) -> str:
        chosen = req.session.data.get("server", LOCAL)
        return chosen if chosen in self.peers else LOCAL

    async def pick_server(self, req: WebRequest) -> Response:
        chosen = req.arg("server")
        if chosen != LOCAL and chosen not in self.peers:
            req.session.data["error"] = f"no server {chosen!r} in [admin_web] peers"
        else:
            req.session.data["server"] = chosen
        return redirect(_back(req.arg("back")))

    def _client(self, peer: Any, on_behalf: str) -> ApiClient:
        token = read_token(peer.token_file) if peer.token_file else None
        return ApiClient(peer.url, token=token, ca_file=peer.ca_file,
                         certificate=peer.certificate, private_key=peer.private_key,
                         on_behalf=on_behalf)

    async def call(self, req: WebRequest, name: str, params: dict[str, Any]) -> dict:
        """Run operation ``name`` on the chosen server; OpsError (and the other expected
        failures) as ``run`` or ``ApiClient.call`` raise them."""
        server = self._server(req)
        user = req.user or "?"
        if server == LOCAL:
            return await self.blocking(lambda: run(self.make_context(user, "console"), name,
                                                   params))
        peer = self.peers[server]
        on_behalf = f"{user}@{self.config.server.hostname}"
        return await self.blocking(lambda: self._client(peer, on_behalf).call(name, params))

    async def do(self, req: WebRequest, name: str) -> Response:
        back = _back(req.arg("back"))
        op = OPERATIONS.get(name)
        if op is None or not op.change:
            req.session.data["error"] = f"no operation {name}"
            return redirect(back)
        params: dict[str, Any] = {}
        for key, kind in op.params.items():
            value = req.arg(key)
            if kind == "bool":
                params[key] = value in ("on", "true", "1", "yes")
            elif kind == "list":
                params[key] = [v for v in value.replace(",", " ").split() if v]
            elif value != "" or kind == "str":
                params[key] = value
        try:
            result = await self.call(req, name, params)
        except EXPECTED as e:
            req.session.data["error"] = error_line(e)
        else:
            req.session.data["notice"] = " ".join(result.get("messages") or ["done"])
            if result.get("warnings"):
                req.session.data["warning"] = " ".join(result["warnings"])
        return redirect(back)

    # -- pages

    async def _show(self, req: WebRequest, template: str, reads: dict[str, tuple[str, dict]],
                    **context: Any) -> Response:
        data: dict[str, Any] = {}
        error = req.session.data.pop("error", "")
        for key, (name, params) in reads.items():
            try:
                data[key] = await self.call(req, name, params)
            except EXPECTED as e:
                error = error or error_line(e)
                data[key] = None
        server = self._server(req)
        return self.page(
            req, template, current=template.split("/")[-1].split(".")[0], data=data,
            notice=req.session.data.pop("notice", ""), warning=req.session.data.pop("warning", ""),
            error=error, server=server, servers=[LOCAL, *self.peers],
            server_label=server or f"{self.config.server.hostname} (this server)",
            hostname=self.config.server.hostname, **context)

    async def page_stat(self, req: WebRequest) -> Response:
        return await self._show(req, "console/stat.html", {"stat": ("stat", {})})

    async def page_domains(self, req: WebRequest) -> Response:
        return await self._show(req, "console/domains.html", {"domains": ("domain.list", {})})

    async def page_mailboxes(self, req: WebRequest) -> Response:
        domain = req.arg("domain") or None
        return await self._show(req, "console/mailboxes.html",
                                {"mailboxes": ("mailbox.list", {"domain": domain}),
                                 "domains": ("domain.list", {})}, domain=domain or "")

    async def page_aliases(self, req: WebRequest) -> Response:
        return await self._show(req, "console/aliases.html",
                                {"aliases": ("alias.list", {}), "lists": ("list.show", {})})

    async def page_queue(self, req: WebRequest) -> Response:
        return await self._show(req, "console/queue.html", {"queue": ("queue.list", {})})

    async def page_quarantine(self, req: WebRequest) -> Response:
        return await self._show(req, "console/quarantine.html",
                                {"quarantine": ("quarantine.list", {})})

    async def page_nodes(self, req: WebRequest) -> Response:
        return await self._show(req, "console/nodes.html", {"nodes": ("nodes", {})})

    async def page_graphs(self, req: WebRequest) -> Response:
        charts: list[Markup] = []
        metrics = False
        if self.sampler is not None and self._server(req) == LOCAL:
            series = self.sampler.series()
            metrics = self.sampler.metrics is not None
            charts.append(Markup(svg_chart(series["queue"], "Queue length", "messages")))
            if metrics:
                charts.append(Markup(svg_chart(series["accepted"], "Messages accepted per "
                                               "minute", "per minute")))
                charts.append(Markup(svg_chart(series["logins_ok"], "Log-ins per minute",
                                               "per minute")))
                charts.append(Markup(svg_chart(series["logins_failed"], "Failed log-ins per "
                                               "minute", "per minute")))
        return await self._show(req, "console/graphs.html", {}, charts=charts, metrics=metrics,
                                interval=self.config.admin_web.graph_interval)


def _back(path: str) -> str:
    """A console page to go back to: one of PAGES (with its query), else /stat."""
    base = path.split("?", 1)[0]
    return path if base.lstrip("/") in PAGES and path.startswith("/") else "/stat"
