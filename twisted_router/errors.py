# -*- test-case-name: tests.unit.test_errors -*-
"""
The router's own failures, as one family of exceptions.

Every answer the router makes up itself (not a worker's, which is passed
through untouched) is JSON C{{"error": message}} with a status that says
whose fault it is. Raising one of these anywhere below the routes, and
answering them all in one Klein error handler, keeps that rule in one place:
no code path returns error bytes as a value, and nothing outside the web
application knows about HTTP requests. The simulator's C{Reply} follows the
same idiom.

The messages are part of the API: scripts written for the earlier router
match on their first words (C{No healthy workers available in the pool},
C{Worker request failed: ...}, C{Unknown video_id}), so a message may grow
more detail after those words but never lose them.
"""

from __future__ import annotations

import json
from typing import ClassVar

from twisted.web.iweb import IRequest

__all__ = [
    "BadRequest",
    "Conflict",
    "NoWorkers",
    "NotFound",
    "QueueFull",
    "QueueTimedOut",
    "RouterError",
    "WorkerFailed",
    "WorkerTimedOutError",
    "answer_json",
]


class RouterError(Exception):
    """
    A request the router answers itself with C{{"error": message}}.

    @cvar status: the HTTP status of the answer; each subclass fixes one.
    @ivar message: the error text, written for the client.
    """

    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Extra response headers of the answer."""
        return {}

    def __str__(self) -> str:
        return self.message


class BadRequest(RouterError):
    """The client's request is malformed or names something impossible (400)."""

    status = 400


class NotFound(RouterError):
    """The request names a worker, job or image the router cannot find (404)."""

    status = 404


class AuthenticationRequired(RouterError):
    """
    No API key, or a wrong one, on an endpoint that needs one (401,
    C{WWW-Authenticate: Bearer}; C{basic}: C{WWW-Authenticate: Basic}, so a
    browser asks its user for the key).
    """

    status = 401

    def __init__(self, message: str, *, basic: bool = False) -> None:
        super().__init__(message)
        self.basic = basic

    @property
    def headers(self) -> dict[bytes, bytes]:
        if self.basic:
            return {b"www-authenticate": b'Basic realm="sglang-d-router", charset="UTF-8"'}
        return {b"www-authenticate": b'Bearer realm="sglang-d-router"'}


class InsufficientScope(RouterError):
    """The API key on an endpoint that needs the admin key (403, RFC 6750 C{insufficient_scope})."""

    status = 403

    @property
    def headers(self) -> dict[bytes, bytes]:
        return {b"www-authenticate": b'Bearer realm="sglang-d-router", error="insufficient_scope"'}


class Conflict(RouterError):
    """The request contradicts what the router already holds, e.g. a reused weight label (409)."""

    status = 409


class WorkerFailed(RouterError):
    """The worker chosen for the request did not answer it (502)."""

    status = 502


class NoWorkers(RouterError):
    """No worker can take the request now, and waiting would not help (503)."""

    status = 503


class StateNotSaved(RouterError):
    """
    A refit could not be written to the state journal (C{--state-dir}), so it
    was not sent to any worker (503): a refit the router could not recover
    after a crash must not start.
    """

    status = 503


class WorkerTimedOutError(RouterError):
    """The worker sent no response headers within C{--timeout} (504)."""

    status = 504


class QueueFull(RouterError):
    """
    The router-side queue is full (429): the client should retry after
    C{retry_after} seconds (sent as C{Retry-After}, the convention of
    production gateways), when the queue has had time to drain.
    """

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return {b"retry-after": str(self.retry_after).encode()}


class QueueTimedOut(RouterError):
    """A request waited in the router-side queue longer than C{--queue-timeout} (504)."""

    status = 504


def answer_json(request: IRequest, status: int, payload: object) -> bytes:
    """Set the status and the JSON content type; the encoded C{payload} is the body to return."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8")
