"""The admin API: JSON over HTTP(S) under ``/api/v1/``, one endpoint per operation
(ops/registry.py; README "Admin console" has the table).

``GET /api/v1/<noun>/<verb>?param=...`` runs a read, ``POST /api/v1/<noun>/<verb>`` with a JSON
object (``Content-Type: application/json``) runs a change; ``GET /api/v1/`` describes the server
and the operations. Answers: ``200`` and the operation's JSON result; ``400 {"error": "<one
line>"}`` when the operation refuses (the line ``pop3coexist-admin`` prints); ``401`` without a
credential or with a wrong one, ``403`` for a client certificate that names no valid
administrator, with no detail either way; ``404`` unknown operation; ``405`` wrong method;
``413`` a body over 1 MB; ``415`` a change that is not JSON.

Credentials (``authenticate``): ``Authorization: Bearer <token>`` (identity/adminaccounts.py
``AdminTokens``, re-read on every request), or on a ``tls_listen`` listener with
``[admin_web] client_ca`` a client certificate that CA signed (the TLS handshake verifies it),
whose subject CN is the administrator's name. Operations run in a thread (they are blocking
file work); a look-up in the account source goes back to the reactor thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from pop3coexist.identity.adminaccounts import NAME, AdminTokens
from pop3coexist.ops.client import ON_BEHALF
from pop3coexist.ops.context import EXPECTED, Context, error_line
from pop3coexist.ops.registry import OPERATIONS, run

log = Logger()

MAX_BODY = 1024 * 1024


def certificate_admin(request: Any) -> str | None:
    """The CN of the verified client certificate of ``request``'s TLS connection, or None
    (no TLS, no certificate). A certificate is only there when the handshake verified it
    against ``client_ca`` (adminweb/site.py asks for one only then)."""
    transport = request.transport
    if not ISSLTransport.providedBy(transport):
        return None
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    cn = cert.get_subject().commonName
    return cn if isinstance(cn, str) else ""


def header(request: Any, name: bytes) -> str:
    """A request header as text ("" when absent)."""
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else (value or "")


def send_json(request: Any, code: int, value: Any) -> bytes:
    """Set the status and headers of a JSON answer; its body."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(value, indent=1).encode() + b"\n"


class AdminApi(resource.Resource):
    """``/api/v1/``: see the module docstring.

    ``make_context(actor, via) -> Context`` gives the operations their view of the state;
    ``tokens``: the token file; ``use_certificates``: whether a client certificate logs in
    (``client_ca`` set); ``blocking(f, *a)``: runs ``f`` off the reactor thread and returns a
    Deferred (``threads.deferToThread``; tests pass a synchronous one)."""

    isLeaf = True

    def __init__(self, make_context: Callable[[str, str], Context], tokens: AdminTokens,
                 info: dict[str, Any], use_certificates: bool,
                 blocking: Callable[..., defer.Deferred]) -> None:
        super().__init__()
        self.make_context = make_context
        self.tokens = tokens
        self.info = info
        self.use_certificates = use_certificates
        self.blocking = blocking

    def authenticate(self, request: Any) -> tuple[int, str | None]:
        """``(200, admin)``, or ``(401 | 403, None)``."""
        scheme, _, token = header(request, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                admin = self.tokens.admin_for(token.strip())
            except EXPECTED as e:
                log.error("admin API: the token file cannot be read: {why}", why=error_line(e))
                admin = None
            return (200, admin) if admin else (401, None)
        if self.use_certificates:
            cn = certificate_admin(request)
            if cn is not None:
                return (200, cn) if NAME.match(cn) else (403, None)
        return 401, None

    def render(self, request: Any) -> Any:
        peer = request.getClientAddress()
        code, admin = self.authenticate(request)
        if admin is None:
            log.info("admin API: {code} for {method} {path} from {peer}", code=code,
                     method=request.method.decode("latin-1", "replace"),
                     path=request.path.decode("latin-1", "replace")[:200],
                     peer=getattr(peer, "host", peer))
            if code == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="pop3coexist-admin"')
            return send_json(request, code, {"error": "unauthorized" if code == 401
                                             else "forbidden"})
        parts = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if not parts:
            return send_json(request, 200, dict(self.info, admin=admin, operations=[
                {"name": op.name, "method": op.method, "path": op.path,
                 "params": dict(op.params), "doc": op.doc} for op in OPERATIONS.values()]))
        op = OPERATIONS.get(".".join(parts))
        if op is None:
            return send_json(request, 404, {"error": f"no operation {'/'.join(parts)}"})
        method = request.method.decode("latin-1")
        if method != op.method:
            request.setHeader(b"allow", op.method.encode())
            return send_json(request, 405, {"error": f"{op.name} takes {op.method}"})
        if op.change:
            params = self._body(request)
            if isinstance(params, bytes):
                return params
        else:
            params = self._query(request, op.params)
        behalf = header(request, ON_BEHALF.lower().encode()).strip()
        actor = f"{admin}(for {behalf[:100]})" if behalf else admin
        d = self.blocking(self._run, actor, op.name, params)
        d.addCallbacks(lambda result: self._finish(request, 200, result),
                       lambda f: self._failed(request, f))
        return server.NOT_DONE_YET

    def _run(self, admin: str, name: str, params: dict[str, Any]) -> dict:
        return run(self.make_context(admin, "api"), name, params)

    def _body(self, request: Any) -> dict[str, Any] | bytes:
        if getattr(request, "too_big", False):
            return send_json(request, 413, {"error": "the request is over 1 MB"})
        kind = header(request, b"content-type").split(";")[0].strip().lower()
        if kind != "application/json":
            return send_json(request, 415, {"error": "a change takes a JSON object "
                                                     "(Content-Type: application/json)"})
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return send_json(request, 413, {"error": "the request is over 1 MB"})
        try:
            params = json.loads(raw or b"{}")
        except ValueError:
            return send_json(request, 400, {"error": "the body is not valid JSON"})
        if not isinstance(params, dict):
            return send_json(request, 400, {"error": "the body must be a JSON object"})
        return params

    @staticmethod
    def _query(request: Any, declared: Any) -> dict[str, Any]:
        query = parse_qs(request.uri.decode("latin-1").partition("?")[2],
                         keep_blank_values=True)
        params: dict[str, Any] = {}
        for name, values in query.items():
            kind = declared.get(name)
            if kind == "list":
                params[name] = values
            elif kind == "bool":
                params[name] = values[-1].lower() in ("1", "true", "yes")
            else:
                params[name] = values[-1]  # unknown names are refused by the operation
        return params

    def _finish(self, request: Any, code: int, value: Any) -> None:
        if getattr(request, "_disconnected", False):  # the client went away meanwhile
            return
        request.write(send_json(request, code, value))
        request.finish()

    def _failed(self, request: Any, failure: Failure) -> None:
        if failure.check(*EXPECTED):
            self._finish(request, 400, {"error": error_line(failure.value)})
            return
        log.failure("admin API: an operation failed", failure)
        self._finish(request, 500, {"error": "internal error (see the server's log)"})
