"""
The routing-algorithm comparison's table, files and plot
(C{examples/diffusion_router/bench_routing_algorithms.py}, issue 8 point 5),
on figures made up here; the whole runner is run in tests/integration.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "diffusion_router" / "bench_routing_algorithms.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_routing_algorithms", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def figures(rps: float, p99: float, failed: int = 0) -> dict[str, Any]:
    return {
        "requests": 10, "completed_requests": 10 - failed, "failed_requests": failed, "duration_s": 10 / rps,
        "throughput_rps": rps, "latency_mean_s": p99 / 2, "latency_p50_s": p99 / 3, "latency_p99_s": p99,
        "router_cpu_ms_per_request": 1.0, "workers": [{"name": "w0", "speed": 1.0, "requests": 6},
                                                       {"name": "w1", "speed": 0.25, "requests": 4}],
    }


def test_rows_compare_each_algorithm_with_random_in_the_same_scenario(bench: ModuleType) -> None:
    scenario = bench.SCENARIOS["mixed-speed"]
    results = {
        ("mixed-speed", "random"): figures(10.0, 2.0),
        ("mixed-speed", "least-request"): figures(20.0, 0.5),
        ("mixed-speed", "round-robin"): {"error": "bench_router.py exited with status 1 and wrote no figures"},
    }
    rows = bench.comparison_rows([scenario], results, ["least-request", "round-robin", "random"])
    least, robin, random = rows
    assert least["throughput_rps_vs_random_pct"] == pytest.approx(100.0)
    assert least["latency_p99_s_vs_random_pct"] == pytest.approx(-75.0)
    assert least["requests_per_worker"] == "6 4" and least["workers"] == "1 1 0.25"
    assert random["throughput_rps_vs_random_pct"] == pytest.approx(0.0)
    assert robin["error"].startswith("bench_router.py exited") and robin["throughput_rps"] == ""


def test_csv_json_and_plot_are_written(bench: ModuleType, tmp_path: Path) -> None:
    scenarios = [bench.SCENARIOS["uniform"], bench.SCENARIOS["mixed-speed"]]
    results = {(s.name, a): figures(10.0 + i, 1.0) for s in scenarios for i, a in enumerate(bench.ALGORITHMS)}
    rows = bench.comparison_rows(scenarios, results, list(bench.ALGORITHMS))
    png = bench.write_comparison(rows, scenarios, tmp_path)
    if HAVE_MATPLOTLIB:  # the test extra installs it; the next test covers its absence
        assert png == tmp_path / "comparison.png"
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert png is None
    with open(tmp_path / "comparison.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["scenario"], r["algorithm"]) for r in table] == [(k[0], k[1]) for k in results]
    document = json.loads((tmp_path / "comparison.json").read_text())
    assert document["baseline"] == "random"
    assert [s["name"] for s in document["scenarios"]] == ["uniform", "mixed-speed"]
    assert document["scenarios"][1]["worker_speeds"] == [1.0, 1.0, 0.25]
    assert len(document["rows"]) == 8


def test_without_matplotlib_the_plot_is_skipped_and_the_tables_still_written(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    scenarios = [bench.SCENARIOS["uniform"]]
    rows = bench.comparison_rows(scenarios, {("uniform", "random"): figures(5.0, 1.0)}, ["random"])
    assert bench.write_comparison(rows, scenarios, tmp_path) is None
    assert not (tmp_path / "comparison.png").exists()
    assert (tmp_path / "comparison.csv").read_text().startswith("scenario,algorithm,")
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"][0]["algorithm"] == "random"


def test_every_algorithm_meets_the_same_workload(bench: ModuleType, tmp_path: Path) -> None:
    scenario = bench.SCENARIOS["mixed-speed"]
    argvs = {a: scenario.bench_argv(a, tmp_path / "x.json", quick=True) for a in bench.ALGORITHMS}
    without_algorithm = {
        tuple(v for i, v in enumerate(argv) if not (argv[i - 1] == "--routing-algorithm" or v == "--routing-algorithm"))
        for argv in argvs.values()
    }
    assert len(without_algorithm) == 1
    assert "--router-launcher" in argvs["random"] and "demo" in argvs["random"]
