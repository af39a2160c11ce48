"""The alias and list conformance suite (tests/support/alias_conformance.py) with local
accounts: three Unix accounts checked through a real PAM service (needs root, as CI has)."""

from __future__ import annotations

import pytest

from tests.support.alias_conformance import AliasConformance, AliasEnv, Person
from tests.support.pam import LocalAccounts
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def localenv(tmp_path_factory):
    """Three local accounts with mailboxes, a server using PAM, a smart host."""
    require_installed_plugin()
    accounts = LocalAccounts()
    host = SmartHost().start()
    try:
        accounts.install_service()
        people = []
        for kind in ("ann", "bo", "cy"):
            acct = accounts.add(kind, password=f"Pam-alias-{kind}-1")
            people.append(Person(f"{acct.name}@{HOSTNAME}", acct.name, acct.password))
        method = (f'[auth]\nmethod = "local"\napop = false\n[auth.local]\n'
                  f'pam_service = "{accounts.service}"\n')
        srv = ServerProcess(tmp_path_factory.mktemp("aliases-local"), method_config=method,
                            extra_config=f'[smarthost]\nhost = "{host.hop}"\ntls = "none"\n')
        srv.write_config()
        for p in people:
            srv.admin("mailbox", "add", p.address)
        srv.start()
        try:
            yield AliasEnv(srv, HOSTNAME, people, host)
        finally:
            srv.stop_cleanly(*(p.password for p in people))
    finally:
        host.stop()
        accounts.remove()


class TestLocalAliases(AliasConformance):
    """Every alias and list case with auth.method = "local"."""

    @pytest.fixture
    def aenv(self, localenv: AliasEnv) -> AliasEnv:
        return localenv
