"""The bounded atheris campaign of CI: every harness of tests/fuzz/harnesses.py run
coverage-guided (tests/fuzz/campaign.py) for ``FUZZ_RUNS`` inputs (default 2000) from its seed
corpus. A crash or a broken invariant fails the test with the harness's output and the input
saved under the test's temporary folder. ``make fuzz`` runs the long campaign."""

from __future__ import annotations

import os

import pytest

from tests.fuzz.campaign import harness_names, run_one

pytestmark = pytest.mark.timeout(900)

RUNS = int(os.environ.get("FUZZ_RUNS", "2000"))
# harnesses that run a whole session over a real Maildir per input: fewer inputs in CI
SLOW = {"imap_session": 300}


def _atheris_or_skip() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is not installed (pip install '.[test]')")
        pytest.skip("atheris is not installed")


@pytest.mark.parametrize("name", harness_names())
def test_bounded_atheris_campaign(name: str, tmp_path) -> None:
    """``FUZZ_RUNS`` coverage-guided inputs of the harness break no invariant and raise
    nothing unexpected."""
    _atheris_or_skip()
    runs = min(RUNS, SLOW.get(name, RUNS))
    result = run_one(name, runs, 240, tmp_path, seed=1, timeout=600)
    assert result["returncode"] == 0 and result["crash"] is None, result["log"]
    assert result["inputs"] >= runs, result["log"]
