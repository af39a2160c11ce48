"""The ``[admin_web]`` listeners of the main process: the admin API (adminweb/api.py) under
``/api/v1/`` (and the console, adminweb/console.py, at ``/``), over plain HTTP on loopback
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


class _NotFound(resource.Resource):
    """Everything the admin site does not serve: 404 with no detail."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class _Root(resource.Resource):
    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802
        return _NotFound()


class _Quiet(server.Site):
    """A Site whose request lines do not go to the server's log (the audit log says what
    administrators did; the API logs refusals itself)."""

    def log(self, request: Any) -> None:
        pass


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
               flush: Callable[[], None] | None = None,
               extra: Callable[[resource.Resource, Callable[..., Any]], None] | None = None
               ) -> server.Site:
    """The site: ``/api/v1/`` and whatever ``extra(root, blocking)`` adds (the console)."""
    from pop3coexist.adminweb.api import AdminApi

    web = config.admin_web

    def blocking(f: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    info = {"server": {"hostname": config.server.hostname,
                       "auth_method": config.auth.method}}
    api = AdminApi(context_factory(config, store, checker, reactor, flush),
                   AdminTokens(web.tokens_path(config.server.state_dir)), info,
                   use_certificates=web.client_ca is not None, blocking=blocking)
    root = _Root()
    v1 = resource.Resource()
    v1.putChild(b"v1", api)
    root.putChild(b"api", v1)
    if extra is not None:
        extra(root, blocking)
    site = _Quiet(root)
    site.displayTracebacks = False
    return site


def admin_listeners(config: Config, store: Any, checker: Any, reactor: Any,
                    flush: Callable[[], None] | None = None) -> list[tuple[str, str, Any]]:
    """``(role, endpoint description, factory)`` of every ``[admin_web]`` listener: role
    ``admin_web`` (plain, loopback) or ``admin_webs`` (TLS). ConfigError for unusable TLS
    files."""
    web = config.admin_web
    if not web.enabled:
        return []
    site = admin_site(config, store, checker, reactor, flush)
    out: list[tuple[str, str, Any]] = [("admin_web", desc, site) for desc in web.listen]
    if web.tls_listen:
        from pop3coexist.tls import client_certificate_options, reloadable_server_options

        options = (client_certificate_options(config.tls, web.client_ca)
                   if web.client_ca is not None else reloadable_server_options(config.tls))
        for desc in web.tls_listen:
            out.append(("admin_webs", desc, TLSMemoryBIOFactory(options, False, site)))
    return out
