"""
The router as its users run it: real processes on 127.0.0.1, ephemeral ports.

Simulated workers (C{python -m twisted_router.simulator}) and the router
(C{python -m twisted_router}, the console script, or C{twistd -n sglang-d-router})
are started on port 0; their ports are read from the C{listening on http://HOST:PORT}
line. The client side is the standard library only (C{http.client} and
C{concurrent.futures}), every wait is bounded, and the C{processes} fixture stops every
process group when the test ends.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tests.support.live import (
    BIN,
    MB,
    Reply,
    call,
    connection,
    post_image,
    proc_status_kb,
    sim,
    terminate,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:  # the fixture's type; conftest.py is imported by pytest itself
    from tests.integration.conftest import Processes

MIB = 1024 * 1024


# -- routing ----------------------------------------------------------------------------------


def test_round_robin_spreads_evenly_over_three_workers(processes: Processes) -> None:
    workers = processes.workers(sim("img-a"), sim("img-b"), sim("img-c"))
    router = processes.router(workers, "--routing-algorithm", "round-robin")
    wait_for_workers(router, 3)

    served: Counter[str | None] = Counter()
    for _ in range(30):
        reply = post_image(router.url)
        assert reply.status == 200, reply
        served[reply.worker] += 1

    assert served == {"img-a": 10, "img-b": 10, "img-c": 10}


def test_least_request_prefers_the_less_loaded_worker(processes: Processes) -> None:
    # A 1024x1024, 8-step image takes 8 x 4 ms = 32 ms of simulated GPU time on the fast
    # worker and 320 ms on the slow one (--speed 0.1). Each worker runs one request at a
    # time (one FIFO GPU queue), so requests queue up on the slow worker and its in-flight
    # count stays high; least-request then sends most of the load to the fast one. Even if
    # a loaded machine added ~50 ms of overhead to every request, the fast worker would
    # still serve well over twice as many (expected ~33 vs ~7 on an idle machine).
    workers = processes.workers(
        sim("fast", "--step-ms", "4"),
        sim("slow", "--step-ms", "4", "--speed", "0.1"),
    )
    router = processes.router(workers, "--routing-algorithm", "least-request")
    wait_for_workers(router, 2)
    payload = {"prompt": "a red fox", "size": "1024x1024", "num_inference_steps": 8}

    def one(_: int) -> str | None:
        reply = post_image(router.url, payload, timeout=60.0)
        assert reply.status == 200, reply
        return reply.worker

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = Counter(pool.map(one, range(40)))

    print(f"\n[least-request] served {dict(served)}")
    assert served["fast"] + served["slow"] == 40, served
    assert served["fast"] > 2 * served["slow"], served
    assert served["slow"] >= 1, served  # the slow worker is used, not starved


# -- failures ---------------------------------------------------------------------------------


def test_killed_worker_gives_502_then_503(processes: Processes) -> None:
    (worker,) = processes.workers(sim("doomed"))
    router = processes.router([worker])
    wait_for_workers(router, 1)
    assert post_image(router.url).status == 200  # leaves a pooled connection to the worker

    worker.signal_group(signal.SIGKILL)
    worker.popen.wait(timeout=10)

    first = post_image(router.url)
    assert first.status == 502, first
    assert first.headers["content-type"].startswith("application/json"), first
    error = first.json()["error"]
    assert error.startswith("Worker request failed: "), error

    # The worker was quarantined at once: nothing is left to route to.
    second = post_image(router.url)
    assert second.status == 503, second
    assert "error" in second.json(), second


def test_worker_500_is_passed_through_unchanged(processes: Processes) -> None:
    (worker,) = processes.workers(sim("failing", "--fail-rate", "1"))
    router = processes.router([worker])
    wait_for_workers(router, 1)

    reply = post_image(router.url)

    assert reply.status == 500, reply
    assert reply.headers["content-type"].startswith("text/plain"), reply
    assert reply.body == b"Internal Server Error"
    assert reply.worker == "failing"


# -- mixed traffic ----------------------------------------------------------------------------


def test_concurrent_mixed_requests_and_video_jobs(processes: Processes) -> None:
    image, video = processes.workers(
        sim("image", "--step-ms", "1"),
        sim("video", "--task-type", "T2V", "--step-ms", "0.05", "--video-bytes", "65536"),
    )
    router = processes.router([image, video])
    wait_for_workers(router, 2)

    kinds = ["image", "video", "health", "image"] * 4  # 16 requests

    def one(kind: str) -> tuple[str, Reply]:
        if kind == "image":
            return kind, post_image(router.url)
        if kind == "video":
            return kind, call(router.url, "POST", "/v1/videos", {"prompt": "waves", "seconds": 1})
        return kind, call(router.url, "GET", "/health")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, kinds))

    video_ids: list[str] = []
    for kind, reply in results:
        assert reply.status == 200, (kind, reply)
        if kind == "image":
            # Image generations may go to any routable worker (the simulated T2V worker
            # answers them too); only video creations are restricted to video workers.
            assert reply.json()["data"], reply
        elif kind == "video":
            assert reply.worker == "video", reply
            video_ids.append(reply.json()["id"])
        else:
            assert reply.json()["status"] == "healthy", reply
    assert len(video_ids) == 4 and len(set(video_ids)) == 4

    for video_id in video_ids:

        def completed(video_id: str = video_id) -> dict[str, Any] | None:
            reply = call(router.url, "GET", f"/v1/videos/{video_id}", timeout=5.0)
            assert reply.status == 200, reply
            job: dict[str, Any] = reply.json()
            assert job["status"] != "failed", job
            return job if job["status"] == "completed" else None

        job = wait_until(f"video {video_id} to complete", completed, timeout=20.0)
        assert job["id"] == video_id
        content = call(router.url, "GET", f"/v1/videos/{video_id}/content")
        assert content.status == 200, content
        assert content.headers["content-type"] == "video/mp4"
        assert len(content.body) == 65536
        assert content.worker == "video"


# -- running the router -----------------------------------------------------------------------


def _healthy(url: str) -> Reply | None:
    reply = call(url, "GET", "/health", timeout=5.0)
    return reply if reply.status == 200 else None


def test_twistd_plugin_serves_and_stops_on_sigterm(processes: Processes) -> None:
    (worker,) = processes.workers(sim("w"))
    router = processes.twistd_router([worker])
    assert "listening on http://127.0.0.1:" in router.output()

    reply = wait_until("twistd router /health to answer 200", lambda: _healthy(router.url))
    assert reply.json()["healthy_workers"] == 1

    # twistd deliberately ends a signal-stopped process by re-raising that signal
    # (twisted.application.app._exitWithSignal), so a parent sees "terminated by SIGTERM";
    # process managers such as systemd count that as a clean stop. What matters is that the
    # shutdown ran to completion instead of the process being killed half-way.
    code = terminate(router, timeout=15.0)
    assert code in (0, -signal.SIGTERM), router.output()
    assert "Server Shut Down." in router.output(), router.output()


def test_console_script_stops_cleanly_on_sigterm(processes: Processes) -> None:
    (worker,) = processes.workers(sim("w"))
    router = processes.start(
        [
            str(BIN / "sglang-d-router"),
            "--host", "127.0.0.1", "--port", "0",
            "--health-check-interval", "1",
            "--worker-urls", worker.url,
        ]
    )
    wait_until("console-script router /health to answer 200", lambda: _healthy(router.url))
    assert post_image(router.url).status == 200  # a pooled upstream connection is open

    assert terminate(router, timeout=15.0) == 0, router.output()


# -- streaming --------------------------------------------------------------------------------


def test_200_mb_video_streams_through_router_in_bounded_memory(processes: Processes) -> None:
    size = 200 * MB
    (worker,) = processes.workers(
        sim("video", "--task-type", "T2V", "--step-ms", "0.01", "--video-bytes", str(size))
    )
    router = processes.router([worker])
    wait_for_workers(router, 1)

    created = call(router.url, "POST", "/v1/videos", {"prompt": "waves", "seconds": 1})
    assert created.status == 200, created
    video_id = created.json()["id"]

    def completed() -> bool | None:
        job = call(router.url, "GET", f"/v1/videos/{video_id}", timeout=5.0).json()
        assert job["status"] != "failed", job
        return True if job["status"] == "completed" else None

    wait_until("the video to complete", completed, timeout=20.0)

    before = proc_status_kb(router.pid)
    conn = connection(router.url, timeout=30.0)
    started = time.monotonic()
    try:
        conn.request("GET", f"/v1/videos/{video_id}/content")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "video/mp4"
        received = 0
        while chunk := response.read(MIB):
            received += len(chunk)
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    after = proc_status_kb(router.pid)

    assert received == size
    rss_growth_mb = (after["VmRSS"] - before["VmRSS"]) / 1024
    hwm_growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(
        f"\n[stream] {received / MB:.0f} MB through the router in {elapsed:.2f}s "
        f"({received / MB / elapsed:.0f} MB/s); router VmHWM {before['VmHWM'] / 1024:.1f} -> "
        f"{after['VmHWM'] / 1024:.1f} MiB (peak growth {hwm_growth_mb:.1f} MiB), "
        f"VmRSS {before['VmRSS'] / 1024:.1f} -> {after['VmRSS'] / 1024:.1f} MiB "
        f"(growth {rss_growth_mb:.1f} MiB)"
    )
    assert (after["VmHWM"] - before["VmHWM"]) * 1024 < 30 * MB, (before, after)
