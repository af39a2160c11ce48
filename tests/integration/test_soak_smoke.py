"""A short run of the soak driver (soak/run.py, `make soak`) so CI exercises the fault schedule
and the audit code: 30 seconds of load with one fault of each kind (worker and main process
killed with SIGKILL, slow-loris connections, the smart host down, slapd stopped, the state
file system full), each outage a few seconds long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.programs import in_ci, require_program
from tests.support.server import require_installed_plugin

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_soak_driver_short_run_audits_clean(tmp_path):
    """The driver runs every fault, and its audit finds every message that got a 250 in
    exactly one place (none lost, none duplicated), no refused message stored, 452 4.3.1
    while the disk was full, no file left in tmp/ or the spool, and RSS within its bound."""
    require_installed_plugin()
    require_program("smtp-source", "/usr/sbin/smtp-source")
    require_program("slapd", "/usr/sbin/slapd")
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the soak needs root (a tmpfs for the state folder)")
        pytest.skip("the soak needs root (a tmpfs for the state folder)")
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "soak" / "run.py"), "--duration", "30", "--rate", "8",
         "--window", "4", "--pop3-clients", "3", "--senders", "3", "--state-mb", "64",
         "--workdir", str(tmp_path / "work"), "--json", str(report)],
        capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL,
    )
    result = json.loads(report.read_text())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert result["ok"]
    assert result["messages"]["ok"] > 0 and result["messages"]["lost"] == 0
    assert result["messages"]["duplicated"] == 0, result["duplicated_ids"]
    assert result["refused_but_stored"] == 0, result["refused_but_stored_ids"]
    assert result["disk_full_replies"] > 0
    assert not result["leftover_files"]
    kinds = {f["fault"] for f in result["faults_done"]}
    assert kinds == {"worker", "loris", "smarthost", "slapd", "disk", "main"}
    assert not [f for f in result["faults_done"] if "FAILED" in f["note"]], result["faults_done"]
    assert "AUDIT PASSED" in done.stdout
