#!/usr/bin/env python3
"""
Compare the router's routing algorithms and scheduling configurations over the same workloads.

For every scenario (a workload and the speeds of the simulated workers that
serve it) and every configuration (a routing algorithm, plus router options
such as C{--max-inflight-per-worker}), run C{bench_router.py} once, with a
fresh fleet and a router started by C{demo.py}; then write to the output
folder:

  - C{bench_<scenario>_<configuration>.json}: each run's figures (bench_router.py's);
  - C{workload_<scenario>.json}: the requests of a batch or Poisson scenario
    (every configuration meets exactly these);
  - C{comparison.csv} and C{comparison.json}: one row per scenario and
    configuration: makespan, its lower bound and their ratio (batch and
    Poisson scenarios), latency p50/p99, throughput, router CPU per request,
    and the change against the baseline algorithm in percent;
  - C{comparison.png}: makespan ratio, p99 latency and router CPU per
    scenario, when matplotlib is installed (C{pip install -e '.[bench]'});
    without it the plot is skipped and the runner says so.

A configuration the router does not offer (an algorithm missing from its
C{--routing-algorithm} choices, an option missing from its C{--help}) is
reported as "not available" and not run.

    python examples/diffusion_router/bench_routing_algorithms.py --quick
    python examples/diffusion_router/bench_routing_algorithms.py --scenario skewed-batch --output-dir out/

Stdlib only, besides the optional matplotlib and this package (the lower
bound uses the simulator's own service-time formula). The exit status is 1
when a run that was available failed or had failed requests.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from twisted_router.simulator.model import service_seconds

HERE = Path(__file__).resolve().parent
BENCH_ROUTER = HERE / "bench_router.py"
DEMO = HERE / "demo.py"
#: The earlier comparison's baseline: what any smarter policy must beat.
BASELINE = "random"
#: Figures compared against the baseline, and whether more is better.
METRICS = {
    "throughput_rps": True,
    "latency_mean_s": False,
    "latency_p50_s": False,
    "latency_p99_s": False,
}
COLUMNS = [
    "scenario", "configuration", "algorithm", "router_args", "workers", "requests", "completed_requests",
    "failed_requests", "duration_s", "makespan_s", "lower_bound_s", "makespan_ratio",
    *[c for m in METRICS for c in (m, f"{m}_vs_{BASELINE}_pct")],
    "router_cpu_ms_per_request", "requests_per_worker", "available", "error",
]


# -- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    """
    One way of running the router: a routing algorithm and extra router options.

    @ivar name: the label in the table and in file names.
    @ivar router_args: options after C{--routing-algorithm}; every C{--option}
        among them must appear in the router's C{--help}, or the
        configuration is "not available".
    """

    name: str
    algorithm: str
    router_args: tuple[str, ...] = ()

    def missing(self, offered: RouterOptions) -> str | None:
        """Why the router cannot run this configuration, or C{None} when it can."""
        if self.algorithm not in offered.algorithms:
            return f"the router has no --routing-algorithm {self.algorithm}"
        absent = [a for a in self.router_args if a.startswith("--") and a not in offered.options]
        if absent:
            return f"the router has no {', '.join(absent)}"
        return None


@dataclass(frozen=True)
class RouterOptions:
    """What the router's C{--help} offers: its routing algorithms and its option names."""

    algorithms: frozenset[str]
    options: frozenset[str]

    @classmethod
    def from_help(cls, text: str) -> RouterOptions:
        choices = re.search(r"--routing-algorithm \{([^}]*)\}", text)
        algorithms = frozenset(choices.group(1).split(",")) if choices else frozenset()
        return cls(algorithms, frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)))


