"""
Observability with real processes: request ids and W3C trace context round
trip through a real simulated worker (which records what it received),
C{--log-format json} lines parse and carry the id, and C{--metrics-listen}
serves the same series as C{/metrics} on the main port.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.live import (
    SMALL_IMAGE,
    call,
    sim,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "rojo=00f067aa0ba902b7"
IMAGES = "/v1/images/generations"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_ids_round_trip_json_logs_parse_and_metrics_have_their_own_port(processes: Processes) -> None:
    first, second = processes.workers(sim("obs-a"), sim("obs-b"))
    router = processes.router(
        [first, second],
        "--routing-algorithm", "round-robin",
        "--log-format", "json",
        "--access-log", "on",
        "--metrics-listen", "tcp:0:interface=127.0.0.1",
    )
    main = router.wait_for_line(r'"sglang-d-router listening on (http://127\.0\.0\.1:\d+)"').group(1)
    metrics_url = router.wait_for_line(r'"metrics listening on (http://127\.0\.0\.1:\d+)"').group(1)
    assert main != metrics_url
    wait_for_workers(router, 2)

    trace = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    given = call(main, "POST", IMAGES, SMALL_IMAGE, headers={"X-Request-ID": "obs-given-1", **trace})
    generated = call(main, "POST", IMAGES, SMALL_IMAGE, headers={"traceparent": TRACEPARENT})
    hostile = call(main, "POST", IMAGES, SMALL_IMAGE, headers={"X-Request-ID": "x" * 300})
    refused = call(main, "GET", "/workers/nobody", headers={"X-Request-ID": "obs-404"})
    assert [r.status for r in (given, generated, hostile, refused)] == [200, 200, 200, 404]
    assert given.headers["x-request-id"] == "obs-given-1"
    assert refused.headers["x-request-id"] == "obs-404"
    made = generated.headers["x-request-id"]
    replaced = hostile.headers["x-request-id"]
    assert made and replaced and len(replaced) < 40 and made != replaced

    # What the workers received: the same ids, and the trace context untouched.
    seen: list[dict[str, Any]] = []
    for worker in (first, second):
        seen += [r for r in call(worker.url, "GET", "/sim/requests").json()["requests"] if r["path"] == IMAGES]
    by_id = {r["x_request_id"]: r for r in seen}
    assert set(by_id) == {"obs-given-1", made, replaced}
    assert by_id["obs-given-1"]["traceparent"] == TRACEPARENT
    assert by_id["obs-given-1"]["tracestate"] == TRACESTATE
    assert by_id[made]["traceparent"] == TRACEPARENT
    assert by_id[replaced]["traceparent"] is None

    # Every line the router wrote is one JSON object; the access lines carry the ids.
    def access_lines() -> dict[str, dict[str, Any]] | None:
        records = [json.loads(line) for line in router.output().splitlines() if line.strip()]
        found = {r["request_id"]: r for r in records if r.get("namespace") == "twisted_router.access"}
        return found if {"obs-given-1", made, "obs-404"} <= set(found) else None

    lines = wait_until("the access lines", access_lines, timeout=10)
    line = lines["obs-given-1"]
    assert line["status"] == 200 and line["route"] == IMAGES and line["method"] == "POST"
    assert line["worker"] in (first.url, second.url) and line["weight_version"] == "0"
    assert line["level"] == "info" and "obs-given-1" in line["message"] and line["time"]
    assert lines["obs-404"]["status"] == 404 and lines["obs-404"]["worker"] == "-"

    # The metrics port serves the same registry as /metrics on the main port.
    scraped = samples(call(metrics_url, "GET", "/metrics").body.decode())
    on_main = samples(call(main, "GET", "/metrics").body.decode())
    key = "sglang_router_requests_total"
    served = sum(v for (name, labels), v in scraped.items() if name == key and ("route", IMAGES) in labels)
    assert served == 3
    assert sum(v for (name, labels), v in on_main.items() if name == key and ("route", IMAGES) in labels) == 3
    assert call(metrics_url, "GET", "/workers").status == 404  # only /metrics there


def test_twistd_writes_json_lines_with_the_request_id(processes: Processes) -> None:
    (worker,) = processes.workers(sim("obs-twistd"))
    router = processes.twistd_router([worker], "--log-format", "json", "--access-log", "on")
    wait_for_workers(router, 1)
    reply = call(router.url, "POST", IMAGES, SMALL_IMAGE, headers={"X-Request-ID": "twistd-1"})
    assert (reply.status, reply.headers["x-request-id"]) == (200, "twistd-1")

    def access_line() -> dict[str, Any] | None:
        records = [json.loads(line) for line in router.output().splitlines() if line.strip()]
        return next((r for r in records if r.get("request_id") == "twistd-1"), None)

    line = wait_until("the twistd access line", access_line, timeout=10)
    assert line["namespace"] == "twisted_router.access" and line["status"] == 200
    assert line["worker"] == worker.url
