"""pop3coexist: a Twisted POP3 + ESMTP mail server that coexists with an organisation gateway.

The package layout follows the architecture: ``interfaces`` holds the seams, ``config`` the
validated settings, ``store`` the on-disk formats, ``identity`` the credential checkers,
``policy`` the decisions, ``pop3`` and ``smtp`` the protocol front-ends, ``service`` the wiring.
"""

__version__ = "0.1.0"
