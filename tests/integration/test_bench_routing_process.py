"""
C{bench_routing_algorithms.py --quick} end to end (issue 8 point 5, issue 12 point 5): it spawns
bench_router.py once per scenario and configuration, each of which spawns demo.py and
simulated workers, and writes the comparison. Its outputs are checked, not its speed. A
configuration the router does not offer (least-work and the queue options, until they exist)
must be reported as not available, never run and never a failure.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "examples" / "diffusion_router"
CONFIGURATIONS = ["least-request", "round-robin", "random", "power-of-two", "least-work", "least-work-queue1",
                  "least-work-queue2"]
SCENARIOS = ["skewed-batch", "mixed-batch", "poisson", "small-requests"]
WORKLOADS = {"skewed-batch": 8, "mixed-batch": 16}  # quick sizes of the batches


def router_help() -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / "demo.py"), "--help"], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


@pytest.mark.timeout(900)  # 28 fleets one after another; bounded, but slow on a loaded machine
def test_quick_comparison_writes_csv_json_and_a_plot_when_matplotlib_is_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_routing_algorithms.py"), "--quick", "--output-dir", str(out),
         "--run-timeout", "240"],
        capture_output=True, text=True, timeout=900, start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "router started by demo.py" in done.stdout  # bench_router.py ran the demo's script
    help_text = router_help()
    least_work = "least-work" in help_text
    queue = least_work and "--max-inflight-per-worker" in help_text and "--max-queue" in help_text
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scenario"], r["configuration"]) for r in rows] == [(s, c) for s in SCENARIOS for c in CONFIGURATIONS]
    for row in rows:
        expected = {"least-work": least_work, "least-work-queue1": queue, "least-work-queue2": queue}
        if not expected.get(row["configuration"], True):
            assert row["available"] == "False" and row["error"].startswith("not available: the router has no ")
            assert not (out / f"bench_{row['scenario']}_{row['configuration']}.json").exists()
            continue
        assert row["available"] == "True"
        assert row["error"] == "" and int(row["failed_requests"]) == 0
        assert int(row["completed_requests"]) == int(row["requests"]) > 0
        assert float(row["throughput_rps"]) > 0 and float(row["latency_p99_s"]) > 0
        assert float(row["latency_p50_s"]) <= float(row["latency_p99_s"])
        if row["scenario"] in WORKLOADS:  # every generation of the batch ran once, somewhere
            assert int(row["requests"]) == WORKLOADS[row["scenario"]]
            assert sum(int(n) for n in row["requests_per_worker"].split()) == int(row["requests"])
        if row["scenario"] == "small-requests":
            assert row["makespan_ratio"] == "" and float(row["router_cpu_ms_per_request"]) >= 0
            assert sum(int(n) for n in row["requests_per_worker"].split()) == int(row["requests"])
        else:  # no schedule beats the bound; the measured one includes HTTP and polling
            assert float(row["makespan_s"]) >= float(row["lower_bound_s"]) > 0
            assert float(row["makespan_ratio"]) >= 1.0
        if row["configuration"] == "random":
            assert float(row["throughput_rps_vs_random_pct"]) == 0.0
    document = json.loads((out / "comparison.json").read_text())
    assert document["baseline"] == "random" and len(document["rows"]) == len(rows)
    assert [s["name"] for s in document["scenarios"]] == SCENARIOS
    for scenario in WORKLOADS:
        workload = json.loads((out / f"workload_{scenario}.json").read_text())
        assert len(workload["requests"]) == WORKLOADS[scenario]
    assert any(r["kind"] == "video" for r in json.loads((out / "workload_mixed-batch.json").read_text())["requests"])
    for row in rows:
        if row["available"] == "True":
            run = json.loads((out / f"bench_{row['scenario']}_{row['configuration']}.json").read_text())
            assert run["routing_algorithm"] == row["algorithm"] and run["router_launcher"] == "demo"
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
        assert f"wrote {out / 'comparison.png'}" in done.stdout
    else:
        assert not (out / "comparison.png").exists()
        assert "plot skipped: matplotlib is not installed" in done.stdout
