"""The HTTP front-ends on twisted.web (issue 19): a shared web core and web mail.

The core (no mail specifics; the admin console builds on it with its own account checker):

- ``sessions``  server-side sessions: random 256-bit ids, cookie attributes, idle and absolute
                timeouts, a new id at log-in (no fixation), log-out destroys
- ``csrf``      per-session CSRF tokens, checked on every POST (403 page otherwise)
- ``headers``   security headers on every response (CSP without inline script, nosniff,
                Referrer-Policy, frame-ancestors, no-store on authenticated pages)
- ``render``    jinja2 pages with autoescape, the shared stylesheet and static files
- ``login``     password log-in through an ``IAccountChecker`` and an ``IAuthThrottle``
                (the same gate and failure delay POP3, SMTP and IMAP use)
- ``app``       ``WebApp``: a small router (routes, async handlers, sessions, CSRF, headers,
                body-size limit) that a front-end subclasses
- ``listen``    the listener rule "TLS except on loopback" and the site each listener gets

Web mail (``[web]``): ``webmail`` (the pages), ``mailview`` (reading a message: MIME parts,
attachments), ``sanitize`` (HTML through nh3), ``compose`` (new messages, replies, forwards),
``mailrules`` (out-of-office and filing rules written as Sieve).
"""
