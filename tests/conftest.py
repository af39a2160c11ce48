"""How the suite runs in parallel (pytest-xdist, ``-n auto --dist loadgroup`` in pyproject's
``addopts``): every test module is one ``xdist_group`` of its own, so a module's tests run on
one worker and its module-scoped fixtures (a real server, slapd, Dovecot, clamd) start once, as
in a serial run. Not always in file order (seen in CI): a test that needs state makes it itself
(e.g. ``_ensure_ann`` in test_cluster.py), never relying on an earlier test. Modules that change the machine itself (Unix accounts made
with ``useradd``, PAM service files, the shared ``pop3ctest`` mail user) share the group
``system-accounts``, so they run one after the other on one worker: ``useradd`` and
``userdel`` lock ``/etc/passwd`` and a second one at the same moment may fail.

Everything else is safe to run beside another module by construction: ports are picked by the
OS (port 0, read back) or by ``free_port()`` just before use, each test has its own tmp_path,
and no test uses a fixed pid file, socket path or shared daemon. A module that breaks that
rule sets ``pytestmark = pytest.mark.xdist_group("...")`` itself; an explicit group wins.
Without xdist (``-p no:xdist`` or ``-n 0``) the markers do nothing.
"""

from __future__ import annotations

import pytest

# modules that make or remove Unix accounts or PAM service files (tests/support/pam.py,
# tests/support/privilege.py): one at a time
SYSTEM_ACCOUNTS = {
    "test_aliases_local.py",
    "test_conformance_local.py",
    "test_pam.py",
    "test_pam_e2e.py",
    "test_privilege.py",
    "test_systemd.py",
    "test_winpop_import.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test without an ``xdist_group`` its module's group (see the docstring)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        name = item.path.name
        group = "system-accounts" if name in SYSTEM_ACCOUNTS else str(
            item.path.relative_to(config.rootpath))
        item.add_marker(pytest.mark.xdist_group(group))