@cache
def router_options() -> RouterOptions:
    """Ask the demo router's script (the router the runs start) what it offers."""
    done = subprocess.run([sys.executable, str(DEMO), "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    return RouterOptions.from_help(done.stdout)


#: Bound of the router-side queue in the queued configurations: larger than any batch here,
#: so a batch is never refused (429) and the queue, not the client, holds the backlog.
QUEUE_BOUND = "4096"

CONFIGURATIONS: dict[str, Configuration] = {
    c.name: c
    for c in (
        Configuration("least-request", "least-request"),
        Configuration("round-robin", "round-robin"),
        Configuration("random", "random"),
        Configuration("power-of-two", "power-of-two"),
        Configuration("least-work", "least-work"),
        Configuration("least-work-queue1", "least-work",
                      ("--max-inflight-per-worker", "1", "--max-queue", QUEUE_BOUND)),
        Configuration("least-work-queue2", "least-work",
                      ("--max-inflight-per-worker", "2", "--max-queue", QUEUE_BOUND)),
    )
}
#: The plain algorithms (older name of the C{--configurations} list).
ALGORITHMS = ("least-request", "round-robin", "random", "power-of-two")


# -- workloads ------------------------------------------------------------------------------------

#: Image sizes of the mixed workloads, and the video of the mixed batch (Wan's 832x480, 17 frames
#: = about one second at 16 fps: a short clip, so videos weigh like a few large images, not 80).
MIXED_SIZES = ("512x512", "768x768", "1024x1024")
VIDEO_SIZE = "832x480"
VIDEO_FRAMES = 17
MIXED_STEPS = (8, 50)


def identical_images(count: int, size: str = "1024x1024", steps: int = 10) -> list[dict[str, Any]]:
    """C{count} identical image requests, all at once (an RL rollout batch of one prompt shape)."""
    return [{"at": 0.0, "kind": "image", "size": size, "steps": steps} for _ in range(count)]


def mixed_request(rng: random.Random, *, video: bool) -> dict[str, Any]:
    """One request of the mixed workload: steps uniform in 8..50; an image of a random size, or a video."""
    steps = rng.randint(*MIXED_STEPS)
    if video:
        return {"kind": "video", "size": VIDEO_SIZE, "steps": steps, "num_frames": VIDEO_FRAMES}
    return {"kind": "image", "size": rng.choice(MIXED_SIZES), "steps": steps}


def mixed_batch(count: int, video_share: float, seed: int) -> list[dict[str, Any]]:
    """C{count} mixed requests at once, exactly C{round(video_share × count)} of them videos, shuffled."""
    rng = random.Random(seed)
    videos = round(video_share * count)
    kinds = [True] * videos + [False] * (count - videos)
    rng.shuffle(kinds)
    return [{"at": 0.0, **mixed_request(rng, video=v)} for v in kinds]


def mean_mixed_image_work(step_ms: float) -> float:
    """Expected seconds (at speed 1) of one mixed image request: mean steps × mean pixel share."""
    pixels = [w * h / 1024**2 for w, h in (parse_size(s) for s in MIXED_SIZES)]
    return step_ms / 1000 * (sum(MIXED_STEPS) / 2) * (sum(pixels) / len(pixels))


def poisson_images(rate: float, duration: float, seed: int) -> list[dict[str, Any]]:
    """Mixed image requests arriving as a Poisson process of C{rate} per second for C{duration} s."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    at = rng.expovariate(rate)
    while at < duration:
        out.append({"at": round(at, 4), **mixed_request(rng, video=False)})
        at += rng.expovariate(rate)
    return out


def parse_size(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


def work_seconds(item: dict[str, Any], step_ms: float) -> float:
    """Seconds one request holds a speed-1 simulated GPU: the simulator's own formula."""
    width, height = parse_size(item["size"])
    return service_seconds(step_ms=step_ms, steps=item["steps"], width=width, height=height,
                           frames=item.get("num_frames", 1), n=item.get("n", 1))


def lower_bound(items: Sequence[dict[str, Any]], speeds: Sequence[float], step_ms: float) -> float:
    """
    No schedule finishes C{items} sooner, measured from the first arrival.

    C{max(total work ÷ total speed, largest job ÷ fastest speed)} for a batch;
    with arrivals spread out, the second term becomes the latest
    C{arrival + job ÷ fastest speed} (a job cannot finish before it has
    arrived and run on the fastest worker), and the first term still holds.
    """
    first = min(float(i.get("at", 0)) for i in items)
    total = sum(work_seconds(i, step_ms) for i in items) / sum(speeds)
    last = max(float(i.get("at", 0)) - first + work_seconds(i, step_ms) / max(speeds) for i in items)
    return max(total, last)


# -- scenarios ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """
    A workload and the fleet that serves it. Every configuration meets exactly
    the same one, so their figures compare.

    Two kinds: a I{closed} loop (C{workload} is C{None}: C{concurrency}
    clients send C{size} images back to back, what bench_router.py's request
    mode does) and a I{workload} (a list of requests with arrival times, sent
    open-loop by its workload mode, for batches and Poisson arrivals).

    @ivar worker_speeds: one simulated worker per value (its C{--speed}:
        1 normal, 0.25 a GPU four times slower).
    @ivar step_ms: simulated ms per denoising step of a 1024x1024 image.
    @ivar workload: builds the requests (C{quick} → a shorter one).
    @ivar task_type: the workers' simulator C{--task-type} (TI2V workers serve
        images and video jobs).
    """

    name: str
    description: str
    worker_speeds: tuple[float, ...]
    step_ms: float
    size: str = "256x256"
    concurrency: int = 16
    requests: int = 0
    quick_requests: int = 0
    workload: Callable[[bool], list[dict[str, Any]]] | None = field(default=None, compare=False)
    task_type: str = "TI2V"

    def bench_argv(self, configuration: Configuration | str, output: Path, *, quick: bool,
                   workload_file: Path | None = None) -> list[str]:
        if isinstance(configuration, str):
            configuration = CONFIGURATIONS[configuration]
        argv = [
            sys.executable, str(BENCH_ROUTER),
            "--router-launcher", "demo",
            "--routing-algorithm", configuration.algorithm,
            "--router-args", shlex.join(configuration.router_args),
            "--worker-speeds", ",".join(f"{v:g}" for v in self.worker_speeds),
            "--step-ms", f"{self.step_ms:g}",
            "--output-file", str(output),
        ]
        if self.workload is not None:
            if workload_file is None:
                raise ValueError(f"scenario {self.name} needs its workload file")
            return [*argv, "--workload", str(workload_file), "--task-type", self.task_type, "--duration", "600",
                    "--warmup", str(WARMUP_PER_WORKER * len(self.worker_speeds))]
        requests = self.quick_requests if quick else self.requests
        return [
            *argv,
            "--size", self.size,
            "--concurrency", str(self.concurrency),
            "--requests", str(requests),
            "--warmup", str(self.concurrency * (1 if quick else 4)),
            "--duration", "600",
            "--no-direct",
        ]


#: Warm-up requests per worker before a workload (bench_router.py's: 1024², 4 steps, one
#: connection per worker): the router starts the batch knowing roughly how fast each worker is,
#: as it would after the previous batch of an RL loop.
WARMUP_PER_WORKER = 2

#: Poisson scenario: simulated time runs at Qwen-Image's real speed (286 ms per 1024² step on an
#: H100, twisted_router.simulator.model.service_seconds), scaled down by POISSON_TIME_SCALE so
#: 3 minutes of simulated arrivals take 18 s of wall time (the rate scales up by the same factor).
REAL_STEP_MS = 286.0
POISSON_TIME_SCALE = 10.0
POISSON_STEP_MS = REAL_STEP_MS / POISSON_TIME_SCALE
POISSON_SPEEDS = (1.0, 1.0, 1.0, 0.25)
POISSON_LOAD = 0.8
POISSON_SIMULATED_S = 180.0


def poisson_workload(quick: bool) -> list[dict[str, Any]]:
    """Arrivals at 80 % of the fleet's capacity (total speed ÷ mean job) for 3 simulated minutes."""
    rate = POISSON_LOAD * sum(POISSON_SPEEDS) / mean_mixed_image_work(POISSON_STEP_MS)
    simulated = POISSON_SIMULATED_S / (12 if quick else 1)
    return poisson_images(rate, simulated / POISSON_TIME_SCALE, seed=12)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="skewed-batch",
            description="(a) speeds 1, 1, 1, 0.25; 64 identical 10-step 1024² images at once",
            worker_speeds=(1.0, 1.0, 1.0, 0.25),
            step_ms=20,
            workload=lambda quick: identical_images(8 if quick else 64),
        ),
        Scenario(
            name="mixed-batch",
            description="(b) 4 equal workers; 128 mixed requests at once (steps 8-50; 512²/768²/1024²; "
            "10% videos, polled until completed)",
            worker_speeds=(1.0, 1.0, 1.0, 1.0),
            step_ms=5,
            workload=lambda quick: mixed_batch(16 if quick else 128, 0.1, seed=12),
        ),
        Scenario(
            name="poisson",
            description=f"(c) speeds 1, 1, 1, 0.25; Poisson arrivals of mixed images at 80% of capacity for "
            f"3 simulated minutes ({POISSON_TIME_SCALE:g}x faster than Qwen-Image's real time)",
            worker_speeds=POISSON_SPEEDS,
            step_ms=POISSON_STEP_MS,
            workload=poisson_workload,
        ),
        Scenario(
            name="small-requests",
            description="(d) router CPU per small request: 2 fast workers, 16 connections, 256² 8-step images",
            worker_speeds=(1.0, 1.0),
            step_ms=0.1,
            concurrency=16,
            requests=3000,
            quick_requests=200,
            task_type="T2I",
        ),
        # Earlier closed-loop comparisons (issue 8), not run unless named.
        Scenario(
            name="uniform",
            description="three equal workers, a steady closed-loop image load",
            worker_speeds=(1.0, 1.0, 1.0),
            step_ms=40,
            size="512x512",
            concurrency=6,
            requests=300,
            quick_requests=36,
            task_type="T2I",
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
            task_type="T2I",
        ),
    )
}
DEFAULT_SCENARIOS = ("skewed-batch", "mixed-batch", "poisson", "small-requests")


