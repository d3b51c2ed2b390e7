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

from tests.support.live import (
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
    workers_by_url,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


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
            entry = workers_by_url(router)[hung.url]
            return entry if entry["is_dead"] else None

        entry = wait_until("the hung worker to be quarantined", quarantined, timeout=15)
        assert "health checks" in entry["dead_reason"]
        detected_after = time.monotonic() - started
        # Once quarantined, every request goes to the healthy worker and succeeds.
        after = [post_image(router.url, timeout=20) for _ in range(6)]
        assert [(r.status, r.worker) for r in after] == [(200, "healthy")] * 6
        # No in-flight count leaked on either worker once the timed-out requests are over.
        def settled() -> dict[str, dict[str, Any]] | None:
            workers = workers_by_url(router)
            return workers if all(w["active_requests"] == 0 for w in workers.values()) else None

        workers = wait_until("in-flight counts back to 0", settled, timeout=10)
        timed_out = sum(1 for r in during if r.status == 504)
        assert workers[hung.url]["failed_requests"] >= timed_out
        print(f"hung worker quarantined {detected_after:.1f}s after SIGSTOP")
    finally:
        hung.signal_group(signal.SIGCONT)

    # Back from the hang, it stays out (it may hold stale weights) until an operator re-admits it.
    time.sleep(1.5)  # three health intervals
    entry = workers_by_url(router)[hung.url]
    assert entry["is_dead"] is True
    worker_id = entry["worker_id"]
    reply = call(router.url, "PUT", f"/workers/{worker_id}", {"is_dead": False})
    assert reply.status == 200 and reply.json()["worker"]["is_dead"] is False
    served = {post_image(router.url).worker for _ in range(6)}
    assert served == {"healthy", "hung"}
