"""
The relay's drain mode (issue 9, defect 9): when the client of a generation
goes away, the rest of the worker's answer is read and discarded, bounded in
time, so the request counts as load until the worker is done with it.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from tests.support.deferreds import assert_no_result, failure_result_of
from tests.support.downstream import FakeDownstreamRequest
from twisted_router.proxy import BodyRelay


def _draining_relay() -> tuple[Clock, FakeDownstreamRequest, BodyRelay, StringTransport]:
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    relay.drain_if_abandoned = True
    upstream = StringTransport()
    relay.makeConnection(upstream)
    return clock, request, relay, upstream


def test_a_paused_relay_whose_client_leaves_resumes_the_worker_and_discards_the_rest() -> None:
    clock, request, relay, upstream = _draining_relay()
    relay.dataReceived(b"first")
    request.producer.pauseProducing()  # slow client
    assert upstream.producerState == "paused"
    request.channel = None  # then it goes away
    request.producer.stopProducing()
    assert upstream.producerState == "producing"  # read on: the worker is still sending
    assert_no_result(relay.done)
    relay.dataReceived(b"rest of the answer")
    assert request.written == [b"first"]  # nothing more is written to the gone client
    relay.connectionLost(Failure(ResponseDone()))
    failure_result_of(relay.done, CancelledError)  # the caller still learns the client is gone
    assert clock.getDelayedCalls() == []


def test_a_drain_is_bounded_in_time_even_if_the_worker_keeps_trickling() -> None:
    clock, request, relay, upstream = _draining_relay()
    request.channel = None
    request.producer.stopProducing()
    for _ in range(4):  # a byte every 1.5 s keeps the idle timer from firing ...
        clock.advance(1.5)
        if relay.done.called:
            break
        relay.dataReceived(b".")
    # ... but the drain as a whole ends after the timeout (5 s).
    failure_result_of(relay.done, CancelledError)
    assert upstream.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def test_without_drain_mode_a_leaving_client_stops_the_worker_at_once() -> None:
    clock = Clock()
    request = FakeDownstreamRequest()
    relay = BodyRelay(request, clock, idle_timeout=5)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    request.channel = None
    request.producer.stopProducing()
    assert upstream.producerState == "stopped"
    failure_result_of(relay.done, CancelledError)