# -- running ----------------------------------------------------------------------------------------


def write_workload(scenario: Scenario, output_dir: Path, *, quick: bool) -> tuple[Path, list[dict[str, Any]]] | None:
    """Write the scenario's requests (if it has a workload) for every configuration to replay."""
    if scenario.workload is None:
        return None
    items = scenario.workload(quick)
    path = output_dir / f"workload_{scenario.name}.json"
    path.write_text(json.dumps({"scenario": scenario.name, "requests": items}, indent=1) + "\n")
    return path, items


def run_one(scenario: Scenario, configuration: Configuration, output_dir: Path, *, quick: bool, timeout: float,
            workload_file: Path | None = None) -> dict[str, Any]:
    """Run bench_router.py once; its JSON figures, or C{{"error": ...}}."""
    missing = configuration.missing(router_options())
    if missing is not None:
        print(f"[skip] {scenario.name} / {configuration.name}: not available ({missing})", flush=True)
        return {"error": f"not available: {missing}", "available": False}
    output = output_dir / f"bench_{scenario.name}_{configuration.name}.json"
    argv = scenario.bench_argv(configuration, output, quick=quick, workload_file=workload_file)
    print(f"[run] {scenario.name} / {configuration.name}: {shlex.join(argv)}", flush=True)
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
                    configurations: Sequence[Configuration | str],
                    bounds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """
    One row per scenario and configuration, with the change against L{BASELINE}
    in the same scenario and, where C{bounds} has the scenario's lower bound,
    the makespan ratio.
    """
    configs = [CONFIGURATIONS[c] if isinstance(c, str) else c for c in configurations]
    bounds = bounds or {}
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        baseline = results.get((scenario.name, BASELINE), {})
        bound = bounds.get(scenario.name)
        for config in configs:
            figures = results.get((scenario.name, config.name), {"error": "not run"})
            row: dict[str, Any] = {
                "scenario": scenario.name,
                "configuration": config.name,
                "algorithm": config.algorithm,
                "router_args": shlex.join(config.router_args),
                "workers": " ".join(f"{v:g}" for v in scenario.worker_speeds),
                "available": figures.get("available", True),
                "error": figures.get("error", ""),
            }
            for key in ("requests", "completed_requests", "failed_requests", "duration_s", "makespan_s",
                        "router_cpu_ms_per_request"):
                row[key] = figures.get(key, "")
            row["lower_bound_s"] = "" if bound is None else bound
            makespan = figures.get("makespan_s")
            row["makespan_ratio"] = (makespan / bound if isinstance(makespan, (int, float)) and bound
                                     else "")
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


