"""
Tests for L{twisted_router.proxy}: in memory, no sockets, no real time.

Downstream is a tiny Klein app behind L{StubTreq}; upstream is a L{Resource}
that returns C{NOT_DONE_YET} behind L{RequestTraversalAgent} (or a stub
L{IAgent} when a test needs to control failures precisely); the proxy's clock
is a L{task.Clock}. Every test asserts, on teardown, that the proxy left no
delayed call behind and that nothing was logged as an error (e.g. Twisted's
"Producer was not unregistered" or an AttributeError after a disconnect).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from klein import Klein
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.downstream import FakeDownstreamRequest
from twisted_router.proxy import (
    HOP_BY_HOP_HEADERS,
    BodyRelay,
    ForwardResult,
    StreamingProxy,
    UpstreamBodyFailed,
    WorkerTimedOut,
    WorkerUnreachable,
    upstream_headers,
)

WORKER = "http://worker:8000"
TIMEOUT = 30.0


# --------------------------------------------------------------------------
# Fakes


class RecordingUpstream(Resource):
    """A worker that keeps every request open until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        self.bodies.append(request.content.read())
        return NOT_DONE_YET


class FakeResponse:
    """An L{IResponse} whose body the test drives by hand."""

    def __init__(
        self,
        code: int = 200,
        headers: dict[bytes, list[bytes]] | None = None,
        length: int | object = UNKNOWN_LENGTH,
        phrase: bytes = b"OK",
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.version = (b"HTTP", 1, 1)
        self.headers = Headers(headers or {})
        self.length = length
        self.request = None
        self.previousResponse = None
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: Any) -> None:
        pass


