"""
Request ids and trace context through the router's real Site: accepted,
validated, generated, forwarded on every upstream attempt, returned on every
answer (the router's own errors too); W3C trace headers passed untouched.
"""

from __future__ import annotations

import re

import pytest

from tests.support.fleet import FakeWorker
from tests.support.site import parse_answer
from tests.support.site import site_router as router
from twisted_router.requestid import MAX_REQUEST_ID_LENGTH, RequestIds, accept_request_id

IMAGES = b"/v1/images/generations"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
GENERATED = re.compile(r"[0-9a-f]{16}-[0-9a-f]+")


def received(worker: FakeWorker, name: bytes) -> list[bytes] | None:
    """The values of header C{name} on the worker's last generation request."""
    last = [seen for seen in worker.seen if seen.request.path == IMAGES][-1]
    return {k.lower(): v for k, v in last.headers.items()}.get(name)


# -- the pure part -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"abc", b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736", b"x" * MAX_REQUEST_ID_LENGTH, b"a:b/c=d+e"],
)
def test_safe_ids_are_kept(value: bytes) -> None:
    assert accept_request_id(value) == value.decode()


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * (MAX_REQUEST_ID_LENGTH + 1), b"a b", b"a\tb", b"a\x00b", b"a\r\nb", "é".encode(), b"\x7f"],
)
def test_hostile_ids_are_refused(value: bytes) -> None:
    assert accept_request_id(value) is None


def test_generated_ids_are_unique_and_share_a_random_prefix() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(1000)]
    assert len(set(made)) == 1000
    assert all(GENERATED.fullmatch(i) for i in made)
    assert {i.split("-")[0] for i in made} == {made[0].split("-")[0]}
    assert RequestIds().new().split("-")[0] != made[0].split("-")[0]


# -- through the Site -----------------------------------------------------------------


def test_an_id_is_generated_forwarded_and_returned() -> None:
    h, _, workers = router(1)
    answer = h.send("POST", IMAGES.decode(), body=b"{}")
    assert answer.status == 200
    request_id = answer.header(b"x-request-id")
    assert request_id is not None and GENERATED.fullmatch(request_id.decode())
    assert received(workers[0], b"x-request-id") == [request_id]
    assert h.send("POST", IMAGES.decode(), body=b"{}").header(b"x-request-id") != request_id


def test_the_clients_id_and_trace_context_reach_the_worker_untouched() -> None:
    h, _, workers = router(1)
    answer = h.send(
        "POST",
        IMAGES.decode(),
        body=b"{}",
        headers={"X-Request-ID": "client-7", "traceparent": TRACEPARENT, "tracestate": TRACESTATE},
    )
    assert answer.header(b"x-request-id") == b"client-7"
    assert received(workers[0], b"x-request-id") == [b"client-7"]
    assert received(workers[0], b"traceparent") == [TRACEPARENT.encode()]
    assert received(workers[0], b"tracestate") == [TRACESTATE.encode()]


def test_a_correlation_id_is_used_when_there_is_no_request_id() -> None:
    h, _, workers = router(1)
    answer = h.send("POST", IMAGES.decode(), body=b"{}", headers={"X-Correlation-ID": "corr-1"})
    assert answer.header(b"x-request-id") == b"corr-1"
    assert received(workers[0], b"x-request-id") == [b"corr-1"]
    assert received(workers[0], b"x-correlation-id") == [b"corr-1"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Request-ID": "x" * 500},
        {"X-Request-ID": "has space"},
        {"X-Request-ID": "caf\xe9"},
        {"X-Correlation-ID": "<script>alert(1)</script> x"},
    ],
)
def test_a_hostile_id_is_replaced_not_echoed(headers: dict[str, str]) -> None:
    h, _, workers = router(1)
    answer = h.send("POST", IMAGES.decode(), body=b"{}", headers=headers)
    request_id = answer.header(b"x-request-id")
    assert request_id is not None and GENERATED.fullmatch(request_id.decode())
    assert received(workers[0], b"x-request-id") == [request_id]
    assert received(workers[0], b"x-correlation-id") is None  # a hostile one is dropped, not forwarded


def test_two_request_ids_are_one_bad_id() -> None:
    h, _, workers = router(1)
    raw = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n"
        b"X-Request-ID: a\r\nX-Request-ID: b\r\n\r\n{}"
    )
    answer = parse_answer(h.open(raw).value())
    request_id = answer.header(b"x-request-id")
    assert request_id is not None and GENERATED.fullmatch(request_id.decode())
    assert received(workers[0], b"x-request-id") == [request_id]


def test_the_same_id_goes_to_every_worker_a_request_is_retried_on() -> None:
    h, _, workers = router(2, timeout=5.0)
    workers[0].hold(b"POST", IMAGES)
    workers[0].health_status = 500  # hung: the probe after the timeout fails, so it is retried on w1
    transport = h.open(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\nX-Request-ID: retry-me\r\n\r\n{}"
    )
    assert len(workers[0].held) == 1
    h.clock.advance(5.0)
    h.pump()
    answer = parse_answer(transport.value())
    assert answer.status == 200 and answer.header(b"x-worker-id") == b"w1"
    assert answer.header(b"x-request-id") == b"retry-me"
    assert received(workers[0], b"x-request-id") == [b"retry-me"]
    assert received(workers[1], b"x-request-id") == [b"retry-me"]


def test_the_routers_own_errors_carry_the_id() -> None:
    h, _, _ = router(1, max_request_body=16, api_key="k" * 20)
    refusals = {
        401: h.send("POST", IMAGES.decode(), body=b"{}", headers={"X-Request-ID": "e-401"}),
        413: h.send("POST", IMAGES.decode(), body=b"x" * 17, headers={"X-Request-ID": "e-413"}),
        404: h.send(
            "GET", "/workers/nobody", headers={"X-Request-ID": "e-404", "Authorization": "Bearer " + "k" * 20}
        ),
    }
    raw = parse_answer(h.open(b"GET /a%zz HTTP/1.1\r\nHost: r\r\nX-Request-ID: e-400\r\n\r\n").value())
    refusals[raw.status] = raw
    slow = h.open(b"GET /v1/models HTTP/1.1\r\nHost: r\r\nX-Request-ID: e-408\r\nAccept: */*\r\n")
    h.clock.advance(h.parts.config.client_timeout)  # --client-timeout: the rest never came
    refusals[408] = parse_answer(slow.value())
    h.site.set_draining(True)
    refusals[503] = h.send("GET", "/v1/models", headers={"X-Request-ID": "e-503"})
    assert set(refusals) == {400, 401, 404, 408, 413, 503}
    for status, answer in refusals.items():
        assert answer.status == status
        assert answer.header(b"x-request-id") == f"e-{status}".encode(), status
        assert "error" in answer.json()


def test_a_429_from_the_full_queue_carries_the_id() -> None:
    h, _, workers = router(1, max_inflight_per_worker=1, max_queue=1)
    workers[0].hold(b"POST", IMAGES)
    raw = b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}"
    h.open(raw)  # in flight
    h.open(raw)  # queued
    answer = h.send("POST", IMAGES.decode(), body=b"{}", headers={"X-Request-ID": "e-429"})
    assert answer.status == 429 and answer.header(b"retry-after") is not None
    assert answer.header(b"x-request-id") == b"e-429"
    assert "queue is full" in answer.json()["error"]
