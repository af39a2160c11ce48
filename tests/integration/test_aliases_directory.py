"""Aliases and lists with ``auth.method = "directory"`` against a real slapd: the conformance
suite (tests/support/alias_conformance.py), directory proxy addresses beside admin aliases, and
AD-style groups (``objectClass=group``, ``mail``, ``member``, nested groups, ``managedBy``):
one copy per person through nested groups, a group loop that expands once."""

from __future__ import annotations

import pytest

from tests.support.alias_conformance import AliasConformance, AliasEnv, Person, pop_all, send
from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin
from tests.support.slapd import BASE_DN, DIRECTORY_USERS, SERVICE_DN, Slapd
from tests.support.smarthost import SmartHost, wait_until

pytestmark = pytest.mark.integration
TED, KIM, NORA, CONTACT = (DIRECTORY_USERS[k] for k in ("ted", "kim", "nora", "contact"))
PEOPLE = [Person("ted@pop.contoso.test", "ted@pop.contoso.test", TED.password),
          Person("kim@pop.contoso.test", "kim@pop.contoso.test", KIM.password),
          Person("nora@pop.contoso.test", "nora@pop.contoso.test", NORA.password)]
SALES = f"cn=Sales Team,ou=groups,{BASE_DN}"
SUPPORT = f"cn=Support,ou=groups,{BASE_DN}"
GROUPS = f"""dn: {SALES}
changetype: add
objectClass: group
cn: Sales Team
mail: sales-team@pop.contoso.test
proxyAddresses: SMTP:sales-team@pop.contoso.test
proxyAddresses: smtp:sales@pop.contoso.test
member: {TED.dn}
member: {SUPPORT}
member: {CONTACT.dn}
managedBy: {NORA.dn}

dn: {SUPPORT}
changetype: add
objectClass: group
cn: Support
mail: support@pop.contoso.test
member: {KIM.dn}
member: {NORA.dn}
member: {SALES}
member: {TED.dn}
member: {SUPPORT}
"""


@pytest.fixture(scope="module")
def direnv(tmp_path_factory):
    """slapd with the test users and two groups that include each other; a directory server
    relaying outside mail to a smart host."""
    require_installed_plugin()
    ldap = Slapd(tmp_path_factory.mktemp("aliases-slapd"))
    ldap.start()
    host = SmartHost().start()
    try:
        ldap.modify(GROUPS)
        method = (
            '[auth]\nmethod = "directory"\napop = false\n'
            f'[auth.directory]\nurl = "{ldap.url}"\nbase_dn = "{BASE_DN}"\n'
            f'bind_dn = "{SERVICE_DN}"\nbind_password_file = "{ldap.secret_file}"\n'
            'timeout = "5s"\n')
        srv = ServerProcess(tmp_path_factory.mktemp("aliases-dir"), method_config=method,
                            extra_config=f'[smarthost]\nhost = "{host.hop}"\ntls = "none"\n')
        srv.write_config()
        for p in PEOPLE:
            srv.admin("mailbox", "add", p.address)
        srv.start()
        try:
            yield AliasEnv(srv, HOSTNAME, PEOPLE, host)
        finally:
            srv.stop_cleanly(*(p.password for p in PEOPLE))
    finally:
        host.stop()
        ldap.stop()


class TestDirectoryAliases(AliasConformance):
    """Every alias and list case with auth.method = "directory"."""

    @pytest.fixture
    def aenv(self, direnv: AliasEnv) -> AliasEnv:
        return direnv


@pytest.fixture
def env(direnv: AliasEnv) -> AliasEnv:
    for person in direnv.people:
        pop_all(direnv.server, person)
    return direnv


def test_proxy_addresses_keep_working_and_admin_aliases_add_to_them(env: AliasEnv) -> None:
    """Mail to ted's secondary proxy address still lands in his mailbox; an admin alias adds
    another address; an alias cannot take a directory user's address (exit 1)."""
    ted = env.people[0]
    env.server.admin("alias", "add", f"teddy@{HOSTNAME}", ted.address)
    send(env.server, "alice@example.test", [f"theodore@{HOSTNAME}", f"teddy@{HOSTNAME}"],
         "proxy-and-alias")
    assert len([m for m in pop_all(env.server, ted) if b"proxy-and-alias" in m]) == 1
    r = env.server.admin("alias", "add", f"theodore@{HOSTNAME}", "x@outside.test", check=False)
    assert r.returncode == 1 and "belongs to the account" in r.stderr


def test_nested_groups_deliver_one_copy_per_person(env: AliasEnv) -> None:
    """A group (by a secondary proxy address) with a nested group that includes the first
    again and itself: ted, kim and nora get one copy each with List-Id and the owner- sender;
    the contact member's targetAddress gets one copy through the smart host; sending to both
    groups at once still gives one copy each."""
    send(env.server, "alice@example.test", ["sales@pop.contoso.test"], "group-1")
    send(env.server, "alice@example.test",
         ["sales-team@pop.contoso.test", "support@pop.contoso.test"], "group-2")
    for person in env.people:
        got = pop_all(env.server, person)
        for subject in (b"group-1", b"group-2"):
            [copy] = [m for m in got if b"Subject: " + subject in m]
            assert copy.startswith(b"Return-Path: <owner-"), copy[:200]
            assert b"List-Id: <" in copy
    outside = wait_until(
        lambda: [m for m in env.smarthost.received if "ext.person@external.test" in m.rcpt_tos
                 and b"group-2" in m.content], what="the contact's copy")
    assert len(outside) == 1 and outside[0].mail_from.startswith("owner-")


def test_group_owner_is_managed_by(env: AliasEnv) -> None:
    """owner-GROUP@DOMAIN (the list copy's envelope sender) reaches the group's managedBy."""
    send(env.server, "alice@example.test", ["owner-sales-team@pop.contoso.test"], "to-owner")
    nora = env.people[2]
    assert [m for m in pop_all(env.server, nora) if b"to-owner" in m]
