"""
The router-side queue with real processes: a batch through a router with
C{--max-inflight-per-worker 1} and C{least-work} over simulated workers of
different C{--speed}; every request answered 200, the queue empties, no
in-flight count or predicted work is left behind, and the slow worker gets
fewer of the requests (late binding: it frees its slot less often).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tests.support.live import call, sim, wait_for_workers, wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def test_a_batch_through_the_queue_all_answered_and_the_queue_empties(processes: Processes) -> None:
    workers = processes.workers(
        sim("fast-a", "--step-ms", "5", "--speed", "1"),
        sim("fast-b", "--step-ms", "5", "--speed", "1"),
        sim("slow", "--step-ms", "5", "--speed", "0.25"),
    )
    router = processes.router(
        workers, "--routing-algorithm", "least-work", "--max-inflight-per-worker", "1", "--max-queue", "64"
    )
    wait_for_workers(router, 3)
    body = {"prompt": "a fox", "num_inference_steps": 10, "size": "1024x1024"}
    with ThreadPoolExecutor(max_workers=24) as pool:
        replies = list(pool.map(lambda _: call(router.url, "POST", "/v1/images/generations", body, 60.0), range(24)))
    assert [r.status for r in replies] == [200] * 24

    health = call(router.url, "GET", "/health").json()
    assert (health["queued_requests"], health["oldest_queued_wait"]) == (0, 0.0)
    listing = call(router.url, "GET", "/workers").json()
    assert listing["queue"]["max_inflight_per_worker"] == 1
    by_url = {w["url"]: w for w in listing["workers"]}
    entries = [by_url[w.url] for w in workers]
    assert [e["active_requests"] for e in entries] == [0, 0, 0]
    assert [e["predicted_work"] for e in entries] == [0.0, 0.0, 0.0]
    assert sum(e["total_requests"] for e in entries) >= 24
    assert all(e["speed_samples"] > 0 for e in entries)
    fast_a, fast_b, slow = (e["total_requests"] for e in entries)
    assert slow < fast_a and slow < fast_b, (fast_a, fast_b, slow)


def test_video_jobs_hold_their_slot_until_the_router_sees_them_finish(processes: Processes) -> None:
    """
    With C{--max-inflight-per-worker 1}, a running video job keeps its worker's
    slot; nobody polls, so the router's own polls free the slots, and every
    creation is answered.
    """
    workers = processes.workers(
        sim("vid-a", "--task-type", "T2V", "--step-ms", "1"),
        sim("vid-b", "--task-type", "T2V", "--step-ms", "1"),
    )
    router = processes.router(workers, "--routing-algorithm", "least-work", "--max-inflight-per-worker", "1")
    wait_for_workers(router, 2)
    body = {"prompt": "waves", "num_frames": 2, "num_inference_steps": 2, "size": "64x64"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: call(router.url, "POST", "/v1/videos", body, 60.0), range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert len({r.json()["id"] for r in replies}) == 4

    def settled() -> list[dict[str, object]] | None:
        listing = call(router.url, "GET", "/workers").json()["workers"]
        return listing if all(w["running_jobs"] == 0 for w in listing) else None

    listing = wait_until("the router to see every job finish", settled, timeout=30.0)
    assert [w["predicted_work"] for w in listing] == [0.0, 0.0]
    assert all(w["speed_samples"] > 0 for w in listing)  # learned from inference_time_s
    assert call(router.url, "GET", "/health").json()["queued_requests"] == 0
