"""The alias and list conformance suite (tests/support/alias_conformance.py) with the password
file: the installed server, three mailboxes with passwords, an aiosmtpd smart host."""

from __future__ import annotations

import pytest

from tests.support.alias_conformance import AliasConformance, AliasEnv, Person
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.smarthost import SmartHost

pytestmark = pytest.mark.integration
PEOPLE = [Person(f"{n}@{HOSTNAME}", f"{n}@{HOSTNAME}", f"{n}-Secret-9") for n in ("ann", "bo", "cy")]


@pytest.fixture(scope="module")
def pwenv(tmp_path_factory):
    """A password-file server relaying outside mail to a smart host."""
    require_installed_plugin()
    host = SmartHost().start()
    srv = ServerProcess(tmp_path_factory.mktemp("aliases-pw"), tls=True, extra_config=(
        f'[smarthost]\nhost = "{host.hop}"\ntls = "none"\n'))
    srv.write_config()
    for p in PEOPLE:
        srv.add_mailbox(p.address, p.password)
    srv.start()
    try:
        yield AliasEnv(srv, HOSTNAME, PEOPLE, host)
    finally:
        srv.stop_cleanly(*(p.password for p in PEOPLE))
        host.stop()


class TestPasswordFileAliases(AliasConformance):
    """Every alias and list case with auth.method = "passwordfile"."""

    @pytest.fixture
    def aenv(self, pwenv: AliasEnv) -> AliasEnv:
        return pwenv
