"""The simulator's C{GET /sim/requests}: the ids and trace context of the requests it received."""

from __future__ import annotations

from twisted_router.simulator.app import RECEIVED_KEPT
from twisted_router.simulator.testing import InMemoryWorker

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_received_ids_and_trace_headers_are_shown_as_received() -> None:
    sim = InMemoryWorker()
    sim.get("/health", headers={"X-Request-ID": "r-1", "traceparent": TRACEPARENT, "tracestate": "a=b"})
    sim.post("/v1/images/generations", {"prompt": "x"}, headers={"X-Correlation-ID": "c-2"})
    shown = sim.get("/sim/requests").json()["requests"]
    assert shown == [
        {"method": "GET", "path": "/health", "x_request_id": "r-1", "x_correlation_id": None,
         "traceparent": TRACEPARENT, "tracestate": "a=b"},
        {"method": "POST", "path": "/v1/images/generations", "x_request_id": None, "x_correlation_id": "c-2",
         "traceparent": None, "tracestate": None},
    ]


def test_only_the_most_recent_are_kept() -> None:
    sim = InMemoryWorker()
    for i in range(RECEIVED_KEPT + 5):
        sim.get("/health", headers={"X-Request-ID": f"r-{i}"})
    shown = sim.get("/sim/requests").json()["requests"]
    assert len(shown) == RECEIVED_KEPT
    assert shown[0]["x_request_id"] == "r-5" and shown[-1]["x_request_id"] == f"r-{RECEIVED_KEPT + 4}"
