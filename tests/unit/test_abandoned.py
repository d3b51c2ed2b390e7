"""
Abandoned generations stay load (issue 9, defect 9): a client that hangs up
after sending leaves the generation running on the worker, so the router keeps
counting it until the worker has finished it, bounded by --timeout.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.logger import capturedLogs
from twisted.web._newclient import ResponseNeverReceived

from tests.support.deferreds import failure_result_of, success_result_of
from tests.support.fleet import make_router


def test_a_request_abandoned_mid_answer_is_drained_and_counted_until_the_end() -> None:
    h, (w0,) = make_router(1, timeout=30)
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"}, unbuffered=True)
    h.pump()
    [held] = w0.held
    held.write(b'{"data": [')  # headers and the start of the answer are out
    h.pump()
    response = success_result_of(d)  # the client has the headers ...
    response.original._transport.stopProducing()  # ... and goes away mid-answer
    h.pump()
    worker = h.pool.workers()[0]
    assert worker.active_requests == 1
    held.write(b"1]}")
    h.pump()
    assert worker.active_requests == 1  # still computing/sending
    held.finish()
    h.pump()
    assert worker.active_requests == 0
    assert worker.failed_requests == 0 and not worker.is_dead


def test_an_abandoned_request_whose_worker_never_answers_is_released_after_the_timeout() -> None:
    h, (w0,) = make_router(1, timeout=30, health_check_timeout=1)
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    d.cancel()
    failure_result_of(d, CancelledError, ResponseNeverReceived)
    h.pump()
    worker = h.pool.workers()[0]
    h.clock.advance(29)
    h.pump()
    assert worker.active_requests == 1
    with capturedLogs() as events:
        h.clock.advance(1)  # --timeout without response headers
        h.pump()
        h.clock.advance(1)  # and the probe it triggers
        h.pump()
    assert worker.active_requests == 0
    # Nobody is left to answer: the router ends the request quietly, no traceback.
    assert [e for e in events if e.get("log_failure") is not None or e.get("isError")] == []
