"""Config -> the ``interfaces.IAccountChecker`` for ``[auth] method``.

``make_checker`` is what the service wiring calls; ``make_password_file`` is what the admin
command uses to set and remove passwords. The directory (LDAP) and local (PAM) checkers are
imported only when chosen, so their libraries load only when used.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from pop3coexist.config import Config
from pop3coexist.errors import ConfigError
from pop3coexist.identity.passwordfile import PasswordFile, PasswordFileChecker
from pop3coexist.interfaces import IAccountChecker, IMailStore

__all__ = ["make_checker", "make_password_file"]


def make_password_file(config: Config, **options: Any) -> PasswordFile:
    """The password file of ``config``: ``<state_dir>/passwords.json`` with its key at
    ``<state_dir>/passwords.key``, keeping APOP / CRAM-MD5 secrets when ``auth.apop`` is true.
    ``options`` go to ``PasswordFile`` (e.g. ``scrypt_n`` in tests); verified passwords are
    remembered for ``auth.login_cache`` seconds unless ``options`` says otherwise."""
    options.setdefault("verified_ttl", config.auth.login_cache)
    return PasswordFile(
        config.server.password_file,
        config.server.key_file,
        config.auth.apop and config.auth.method == "passwordfile",
        **options,
    )


def make_checker(config: Config, store: IMailStore, reactor: Any = None) -> IAccountChecker:
    """The account checker for ``config.auth.method``.

    - ``passwordfile``: ``PasswordFileChecker`` whose local domains are ``store.list_domains``
      (so ``domain add`` at run time counts at once); blocking work goes to ``reactor``'s
      thread pool (the global reactor's when None).
    - ``directory``: ``identity.directory.DirectoryChecker(config, reactor)`` whose local
      domains are ``store.list_domains``.
    - ``local``: ``identity.local.LocalChecker(config, store)``.

    Nothing is read here: the service calls the checker's ``check()`` (when it has one) at
    start-up, and refuses to start if that raises.
    """
    method = config.auth.method
    if method == "passwordfile":
        if reactor is not None:
            from twisted.internet.threads import deferToThreadPool

            run_blocking = partial(deferToThreadPool, reactor, reactor.getThreadPool())
            return PasswordFileChecker(make_password_file(config), store.list_domains, run_blocking)
        return PasswordFileChecker(make_password_file(config), store.list_domains)
    if method == "directory":
        from pop3coexist.identity.directory import DirectoryChecker

        # domains added with `domain add` while the server runs count at once
        return DirectoryChecker(config, reactor, local_domains=store.list_domains)
    if method == "local":
        from pop3coexist.identity.local import LocalChecker

        return LocalChecker(config, store)
    raise ConfigError(f"[auth.method] unknown authentication method {method!r}")
