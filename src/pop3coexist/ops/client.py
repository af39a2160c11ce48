"""A client of another server's admin API (README "Admin console"): ``pop3coexist-admin --server
URL`` and the console's peers run the operations through it.

``ApiClient(url, token=..., ca_file=..., certificate=..., private_key=...).call(name, params)``
sends ``GET /api/v1/<noun>/<verb>?...`` for a read or ``POST`` with a JSON object for a change
(ops/registry.py names both) and returns the operation's JSON result, or raises ``OpsError``
with the one line the server gave (or one saying why the server could not be asked).
Blocking (urllib); HTTPS certificates are verified (the system's CAs, or ``ca_file``); the
token goes in an ``Authorization: Bearer`` header, never in the URL. A console passes
``on_behalf`` (the administrator logged in to it), sent as ``ON_BEHALF``.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pop3coexist.ops.context import OpsError
from pop3coexist.ops.registry import OPERATIONS

#: the header a console sends with the name of the administrator it acts for (the peer's
#: audit log shows ``admin=<token's name>(for <that name>)``)
ON_BEHALF = "X-Pop3coexist-Admin-For"

#: the largest answer read (a long queue listing fits many times over)
MAX_ANSWER = 64 * 1024 * 1024


def read_token(path: str | Path) -> str:
    """The token in ``path`` (the token alone; a trailing newline ignored); OpsError if the
    file cannot be read or is empty."""
    try:
        text = Path(path).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise OpsError(f"cannot read the token file {path}: {getattr(e, 'strerror', e)}") from None
    if not text:
        raise OpsError(f"the token file {path} is empty")
    return text


class ApiClient:
    """One server's admin API (module docstring)."""

    def __init__(self, url: str, *, token: str | None = None, ca_file: str | Path | None = None,
                 certificate: str | Path | None = None, private_key: str | Path | None = None,
                 timeout: float = 60.0, on_behalf: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OpsError(f"{url!r} is not a server URL (https://host:port/)")
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        self.token = token
        self.timeout = timeout
        self.on_behalf = on_behalf
        self.context: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            try:
                self.context = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file else None)
                if certificate:
                    self.context.load_cert_chain(str(certificate),
                                                 str(private_key) if private_key else None)
            except (OSError, ssl.SSLError) as e:
                raise OpsError(f"cannot load the TLS files: {e}") from None
        elif certificate:
            raise OpsError("a client certificate needs an https:// server URL")

    def call(self, name: str, params: dict[str, Any] | None = None) -> dict:
        """Run operation ``name`` on the server; its result, or OpsError (module docstring)."""
        op = OPERATIONS.get(name)
        if op is None:
            raise OpsError(f"no operation {name}")
        params = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.base + op.path
        data = None
        headers = self._headers()
        if op.change:
            data = json.dumps(params).encode()
            headers["Content-Type"] = "application/json"
        elif params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        return self._request(urllib.request.Request(url, data=data, headers=headers,
                                                    method=op.method))

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.on_behalf:
            headers[ON_BEHALF] = self.on_behalf
        return headers

    def _request(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.context) as answer:
                return self._json(answer.read(MAX_ANSWER))
        except urllib.error.HTTPError as e:
            try:
                body = self._json(e.read(MAX_ANSWER))
            except OpsError:
                body = {}
            finally:
                e.close()
            if e.code in (401, 403):
                raise OpsError(f"{self.base} refused the credentials (HTTP {e.code}): give a "
                               "token (--token-file or POP3COEXIST_ADMIN_TOKEN) or a client "
                               "certificate it accepts") from None
            raise OpsError(str(body.get("error") or f"{self.base}: HTTP {e.code}")) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise OpsError(f"cannot reach {self.base}: {reason}") from None
        except http.client.HTTPException as e:
            # not an OSError: a status line that is not HTTP (BadStatusLine), an answer cut
            # short (IncompleteRead), too many header lines...: the peer is not answering as
            # an HTTP server; one line naming the kind, never the bytes it sent
            raise OpsError(f"{self.base} broke off or garbled its answer "
                           f"({type(e).__name__})") from None

    def info(self) -> dict:
        """``GET /api/v1/``: ``{"server": {"hostname", "auth_method"}, "admin": name,
        "operations": [...]}``; OpsError as ``call``."""
        return self._request(urllib.request.Request(self.base + "/api/v1/", headers=self._headers(),
                                                    method="GET"))

    def _json(self, raw: bytes) -> dict:
        try:
            value = json.loads(raw)
        except ValueError:
            raise OpsError(f"{self.base} did not answer with JSON (is it a pop3coexist admin "
                           "API?)") from None
        if not isinstance(value, dict):
            raise OpsError(f"{self.base}: unexpected answer")
        return value
