"""The ``[admin_web]`` listeners of the main process: the admin API (adminweb/api.py) under
``/api/v1/`` and the console (adminweb/console.py) at every other path, over plain HTTP on loopback
(``listen``) and HTTPS (``tls_listen``, asking for a client certificate when ``client_ca`` is
set). Wired by service.py like the monitoring listener.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from pop3coexist.config import Config
from pop3coexist.identity.adminaccounts import AdminTokens
from pop3coexist.ops.context import Context

MAX_BODY = 1024 * 1024  # a form or a JSON request; no uploads here


class _NotFound(resource.Resource):
    """Everything the admin site does not serve: 404 with no detail."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class _Root(resource.Resource):
    """``/api/...`` to the API's tree, every other path to the console (a leaf that routes
    on the whole path), or 404 without one."""

    def __init__(self, api_tree: resource.Resource, console: resource.Resource | None) -> None:
        super().__init__()
        self.api_tree = api_tree
        self.console = console

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802
        if path == b"api":
            return self.api_tree
        return self.console if self.console is not None else _NotFound()


def context_factory(config: Config, store: Any, checker: Any, reactor: Any,
                    flush: Callable[[], None] | None = None) -> Callable[[str, str], Context]:
    """``make(actor, via) -> Context`` for the operations run by the API and the console: the
    server's own store, look-ups through its checker on the reactor thread, failure reports
    through the SMTP front-end's ``delete_with_report``; ``flush()`` (the delivery runner's, run
on the reactor thread) for ``queue flush``. Called in a worker thread."""
    from pop3coexist.smtp.bounce import delete_with_report

    def resolve(address: str) -> str | None:
        return threads.blockingCallFromThread(reactor, checker.resolve_recipient, address)

    def make(actor: str, via: str) -> Context:
        return Context(config, store=store, resolve=resolve, bounce=delete_with_report,
                       actor=actor, via=via, flush=run_flush)

    def run_flush() -> None:
        if flush is not None:
            reactor.callFromThread(flush)

    return make


def admin_site(config: Config, store: Any, checker: Any, reactor: Any,
               flush: Callable[[], None] | None = None, metrics: Any = None,
               console: bool = True) -> server.Site:
    """The site: the API at ``/api/v1/`` and the console at every other path (web core's
    ``make_site``: bounded bodies, request logs without query strings)."""
    from pop3coexist.adminweb.api import AdminApi
    from pop3coexist.web.app import make_site

    web = config.admin_web

    def blocking(f: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    info = {"server": {"hostname": config.server.hostname,
                       "auth_method": config.auth.method}}
    make_context = context_factory(config, store, checker, reactor, flush)
    api = AdminApi(make_context, AdminTokens(web.tokens_path(config.server.state_dir)), info,
                   use_certificates=web.client_ca is not None, blocking=blocking)
    v1 = resource.Resource()
    v1.putChild(b"v1", api)
    app = make_console(config, make_context, reactor, blocking, metrics) if console else None
    return make_site(_Root(v1, app), MAX_BODY)


def make_console(config: Config, make_context: Callable[[str, str], Context], reactor: Any,
                 blocking: Callable[..., Any], metrics: Any) -> Any:
    """The console (adminweb/console.py): its own sessions (cookie ``pop3coexist_admin``), the
    admin accounts through ``AdminChecker`` with its own failed-log-in throttle, and the
    graphs' sampler (started with the reactor)."""
    from pop3coexist.adminweb.console import AdminChecker, AdminConsole
    from pop3coexist.adminweb.graphs import Sampler
    from pop3coexist.identity.adminaccounts import AdminAccounts
    from pop3coexist.policy.throttle import AuthThrottle
    from pop3coexist.web.login import WebLogin
    from pop3coexist.web.sessions import SessionStore

    web = config.admin_web
    sessions = SessionStore(reactor, idle_timeout=web.session_timeout, max_age=12 * 3600.0,
                            max_sessions=1000, cookie_name="pop3coexist_admin")
    checker = AdminChecker(AdminAccounts(web.accounts_path(config.server.state_dir)), blocking)
    login = WebLogin(checker, AuthThrottle(reactor, base=2.0, maximum=30.0), reactor,
                     name="admin console")
    sampler = Sampler(config.server.queue_dir, metrics, web.graph_interval, web.graph_history,
                      reactor)
    reactor.callWhenRunning(sampler.start)
    return AdminConsole(config, make_context, sessions, login, blocking, sampler)


ADMIN_MAX_CONNECTIONS = 100  # the console and API's connections at once (past it: 503)
ADMIN_MAX_PER_CLIENT = 20  # ... from one address


def admin_listeners(config: Config, store: Any, checker: Any, reactor: Any,
                    flush: Callable[[], None] | None = None, metrics: Any = None
                    ) -> list[tuple[str, str, Any]]:
    """``(role, endpoint description, factory)`` of every ``[admin_web]`` listener: role
    ``admin_web`` (plain, loopback) or ``admin_webs`` (TLS). ConfigError for unusable TLS
    files."""
    web = config.admin_web
    if not web.enabled:
        return []
    from pop3coexist.policy.connlimit import ConnectionLimiter
    from pop3coexist.web.listen import LimitedFactory

    site = LimitedFactory(admin_site(config, store, checker, reactor, flush, metrics),
                          ConnectionLimiter(ADMIN_MAX_CONNECTIONS, ADMIN_MAX_PER_CLIENT),
                          name="admin_web")
    out: list[tuple[str, str, Any]] = [("admin_web", desc, site) for desc in web.listen]
    if web.tls_listen:
        from pop3coexist.tls import (
            reloadable_client_certificate_options,
            reloadable_server_options,
        )

        # both reloaded by SIGHUP (tls.reload_all), like the mail listeners' certificate
        options = (reloadable_client_certificate_options(config.tls, web.client_ca)
                   if web.client_ca is not None else reloadable_server_options(config.tls))
        for desc in web.tls_listen:
            out.append(("admin_webs", desc, TLSMemoryBIOFactory(options, False, site)))
    return out
