"""Hypothesis profiles for the fuzz tier: ``ci`` (the default: bounded examples, a fixed seed
database-free run, no deadline on a shared machine), ``dev`` (more examples) and ``long``
(``make fuzz``: many examples). Choose with ``HYPOTHESIS_PROFILE``."""

from __future__ import annotations

import os

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