def write_comparison(rows: list[dict[str, Any]], scenarios: Sequence[Scenario], output_dir: Path,
                     bounds: dict[str, float] | None = None) -> Path | None:
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
        "scenarios": [
            {"name": s.name, "description": s.description, "worker_speeds": list(s.worker_speeds),
             "step_ms": s.step_ms, "kind": "closed" if s.workload is None else "workload",
             "lower_bound_s": (bounds or {}).get(s.name)}
            for s in scenarios
        ],
        "rows": rows,
    }
    (output_dir / "comparison.json").write_text(json.dumps(document, indent=2) + "\n")
    return plot(rows, output_dir / "comparison.png")


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Makespan ÷ lower bound, p99 latency and router CPU per request, one group of bars per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    configurations = list(dict.fromkeys(r["configuration"] for r in rows))
    panels = [("makespan_ratio", "makespan ÷ lower bound (1 is ideal)", False),
              ("latency_p99_s", "p99 latency, s (log; less is better)", True),
              ("router_cpu_ms_per_request", "router CPU ms/request", False)]
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.6))
    width = 0.8 / max(1, len(configurations))
    for panel, (metric, label, log) in zip(axes, panels, strict=True):
        for i, name in enumerate(configurations):
            values = []
            for scenario in scenarios:
                row = next(r for r in rows if r["scenario"] == scenario and r["configuration"] == name)
                values.append(row[metric] if isinstance(row[metric], (int, float)) else 0.0)
            panel.bar([s + i * width for s in range(len(scenarios))], values, width, label=name)
        panel.set_xticks([s + width * (len(configurations) - 1) / 2 for s in range(len(scenarios))], scenarios,
                         fontsize="small")
        if log:
            panel.set_yscale("log")
        panel.set_title(label)
    axes[0].legend(fontsize="small")
    figure.suptitle("Routing algorithms and scheduling configurations over the same workloads (simulated "
                    "workers; a missing bar: not available or not applicable)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    header = (f"{'scenario':<15} {'configuration':<18} {'makespan s':>10} {'bound s':>8} {'ratio':>6} "
              f"{'p50 s':>8} {'p99 s':>8} {'req/s':>8} {'cpu ms/req':>10} {'failed':>6}  per worker")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["error"] and not isinstance(r["throughput_rps"], (int, float)):
            print(f"{r['scenario']:<15} {r['configuration']:<18} {r['error']}")
            continue
        print(
            f"{r['scenario']:<15} {r['configuration']:<18} {num(r['makespan_s'], '.2f'):>10} "
            f"{num(r['lower_bound_s'], '.2f'):>8} {num(r['makespan_ratio'], '.2f'):>6} "
            f"{num(r['latency_p50_s'], '.3f'):>8} {num(r['latency_p99_s'], '.3f'):>8} "
            f"{num(r['throughput_rps'], '.1f'):>8} {num(r['router_cpu_ms_per_request'], '.3f'):>10} "
            f"{num(r['failed_requests'], 'd'):>6}  {r['requests_per_worker']}"
            + (f"  ({r['error']})" if r["error"] else "")
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--configurations", "--algorithms", dest="configurations", nargs="+",
                        choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS),
                        help="configurations (routing algorithm + router options) to compare")
    parser.add_argument("--scenario", dest="scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(DEFAULT_SCENARIOS), help="workloads to run")
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
    scenarios = [SCENARIOS[name] for name in dict.fromkeys(args.scenarios)]
    configurations = [CONFIGURATIONS[name] for name in dict.fromkeys(args.configurations)]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    bounds: dict[str, float] = {}
    started = time.monotonic()
    for scenario in scenarios:
        print(f"== scenario {scenario.name}: {scenario.description}", flush=True)
        workload = write_workload(scenario, output_dir, quick=args.quick)
        if workload is not None:
            bounds[scenario.name] = lower_bound(workload[1], scenario.worker_speeds, scenario.step_ms)
            print(f"   {len(workload[1])} requests, lower bound {bounds[scenario.name]:.3f}s", flush=True)
        for configuration in configurations:
            results[(scenario.name, configuration.name)] = run_one(
                scenario, configuration, output_dir, quick=args.quick, timeout=args.run_timeout,
                workload_file=None if workload is None else workload[0],
            )
    rows = comparison_rows(scenarios, results, configurations, bounds)
    png = write_comparison(rows, scenarios, output_dir, bounds)
    print()
    print_table(rows)
    print()
    print(f"all runs took {time.monotonic() - started:.0f}s")
    print(f"wrote {output_dir / 'comparison.csv'} and {output_dir / 'comparison.json'}")
    if png is not None:
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    return 1 if failed_runs(rows) else 0


def failed_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of runs that failed or had failed requests; a configuration not available is no failure."""
    return [r for r in rows if r["available"] and (r["error"] or r["failed_requests"] not in (0, ""))]


if __name__ == "__main__":
    sys.exit(main())
