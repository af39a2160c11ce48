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

Hypothesis profiles, for every tier (they were in tests/fuzz/conftest.py, which a run of
tests/unit alone never loaded: a property test there then had Hypothesis's default deadline
and "too slow" health checks, which fail on a loaded machine): ``ci`` (the default: bounded
examples, a fixed seed, no example database, no deadline on a shared machine), ``dev`` (more
examples) and ``long`` (``make fuzz``: many examples). Choose with ``HYPOTHESIS_PROFILE``. A
test's own ``@settings`` still wins for what it names.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=60, stateful_step_count=30, derandomize=True,
                          print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=300, stateful_step_count=40, print_blob=True,
                          **_COMMON)
settings.register_profile("long", max_examples=20000, stateful_step_count=60,
                          print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
