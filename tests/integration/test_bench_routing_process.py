"""
C{bench_routing_algorithms.py --quick} end to end (issue 8 point 5): it spawns
bench_router.py once per routing algorithm, each of which spawns demo.py and
simulated workers, and writes the comparison. Its outputs are checked, not its speed.
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
ALGORITHMS = ["least-request", "round-robin", "random", "power-of-two"]
SCENARIOS = ["uniform", "mixed-speed"]


@pytest.mark.timeout(900)  # eight fleets one after another; bounded, but slow on a loaded machine
def test_quick_comparison_writes_csv_json_and_a_plot_when_matplotlib_is_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_routing_algorithms.py"), "--quick", "--output-dir", str(out),
         "--run-timeout", "240"],
        capture_output=True, text=True, timeout=900, start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "router started by demo.py" in done.stdout  # bench_router.py ran the demo's script
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scenario"], r["algorithm"]) for r in rows] == [(s, a) for s in SCENARIOS for a in ALGORITHMS]
    for row in rows:
        assert row["error"] == "" and int(row["failed_requests"]) == 0
        assert int(row["completed_requests"]) == int(row["requests"]) > 0
        assert float(row["throughput_rps"]) > 0 and float(row["latency_p99_s"]) > 0
        assert sum(int(n) for n in row["requests_per_worker"].split()) == int(row["requests"])
        if row["algorithm"] == "random":
            assert float(row["throughput_rps_vs_random_pct"]) == 0.0
    document = json.loads((out / "comparison.json").read_text())
    assert document["baseline"] == "random" and len(document["rows"]) == len(rows)
    for scenario in SCENARIOS:
        for algorithm in ALGORITHMS:
            run = json.loads((out / f"bench_{scenario}_{algorithm}.json").read_text())
            assert run["routing_algorithm"] == algorithm and run["router_launcher"] == "demo"
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
        assert f"wrote {out / 'comparison.png'}" in done.stdout
    else:
        assert not (out / "comparison.png").exists()
        assert "plot skipped: matplotlib is not installed" in done.stdout
