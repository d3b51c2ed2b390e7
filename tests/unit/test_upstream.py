"""The client side of HTTP shared by the proxy, the worker calls, the health probe and the launcher."""

from __future__ import annotations

import io
import tempfile
from typing import Any

import pytest
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from tests.support.deferreds import assert_no_result, success_result_of
from twisted_router.upstream import (
    BodyTooLarge,
    FileBodyProducer,
    body_producer,
    describe_failure,
    make_agent,
    with_deadline,
)

# -- the connection pool and agent ----------------------------------------------------


def test_make_agent_configures_a_persistent_pool() -> None:
    reactor = MemoryReactorClock()
    agent, pool = make_agent(reactor, max_connections=64, connect_timeout=3.0)
    assert pool.persistent is True
    assert pool.maxPersistentPerHost == 64
    assert pool.cachedConnectionTimeout == 4  # below uvicorn's 5 s keep-alive
    assert agent._pool is pool
    agent.request(b"GET", b"http://127.0.0.1:9000/x")
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9000, 3.0)


def test_a_probe_agent_does_not_keep_connections() -> None:
    reactor = MemoryReactorClock()
    _, pool = make_agent(reactor, max_connections=1, persistent=False, connect_timeout=2)
    assert pool.persistent is False


# -- request bodies --------------------------------------------------------------------


def test_body_producer_kinds_and_file_is_never_closed() -> None:
    clock = Clock()
    assert body_producer(clock, b"GET", io.BytesIO()) is None
    empty_post = body_producer(clock, b"POST", io.BytesIO())
    assert empty_post is not None and empty_post.length == 0
    small = body_producer(clock, b"POST", io.BytesIO(b"abc"))
    assert small is not None and small.length == 3

    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 300_000)
        f.seek(123)  # forward() must rewind
        big = body_producer(clock, b"POST", f)
        assert isinstance(big, FileBodyProducer)
        assert big.length == 300_000
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        done = big.startProducing(Consumer())
        big.pauseProducing()
        clock.advance(0)
        assert written == []  # paused: nothing read
        big.resumeProducing()
        while clock.getDelayedCalls():
            clock.advance(0)
        success_result_of(done)
        assert b"".join(written) == b"x" * 300_000
        assert not f.closed  # a retry can read it again


def test_file_producer_stop_leaves_nothing_scheduled() -> None:
    clock = Clock()
    with tempfile.TemporaryFile() as f:
        f.write(b"y" * 600_000)
        producer = FileBodyProducer(clock, f, 600_000)
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)
                producer.stopProducing()  # e.g. the upstream connection went away

        done = producer.startProducing(Consumer())
        assert producer.active
        clock.advance(0)
        assert len(written) == 1
        assert not producer.active
        assert clock.getDelayedCalls() == []
        assert_no_result(done)  # IBodyProducer: never fires after stopProducing


# -- describe_failure --------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "timeout", "expected"),
    [
        (defer.TimeoutError(), 5.0, "timed out after 5s"),
        (defer.TimeoutError(), 2.5, "timed out after 2.5s"),
        (defer.TimeoutError(), None, "timed out"),
        (error.TimeoutError(), 3.0, "timed out after 3s"),
        (TimeoutError(), None, "timed out"),
        (error.ConnectionRefusedError(), None, "connection refused"),
        (error.DNSLookupError("w1"), None, "DNS lookup failed"),
        (error.NoRouteError(), None, "no route to host"),
        (error.TCPTimedOutError(), None, "connect timed out"),
        (CancelledError(), None, "cancelled"),
        (error.ConnectionLost(), None, "connection lost"),
        (error.ConnectionDone(), None, "connection lost"),
        (ValueError("bad thing"), None, "ValueError: bad thing"),
        (RuntimeError(), None, "RuntimeError"),
        (BodyTooLarge("body larger than 8 bytes"), None, "BodyTooLarge: body larger than 8 bytes"),
    ],
)
def test_describe_failure(exc: BaseException, timeout: float | None, expected: str) -> None:
    assert describe_failure(exc, timeout) == expected
    assert describe_failure(Failure(exc), timeout) == expected


