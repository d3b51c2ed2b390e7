#!/usr/bin/env python3
"""
Compare the router's routing algorithms over the same workloads.

For every scenario (a workload and the speeds of the simulated workers that
serve it) and every routing algorithm, run C{bench_router.py} once, with a
fresh fleet and a router started by C{demo.py}; then write to the output
folder:

  - C{bench_<scenario>_<algorithm>.json}: each run's figures (bench_router.py's);
  - C{comparison.csv} and C{comparison.json}: one row per scenario and
    algorithm, with the change against the baseline algorithm in percent;
  - C{comparison.png}: throughput and p99 latency per scenario, when
    matplotlib is installed (C{pip install -e '.[bench]'}); without it the
    plot is skipped and the runner says so.

    python examples/diffusion_router/bench_routing_algorithms.py --quick
    python examples/diffusion_router/bench_routing_algorithms.py --scenario mixed-speed --output-dir out/

Stdlib only, besides the optional matplotlib. The exit status is 1 when a run
failed or had failed requests.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH_ROUTER = HERE / "bench_router.py"
ALGORITHMS = ("least-request", "round-robin", "random", "power-of-two")
#: The earlier comparison's baseline: what any smarter policy must beat.
BASELINE = "random"
#: Figures compared across algorithms, and whether more is better.
METRICS = {
    "throughput_rps": True,
    "latency_mean_s": False,
    "latency_p50_s": False,
    "latency_p99_s": False,
}
COLUMNS = [
    "scenario", "algorithm", "workers", "requests", "completed_requests", "failed_requests",
    "duration_s", *[c for m in METRICS for c in (m, f"{m}_vs_{BASELINE}_pct")],
    "router_cpu_ms_per_request", "requests_per_worker", "error",
]


@dataclass(frozen=True)
class Scenario:
    """
    A workload and the fleet that serves it. Every algorithm meets exactly
    the same one, so their figures compare. (New scenarios, e.g. scheduling
    ones, are added to L{SCENARIOS}.)

    @ivar worker_speeds: one simulated image worker per value (its C{--speed}:
        1 normal, 0.25 a GPU four times slower).
    @ivar step_ms: simulated ms per denoising step of a 1024x1024 image.
    @ivar size: requested image size (the time scales with its pixels).
    """

    name: str
    description: str
    worker_speeds: tuple[float, ...]
    step_ms: float
    size: str
    concurrency: int
    requests: int
    quick_requests: int

    def bench_argv(self, algorithm: str, output: Path, *, quick: bool) -> list[str]:
        requests = self.quick_requests if quick else self.requests
        return [
            sys.executable, str(BENCH_ROUTER),
            "--router-launcher", "demo",
            "--routing-algorithm", algorithm,
            "--worker-speeds", ",".join(f"{v:g}" for v in self.worker_speeds),
            "--step-ms", f"{self.step_ms:g}",
            "--size", self.size,
            "--concurrency", str(self.concurrency),
            "--requests", str(requests),
            "--warmup", str(self.concurrency * (1 if quick else 4)),
            "--duration", "600",
            "--no-direct",
            "--output-file", str(output),
        ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="uniform",
            description="three equal workers, a steady closed-loop image load",
            worker_speeds=(1.0, 1.0, 1.0),
            step_ms=40,
            size="512x512",
            concurrency=6,
            requests=300,
            quick_requests=36,
        ),
        Scenario(
            name="mixed-speed",
            description="two normal workers and one four times slower: the policy must notice load",
            worker_speeds=(1.0, 1.0, 0.25),
            step_ms=40,
            size="512x512",
            concurrency=6,
            requests=300,
            quick_requests=36,
        ),
    )
}


def run_one(scenario: Scenario, algorithm: str, output_dir: Path, *, quick: bool, timeout: float) -> dict[str, Any]:
    """Run bench_router.py once; its JSON figures, or C{{"error": ...}}."""
    output = output_dir / f"bench_{scenario.name}_{algorithm}.json"
    argv = scenario.bench_argv(algorithm, output, quick=quick)
    print(f"[run] {scenario.name} / {algorithm}: {shlex.join(argv)}", flush=True)
    try:
        done = subprocess.run(argv, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"bench_router.py did not finish within {timeout:g}s"}
    if not output.exists():
        return {"error": f"bench_router.py exited with status {done.returncode} and wrote no figures"}
    try:
        figures: dict[str, Any] = json.loads(output.read_text())
    except ValueError as exc:
        return {"error": f"unreadable figures in {output.name}: {exc}"}
    if done.returncode != 0:
        figures["error"] = f"bench_router.py exited with status {done.returncode}"
    return figures


def comparison_rows(scenarios: Sequence[Scenario], results: dict[tuple[str, str], dict[str, Any]],
                    algorithms: Sequence[str]) -> list[dict[str, Any]]:
    """One row per scenario and algorithm, with the change against L{BASELINE} in the same scenario."""
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        baseline = results.get((scenario.name, BASELINE), {})
        for algorithm in algorithms:
            figures = results.get((scenario.name, algorithm), {"error": "not run"})
            row: dict[str, Any] = {
                "scenario": scenario.name,
                "algorithm": algorithm,
                "workers": " ".join(f"{v:g}" for v in scenario.worker_speeds),
                "error": figures.get("error", ""),
            }
            for key in ("requests", "completed_requests", "failed_requests", "duration_s",
                        "router_cpu_ms_per_request"):
                row[key] = figures.get(key, "")
            row["requests_per_worker"] = " ".join(str(w["requests"]) for w in figures.get("workers", []))
            for metric in METRICS:
                value, base = figures.get(metric), baseline.get(metric)
                row[metric] = "" if value is None else value
                change: float | str = ""
                if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base:
                    change = (value - base) / abs(base) * 100
                row[f"{metric}_vs_{BASELINE}_pct"] = change
            rows.append(row)
    return rows


def write_comparison(rows: list[dict[str, Any]], scenarios: Sequence[Scenario], output_dir: Path) -> Path | None:
    """
    Write comparison.csv, comparison.json and, with matplotlib, comparison.png.

    @return: the plot's path, or C{None} when matplotlib is not installed.
    """
    with open(output_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "baseline": BASELINE,
        "scenarios": [asdict(s) for s in scenarios],
        "rows": rows,
    }
    (output_dir / "comparison.json").write_text(json.dumps(document, indent=2) + "\n")
    return plot(rows, output_dir / "comparison.png")


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput and p99 latency per algorithm, one group of bars per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(algorithms))
    for panel, (metric, label) in zip(axes, [("throughput_rps", "requests/s (more is better)"),
                                             ("latency_p99_s", "p99 latency, s (less is better)")], strict=True):
        for i, algorithm in enumerate(algorithms):
            values = []
            for scenario in scenarios:
                row = next(r for r in rows if r["scenario"] == scenario and r["algorithm"] == algorithm)
                values.append(row[metric] if isinstance(row[metric], (int, float)) else 0.0)
            panel.bar([s + i * width for s in range(len(scenarios))], values, width, label=algorithm)
        panel.set_xticks([s + width * (len(algorithms) - 1) / 2 for s in range(len(scenarios))], scenarios)
        panel.set_title(label)
    axes[0].legend(fontsize="small")
    figure.suptitle("Routing algorithms over the same workloads (simulated workers)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    def delta(value: Any) -> str:
        return f"{value:+.1f}%" if isinstance(value, (int, float)) else ""

    header = (f"{'scenario':<12} {'algorithm':<14} {'req/s':>8} {'vs ' + BASELINE:>10} {'mean s':>8} "
              f"{'p50 s':>8} {'p99 s':>8} {'vs ' + BASELINE:>10} {'failed':>6}  per worker")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["error"] and not isinstance(r["throughput_rps"], (int, float)):
            print(f"{r['scenario']:<12} {r['algorithm']:<14} ERROR: {r['error']}")
            continue
        print(
            f"{r['scenario']:<12} {r['algorithm']:<14} {num(r['throughput_rps'], '.2f'):>8} "
            f"{delta(r[f'throughput_rps_vs_{BASELINE}_pct']):>10} {num(r['latency_mean_s'], '.3f'):>8} "
            f"{num(r['latency_p50_s'], '.3f'):>8} {num(r['latency_p99_s'], '.3f'):>8} "
            f"{delta(r[f'latency_p99_s_vs_{BASELINE}_pct']):>10} {num(r['failed_requests'], 'd'):>6}  "
            f"{r['requests_per_worker']}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS),
                        help="routing algorithms to compare")
    parser.add_argument("--scenario", dest="scenarios", nargs="+", choices=sorted(SCENARIOS),
                        default=list(SCENARIOS), help="workloads to run")
    parser.add_argument("--output-dir", default=None,
                        help="folder for the results (default: outputs/routing_comparison_<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run of every scenario (a smoke test, not a measurement)")
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="longest one bench_router.py run may take, seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir or f"outputs/routing_comparison_{time.strftime('%Y%m%d_%H%M%S')}")
    output_dir.mkdir(parents=True, exist_ok=True)
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    algorithms = list(dict.fromkeys(args.algorithms))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for scenario in scenarios:
        print(f"== scenario {scenario.name}: {scenario.description}", flush=True)
        for algorithm in algorithms:
            results[(scenario.name, algorithm)] = run_one(
                scenario, algorithm, output_dir, quick=args.quick, timeout=args.run_timeout
            )
    rows = comparison_rows(scenarios, results, algorithms)
    png = write_comparison(rows, scenarios, output_dir)
    print()
    print_table(rows)
    print()
    print(f"wrote {output_dir / 'comparison.csv'} and {output_dir / 'comparison.json'}")
    if png is not None:
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    failed = any(r["error"] or r["failed_requests"] not in (0, "") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
