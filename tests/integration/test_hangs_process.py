"""
A hung worker must not stall the fleet, and abandoned generations stay load:
real router and simulated-worker processes on 127.0.0.1, hangs made with
SIGSTOP.

Each test prints the figure it measures (seconds to the first answer, requests
sent to a hung worker, in-flight counts after clients hung up), so a run with
C{-s} shows the behaviour and not only pass or fail. Every wait is bounded and
every process is stopped by the C{processes} fixture, and every SIGSTOP is
undone in a C{finally}.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.support.live import (
    SMALL_IMAGE,
    Reply,
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
    workers_by_url,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def test_refit_with_a_hung_worker_serves_from_the_updated_one(processes: Processes) -> None:
    """
    One worker hangs (SIGSTOP) during a refit: the one that finished is
    routable at once on the new version, the hung one is quarantined when the
    weight-update timeout expires, and the refit's answer reports both.
    """
    ready, hung = processes.workers(sim("ready"), sim("hung"))
    router = processes.router(
        [ready, hung],
        "--weight-update-timeout", "12",
        # Probes must not be what catches the hang here: the refit's own timeout must.
        "--health-check-interval", "30",
        "--health-check-timeout", "20",
    )
    wait_for_workers(router, 2)
    hung.signal_group(signal.SIGSTOP)
    try:
        refit: list[Reply] = []
        started = time.monotonic()
        thread = threading.Thread(
            target=lambda: refit.append(
                call(router.url, "POST", "/update_weights_from_disk",
                     {"model_path": "/ckpt/step-1", "weight_version": "v1"}, timeout=30)
            )
        )
        thread.start()
        try:
            time.sleep(0.3)  # the refit is under way
            first = post_image(router.url, timeout=30)
            first_after = time.monotonic() - started
            print(f"first generation during the refit: HTTP {first.status} from {first.worker} "
                  f"version {first.headers.get('x-weight-version')} after {first_after:.2f}s")
            assert first.status == 200
            assert first.worker == "ready"
            assert first.headers.get("x-weight-version") == "v1"
            # Served while the refit still waits for the hung worker (not after its timeout).
            assert thread.is_alive() and not refit
        finally:
            thread.join(timeout=30)
        assert refit, "the refit did not answer"
        answer = refit[0]
        print(f"refit answered HTTP {answer.status} after {time.monotonic() - started:.2f}s")
        assert answer.status == 502
        results = {r["worker_url"]: r for r in answer.json()["results"]}
        assert results[ready.url]["success"] is True
        assert results[hung.url]["success"] is False
        assert "timed out" in results[hung.url]["error"]
        workers = workers_by_url(router)
        assert workers[hung.url]["is_dead"] is True
        assert workers[hung.url]["weight_version"] is None
        assert workers[ready.url]["state"] == "ready"
        assert workers[ready.url]["weight_version"] == "v1"
    finally:
        hung.signal_group(signal.SIGCONT)


def test_hung_worker_stops_getting_requests_and_its_requests_are_retried(processes: Processes) -> None:
    """
    A worker hangs while requests stream in: within one probe interval plus
    one probe timeout it gets no new request (suspect), it is quarantined a
    few seconds later, and requests it held without answering are retried on
    the healthy worker instead of failing.
    """
    interval, probe_timeout = 2.0, 1.0
    healthy, hung = processes.workers(sim("healthy"), sim("hung"))
    router = processes.router(
        [healthy, hung],
        "--routing-algorithm", "round-robin",
        "--timeout", "4",
        "--health-check-interval", str(interval),
        "--health-check-timeout", str(probe_timeout),
        "--health-check-failure-threshold", "3",
    )
    wait_for_workers(router, 2)
    hung.signal_group(signal.SIGSTOP)
    hung_at = time.monotonic()
    try:
        # Watch the hung worker's state: the moment it is first seen suspect
        # (or dead), and how many requests it had been sent by then.
        seen_out: list[tuple[float, str, int]] = []
        stop_watching = threading.Event()

        def watch() -> None:
            while not stop_watching.is_set() and not seen_out:
                entry = workers_by_url(router)[hung.url]
                if entry["state"] in ("suspect", "dead"):
                    seen_out.append((time.monotonic() - hung_at, entry["state"], entry["total_requests"]))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                futures = []
                while time.monotonic() - hung_at < 10:
                    futures.append(pool.submit(post_image, router.url, SMALL_IMAGE, 30))
                    time.sleep(0.2)
                replies = [f.result(timeout=60) for f in futures]
        finally:
            stop_watching.set()
            watcher.join(timeout=30)
        entry = wait_until(
            "the hung worker to be quarantined",
            lambda: (w if (w := workers_by_url(router)[hung.url])["is_dead"] else None),
            timeout=20,
        )
        assert seen_out, "the hung worker was never seen suspect or dead"
        out_after, out_state, sent_by_then = seen_out[0]
        statuses = [r.status for r in replies]
        print(f"{len(replies)} requests: {statuses.count(200)} x 200, {len(replies) - statuses.count(200)} other "
              f"({sorted(set(statuses))}); hung worker {out_state} {out_after:.1f}s after the hang "
              f"(bound: interval + probe timeout = {interval + probe_timeout:g}s), had {sent_by_then} request(s) "
              f"by then and {entry['total_requests']} in all; dead: {entry['dead_reason']}")
        assert entry["total_requests"] == sent_by_then, "the hung worker got requests after it was taken out"
        # Out of rotation within one interval + one probe timeout (+ generous slack for a loaded machine);
        # before suspect workers, it took the whole failure threshold (3 rounds here).
        assert out_after < interval + probe_timeout + 4
        assert statuses == [200] * len(replies)
        assert {r.worker for r in replies} == {"healthy"}
    finally:
        hung.signal_group(signal.SIGCONT)


def _send_and_hang_up(base_url: str, payload: bytes) -> None:
    """Send a whole generation request, then close the connection without reading."""
    parts = urlsplit(base_url)
    assert parts.hostname == "127.0.0.1"
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        head = (
            "POST /v1/images/generations HTTP/1.1\r\nHost: router\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        sock.sendall(head + payload)
        time.sleep(0.2)  # the router has dispatched it


def test_abandoned_generations_keep_counting_until_the_worker_finishes(processes: Processes) -> None:
    """
    Clients that hang up after sending leave generations running on the
    worker; the router keeps counting them as in flight until the worker has
    finished them, so least-request does not think the worker idle.
    """
    import json

    # 8 steps at 512x512 with --step-ms 1000: 2 s of simulated GPU time each, run one at a time.
    (worker,) = processes.workers(sim("slow", "--step-ms", "1000"))
    router = processes.router([worker], "--timeout", "30")
    wait_for_workers(router, 1)
    payload = json.dumps(SMALL_IMAGE).encode()
    for _ in range(4):
        _send_and_hang_up(router.url, payload)
    hung_up_at = time.monotonic()
    active_after = workers_by_url(router)[worker.url]["active_requests"]
    print(f"in flight right after 4 clients hung up: {active_after}")
    assert active_after >= 3  # the first may have finished already; the rest are queued on the worker

    settled = wait_until(
        "the abandoned generations to finish",
        lambda: (w if (w := workers_by_url(router)[worker.url])["active_requests"] == 0 else None),
        timeout=30,
    )
    drained_after = time.monotonic() - hung_up_at
    print(f"in flight back to 0 {drained_after:.2f}s after the hang-ups")
    assert drained_after > 2.0  # they were counted while the worker computed them (4 x 2 s in all)
    assert settled["failed_requests"] == 0
    # And the worker is usable afterwards.
    assert post_image(router.url).status == 200
