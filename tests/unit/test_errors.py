"""
L{twisted_router.errors}: one family of router errors, each with its status,
answered by the web application's one error handler.
"""

from __future__ import annotations

import pytest

from tests.support.fleet import make_router
from twisted_router.errors import (
    BadRequest,
    Conflict,
    NotFound,
    NoWorkers,
    RouterError,
    WorkerFailed,
    WorkerTimedOutError,
)


@pytest.mark.parametrize(
    ("error", "status"),
    [(BadRequest, 400), (NotFound, 404), (Conflict, 409), (WorkerFailed, 502), (NoWorkers, 503),
     (WorkerTimedOutError, 504)],
)
def test_each_error_names_its_status_and_keeps_its_message(error: type[RouterError], status: int) -> None:
    raised = error("what and why")
    assert isinstance(raised, RouterError)
    assert (raised.status, raised.message, str(raised)) == (status, "what and why", "what and why")


def test_a_router_error_is_answered_as_json_with_its_status() -> None:
    h, _ = make_router(0)
    code, body, response = h.call("GET", "/workers/nobody")
    assert code == 404
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert body == b'{"error": "Worker not found"}'
