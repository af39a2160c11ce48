"""The administrative operations, one implementation for every face (README "Admin console").

Each operation takes a ``context.Context`` and its arguments and returns JSON-able data, or
raises ``context.OpsError`` (one line). ``registry.py`` names them (``mailbox.lock``, ...) for
the faces: the ``pop3coexist-admin`` command (admin/), the admin API and the console
(adminweb/). Layer: below the front-ends, above policy.
"""
