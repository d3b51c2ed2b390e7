"""
Tests for L{twisted_router.calls}: buffered worker calls and fan-out.

Upstream workers are in-memory resources behind
L{treq.testing.RequestTraversalAgent}; time is a L{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.support.deferreds import assert_no_result, success_result_of
from tests.support.network import Answer, AnsweringWorkers
from twisted_router import calls
from twisted_router.calls import MAX_REPLY_BYTES, WorkerCaller, WorkerReply, decode_body
from twisted_router.upstream import make_http_client

W1 = "http://w1:30000"
W2 = "http://w2:30000"
W3 = "http://w3:30000"


class Harness:
    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.workers = AnsweringWorkers(answers)
        self.agent = RequestTraversalAgent(self.workers)
        self.clock = Clock()
        self.caller = WorkerCaller(make_http_client(self.agent), self.clock)

    def call(self, url: str = W1, method: str = "POST", path: str = "/x", **kw: Any) -> Deferred[WorkerReply]:
        kw.setdefault("timeout", 5.0)
        d = Deferred.fromCoroutine(self.caller.call(url, method, path, **kw))
        self.agent.flush()
        return d

    def fan_out(self, urls: list[str], **kw: Any) -> Deferred[list[WorkerReply]]:
        kw.setdefault("timeout", 5.0)
        d = Deferred.fromCoroutine(self.caller.fan_out(urls, "POST", "/x", **kw))
        self.agent.flush()
        return d


# -- call: answers -----------------------------------------------------------------


def test_json_body_is_decoded() -> None:
    h = Harness({"w1": Answer(200, {"success": True, "message": "ok", "n": [1, 2]})})
    reply = success_result_of(h.call())
    assert reply == WorkerReply(W1, 200, {"success": True, "message": "ok", "n": [1, 2]})
    assert reply.success
    assert reply.error is None
    assert h.clock.getDelayedCalls() == []


def test_text_body_is_decoded_as_text() -> None:
    h = Harness({"w1": Answer(200, b"all good\n", content_type=b"text/plain")})
    reply = success_result_of(h.call())
    assert reply.body == "all good\n"
    assert reply.success


def test_undecodable_bytes_are_replaced_not_fatal() -> None:
    h = Harness({"w1": Answer(200, b"\xff\xfeoops", content_type=b"application/octet-stream")})
    reply = success_result_of(h.call())
    assert reply.body == "\ufffd\ufffdoops"


def test_empty_body_is_empty_text() -> None:
    h = Harness({"w1": Answer(200, b"")})
    reply = success_result_of(h.call())
    assert reply == WorkerReply(W1, 200, "")
    assert reply.success


def test_success_false_in_a_200_body_is_a_failure() -> None:
    h = Harness({"w1": Answer(200, {"success": False, "message": "no such checkpoint"})})
    reply = success_result_of(h.call())
    assert reply.status_code == 200
    assert reply.body == {"success": False, "message": "no such checkpoint"}
    assert not reply.success


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_non_2xx_is_a_failure_with_its_body(status: int) -> None:
    h = Harness({"w1": Answer(status, {"error": "boom"})})
    reply = success_result_of(h.call())
    assert reply.status_code == status
    assert reply.body == {"error": "boom"}
    assert reply.error is None
    assert not reply.success


def test_redirects_are_not_followed() -> None:
    h = Harness({"w1": Answer(302, b"", headers={b"location": b"http://w2:30000/x"})})
    reply = success_result_of(h.call())
    assert reply.status_code == 302
    assert not reply.success
    assert len(h.workers.requests) == 1


def test_request_method_path_body_and_content_type() -> None:
    h = Harness()
    success_result_of(h.call(W1, "POST", "/update_weights_from_disk", body=b'{"model_path": "/m"}'))
    [request] = h.workers.requests
    assert request.method == b"POST"
    assert request.uri == b"/update_weights_from_disk"
    assert h.workers.bodies == [b'{"model_path": "/m"}']
    assert request.getHeader(b"content-type") == b"application/json"
    assert request.getHeader(b"host") == b"w1:30000"


def test_no_body_sends_no_content_type() -> None:
    h = Harness()
    success_result_of(h.call(W1, "GET", "/v1/models"))
    [request] = h.workers.requests
    assert request.method == b"GET"
    assert request.getHeader(b"content-type") is None
    assert h.workers.bodies == [b""]


def test_cookies_are_never_replayed_to_workers() -> None:
    h = Harness({"w1": Answer(200, b"{}", headers={b"set-cookie": b"session=secret; Path=/"})})
    success_result_of(h.call(W1))
    success_result_of(h.call(W1))
    success_result_of(h.call(W2))
    assert [r.getHeader(b"cookie") for r in h.workers.requests] == [None, None, None]


# -- call: failures ----------------------------------------------------------------


def test_timeout_gives_no_status_and_leaves_nothing_scheduled() -> None:
    h = Harness({"w1": Answer(hang=True)})
    d = h.call(timeout=3)
    assert_no_result(d)
    h.clock.advance(2.9)
    assert_no_result(d)
    h.clock.advance(0.1)
    h.agent.flush()
    reply = success_result_of(d)
    assert reply == WorkerReply(W1, None, None, "timed out after 3s")
    assert not reply.success
    assert h.clock.getDelayedCalls() == []
    # The hung request was abandoned: its connection was closed.
    assert h.workers.lost == h.workers.requests


def test_fractional_timeout_is_described_compactly() -> None:
    h = Harness({"w1": Answer(hang=True)})
    d = h.call(timeout=0.25)
    h.clock.advance(0.25)
    assert success_result_of(d).error == "timed out after 0.25s"


def test_timeout_while_the_body_trickles() -> None:
    """The deadline covers the body too, not only the headers."""

    class Trickle(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.requests: list[Request] = []

        def render(self, request: Request) -> int:
            self.requests.append(request)
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"partial": ')
            return NOT_DONE_YET

    resource = Trickle()
    agent = RequestTraversalAgent(resource)
    clock = Clock()
    caller = WorkerCaller(make_http_client(agent), clock)
    d = Deferred.fromCoroutine(caller.call(W1, "GET", "/x", timeout=4))
    agent.flush()
    assert_no_result(d)
    lost: list[Failure] = []
    resource.requests[0].notifyFinish().addErrback(lost.append)
    clock.advance(4)
    agent.flush()
    assert success_result_of(d) == WorkerReply(W1, None, None, "timed out after 4s")
    assert clock.getDelayedCalls() == []
    assert len(lost) == 1


@implementer(IAgent)
class FailingAgent:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.requests: list[tuple[bytes, bytes]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method, uri))
        return fail(self.exc)


def test_connection_refused() -> None:
    agent = FailingAgent(error.ConnectionRefusedError())
    clock = Clock()
    caller = WorkerCaller(make_http_client(agent), clock)
    reply = success_result_of(Deferred.fromCoroutine(caller.call(W1, "POST", "/x", body=b"{}", timeout=5)))
    assert reply == WorkerReply(W1, None, None, "connection refused")
    assert reply.payload() == {
        "worker_url": W1,
        "status_code": None,
        "body": None,
        "success": False,
        "error": "connection refused",
    }
    assert agent.requests == [(b"POST", b"http://w1:30000/x")]
    assert clock.getDelayedCalls() == []


def test_unexpected_exception_becomes_a_reply() -> None:
    caller = WorkerCaller(make_http_client(FailingAgent(RuntimeError("kaput"))), Clock())
    reply = success_result_of(Deferred.fromCoroutine(caller.call(W1, "GET", "/x", timeout=5)))
    assert reply == WorkerReply(W1, None, None, "RuntimeError: kaput")


class Big(Resource):
    """Writes C{size} bytes in C{chunk}-sized writes, then keeps the request open."""

    isLeaf = True

    def __init__(self, size: int, chunk: int = 1024 * 1024) -> None:
        super().__init__()
        self.size = size
        self.chunk = chunk
        self.lost: list[Failure] = []
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        request.setHeader(b"content-type", b"application/json")
        sent = 0
        while sent < self.size:
            n = min(self.chunk, self.size - sent)
            request.write(b"x" * n)
            sent += n
        return NOT_DONE_YET


def test_reply_larger_than_the_limit_is_refused_and_the_connection_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calls, "MAX_REPLY_BYTES", 100)
    resource = Big(101, chunk=30)
    agent = RequestTraversalAgent(resource)
    clock = Clock()
    caller = WorkerCaller(make_http_client(agent), clock)
    d = Deferred.fromCoroutine(caller.call(W1, "GET", "/x", timeout=5))
    agent.flush()
    agent.flush()
    reply = success_result_of(d)
    assert reply.status_code is None
    assert reply.body is None
    assert reply.error is not None and "larger than 100 bytes" in reply.error
    assert len(resource.lost) == 1, "the connection to the worker was not closed"
    assert clock.getDelayedCalls() == []


def test_reply_of_exactly_the_limit_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "MAX_REPLY_BYTES", 100)
    h = Harness({"w1": Answer(200, b"y" * 100, content_type=b"text/plain")})
    assert success_result_of(h.call()).body == "y" * 100


def test_default_limit_refuses_a_reply_just_over_it() -> None:
    resource = Big(MAX_REPLY_BYTES + 1)
    agent = RequestTraversalAgent(resource)
    caller = WorkerCaller(make_http_client(agent), Clock())
    d = Deferred.fromCoroutine(caller.call(W1, "GET", "/x", timeout=5))
    agent.flush()
    agent.flush()
    reply = success_result_of(d)
    assert reply.error is not None and f"larger than {MAX_REPLY_BYTES} bytes" in reply.error
    assert len(resource.lost) == 1


def test_limit_is_a_few_megabytes() -> None:
    assert 1024 * 1024 <= MAX_REPLY_BYTES <= 64 * 1024 * 1024


# -- fan_out -----------------------------------------------------------------------


def test_fan_out_keeps_order_and_one_reply_per_worker() -> None:
    h = Harness(
        {
            "w1": Answer(200, {"success": True}),
            "w2": Answer(500, {"error": "oom"}),
            "w3": Answer(200, {"success": False}),
        }
    )
    replies = success_result_of(h.fan_out([W3, W1, W2], body=b"{}"))
    assert [r.worker_url for r in replies] == [W3, W1, W2]
    assert [r.status_code for r in replies] == [200, 200, 500]
    assert [r.success for r in replies] == [False, True, False]
    assert len(h.workers.requests) == 3


def test_fan_out_calls_concurrently_and_orders_by_input_not_by_arrival() -> None:
    h = Harness({"w1": Answer(hang=True), "w2": Answer(200, {"success": True})})
    d = h.fan_out([W1, W2], timeout=10)
    # Both calls are in flight at once; w2 answered, w1 has not.
    assert len(h.workers.requests) == 2
    assert_no_result(d)
    w1_request = next(r for r in h.workers.requests if r.getHeader(b"host") == b"w1:30000")
    w1_request.setResponseCode(200)
    w1_request.write(b'{"success": true, "late": true}')
    w1_request.finish()
    h.agent.flush()
    replies = success_result_of(d)
    assert [(r.worker_url, r.body) for r in replies] == [
        (W1, {"success": True, "late": True}),
        (W2, {"success": True}),
    ]
    assert h.clock.getDelayedCalls() == []


def test_fan_out_mixes_timeouts_and_answers() -> None:
    h = Harness({"w2": Answer(hang=True)})
    d = h.fan_out([W1, W2, W3], timeout=2)
    assert_no_result(d)
    h.clock.advance(2)
    h.agent.flush()
    replies = success_result_of(d)
    assert [r.worker_url for r in replies] == [W1, W2, W3]
    assert [r.error for r in replies] == [None, "timed out after 2s", None]
    assert [r.success for r in replies] == [True, False, True]
    assert h.clock.getDelayedCalls() == []


def test_fan_out_to_nobody_is_empty() -> None:
    h = Harness()
    assert success_result_of(h.fan_out([])) == []
    assert h.workers.requests == []


def test_fan_out_sends_the_same_body_to_each() -> None:
    h = Harness()
    success_result_of(h.fan_out([W1, W2], body=b'{"tags": ["weights"]}'))
    assert h.workers.bodies == [b'{"tags": ["weights"]}'] * 2


def test_fan_out_reports_each_refused_worker() -> None:
    caller = WorkerCaller(make_http_client(FailingAgent(error.ConnectionRefusedError())), Clock())
    replies = success_result_of(Deferred.fromCoroutine(caller.fan_out([W1, W2], "POST", "/x", timeout=1)))
    assert [(r.worker_url, r.error) for r in replies] == [
        (W1, "connection refused"),
        (W2, "connection refused"),
    ]


# -- WorkerReply -------------------------------------------------------------------


def test_payload_shape_on_success() -> None:
    assert WorkerReply(W1, 200, {"success": True}).payload() == {
        "worker_url": W1,
        "status_code": 200,
        "body": {"success": True},
        "success": True,
    }


def test_payload_shape_with_error() -> None:
    payload = WorkerReply(W1, None, None, "timed out after 5s").payload()
    assert payload == {
        "worker_url": W1,
        "status_code": None,
        "body": None,
        "success": False,
        "error": "timed out after 5s",
    }
    assert json.loads(json.dumps(payload)) == payload


@pytest.mark.parametrize(
    ("status", "body", "success"),
    [
        (200, {"success": True}, True),
        (200, {"success": False}, False),
        (200, {"message": "ok"}, True),
        (200, {"success": None}, True),
        (200, {"success": 0}, True),  # only a literal false means failure
        (200, [{"success": False}], True),
        (200, "success: false", True),
        (204, "", True),
        (299, None, True),
        (199, None, False),
        (300, None, False),
        (404, {"success": True}, False),
        (None, None, False),
    ],
)
def test_success_rule(status: int | None, body: Any, success: bool) -> None:
    assert WorkerReply(W1, status, body).success is success


def test_decode_body() -> None:
    assert decode_body(b'{"a": 1}') == {"a": 1}
    assert decode_body(b"[1, 2]") == [1, 2]
    assert decode_body(b"not json") == "not json"
    assert decode_body(b"") == ""
