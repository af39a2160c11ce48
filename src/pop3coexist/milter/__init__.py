"""The milter client: content filters (virus and spam scanners) over the Sendmail milter
protocol, version 6, as Postfix speaks it.

``codec`` holds the wire format (no I/O), ``client`` one connection to one milter (a Twisted
protocol and the option negotiation), ``conversation`` the conversation of one SMTP session
with every configured milter (``interfaces.IContentFilter``) and the per-listener factory
(``interfaces.IContentFilterFactory``) that ``service.py`` gives the SMTP listeners.
"""
