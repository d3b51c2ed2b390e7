"""
The example Grafana dashboard and Prometheus rules, and docs/metrics.md,
name only series the router exposes (so they cannot rot), and the rule file
is a Prometheus rule file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from twisted_router.metrics import PREFIX, RouterMetrics
from twisted_router.pool import WorkerPool

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "observability"
SERIES = re.compile(r"\b" + PREFIX + r"[a-z0-9_]+")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def exposed() -> dict[str, str]:
    """Every sample name the router can expose, mapped to the family it belongs to."""
    pool = WorkerPool(now=lambda: 0.0)
    pool.add("http://10.0.0.1:30000")
    metrics = RouterMetrics(pool, fleet_version=lambda: "0", queue_status=lambda: {
        "queued_requests": 0, "oldest_queued_wait": 0.0})
    names: dict[str, str] = {}
    for family in metrics.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


def used_in(path: Path) -> set[str]:
    return set(SERIES.findall(path.read_text()))


@pytest.mark.parametrize("name", ["grafana-dashboard.json", "alerts.yml"])
def test_every_series_used_exists(name: str) -> None:
    used = used_in(EXAMPLES / name)
    assert used, f"{name} uses no series"
    assert used <= set(exposed()), sorted(used - set(exposed()))


def test_docs_list_exactly_the_exposed_families() -> None:
    documented = used_in(REPO / "docs" / "metrics.md")
    names = exposed()
    assert documented <= set(names) | set(names.values()), sorted(documented - set(names) - set(names.values()))
    missing = {family for family in names.values() if not ({family} | {n for n, f in names.items() if f == family}) & documented}
    assert not missing, sorted(missing)


def test_alerts_is_a_prometheus_rule_file() -> None:
    rules_file: Any = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    assert set(rules_file) == {"groups"}
    alerts = []
    for group in rules_file["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        assert set(group) <= {"name", "interval", "limit", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule)
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")")
            assert rule["expr"].count("{") == rule["expr"].count("}")
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule["for"]
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values())
            alerts.append(rule.get("alert"))
    assert {"SGLangRouterNoRoutableWorker", "SGLangRouterWorkerStuckUpdating", "SGLangRouterHighErrorRate"} <= set(alerts)


def test_the_dashboard_is_a_grafana_model() -> None:
    model = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    assert model["title"] and model["uid"] and model["schemaVersion"] >= 30
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert SERIES.search(target["expr"]), (panel["title"], target["expr"])
            assert target["expr"].count("(") == target["expr"].count(")")
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24


def test_the_queue_wait_panel_says_it_needs_the_router_side_queue() -> None:
    """Without --max-inflight-per-worker the histogram is never observed: an empty panel must say why."""
    model = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    (panel,) = [
        p for p in model["panels"] if any("sglang_router_queue_wait_seconds" in t["expr"] for t in p["targets"])
    ]
    assert "--max-inflight-per-worker" in panel["description"] and "Empty unless" in panel["description"]
