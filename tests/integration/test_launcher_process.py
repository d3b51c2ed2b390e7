"""
The launcher as operators run it: C{python -m twisted_router --launcher-config
fleet.yaml} (and C{twistd -n sglang-d-router ...}) with the simulated backend,
real processes on 127.0.0.1.

Workers are found by the router's own log lines (C{[worker N] started, pid P})
and checked by process group: each worker leads its own group, so
C{os.killpg(pid, 0)} tells whether anything of it is left. Every group seen is
SIGKILLed when a test ends, whatever happened, so a failing test leaves no
worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.launched import (
    STARTED,
    free_port_range,
    group_alive,
    started_workers,
    write_fleet,
)
from tests.support.live import (
    SMALL_IMAGE,
    all_routable,
    call,
    terminate,
    twistd_env,
    twistd_router_argv,
    wait_until,
    workers_by_url,
)
from tests.support.processes import python_module

if TYPE_CHECKING:  # the fixture's type; conftest.py is imported by pytest itself
    from tests.integration.conftest import Processes


# -- tests -------------------------------------------------------------------------------------


def test_launched_fleet_serves_survives_a_sigkill_and_stops_without_orphans(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    (external,) = processes.workers(["--worker-id", "external"])
    base = free_port_range(8)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          worker_host: 127.0.0.1
          worker_base_port: {base}
          wait_timeout: 30
          shutdown_grace: 5
          restart: {{min_delay: 0.5, max_delay: 2}}
          simulated:
            step_ms: 1
            startup_delay: 1
            workers:
              - {{task_type: T2I}}
              - {{task_type: T2I}}
              - {{task_type: T2V}}
        """,
    )
    router = processes.router([external], "--launcher-config", str(fleet))
    # The router listens at once; only the external worker serves until a launched one is ready.
    urls = [f"http://127.0.0.1:{base + 2 * i}" for i in range(3)]
    workers = wait_until("all launched workers routable", lambda: all_routable(router, [*urls, external.url]), 30.0)
    assert workers[urls[2]]["video_support"] is True
    pids = started_workers(router)
    assert sorted(pids) == [0, 1, 2]
    worker_groups.update(pid for runs in pids.values() for pid in runs)
    assert "3/3 workers ready" in router.output()

    served = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
    assert served.status == 200, served.body

    # SIGKILL worker 0's whole process group: out of rotation at once, not after 3 health intervals.
    (victim,) = pids[0]
    os.killpg(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def quarantined() -> dict[str, Any] | None:
        workers = workers_by_url(router)
        return workers[urls[0]] if workers and workers[urls[0]]["is_dead"] else None

    dead = wait_until("the killed worker to be out of rotation", quarantined, 5.0)
    assert time.monotonic() - killed_at < 2.0
    assert "killed by signal 9" in dead["dead_reason"]

    # Restarted with backoff, re-registered once healthy, and serving again.
    wait_until("the killed worker to be routable again", lambda: all_routable(router, [*urls, external.url]), 20.0)
    restarted = started_workers(router)[0]
    assert len(restarted) == 2 and restarted[0] == victim
    worker_groups.update(restarted)
    assert not group_alive(victim)

    def served_by_worker_0() -> str | None:
        reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
        assert reply.status == 200, reply.body
        return reply.worker if reply.worker == f"127.0.0.1:{base}" else None

    wait_until("a request served by the restarted worker", served_by_worker_0, 10.0)

    # SIGTERM the router: exit 0, and nothing of the fleet left.
    assert terminate(router) == 0, router.output()
    assert "launcher: all workers stopped" in router.output()
    left = [pgid for pgid in worker_groups if group_alive(pgid)]
    assert left == [], router.output()
    assert external.popen.poll() is None  # an external worker is not the launcher's to stop


def test_router_listens_at_once_and_sigint_stops_the_fleet_with_exit_0(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    base = free_port_range(4)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          num_workers: 2
          worker_base_port: {base}
          simulated: {{startup_delay: 2}}
        """,
    )
    router = processes.start(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet))
    )
    # Listening before any worker is up: /health says 503 until the first one is ready.
    early = call(router.url, "GET", "/health")
    assert early.status == 503, early.body
    urls = [f"http://127.0.0.1:{base + 2 * i}" for i in range(2)]
    wait_until("both workers routable", lambda: all_routable(router, urls), 20.0)
    assert call(router.url, "GET", "/health").status == 200
    router.wait_for_line(r"2/2 workers ready \(\d+ s\)", timeout=5.0)
    worker_groups.update(pid for runs in started_workers(router).values() for pid in runs)
    assert terminate(router, signal.SIGINT) == 0, router.output()
    assert [pgid for pgid in worker_groups if group_alive(pgid)] == []


def test_workers_never_get_the_routers_own_port(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    """With C{--port P} and C{worker_base_port: P} the router used to register itself as worker 0."""
    base = free_port_range(6)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          num_workers: 2
          worker_base_port: {base}
        """,
    )
    router = processes.start(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", str(base), "--launcher-config", str(fleet))
    )
    assert router.url == f"http://127.0.0.1:{base}"
    urls = [f"http://127.0.0.1:{base + 1}", f"http://127.0.0.1:{base + 3}"]
    wait_until("both workers routable on other ports", lambda: all_routable(router, urls), 20.0)
    worker_groups.update(pid for runs in started_workers(router).values() for pid in runs)
    assert f"127.0.0.1:{base} registered" not in router.output()
    assert "Address already in use" not in router.output()
    assert terminate(router) == 0, router.output()


def test_a_hung_managed_worker_is_quarantined_restarted_and_serves_again(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    """SIGSTOP: the process does not exit, so only the health checker notices; it used to hold its GPUs for ever."""
    base = free_port_range(4)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          num_workers: 2
          worker_base_port: {base}
          shutdown_grace: 1
          restart: {{min_delay: 0.5, max_delay: 2}}
        """,
    )
    router = processes.start(
        python_module(
            "twisted_router", "--host", "127.0.0.1", "--port", "0",
            "--health-check-interval", "0.5", "--health-check-timeout", "0.5",
            "--health-check-failure-threshold", "2",
            "--launcher-config", str(fleet),
        )
    )
    urls = [f"http://127.0.0.1:{base + 2 * i}" for i in range(2)]
    wait_until("both workers routable", lambda: all_routable(router, urls), 20.0)
    pids = started_workers(router)
    worker_groups.update(pid for runs in pids.values() for pid in runs)
    (victim,) = pids[0]
    os.killpg(victim, signal.SIGSTOP)

    def quarantined() -> dict[str, Any] | None:
        workers = workers_by_url(router)
        return workers[urls[0]] if workers and workers[urls[0]]["is_dead"] else None

    wait_until("the hung worker to be quarantined", quarantined, 10.0)
    router.wait_for_line(r"\[worker 0\] .* quarantined by health checks .*: restarting it", timeout=5.0)
    wait_until("the hung worker to be replaced and routable again", lambda: all_routable(router, urls), 20.0)
    restarted = started_workers(router)[0]
    worker_groups.update(restarted)
    assert len(restarted) == 2 and restarted[0] == victim
    assert not group_alive(victim)  # SIGKILLed after shutdown_grace: a stopped process ignores SIGTERM
    assert started_workers(router)[1] == pids[1]  # the healthy worker is untouched
    assert terminate(router) == 0, router.output()
    assert [pgid for pgid in worker_groups if group_alive(pgid)] == []


def test_twistd_runs_and_stops_the_fleet(processes: Processes, worker_groups: set[int], tmp_path: Path) -> None:
    base = free_port_range(2)
    fleet = write_fleet(tmp_path, f"launcher: {{backend: simulated, worker_base_port: {base}}}\n")
    router = processes.start(
        twistd_router_argv("--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet)), env=twistd_env()
    )
    wait_until("the worker routable", lambda: all_routable(router, [f"http://127.0.0.1:{base}"]), 20.0)
    worker_groups.update(pid for runs in started_workers(router).values() for pid in runs)
    # twistd ends a signal-stopped process by re-raising the signal (see test_router_process).
    assert terminate(router) in (0, -signal.SIGTERM), router.output()
    assert "launcher: all workers stopped" in router.output()
    assert [pgid for pgid in worker_groups if group_alive(pgid)] == []


def test_bad_launcher_file_exits_2_with_one_line_and_starts_nothing(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path, "launcher:\n  backend: simulated\n  num_worker: 2\n")
    done = subprocess.run(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet)),
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"sglang-d-router: error: launcher config {fleet}: "
        "launcher.num_worker: unknown key (did you mean 'num_workers'?)\n"
    )
    assert done.stdout == ""  # nothing started, not even logging


@pytest.mark.parametrize("how", ["console", "twistd"])
def test_no_worker_ready_exits_non_zero(how: str, tmp_path: Path, worker_groups: set[int]) -> None:
    base = free_port_range(4)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          num_workers: 2
          worker_base_port: {base}
          worker_extra_args: "--no-such-option"
          restart: false
        """,
    )
    options = ["--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet)]
    if how == "console":
        argv, env = python_module("twisted_router", *options), None
    else:
        argv = twistd_router_argv(*options)
        env = {**os.environ, **twistd_env()}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, start_new_session=True)
    worker_groups.update(int(m.group(2)) for m in STARTED.finditer(done.stdout))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "unrecognized arguments: --no-such-option" in done.stdout  # the workers' own words, relayed
    assert "no worker became ready" in done.stdout


FAKE_SGLANG = """\
#!{python}
# A stand-in for `sglang serve`: prints what it was given, forks a child into its
# process group (like the real scheduler processes), then serves as a simulated worker.
import os, subprocess, sys
args = sys.argv[1:]
print("fake sglang:", " ".join(args), "CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", ""), flush=True)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("scheduler child", child.pid, flush=True)
opts = dict(zip(args[1::2], args[2::2]))
os.execv(sys.executable, [sys.executable, "-m", "twisted_router.simulator",
                          "--host", opts["--host"], "--port", opts["--port"], "--model-path", opts["--model-path"]])
"""


def test_local_backend_runs_sglang_serve_and_ends_its_children(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    """The local backend end to end, with a fake C{sglang} on PATH that forks a child like the real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sglang = bin_dir / "sglang"
    sglang.write_text(FAKE_SGLANG.format(python=sys.executable))
    sglang.chmod(0o755)
    base = free_port_range(4)
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          model: Qwen/Qwen-Image
          num_workers: 2
          worker_base_port: {base}
          worker_extra_args: "--output-path /tmp/out"
          shutdown_grace: 5
          restart: {{min_delay: 0.5}}
        """,
    )
    router = processes.start(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet)),
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "6,7"},
    )
    urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 2}"]
    wait_until("both workers routable", lambda: all_routable(router, urls), 20.0)
    pids = started_workers(router)
    worker_groups.update(pid for runs in pids.values() for pid in runs)
    router.wait_for_line(
        rf"\[worker 1\] fake sglang: serve --model-path Qwen/Qwen-Image --num-gpus 1 --host 127.0.0.1 "
        rf"--port {base + 2} --master-port 31005 --scheduler-port 6555 --output-path /tmp/out CUDA_VISIBLE_DEVICES=7"
    )
    child = int(router.wait_for_line(r"\[worker 0\] scheduler child (\d+)").group(1))
    assert os.getpgid(child) == pids[0][0]  # in the worker's process group

    # Kill only the main process: its orphaned child is ended before the restart.
    os.kill(pids[0][0], signal.SIGKILL)
    wait_until("the orphaned child to be gone", lambda: None if group_alive(pids[0][0]) else True, 10.0)
    wait_until("worker 0 back", lambda: all_routable(router, urls), 20.0)
    worker_groups.update(started_workers(router)[0])

    assert terminate(router) == 0, router.output()
    assert [pgid for pgid in worker_groups if group_alive(pgid)] == [], router.output()
