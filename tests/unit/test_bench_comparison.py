"""
The routing-algorithm comparison's table, files and plot
(C{examples/diffusion_router/bench_routing_algorithms.py}, issue 8 point 5, issue 12 point 5),
its workloads and lower bounds, and bench_router.py's workload files, on figures made up here;
the whole runner is run in tests/integration.
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
SCRIPTS = Path(__file__).resolve().parents[2] / "examples" / "diffusion_router"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_routing_algorithms")


@pytest.fixture(scope="module")
def bench_router() -> ModuleType:
    return load_script("bench_router")


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
    assert [(r["scenario"], r["configuration"]) for r in table] == [(k[0], k[1]) for k in results]
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
    assert (tmp_path / "comparison.csv").read_text().startswith("scenario,configuration,algorithm,")
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


# -- issue 12: scheduling scenarios --------------------------------------------------------------


def test_lower_bound_of_a_batch_is_total_work_over_total_speed(bench: ModuleType) -> None:
    # 64 × 10 steps of 1024² at 20 ms a step = 12.8 s of work over a total speed of 3.25.
    items = bench.identical_images(64)
    assert bench.lower_bound(items, (1.0, 1.0, 1.0, 0.25), 20) == pytest.approx(12.8 / 3.25)


def test_lower_bound_is_the_largest_job_on_the_fastest_worker_when_that_is_longer(bench: ModuleType) -> None:
    video = {"at": 0.0, "kind": "video", "size": "1024x1024", "steps": 50, "num_frames": 10}
    items = [video, *bench.identical_images(3, size="512x512", steps=4)]
    # The video alone is 50 × 10 frames × 1 ms = 0.5 s at speed 1, 0.25 s at speed 2.
    assert bench.lower_bound(items, (2.0, 1.0, 1.0), 1) == pytest.approx(0.25)


def test_lower_bound_counts_a_late_arrival(bench: ModuleType) -> None:
    items = [{"at": 1.0, "kind": "image", "size": "1024x1024", "steps": 10},
             {"at": 3.0, "kind": "image", "size": "1024x1024", "steps": 10}]
    # The last job arrives 2 s after the first and takes 0.1 s on the fastest worker.
    assert bench.lower_bound(items, (1.0, 0.5), 10) == pytest.approx(2.1)


def test_work_seconds_is_the_simulators_own_formula(bench: ModuleType) -> None:
    from twisted_router.simulator.model import service_seconds

    item = {"kind": "video", "size": "832x480", "steps": 20, "num_frames": 17}
    assert bench.work_seconds(item, 5) == service_seconds(step_ms=5, steps=20, width=832, height=480, frames=17)
    assert bench.work_seconds({"kind": "image", "size": "512x512", "steps": 8, "n": 4}, 10) == pytest.approx(
        0.01 * 8 * 0.25 * 4)


def test_mixed_batch_has_the_issues_mix_and_is_the_same_for_a_seed(bench: ModuleType) -> None:
    items = bench.mixed_batch(128, 0.1, seed=3)
    assert len(items) == 128 and all(i["at"] == 0.0 for i in items)
    videos = [i for i in items if i["kind"] == "video"]
    assert len(videos) == 13  # round(12.8)
    assert all(i["num_frames"] == bench.VIDEO_FRAMES and i["size"] == bench.VIDEO_SIZE for i in videos)
    assert {i["size"] for i in items if i["kind"] == "image"} == set(bench.MIXED_SIZES)
    assert all(8 <= i["steps"] <= 50 for i in items)
    assert len({i["steps"] for i in items}) > 20  # uniform over 8..50, not a constant
    assert bench.mixed_batch(128, 0.1, seed=3) == items
    assert bench.mixed_batch(128, 0.1, seed=4) != items


def test_poisson_arrivals_come_at_the_asked_rate_within_the_window(bench: ModuleType) -> None:
    items = bench.poisson_images(rate=50.0, duration=40.0, seed=1)
    times = [i["at"] for i in items]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 40.0
    assert 2000 * 0.9 < len(items) < 2000 * 1.1  # 50/s × 40 s, Poisson: sd ≈ 45
    assert all(i["kind"] == "image" for i in items)


def test_poisson_scenario_loads_the_fleet_at_80_percent(bench: ModuleType) -> None:
    items = bench.poisson_workload(False)
    window = bench.POISSON_SIMULATED_S / bench.POISSON_TIME_SCALE
    offered = sum(bench.work_seconds(i, bench.POISSON_STEP_MS) for i in items) / window
    assert offered / sum(bench.POISSON_SPEEDS) == pytest.approx(0.8, rel=0.25)


def test_router_options_are_read_from_its_help(bench: ModuleType) -> None:
    text = ("usage: x [--routing-algorithm {least-request,least-work}]\n"
            "  --max-inflight-per-worker N   most requests outstanding on one worker\n"
            "  --timeout TIMEOUT  seconds (like --max-queue-ish words are not options)\n")
    offered = bench.RouterOptions.from_help(text)
    assert offered.algorithms == {"least-request", "least-work"}
    assert "--max-inflight-per-worker" in offered.options and "--timeout" in offered.options
    queue1 = bench.CONFIGURATIONS["least-work-queue1"]
    assert queue1.missing(offered) == "the router has no --max-queue"
    assert bench.CONFIGURATIONS["least-work"].missing(offered) is None
    assert bench.CONFIGURATIONS["random"].missing(offered) == "the router has no --routing-algorithm random"


def test_a_configuration_the_router_lacks_is_not_run_and_not_a_failure(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offered = bench.RouterOptions(frozenset({"least-request"}), frozenset({"--routing-algorithm"}))
    monkeypatch.setattr(bench, "router_options", lambda: offered)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("ran bench_router.py"))
    scenario = bench.SCENARIOS["skewed-batch"]
    result = bench.run_one(scenario, bench.CONFIGURATIONS["least-work-queue2"], tmp_path, quick=True,
                           timeout=1, workload_file=tmp_path / "w.json")
    assert result == {"error": "not available: the router has no --routing-algorithm least-work",
                      "available": False}
    rows = bench.comparison_rows([scenario], {("skewed-batch", "least-work-queue2"): result},
                                 ["least-work-queue2", "least-request"], {"skewed-batch": 2.0})
    assert rows[0]["available"] is False and rows[0]["makespan_ratio"] == ""
    assert bench.failed_runs(rows[:1]) == []
    assert bench.failed_runs(rows) == [rows[1]]  # least-request was available but not run


def test_rows_carry_the_makespan_ratio_against_the_scenarios_bound(bench: ModuleType) -> None:
    scenario = bench.SCENARIOS["skewed-batch"]
    run = {**figures(10.0, 3.0), "makespan_s": 6.5}
    rows = bench.comparison_rows([scenario], {("skewed-batch", "least-request"): run}, ["least-request"],
                                 {"skewed-batch": 2.0})
    assert rows[0]["makespan_ratio"] == pytest.approx(3.25) and rows[0]["lower_bound_s"] == 2.0
    assert rows[0]["configuration"] == "least-request" and rows[0]["router_args"] == ""
    closed = bench.comparison_rows([bench.SCENARIOS["small-requests"]],
                                   {("small-requests", "least-request"): figures(10.0, 3.0)}, ["least-request"])
    assert closed[0]["makespan_ratio"] == "" and closed[0]["lower_bound_s"] == ""


def test_workload_scenarios_pass_their_file_and_queue_options(bench: ModuleType, tmp_path: Path) -> None:
    scenario = bench.SCENARIOS["mixed-batch"]
    argv = scenario.bench_argv(bench.CONFIGURATIONS["least-work-queue1"], tmp_path / "o.json", quick=True,
                               workload_file=tmp_path / "w.json")
    assert argv[argv.index("--workload") + 1] == str(tmp_path / "w.json")
    assert argv[argv.index("--routing-algorithm") + 1] == "least-work"
    assert argv[argv.index("--router-args") + 1] == "--max-inflight-per-worker 1 --max-queue 4096"
    assert argv[argv.index("--task-type") + 1] == "TI2V"  # serves the batch's images and videos
    assert argv[argv.index("--warmup") + 1] == "8"  # two per worker: the router has seen each one work
    with pytest.raises(ValueError):
        scenario.bench_argv("least-request", tmp_path / "o.json", quick=True)


def test_the_workload_file_round_trips_and_every_configuration_meets_the_same_one(
    bench: ModuleType, bench_router: ModuleType, tmp_path: Path
) -> None:
    scenario = bench.SCENARIOS["mixed-batch"]
    written = bench.write_workload(scenario, tmp_path, quick=False)
    assert written is not None
    path, items = written
    assert bench_router.load_workload(str(path)) == items
    assert bench.write_workload(scenario, tmp_path, quick=False)[1] == items
    assert bench.write_workload(bench.SCENARIOS["small-requests"], tmp_path, quick=False) is None


def test_bench_router_refuses_a_broken_workload(bench_router: ModuleType, tmp_path: Path) -> None:
    for document in ({}, {"requests": []}, {"requests": [{"kind": "mesh"}]},
                     {"requests": [{"kind": "image", "at": -1}]}):
        path = tmp_path / "w.json"
        path.write_text(json.dumps(document))
        with pytest.raises(ValueError):
            bench_router.load_workload(str(path))


def test_bench_router_builds_image_and_video_bodies(bench_router: ModuleType) -> None:
    path, body = bench_router.request_body({"kind": "video", "size": "832x480", "steps": 9, "num_frames": 17})
    assert path == "/v1/videos"
    assert body == {"prompt": "benchmark", "size": "832x480", "num_inference_steps": 9, "num_frames": 17}
    path, body = bench_router.request_body({"kind": "image", "size": "512x512", "steps": 8, "n": 2})
    assert path == "/v1/images/generations"
    assert body["n"] == 2 and body["response_format"] == "b64_json" and "num_frames" not in body
