"""
Durable state across a real restart: a router SIGKILLed and started again with
the same C{--state-dir} comes back with the fleet's weight version, its
workers (quarantined ones still quarantined), the owners of images and videos
made before, and the workers of an interrupted refit kept out of rotation.
Real processes on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from tests.support.launched import free_port_range, started_workers, write_fleet
from tests.support.live import (
    SMALL_IMAGE,
    Reply,
    call,
    post_image,
    sim,
    twistd_env,
    twistd_router_argv,
    wait_for_workers,
    wait_until,
    workers_by_url,
)
from tests.support.processes import ServerProcess, python_module

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

STATE_FILE = "router-state.json"
INTERRUPTED = "was in progress when the router stopped"


def kill_router(router: ServerProcess) -> None:
    """SIGKILL: no shutdown code runs, so only what is already on disk survives."""
    router.signal_group(signal.SIGKILL)
    router.popen.wait(timeout=10)


def worker_path(url: str) -> str:
    return "/workers/" + quote(url, safe="")


def healthy(router: ServerProcess, count: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = call(router.url, "GET", "/health", timeout=5.0).json()
        return body if body["healthy_workers"] == count else None

    return wait_until(f"{count} healthy worker(s)", probe, timeout=30.0)


def refit(router: ServerProcess, model_path: str, timeout: float = 60.0) -> Reply:
    return call(router.url, "POST", "/update_weights_from_disk", {"model_path": model_path}, timeout=timeout)


def saved_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_bytes())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def test_a_restarted_router_remembers_weights_quarantine_and_owners(processes: Processes, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    workers = processes.workers(
        sim("img-a", "--step-ms", "1"), sim("img-b", "--step-ms", "1"), sim("vid", "--task-type", "T2V", "--step-ms", "1")
    )
    urls = {w.argv[w.argv.index("--worker-id") + 1]: w.url for w in workers}
    router = processes.router(workers, "--state-dir", str(state_dir))
    wait_for_workers(router, 3)

    for step in (1, 2, 3):
        reply = refit(router, f"/ckpt/step-{step}")
        assert reply.status == 200 and reply.json()["weight_version"] == str(step), reply
    image = post_image(router.url)
    assert image.status == 200 and image.headers["x-weight-version"] == "3", image
    image_id = image.json()["id"]
    video = call(router.url, "POST", "/v1/videos", {"prompt": "waves", "num_frames": 2, "size": "64x64"})
    assert video.status == 200, video
    video_id = video.json()["id"]
    wait_until(
        "the video to complete",
        lambda: True if call(router.url, "GET", f"/v1/videos/{video_id}").json()["status"] == "completed" else None,
    )
    # Quarantine the image worker that did not make the image.
    other = urls["img-b" if image.worker == "img-a" else "img-a"]
    quarantined = call(router.url, "PUT", worker_path(other), {"is_dead": True})
    assert quarantined.status == 200, quarantined

    def owners_saved() -> bool | None:
        state = saved_state(state_dir)
        if state is None:
            return None
        images = {row[0] for rows in state["images"].values() for row in rows}
        videos = {row[0] for rows in state["videos"].values() for row in rows}
        dead = [w for w in state["workers"] if w["quarantine_reason"]]
        return True if image_id in images and video_id in videos and len(dead) == 1 else None

    wait_until("the owners and the quarantine to be saved", owners_saved, timeout=10.0)
    kill_router(router)

    # Started again without --worker-urls: the registrations come from the state file.
    again = processes.router([], "--state-dir", str(state_dir))
    health = healthy(again, 2)
    assert (health["weight_version"], health["model_path"]) == ("3", "/ckpt/step-3"), health
    assert health["dead_workers"] == 1, health
    listed = workers_by_url(again)
    assert set(listed) == set(urls.values())
    assert listed[other]["is_dead"] and listed[other]["dead_reason"] == "marked dead by operator", listed[other]
    assert {w["weight_version"] for u, w in listed.items() if u != other} == {"3"}

    answer = post_image(again.url)
    assert answer.status == 200 and answer.headers["x-weight-version"] == "3", answer
    content = call(again.url, "GET", f"/v1/images/{image_id}/content")
    assert content.status == 200 and content.worker == image.worker, content
    video_content = call(again.url, "GET", f"/v1/videos/{video_id}/content")
    assert video_content.status == 200 and video_content.worker == "vid", video_content
    # Found from the restored owner maps, not by asking the fleet.
    assert "found owner" not in again.output(), again.output()
    assert "state restored: weight version 3, 3 worker(s)" in again.output()


def test_a_refit_cut_short_by_a_kill_keeps_its_workers_out_until_readmitted_or_refitted(
    processes: Processes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    # Each weight update takes 3 s of simulated GPU time: long enough to kill the router during one.
    workers = processes.workers(sim("a", "--update-ms", "3000"), sim("b", "--update-ms", "3000"))
    router = processes.router(workers, "--state-dir", str(state_dir))
    wait_for_workers(router, 2)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(refit, router, "/ckpt/step-1", 30.0)
        wait_until(
            "both workers to be updating",
            lambda: True if {w["state"] for w in workers_by_url(router).values()} == {"updating"} else None,
        )
        journal = saved_state(state_dir)
        assert journal is not None and journal["journal"][-1]["outcome"] is None, journal
        kill_router(router)
        assert pending.exception(timeout=30) is not None  # the client saw the router die

    again = processes.router([], "--state-dir", str(state_dir))
    wait_until("both workers to be listed", lambda: workers_by_url(again) if len(workers_by_url(again)) == 2 else None)
    for worker in workers_by_url(again).values():
        assert worker["state"] == "dead" and worker["is_dead"], worker
        assert INTERRUPTED in worker["dead_reason"], worker
        assert "weight update to version 1 (/ckpt/step-1)" in worker["dead_reason"], worker
    health = call(again.url, "GET", "/health").json()
    assert health["healthy_workers"] == 0 and health["weight_version"] == "0", health
    refused = post_image(again.url)
    assert refused.status == 503, refused
    assert json.loads(refused.body)["error"]
    assert (saved_state(state_dir) or {})["journal"][-1]["outcome"] == "interrupted"

    # The operator re-admits one: it comes back (caught up to the fleet's weights).
    a, b = (w.url for w in workers)
    readmitted = call(again.url, "PUT", worker_path(a), {"is_dead": False})
    assert readmitted.status == 200, readmitted
    healthy(again, 1)
    assert workers_by_url(again)[b]["is_dead"]
    # A new refit reaches the other one too and brings it back; the interrupted label stays taken.
    reply = refit(again, "/ckpt/step-2")
    assert reply.status == 200 and reply.json()["weight_version"] == "2", reply
    healthy(again, 2)
    answer = post_image(again.url, SMALL_IMAGE)
    assert answer.status == 200 and answer.headers["x-weight-version"] == "2", answer


def test_a_launcher_run_keeps_state_by_default_and_catches_fresh_workers_up(
    processes: Processes, worker_groups: set[int], tmp_path: Path
) -> None:
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: simulated
          worker_host: 127.0.0.1
          worker_base_port: {free_port_range(8)}
          wait_timeout: 30
          shutdown_grace: 5
          simulated:
            step_ms: 1
            weights_prefix: /ckpt/
            workers:
              - {{task_type: T2I}}
              - {{task_type: T2I}}
        """,
    )
    argv = python_module(
        "twisted_router", "--host", "127.0.0.1", "--port", "0", "--health-check-interval", "1",
        "--launcher-config", str(fleet),
    )
    router = processes.start(argv)
    wait_until("2 launched workers", lambda: True if "2/2 workers ready" in router.output() else None, 30.0)
    healthy(router, 2)
    for step in (1, 2):
        reply = refit(router, f"/ckpt/step-{step}")
        assert reply.status == 200 and reply.json()["weight_version"] == str(step), reply
    # No --state-dir and no state_dir key: the default, under $XDG_STATE_HOME (private to this test).
    state_files = list(Path(os.environ["XDG_STATE_HOME"], "sglang-d-router").glob(f"fleet-*/{STATE_FILE}"))
    assert len(state_files) == 1, state_files
    old_pids = [pid for runs in started_workers(router).values() for pid in runs]
    worker_groups.update(old_pids)  # whatever a killed router leaves behind is stopped at the end
    kill_router(router)

    again = processes.start(argv)
    wait_until("2 relaunched workers", lambda: True if "2/2 workers ready" in again.output() else None, 30.0)
    health = healthy(again, 2)
    worker_groups.update(pid for runs in started_workers(again).values() for pid in runs)
    assert (health["weight_version"], health["model_path"]) == ("2", "/ckpt/step-2"), health
    listed = workers_by_url(again)
    # New processes (on whatever ports are free now); no managed registration was restored.
    assert not set(old_pids) & {pid for runs in started_workers(again).values() for pid in runs}
    assert "state restored: weight version 2, 0 worker(s)" in again.output(), again.output()
    assert len(listed) == 2
    assert {w["weight_version"] for w in listed.values()} == {"2"}
    assert {w["model_path"] for w in listed.values()} == {"/ckpt/step-2"}
    answer = post_image(again.url)
    assert answer.status == 200 and answer.headers["x-weight-version"] == "2", answer
    saved = json.loads(state_files[0].read_bytes())
    assert saved["workers"] == [] and saved["fleet"]["weight_version"] == "2"


def _exit_of(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL
    )
    return done.returncode, done.stdout, done.stderr


def test_a_corrupt_state_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(b'{"kind": "sglang-d-router-state", "format": 1, "fleet": {"weight_ver')
    code, out, err = _exit_of(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir))
    )
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("sglang-d-router: error: state file "), err
    assert "not valid JSON (corrupt or truncated file?)" in err
    assert "listening" not in out

    (state_dir / STATE_FILE).write_text('{"name": "not ours"}')
    code, out, err = _exit_of(twistd_router_argv("--port", "0", "--state-dir", str(state_dir)), env=twistd_env())
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "not a sglang-d-router-state file" in err, err
    # Neither touched the file.
    assert (state_dir / STATE_FILE).read_text() == '{"name": "not ours"}'
