"""The monitoring examples in etc/monitoring/ load and name only metrics the server has:
the alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``,
tests/fixtures/pop3coexist-alerts.test.yml); the Grafana dashboard is valid JSON whose every
query names existing metrics and is valid PromQL (promtool checks it as a recording rule);
the README's metric table lists exactly the metrics the code declares."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from pop3coexist.monitor.metrics import METRICS, PREFIX, exposed_names
from tests.support.programs import require_program

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "monitoring" / "pop3coexist-alerts.yml"
RULE_TESTS = ROOT / "tests" / "fixtures" / "pop3coexist-alerts.test.yml"
DASHBOARD = ROOT / "etc" / "monitoring" / "pop3coexist-dashboard.json"
NAME_RE = re.compile(r"\bpop3coexist_[a-z_]+")


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    tool = require_program("promtool")
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_alert_rules_pass_promtool_check() -> None:
    """``promtool check rules`` (Debian's prometheus package) accepts the example rules."""
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_fire_when_they_should() -> None:
    """``promtool test rules``: down, queue backlog and worker restarts fire on made-up series,
    and stay quiet before their time and on healthy deliveries."""
    result = _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_name_only_existing_metrics() -> None:
    """Every pop3coexist_* name in the rules is one a scrape can show."""
    names = set(NAME_RE.findall(RULES.read_text()))
    assert names and names <= exposed_names(), names - exposed_names()


def _dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    assert data["title"] and data["uid"] and data["schemaVersion"] >= 30
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = []
    for panel in data["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queries.append(target["expr"])
    return queries


def test_dashboard_names_only_existing_metrics_and_shows_every_one() -> None:
    """The dashboard parses; each metric it names exists; each declared metric has a panel."""
    queries = _dashboard_queries()
    named = {n for q in queries for n in NAME_RE.findall(q)}
    assert named <= exposed_names(), named - exposed_names()
    shown = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum")
             .removesuffix("_count") for n in named}
    assert {PREFIX + name for name in METRICS} <= shown, {PREFIX + n for n in METRICS} - shown


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, passes promtool as the
    expression of a recording rule."""
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(_dashboard_queries()):
        expr = (query.replace("$__rate_interval", "5m").replace("$job", "pop3coexist")
                .replace("$instance", ".*"))
        rules += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_metric_table_matches_the_code() -> None:
    """README "Monitoring" has one row per metric with its exposed name, type and labels."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `(pop3coexist_[a-z_]+)` \| (\w+) \| ([^|]*) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    expected = {}
    for name, (kind, labels, _doc) in METRICS.items():
        full = PREFIX + name + ("_total" if kind == "counter" else "")
        expected[full] = (kind, ", ".join(f"`{label}`" for label in labels) or "-")
    assert rows == expected