@implementer(IAgent)
class StubAgent:
    """An agent whose request Deferreds the test fires (or that fails at once)."""

    def __init__(self, result: Callable[[], Deferred[Any]] | None = None) -> None:
        self._result = result
        self.calls: list[tuple[bytes, bytes, Headers, Any]] = []
        self.deferreds: list[Deferred[Any]] = []
        self.cancelled: list[Deferred[Any]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.calls.append((method, uri, headers or Headers(), bodyProducer))
        if self._result is not None:
            return self._result()
        d: Deferred[Any] = Deferred(self.cancelled.append)
        self.deferreds.append(d)
        return d


@implementer(IAgent)
class HostRoutingAgent:
    """Fails for host C{dead}, delegates everything else."""

    def __init__(self, live: Any, dead_behaviour: Callable[[Any], Deferred[Any]]) -> None:
        self._live = live
        self._dead = dead_behaviour

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        if uri.startswith(b"http://dead"):
            return self._dead(bodyProducer)
        return self._live.request(method, uri, headers, bodyProducer)  # type: ignore[no-any-return]


class Harness:
    """Downstream Klein app -> StreamingProxy -> in-memory upstream."""

    def __init__(
        self,
        agent: Any = None,
        *,
        max_per_worker: int = 100,
        worker: str = WORKER,
        forward: Callable[[Harness, Request], Any] | None = None,
        **forward_kwargs: Any,
    ) -> None:
        self.clock = Clock()
        self.upstream = RecordingUpstream()
        self.up = RequestTraversalAgent(self.upstream)
        self.agent = self.up if agent is None else agent
        self.proxy = StreamingProxy(
            self.clock, self.agent, timeout=TIMEOUT, max_connections_per_worker=max_per_worker
        )
        self.outcomes: list[Any] = []
        self.downstream: list[Request] = []
        self.route_deferreds: list[Deferred[Any]] = []
        harness = self
        app = Klein()

        async def default_forward(request: Request) -> Any:
            return await harness.proxy.forward(request, worker, **forward_kwargs)

        async def handle(request: Request) -> bytes | None:
            try:
                if forward is not None:
                    result = await forward(harness, request)
                else:
                    result = await default_forward(request)
            except WorkerUnreachable as e:
                harness.outcomes.append(e)
                request.setResponseCode(502)
                return b'{"error": "unreachable"}'
            except WorkerTimedOut as e:
                harness.outcomes.append(e)
                request.setResponseCode(504)
                return b'{"error": "timeout"}'
            except (UpstreamBodyFailed, CancelledError) as e:
                # The client is (being) aborted: write nothing.
                harness.outcomes.append(e)
                return None
            harness.outcomes.append(result)
            return None

        @app.route("/", branch=True)
        def route(request: Request) -> Deferred[Any]:
            harness.downstream.append(request)
            d = Deferred.fromCoroutine(handle(request))
            harness.route_deferreds.append(d)
            return d

        self.app = app
        self.resource = app.resource()
        self.client = StubTreq(self.resource)

    def pump(self, rounds: int = 20) -> None:
        """Move bytes both ways and run the proxy's zero-delay calls."""
        for _ in range(rounds):
            self.client.flush()
            self.up.flush()
            self.clock.advance(0)

    def get(self, path: str = "/", **kw: Any) -> Deferred[Any]:
        d = self.client.get("http://router" + path, unbuffered=True, **kw)
        self.pump()
        return d

    def request(self, method: str, path: str = "/", **kw: Any) -> Deferred[Any]:
        d = self.client.request(method, "http://router" + path, unbuffered=True, **kw)
        self.pump()
        return d

    def collect(self, response: Any) -> tuple[list[bytes], Deferred[None]]:
        chunks: list[bytes] = []
        d = self.client.collect(response, chunks.append)
        self.pump()
        return chunks, d

    def assert_clean(self) -> None:
        assert self.clock.getDelayedCalls() == []
        assert self.proxy.tracked_workers() == frozenset()


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    with capturedLogs() as events:
        yield events
    errors = [e for e in events if e.get("log_failure") is not None or e.get("isError")]
    assert errors == [], errors


@pytest.fixture
def h(logged: list[dict[str, Any]]) -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.assert_clean()


def upstream_finish_deferred(request: Request) -> Deferred[None]:
    """Fails once the worker-side request lost its connection (i.e. we aborted it)."""
    return request.notifyFinish()


# --------------------------------------------------------------------------
# Passthrough


@pytest.mark.parametrize(
    ("code", "content_type", "body"),
    [
        (500, b"text/plain", b"CUDA out of memory (not JSON)"),
        (200, b"application/json", b'{"data": [{"b64_json": "AAAA"}]}'),
        (200, b"application/octet-stream", bytes(range(256)) * 4),
        (201, b"video/mp4; codecs=avc1", b"\x00\x00\x00\x18ftypmp42"),
        (418, None, b"no content type at all"),
    ],
)
def test_status_headers_and_body_pass_through(
    h: Harness, code: int, content_type: bytes | None, body: bytes
) -> None:
    d = h.get("/v1/images/generations")
    up = h.upstream.requests[0]
    up.setResponseCode(code)
    if content_type is None:
        up.defaultContentType = None
    else:
        up.setHeader(b"Content-Type", content_type)
    up.setHeader(b"Server", b"sglang-worker")
    up.responseHeaders.setRawHeaders(b"Set-Cookie", [b"a=1", b"b=2"])
    up.setHeader(b"X-Request-Id", b"abc")
    up.write(body[:10])
    up.write(body[10:])
    up.finish()
    h.pump()

    resp = success_result_of(d)
    chunks, done = h.collect(resp)
    success_result_of(done)
    assert resp.code == code
    assert b"".join(chunks) == body
    sent = h.downstream[0].responseHeaders
    assert sent.getRawHeaders(b"Content-Type") == (None if content_type is None else [content_type])
    assert sent.getRawHeaders(b"Server") == [b"sglang-worker"]  # replaced, not appended
    assert len(sent.getRawHeaders(b"Date", [])) == 1
    assert sent.getRawHeaders(b"Set-Cookie") == [b"a=1", b"b=2"]
    assert sent.getRawHeaders(b"X-Request-Id") == [b"abc"]
    assert resp.headers.getRawHeaders(b"X-Request-Id") == [b"abc"]
    assert h.outcomes == [ForwardResult(status=code, body_bytes=len(body), captured=None)]


def test_reason_phrase_is_relayed(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up.setResponseCode(503, b"Worker Sleeping")
    up.finish()
    h.pump()
    resp = success_result_of(d)
    success_result_of(h.collect(resp)[1])
    assert resp.code == 503
    assert resp.phrase == b"Worker Sleeping"


def test_chunks_stream_before_upstream_finishes(h: Harness) -> None:
    d = h.get("/v1/videos/v1/content")
    up = h.upstream.requests[0]
    up.setHeader(b"Content-Type", b"video/mp4")
    up.write(b"first")
    h.pump()
    resp = success_result_of(d)
    chunks, done = h.collect(resp)
    assert chunks == [b"first"]
    assert_no_result(done)

    up.write(b"second")
    h.pump()
    assert chunks == [b"first", b"second"]
    assert_no_result(done)
    assert h.outcomes == []  # forward is still running

    up.finish()
    h.pump()
    success_result_of(done)
    assert h.outcomes == [ForwardResult(200, 11, None)]


def test_content_length_is_set_from_response_length(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up.setHeader(b"Content-Length", b"11")
    up.write(b"hello ")
    h.pump()
    resp = success_result_of(d)
    chunks, done = h.collect(resp)
    up.write(b"world")
    up.finish()
    h.pump()
    success_result_of(done)
    assert b"".join(chunks) == b"hello world"
    assert resp.length == 11
    sent = h.downstream[0].responseHeaders
    assert sent.getRawHeaders(b"Content-Length") == [b"11"]
    assert not sent.hasHeader(b"Transfer-Encoding")


def test_unknown_length_is_chunked_by_twisted(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up.write(b"x")
    up.finish()
    h.pump()
    resp = success_result_of(d)
    success_result_of(h.collect(resp)[1])
    sent = h.downstream[0].responseHeaders
    assert not sent.hasHeader(b"Content-Length")
    assert sent.getRawHeaders(b"Transfer-Encoding") == [b"chunked"]  # Twisted's own


def test_head_request_relays_length_without_body(h: Harness) -> None:
    d = h.request("HEAD", "/v1/videos/v1/content")
    up = h.upstream.requests[0]
    assert up.method == b"HEAD"
    up.setHeader(b"Content-Length", b"1234")
    up.setHeader(b"Content-Type", b"video/mp4")
    up.finish()
    h.pump()
    resp = success_result_of(d)
    chunks, done = h.collect(resp)
    success_result_of(done)
    assert chunks == []
    assert h.downstream[0].responseHeaders.getRawHeaders(b"Content-Length") == [b"1234"]
    assert h.outcomes == [ForwardResult(200, 0, None)]


def test_extra_response_headers_mapping_and_callable(logged: list[dict[str, Any]]) -> None:
    seen: list[int] = []

    def extra(response: Any) -> dict[bytes, bytes]:
        seen.append(response.code)
        return {b"X-Worker": b"w1", b"Server": b"router"}

    for extra_headers in ({b"X-Worker": b"w1", b"Server": b"router"}, extra):
        hx = Harness(extra_response_headers=extra_headers)
        d = hx.get()
        up = hx.upstream.requests[0]
        up.setHeader(b"Server", b"worker")
        up.finish()
        hx.pump()
        success_result_of(hx.collect(success_result_of(d))[1])
        sent = hx.downstream[0].responseHeaders
        assert sent.getRawHeaders(b"X-Worker") == [b"w1"]
        assert sent.getRawHeaders(b"Server") == [b"router"]  # extra wins
        hx.assert_clean()
    assert seen == [200]


# --------------------------------------------------------------------------
# Capture


@pytest.mark.parametrize(
    ("limit", "body", "expected", "head"),
    [
        (100, b'{"id": "video_1"}', b'{"id": "video_1"}', b'{"id": "video_1"}'),
        (10, b"0123456789", b"0123456789", b"0123456789"),  # exactly at the limit
        (10, b"0123456789A", None, b"0123456789"),  # one over: only the head is kept
        (0, b"short", None, b""),  # capture off
    ],
)
def test_capture(
    logged: list[dict[str, Any]], limit: int, body: bytes, expected: bytes | None, head: bytes
) -> None:
    hx = Harness(capture_limit=limit)
    d = hx.get()
    up = hx.upstream.requests[0]
    for i in range(0, len(body), 3):
        up.write(body[i : i + 3])
        hx.pump()
    up.finish()
    hx.pump()
    chunks, done = hx.collect(success_result_of(d))
    success_result_of(done)
    assert b"".join(chunks) == body  # relayed in full either way
    assert hx.outcomes == [ForwardResult(200, len(body), expected, head)]
    hx.assert_clean()


# --------------------------------------------------------------------------
# Upstream request: headers, URI, body


def test_raw_uri_with_encoded_slash_and_query_is_preserved(h: Harness) -> None:
    path = "/v1/images/img%2F1/content?variant=a%20b&x=%2F&x=2"
    h.get(path)
    up = h.upstream.requests[0]
    assert up.uri == path.encode()
    up.finish()
    h.pump()


def test_path_and_method_overrides(logged: list[dict[str, Any]]) -> None:
    async def fwd(hx: Harness, request: Request) -> Any:
        return await hx.proxy.forward(
            request, WORKER + "/", path=b"/v1/images/generations", method=b"POST"
        )

    hx = Harness(forward=fwd)
    hx.request("PUT", "/generate", data=b"{}")
    up = hx.upstream.requests[0]
    assert (up.method, up.uri) == (b"POST", b"/v1/images/generations")
    assert hx.upstream.bodies == [b"{}"]
    up.finish()
    hx.pump()
    hx.assert_clean()


def test_hop_by_hop_and_connection_named_request_headers_are_dropped(h: Harness) -> None:
    h.get(
        "/",
        headers={
            "Connection": "keep-alive, X-Hop-Only",
            "X-Hop-Only": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "websocket",
            "Authorization": "Bearer end-to-end",
            "X-Keep": "1",
        },
    )
    up = h.upstream.requests[0]
    got = up.requestHeaders
    for name in (b"x-hop-only", b"keep-alive", b"proxy-authorization", b"proxy-connection"):
        assert not got.hasHeader(name), name
    for name in (b"te", b"trailer", b"upgrade"):
        assert not got.hasHeader(name), name
    # The only Connection header upstream is the in-memory Agent's own "close".
    assert got.getRawHeaders(b"Connection") == [b"close"]
    assert got.getRawHeaders(b"Authorization") == [b"Bearer end-to-end"]
    assert got.getRawHeaders(b"X-Keep") == [b"1"]
    assert got.getRawHeaders(b"Host") == [b"worker:8000"]
    up.finish()
    h.pump()


def test_hop_by_hop_response_headers_are_dropped(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    for name, value in [
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"h2c"),
        (b"X-Keep", b"1"),
    ]:
        up.setHeader(name, value)
    up.write(b"body")
    up.finish()
    h.pump()
    success_result_of(h.collect(success_result_of(d))[1])
    sent = h.downstream[0].responseHeaders
    for name in (b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert not sent.hasHeader(name), name
    assert sent.getRawHeaders(b"X-Keep") == [b"1"]


def test_connection_named_response_headers_are_dropped(logged: list[dict[str, Any]]) -> None:
    # Twisted's Agent hides the worker's Connection header; another IAgent may not.
    agent = StubAgent()
    hx = Harness(agent)
    d = hx.get()
    response = FakeResponse(
        headers={
            b"Connection": [b"close, X-Hop-Token"],
            b"X-Hop-Token": [b"t"],
            b"Transfer-Encoding": [b"chunked"],
            b"Content-Length": [b"999"],
            b"X-Keep": [b"1"],
        },
        length=4,
    )
    agent.deferreds[0].callback(response)
    response.protocol.dataReceived(b"body")
    response.protocol.connectionLost(Failure(ResponseDone()))
    hx.pump()
    resp = success_result_of(d)
    chunks, done = hx.collect(resp)
    success_result_of(done)
    sent = hx.downstream[0].responseHeaders
    # Twisted's server adds its own "Connection: close" for the non-persistent client.
    assert sent.getRawHeaders(b"connection") == [b"close"]
    assert not sent.hasHeader(b"x-hop-token")
    assert not sent.hasHeader(b"transfer-encoding")
    assert sent.getRawHeaders(b"Content-Length") == [b"4"]  # from response.length
    assert sent.getRawHeaders(b"X-Keep") == [b"1"]
    assert chunks == [b"body"]
    hx.assert_clean()


def test_x_forwarded_headers(h: Harness) -> None:
    h.get("/", headers={"X-Forwarded-For": "10.0.0.1", "Host": "router.example:30080"})
    got = h.upstream.requests[0].requestHeaders
    assert got.getRawHeaders(b"X-Forwarded-For") == [b"10.0.0.1, 127.0.0.1"]
    assert got.getRawHeaders(b"X-Forwarded-Proto") == [b"http"]
    assert got.getRawHeaders(b"X-Forwarded-Host") == [b"router.example:30080"]
    h.upstream.requests[0].finish()
    h.pump()


def test_x_forwarded_proto_https(h: Harness) -> None:
    h.client.get("https://router/", unbuffered=True)
    h.pump()
    got = h.upstream.requests[0].requestHeaders
    assert got.getRawHeaders(b"X-Forwarded-Proto") == [b"https"]
    h.upstream.requests[0].finish()
    h.pump()


class _FakeClientRequest:
    """Just enough of a Request for L{upstream_headers}."""

    def __init__(self, headers: dict[bytes, list[bytes]], address: Any, secure: bool = False):
        self.requestHeaders = Headers(headers)
        self._address = address
        self._secure = secure

    def getClientAddress(self) -> Any:
        return self._address

    def isSecure(self) -> bool:
        return self._secure


def test_upstream_headers_unit() -> None:
    request = _FakeClientRequest(
        {
            b"Connection": [b"Keep-Alive, x-a", b"X-B"],
            b"X-A": [b"1"],
            b"X-B": [b"2"],
            b"Content-Length": [b"5"],
            b"Host": [b"router"],
            b"Expect": [b"100-continue"],
            b"X-Forwarded-For": [b"1.1.1.1", b"2.2.2.2"],
            b"Accept": [b"*/*"],
        }
        | {name: [b"v"] for name in HOP_BY_HOP_HEADERS if name != b"connection"},
        UNIXAddress(b"/run/router.sock"),
        secure=True,
    )
    got = upstream_headers(request)  # type: ignore[arg-type]
    assert dict(got.getAllRawHeaders()) == {
        b"Accept": [b"*/*"],
        b"X-Forwarded-For": [b"1.1.1.1, 2.2.2.2, unknown"],
        b"X-Forwarded-Proto": [b"https"],
        b"X-Forwarded-Host": [b"router"],
    }


def test_small_request_body_is_forwarded(h: Harness) -> None:
    body = b'{"prompt": "a cat", "n": 1}'
    h.request(
        "POST", "/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
    )
    up = h.upstream.requests[0]
    assert h.upstream.bodies == [body]
    assert up.requestHeaders.getRawHeaders(b"Content-Length") == [str(len(body)).encode()]
    assert up.requestHeaders.getRawHeaders(b"Content-Type") == [b"application/json"]
    up.finish()
    h.pump()


@pytest.mark.parametrize("size", [150_000, 1_100_000])
def test_large_request_body_spooled_to_disk_is_forwarded(h: Harness, size: int) -> None:
    # > 100 000 bytes: Twisted spools the body to a TemporaryFile before render.
    body = bytes(i % 251 for i in range(size))
    h.request("POST", "/v1/images/edits", data=body)
    h.pump(rounds=50)
    assert not isinstance(h.downstream[0].content, io.BytesIO)
    assert len(h.upstream.bodies) == 1
    assert h.upstream.bodies[0] == body
    up = h.upstream.requests[0]
    assert up.requestHeaders.getRawHeaders(b"Content-Length") == [str(size).encode()]
    up.finish()
    h.pump()


@pytest.mark.parametrize(
    ("method", "content_length"), [("GET", None), ("DELETE", None), ("POST", [b"0"])]
)
def test_empty_body(h: Harness, method: str, content_length: list[bytes] | None) -> None:
    h.request(method, "/")
    up = h.upstream.requests[0]
    assert up.requestHeaders.getRawHeaders(b"Content-Length") == content_length
    assert h.upstream.bodies == [b""]
    up.finish()
    h.pump()


@pytest.mark.parametrize("partial_upload", [False, True])
def test_retry_on_another_worker_resends_whole_body(
    logged: list[dict[str, Any]], partial_upload: bool
) -> None:
    """WorkerUnreachable leaves the body reusable for the app's retry."""
    body = bytes(i % 256 for i in range(400_000))

    def dead(producer: Any) -> Deferred[Any]:
        if partial_upload:
            # The dead worker accepted a bit of upload before dropping.
            producer.startProducing(type("C", (), {"write": lambda self, data: None})())
        return fail(ResponseNeverReceived([Failure(ConnectionLost())]))

    async def fwd(hx: Harness, request: Request) -> Any:
        try:
            await hx.proxy.forward(request, "http://dead:8000")
        except WorkerUnreachable as e:
            hx.outcomes.append(e)
        return await hx.proxy.forward(request, WORKER)

    hx = Harness(forward=fwd)
    hx.agent = HostRoutingAgent(hx.up, dead)
    hx.proxy._agent = hx.agent
    hx.request("POST", "/v1/images/generations", data=body)
    hx.pump(rounds=50)
    assert hx.upstream.bodies == [body]
    hx.upstream.requests[0].finish()
    hx.pump()
    assert isinstance(hx.outcomes[0], WorkerUnreachable)
    assert hx.outcomes[1] == ForwardResult(200, 0, None)
    hx.assert_clean()


# --------------------------------------------------------------------------
# Failures before the response headers


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError("refused"),
        DNSLookupError("no such host"),
        TCPTimedOutError(),
        ResponseNeverReceived([Failure(ConnectionDone())]),
        ResponseFailed([Failure(ConnectionLost())]),
        ConnectionResetError(),
    ],
)
def test_connection_failures_raise_worker_unreachable(
    logged: list[dict[str, Any]], failure: Exception
) -> None:
    hx = Harness(StubAgent(lambda: fail(failure)))
    d = hx.get()
    resp = success_result_of(d)
    assert resp.code == 502  # the route answered; nothing from forward reached the client
    success_result_of(hx.collect(resp)[1])
    [outcome] = hx.outcomes
    assert isinstance(outcome, WorkerUnreachable)
    assert str(outcome) and "Failure" not in str(outcome)
    hx.assert_clean()


def test_local_errors_are_not_mistaken_for_unreachable_workers(
    logged: list[dict[str, Any]],
) -> None:
    seen: list[Exception] = []

    async def fwd(hx: Harness, request: Request) -> Any:
        try:
            return await hx.proxy.forward(request, WORKER)
        except ValueError as e:  # propagated unchanged, not WorkerUnreachable
            seen.append(e)
            raise WorkerTimedOut("answer something") from e

    hx = Harness(StubAgent(lambda: fail(ValueError("bad URL"))), forward=fwd)
    hx.get()
    assert [str(e) for e in seen] == ["bad URL"]
    hx.assert_clean()


def test_time_to_headers_timeout_cancels_upstream(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    h.clock.advance(TIMEOUT - 1)
    h.pump()
    assert h.outcomes == []
    h.clock.advance(1)
    h.pump()
    [outcome] = h.outcomes
    assert isinstance(outcome, WorkerTimedOut)
    assert success_result_of(d).code == 504
    failure_result_of(up_finished)  # the upstream connection was aborted


def test_timeout_override_and_agent_request_is_cancelled(logged: list[dict[str, Any]]) -> None:
    agent = StubAgent()
    hx = Harness(agent, timeout=2.5)
    hx.get()
    assert len(agent.deferreds) == 1
    hx.clock.advance(2.5)
    hx.pump()
    assert agent.cancelled == agent.deferreds
    assert isinstance(hx.outcomes[0], WorkerTimedOut)
    assert "2.5" in str(hx.outcomes[0])
    hx.assert_clean()


# --------------------------------------------------------------------------
# Failures after the headers


def test_body_idle_timeout_aborts_both_sides(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    up.write(b"a")
    h.pump()
    resp = success_result_of(d)
    chunks, done = h.collect(resp)

    h.clock.advance(TIMEOUT - 1)
    up.write(b"b")  # resets the idle timer
    h.pump()
    h.clock.advance(TIMEOUT - 1)
    h.pump()
    assert h.outcomes == []
    assert chunks == [b"a", b"b"]

    h.clock.advance(1)
    h.pump()
    [outcome] = h.outcomes
    assert isinstance(outcome, UpstreamBodyFailed)
    failure_result_of(done)  # the client saw a broken transfer, not a clean end
    failure_result_of(up_finished)  # and the worker connection was dropped


def test_upstream_dies_mid_body_aborts_client(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up.write(b"partial")
    h.pump()
    resp = success_result_of(d)
    chunks, done = h.collect(resp)
    up.transport.loseConnection()  # the worker process died
    h.pump()
    [outcome] = h.outcomes
    assert isinstance(outcome, UpstreamBodyFailed)
    assert chunks == [b"partial"]
    failure_result_of(done)


def test_upstream_dies_mid_body_with_content_length(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up.setHeader(b"Content-Length", b"100")
    up.write(b"x" * 10)
    h.pump()
    chunks, done = h.collect(success_result_of(d))
    up.transport.loseConnection()
    h.pump()
    assert isinstance(h.outcomes[0], UpstreamBodyFailed)
    failure_result_of(done)


def test_relay_treats_potential_data_loss_as_success() -> None:
    """A body delimited by connection close (no length, not chunked) ends that way."""
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    relay.makeConnection(StringTransport())
    relay.dataReceived(b"abc")
    relay.connectionLost(Failure(PotentialDataLoss()))
    success_result_of(relay.done)
    assert request.unregistered == 1
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------------
# Client disconnect and cancellation


def test_client_disconnect_mid_body_aborts_upstream(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    up.write(b"chunk")
    h.pump()
    success_result_of(d)
    assert h.proxy.active_count(WORKER) == 1

    h.downstream[0].transport.loseConnection()
    h.pump()
    failure_result_of(up_finished)
    [outcome] = h.outcomes
    assert isinstance(outcome, CancelledError)
    assert h.proxy.active_count(WORKER) == 0
    # Writing more upstream after that reaches nobody and breaks nothing.
    up.write(b"late")
    h.pump()


def test_client_disconnect_before_headers_cancels_upstream(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    h.downstream[0].transport.loseConnection()
    h.pump()
    failure_result_of(d, ResponseNeverReceived)  # the test client's view
    failure_result_of(up_finished)
    assert isinstance(h.outcomes[0], CancelledError)


def test_client_disconnect_with_stub_agent_cancels_agent_request(
    logged: list[dict[str, Any]],
) -> None:
    agent = StubAgent()
    hx = Harness(agent)
    d = hx.get()
    hx.downstream[0].transport.loseConnection()
    hx.pump()
    failure_result_of(d, ResponseNeverReceived)
    assert agent.cancelled == agent.deferreds
    assert isinstance(hx.outcomes[0], CancelledError)
    hx.assert_clean()


def _shielded_harness(agent: Any = None) -> tuple[Harness, list[Deferred[Any]]]:
    """Klein's cancellation does not reach forward: only its own notifyFinish hook can."""
    inners: list[Deferred[Any]] = []

    async def fwd(hx: Harness, request: Request) -> Any:
        inner = Deferred.fromCoroutine(hx.proxy.forward(request, WORKER))
        inners.append(inner)
        outer: Deferred[Any] = Deferred()  # cancelling outer does not cancel inner

        def pass_on(result: Any) -> Any:
            if not outer.called:
                (outer.errback if isinstance(result, Failure) else outer.callback)(result)
            return result  # kept on inner for the test to inspect

        inner.addBoth(pass_on)
        return await outer

    return Harness(agent, forward=fwd), inners


@pytest.mark.parametrize("phase", ["before headers", "mid-body"])
def test_client_disconnect_reaches_forward_without_klein_cancellation(
    logged: list[dict[str, Any]], phase: str
) -> None:
    hx, inners = _shielded_harness()
    d = hx.get()
    up = hx.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    if phase == "mid-body":
        up.write(b"chunk")
        hx.pump()
        success_result_of(d)
    hx.downstream[0].transport.loseConnection()
    hx.pump()
    if phase == "before headers":
        failure_result_of(d, ResponseNeverReceived)
    failure_result_of(up_finished)
    failure_result_of(inners[0], CancelledError)  # forward itself ended
    hx.assert_clean()


def test_caller_cancellation_mid_body_aborts_client_and_upstream(h: Harness) -> None:
    d = h.get()
    up = h.upstream.requests[0]
    up_finished = upstream_finish_deferred(up)
    up.write(b"chunk")
    h.pump()
    chunks, done = h.collect(success_result_of(d))
    h.route_deferreds[0].cancel()  # e.g. an app-level deadline
    h.pump()
    failure_result_of(up_finished)
    failure_result_of(done)  # truncated body must not look complete
    assert isinstance(h.outcomes[0], CancelledError)


def test_forward_on_already_disconnected_request(logged: list[dict[str, Any]]) -> None:
    agent = StubAgent()
    clock = Clock()
    proxy = StreamingProxy(clock, agent, timeout=5)
    request = FakeDownstreamRequest()
    request.channel = None
    d = Deferred.fromCoroutine(proxy.forward(request, WORKER))  # type: ignore[arg-type]
    failure_result_of(d, CancelledError)
    assert agent.calls == []
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------------
# Backpressure (invisible through iosim, so unit-tested on the relay)


def test_relay_registers_upstream_as_push_producer_and_propagates_pause() -> None:
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    assert request.streaming is True
    producer = request.producer

    producer.pauseProducing()
    assert upstream.producerState == "paused"
    clock.advance(4.9)  # a slow client is not an idle worker
    assert not relay.done.called

    producer.resumeProducing()
    assert upstream.producerState == "producing"
    assert len(clock.getDelayedCalls()) == 1  # idle timer back on, stall timer off

    relay.dataReceived(b"data")
    assert request.written == [b"data"]
    relay.connectionLost(Failure(ResponseDone()))
    success_result_of(relay.done)
    assert request.unregistered == 1
    assert clock.getDelayedCalls() == []


class AbortRecorder:
    aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


def test_client_that_reads_nothing_for_the_timeout_is_dropped(logged: list[dict[str, Any]]) -> None:
    clock = Clock()
    request = FakeDownstreamRequest()
    request.transport = AbortRecorder()  # type: ignore[attr-defined]
    relay = BodyRelay(request, clock, idle_timeout=5)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    request.producer.pauseProducing()
    clock.advance(5)
    assert request.transport.aborted == 1  # type: ignore[attr-defined]
    # The disconnect then arrives as usual and ends the relay.
    request.channel = None
    request.producer.stopProducing()
    failure_result_of(relay.done, CancelledError)
    assert upstream.producerState == "stopped"
    assert clock.getDelayedCalls() == []
    logged.clear()  # the warning is expected


def test_relay_stop_producing_from_channel_stops_upstream() -> None:
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    request.channel = None  # what Request.connectionLost does
    request.producer.stopProducing()
    assert upstream.producerState == "stopped"
    failure_result_of(relay.done, CancelledError)
    assert request.unregistered == 0  # would raise after a disconnect
    relay.dataReceived(b"late")
    relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert request.written == []
    assert clock.getDelayedCalls() == []


def test_relay_cancel_stops_upstream() -> None:
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    relay.done.cancel()
    assert upstream.producerState == "stopped"
    failure_result_of(relay.done, CancelledError)
    assert request.unregistered == 1  # client still connected: unregister cleanly
    assert clock.getDelayedCalls() == []


def test_pause_during_buffered_delivery_survives_deliver_body_resume(
    logged: list[dict[str, Any]],
) -> None:
    """Response.deliverBody resumes the transport after connectionMade; we re-pause."""
    agent = StubAgent()
    hx = Harness(agent)
    hx.get()

    class PausingResponse(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            self.protocol = protocol
            protocol.makeConnection(self.transport)
            hx.downstream[0].producer.pauseProducing()  # client buffer full
            self.transport.resumeProducing()  # what Twisted's Response does

    response = PausingResponse()
    agent.deferreds[0].callback(response)
    assert response.transport.producerState == "paused"
    response.protocol.connectionLost(Failure(ResponseDone()))
    hx.pump()
    hx.assert_clean()


# --------------------------------------------------------------------------
# Per-worker concurrency cap


def test_per_worker_cap_queues_the_next_request(logged: list[dict[str, Any]]) -> None:
    hx = Harness(max_per_worker=2)
    ds = [hx.get(f"/{i}") for i in range(3)]
    assert [r.uri for r in hx.upstream.requests] == [b"/0", b"/1"]
    assert hx.proxy.active_count(WORKER) == 2
    assert hx.proxy.waiting_count(WORKER) == 1

    hx.upstream.requests[0].finish()
    hx.pump()
    assert [r.uri for r in hx.upstream.requests] == [b"/0", b"/1", b"/2"]
    assert hx.proxy.waiting_count(WORKER) == 0

    for up in hx.upstream.requests[1:]:
        up.finish()
    hx.pump()
    for d in ds:
        success_result_of(hx.collect(success_result_of(d))[1])
    assert len(hx.outcomes) == 3
    hx.assert_clean()


def test_cap_is_per_worker(logged: list[dict[str, Any]]) -> None:
    async def fwd(hx: Harness, request: Request) -> Any:
        worker = "http://other:8000" if request.uri == b"/other" else WORKER
        return await hx.proxy.forward(request, worker)

    hx = Harness(max_per_worker=1, forward=fwd)
    hx.get("/a")
    hx.get("/other")
    assert [r.uri for r in hx.upstream.requests] == [b"/a", b"/other"]
    for up in hx.upstream.requests:
        up.finish()
    hx.pump()
    hx.assert_clean()


def test_waiting_for_a_slot_counts_toward_the_timeout(logged: list[dict[str, Any]]) -> None:
    hx = Harness(max_per_worker=1)
    hx.get("/first")
    first = hx.upstream.requests[0]
    first.write(b"streaming")  # /first holds the only slot while it streams
    d2 = hx.get("/second")
    hx.clock.advance(TIMEOUT - 1)
    first.write(b" more")  # keeps /first's idle timer from firing
    hx.pump()
    hx.clock.advance(1)
    hx.pump()
    assert success_result_of(d2).code == 504
    assert hx.proxy.waiting_count(WORKER) == 0
    assert [r.uri for r in hx.upstream.requests] == [b"/first"]
    assert isinstance(hx.outcomes[0], WorkerTimedOut)
    assert "slot" in str(hx.outcomes[0])
    hx.upstream.requests[0].finish()
    hx.pump()
    hx.assert_clean()


def test_client_leaving_while_queued_frees_its_place(logged: list[dict[str, Any]]) -> None:
    hx = Harness(max_per_worker=1)
    hx.get("/first")
    d2 = hx.get("/second")
    assert hx.proxy.waiting_count(WORKER) == 1
    hx.downstream[1].transport.loseConnection()
    hx.pump()
    failure_result_of(d2, ResponseNeverReceived)
    assert hx.proxy.waiting_count(WORKER) == 0
    assert isinstance(hx.outcomes[0], CancelledError)
    hx.upstream.requests[0].finish()
    hx.pump()
    assert [r.uri for r in hx.upstream.requests] == [b"/first"]
    hx.assert_clean()


def test_slot_released_after_unreachable_and_semaphores_dropped(
    logged: list[dict[str, Any]],
) -> None:
    hx = Harness(StubAgent(lambda: fail(ConnectionRefusedError())), max_per_worker=1)
    for _ in range(3):  # would deadlock on the second if the slot leaked
        hx.get()
    assert [type(o) for o in hx.outcomes] == [WorkerUnreachable] * 3
    hx.assert_clean()


# --------------------------------------------------------------------------
# Agent factory and validation


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        StreamingProxy(Clock(), StubAgent(), timeout=0)
    with pytest.raises(ValueError):
        StreamingProxy(Clock(), StubAgent(), timeout=1, max_connections_per_worker=0)


def test_forward_result_is_frozen() -> None:
    result = ForwardResult(200, 3, b"abc")
    with pytest.raises(AttributeError):
        result.status = 500  # type: ignore[misc]