def test_describe_generic_connect_error() -> None:
    text = describe_failure(error.ConnectError(string="host unreachable"))
    assert text.startswith("connection failed: ")
    assert "host unreachable" in text


def test_describe_nested_response_never_received() -> None:
    exc = ResponseNeverReceived([Failure(CancelledError())])
    assert describe_failure(Failure(exc)) == "no response: cancelled"


def test_describe_nested_timeout_uses_the_timeout() -> None:
    exc = ResponseNeverReceived([Failure(defer.TimeoutError())])
    assert describe_failure(exc, 7) == "no response: timed out after 7s"


def test_describe_response_failed_with_several_causes() -> None:
    exc = ResponseFailed([Failure(error.ConnectionLost()), Failure(ValueError("bad chunk"))])
    assert describe_failure(exc) == "response interrupted: connection lost; ValueError: bad chunk"


def test_describe_request_transmission_failed() -> None:
    assert describe_failure(RequestTransmissionFailed([])) == "request not sent"
    assert (
        describe_failure(RequestTransmissionFailed([Failure(error.ConnectionRefusedError())]))
        == "request not sent: connection refused"
    )


def test_describe_deeply_nested() -> None:
    inner = ResponseFailed([Failure(error.ConnectionDone())])
    exc = ResponseNeverReceived([Failure(inner)])
    assert describe_failure(exc) == "no response: response interrupted: connection lost"


def test_describe_long_messages_are_shortened_to_one_line() -> None:
    text = describe_failure(ValueError("line one\n   line two\t" + "x" * 500))
    assert "\n" not in text
    assert text.startswith("ValueError: line one line two x")
    assert len(text) == 200
    assert text.endswith("...")


# -- with_deadline -----------------------------------------------------------------


def test_with_deadline_passes_results_through_and_cancels_its_timer() -> None:
    clock = Clock()
    inner: Deferred[str] = Deferred()
    d = with_deadline(inner, 5, clock)
    assert len(clock.getDelayedCalls()) == 1
    inner.callback("done")
    assert success_result_of(d) == "done"
    assert clock.getDelayedCalls() == []


def test_with_deadline_passes_failures_through_before_it_expires() -> None:
    clock = Clock()
    d = with_deadline(fail(ValueError("nope")), 5, clock)
    failure: list[Failure] = []
    d.addErrback(failure.append)
    assert failure[0].check(ValueError)
    assert clock.getDelayedCalls() == []


def test_with_deadline_turns_any_failure_after_expiry_into_a_timeout() -> None:
    clock = Clock()
    cancelled: list[Deferred[Any]] = []

    def cancel(d: Deferred[Any]) -> None:
        cancelled.append(d)
        d.errback(ResponseNeverReceived([Failure(CancelledError())]))

    inner: Deferred[Any] = Deferred(cancel)
    d = with_deadline(inner, 1.5, clock)
    clock.advance(1.5)
    assert cancelled == [inner]
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.TimeoutError)
    assert str(failures[0].value) == "timed out after 1.5s"
    assert clock.getDelayedCalls() == []


# -- describe_failure, as the health checker uses it --------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(), "connection refused"),
        (DNSLookupError("nope"), "DNS lookup failed"),
        (defer.TimeoutError(), "timed out after 5s"),
        (TimeoutError(), "timed out after 5s"),
        (
            ResponseNeverReceived([Failure(ConnectionRefusedError())]),
            "no response: connection refused",
        ),
        (ResponseFailed([]), "response interrupted"),
        (ValueError("bad\nthing"), "ValueError: bad thing"),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_describe_failure_says_how_long_it_waited(exc: BaseException, expected: str) -> None:
    assert describe_failure(Failure(exc), timeout=5.0) == expected
    assert describe_failure(exc, timeout=5.0) == expected


def test_describe_failure_is_short() -> None:
    assert len(describe_failure(ValueError("x" * 10_000))) <= 200
