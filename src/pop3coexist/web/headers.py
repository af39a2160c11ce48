"""The security headers of every response of a web front-end.

``CSP`` forbids inline script and every script not from this origin, plugins, framing by any
page, ``<base>`` and forms posting elsewhere; styles come from the shared stylesheet alone
(``style-src 'self'``: no inline styles). ``apply(request, authenticated)`` sets it with
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, ``X-Frame-Options:
DENY`` (older browsers), ``Cross-Origin-Opener-Policy: same-origin``, a
``Permissions-Policy`` that turns off what mail never needs, and, on authenticated pages,
``Cache-Control: no-store`` (nothing of a mailbox stays in a shared computer's cache).
A response with its own stricter policy (a message body in a sandboxed frame) passes ``csp``.
"""

from __future__ import annotations

from typing import Any

CSP = ("default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src 'self'")

COMMON = {
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Cross-Origin-Resource-Policy": b"same-origin",
    b"Permissions-Policy": b"camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}


def apply(request: Any, authenticated: bool, csp: str = CSP, *, frame: bool = False) -> None:
    """Set the security headers on ``request`` (a ``twisted.web`` request). ``frame``: the
    response is meant for a frame of our own pages (X-Frame-Options SAMEORIGIN, and ``csp``
    should then name ``frame-ancestors 'self'``)."""
    for name, value in COMMON.items():
        request.setHeader(name, value)
    if frame:
        request.setHeader(b"X-Frame-Options", b"SAMEORIGIN")
    request.setHeader(b"Content-Security-Policy", csp.encode("ascii"))
    if authenticated:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Pragma", b"no-cache")
