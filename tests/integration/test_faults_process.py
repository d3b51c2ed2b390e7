"""
Fault tolerance with real processes: a worker that hangs (SIGSTOP) and one
that stalls mid-answer. The router must keep serving from the healthy worker,
quarantine the hung one through its health checks, never leak an in-flight
count, and keep the quarantined worker out until an operator re-admits it.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tests.integration.test_router_process import (
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def _worker(workers: list[dict[str, Any]], url: str) -> dict[str, Any]:
    return next(w for w in workers if w["url"] == url)


def test_hung_worker_is_quarantined_and_traffic_continues(processes: Processes) -> None:
    healthy, hung = processes.workers(sim("healthy"), sim("hung"))
    router = processes.router(
        [healthy, hung],
        "--routing-algorithm", "round-robin",
        "--timeout", "2",
        "--health-check-interval", "0.5",
        "--health-check-timeout", "0.5",
        "--health-check-failure-threshold", "2",
    )
    wait_for_workers(router, 2)
    hung.signal_group(signal.SIGSTOP)
    try:
        # While the hang is not yet detected, a request routed to it times out with 504;
        # every other request is served by the healthy worker.
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            during = list(pool.map(lambda _: post_image(router.url, timeout=20), range(8)))
        assert {r.status for r in during} <= {200, 504}
        assert all(r.worker == "healthy" for r in during if r.status == 200)
        for reply in during:
            if reply.status == 504:
                assert reply.json()["error"].startswith("Worker request failed: ")

        # Health checks quarantine it within threshold x (interval + probe timeout), give or take.
        def quarantined() -> dict[str, Any] | None:
            workers = call(router.url, "GET", "/workers").json()["workers"]
            entry = _worker(workers, hung.url)
            return entry if entry["is_dead"] else None

        entry = wait_until("the hung worker to be quarantined", quarantined, timeout=15)
        assert "health checks" in entry["dead_reason"]
        detected_after = time.monotonic() - started
        # Once quarantined, every request goes to the healthy worker and succeeds.
        after = [post_image(router.url, timeout=20) for _ in range(6)]
        assert [(r.status, r.worker) for r in after] == [(200, "healthy")] * 6
        # No in-flight count leaked on either worker once the timed-out requests are over.
        def settled() -> list[dict[str, Any]] | None:
            workers = call(router.url, "GET", "/workers").json()["workers"]
            return workers if all(w["active_requests"] == 0 for w in workers) else None

        workers = wait_until("in-flight counts back to 0", settled, timeout=10)
        timed_out = sum(1 for r in during if r.status == 504)
        assert _worker(workers, hung.url)["failed_requests"] >= timed_out
        print(f"hung worker quarantined {detected_after:.1f}s after SIGSTOP")
    finally:
        hung.signal_group(signal.SIGCONT)

    # Back from the hang, it stays out (it may hold stale weights) until an operator re-admits it.
    time.sleep(1.5)  # three health intervals
    workers = call(router.url, "GET", "/workers").json()["workers"]
    assert _worker(workers, hung.url)["is_dead"] is True
    worker_id = _worker(workers, hung.url)["worker_id"]
    reply = call(router.url, "PUT", f"/workers/{worker_id}", {"is_dead": False})
    assert reply.status == 200 and reply.json()["worker"]["is_dead"] is False
    served = {post_image(router.url).worker for _ in range(6)}
    assert served == {"healthy", "hung"}
