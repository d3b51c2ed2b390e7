"""
SIGTERM drains the router, for real: requests in flight to slow simulated
workers all finish with 200, new connections are refused, a request on a
connection that was already open gets 503 (C{/health}: draining), and the
process exits 0 — also under twistd. A grace that expires cuts what is left
and still exits.
"""

from __future__ import annotations

import http.client
import json
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tests.support.live import (
    SMALL_IMAGE,
    call,
    post_image,
    sim,
    wait_exit,
    wait_for_workers,
    wait_until,
)
from tests.support.processes import ServerProcess

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def _in_flight(router: ServerProcess) -> int:
    return sum(w["active_requests"] for w in call(router.url, "GET", "/workers", timeout=5).json()["workers"])


def _open_connection(router: ServerProcess) -> http.client.HTTPConnection:
    """A kept-alive connection, opened (and used once) before the router is told to stop."""
    host, port = router.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    return conn


def _attempt(router: ServerProcess) -> Any:
    try:
        return post_image(router.url, SMALL_IMAGE, timeout=60).status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__


def _start_requests(pool: ThreadPoolExecutor, router: ServerProcess, count: int) -> list[Future[Any]]:
    futures = [pool.submit(_attempt, router) for _ in range(count)]
    wait_until(f"{count} requests in flight", lambda: _in_flight(router) == count or None, timeout=20)
    return futures


def _drain_and_check(router: ServerProcess, *, count: int) -> int:
    keep_alive = _open_connection(router)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = _start_requests(pool, router, count)
        router.popen.send_signal(signal.SIGTERM)
        router.wait_for_line("shutting down: no new connections", timeout=15)

        # New connections are refused; requests on open connections get 503, /health says draining.
        def refused() -> bool | None:
            try:
                call(router.url, "GET", "/health", timeout=5)
            except ConnectionRefusedError:
                return True
            return None

        wait_until("new connections to be refused", refused, timeout=10)
        keep_alive.request("GET", "/health")
        response = keep_alive.getresponse()
        body = json.loads(response.read())
        assert response.status == 503 and body["status"] == "draining", body
        assert response.getheader("connection") == "close"
        keep_alive.close()

        results = [f.result(timeout=90) for f in futures]
    assert results == [200] * count, (results, router.output())
    code = wait_exit(router, timeout=30)
    assert "every request in flight has finished" in router.output()
    return code


def test_sigterm_lets_requests_in_flight_finish(processes: Processes) -> None:
    workers = processes.workers(sim("a", "--base-ms", "1500"), sim("b", "--base-ms", "1500"))
    router = processes.router(workers)
    wait_for_workers(router, 2)
    assert _drain_and_check(router, count=6) == 0


def test_sigterm_under_twistd_drains_too(processes: Processes) -> None:
    workers = processes.workers(sim("a", "--base-ms", "1500"))
    router = processes.twistd_router(workers)
    wait_for_workers(router, 1)
    # twistd ends a signal-stopped process by re-raising the signal (see test_router_process).
    assert _drain_and_check(router, count=3) in (0, -signal.SIGTERM)


def test_grace_expiry_cuts_the_rest_and_exits(processes: Processes) -> None:
    workers = processes.workers(sim("slow", "--base-ms", "60000"))
    router = processes.router(workers, "--shutdown-grace", "1")
    wait_for_workers(router, 1)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = _start_requests(pool, router, 3)
        router.popen.send_signal(signal.SIGTERM)
        assert wait_exit(router, timeout=30) == 0
        results = [f.result(timeout=30) for f in futures]
    assert 200 not in results and all(isinstance(r, str) for r in results), results  # cut, never a fake whole answer
    assert "shutdown grace of 1s expired: 3 request(s)" in router.output()
