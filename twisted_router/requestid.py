# -*- test-case-name: tests.unit.test_requestid -*-
"""
Request ids, and the record the router keeps of each request it serves.

Pure: no I/O, no reactor. The Site (L{twisted_router.site}) makes one
L{RequestRecord} per request when it starts processing it; the web
application fills in the route, the dispatcher the worker and weight
version; when the request ends, the record feeds the access log line and
the request metrics (L{twisted_router.metrics}), so both say the same.

A client's C{X-Request-ID} (or C{X-Correlation-ID}) is kept when it is a
short run of visible ASCII; anything else (too long, spaces, control
characters, non-ASCII) is replaced by a fresh id rather than echoed, so a
hostile value never reaches a log line, a worker or a response header.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CORRELATION_ID_HEADER",
    "FinishedRequest",
    "MAX_REQUEST_ID_LENGTH",
    "REQUEST_ID_HEADER",
    "RequestIds",
    "RequestRecord",
    "accept_request_id",
    "record_of",
]

#: The header a request id travels in, both ways.
REQUEST_ID_HEADER = b"x-request-id"
#: The other spelling clients and gateways use; read when C{X-Request-ID} is absent.
CORRELATION_ID_HEADER = b"x-correlation-id"
#: Longest client-chosen id kept (a UUID is 36 characters; some tracers prefix theirs).
MAX_REQUEST_ID_LENGTH = 128

#: Visible ASCII only: no spaces, no control characters, nothing a log line or a header could be split on.
_ACCEPTABLE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID_LENGTH)


def accept_request_id(value: bytes | None) -> str | None:
    """
    The client's id if it is safe to keep, else C{None} (make a new one).
    """
    if value is None or _ACCEPTABLE.fullmatch(value) is None:
        return None
    return value.decode("ascii")


class RequestIds:
    """
    Makes request ids: a random per-router prefix and a counter.

    Cheaper than a UUID per request (no system randomness on the request
    path) and still unique across routers: two routers share a prefix with
    probability 2**-64.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix if prefix is not None else os.urandom(8).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        """A fresh id, e.g. C{3f2a...c1-1a}."""
        return f"{self._prefix}-{next(self._counter):x}"

    def for_headers(self, given: bytes | None, fallback: bytes | None) -> tuple[str, bool]:
        """
        The id of a request whose C{X-Request-ID} is C{given} and whose
        C{X-Correlation-ID} is C{fallback}.

        @return: the id, and whether it is the client's own.
        """
        for value in (given, fallback):
            if value is not None:
                kept = accept_request_id(value)
                if kept is not None:
                    return kept, True
                break  # a hostile X-Request-ID is replaced, not backed by the other header
        return self.new(), False


@dataclass(slots=True)
class RequestRecord:
    """
    What the router knows about one request, gathered while it is served.

    @ivar request_id: its id (the client's, or one the router made).
    @ivar started: when the Site started processing it (reactor seconds).
    @ivar route: the route template it matched (C{/workers/<path:worker_key>}),
        never the raw path; C{""} when the Site answered it before routing.
    @ivar worker: the URL of the worker that answered it last; C{""} when none.
    @ivar weight_version: the weight version of that worker when it was sent.
    @ivar first_byte: when its response headers went out (reactor seconds).
    """

    request_id: str
    started: float
    route: str = ""
    worker: str = ""
    weight_version: str = ""
    first_byte: float | None = None


def record_of(request: Any) -> RequestRecord | None:
    """The record the Site attached to C{request}, if any (requests made in tests may have none)."""
    record = getattr(request, "record", None)
    return record if isinstance(record, RequestRecord) else None


@dataclass(slots=True)
class FinishedRequest:
    """
    A request that has ended (answered, refused, or abandoned by its
    client), as the access log and the metrics see it.

    @ivar status: the status sent, or 499 when the client went away first.
    @ivar duration: seconds from the start of processing to the end.
    @ivar time_to_first_byte: seconds until the response headers went out;
        C{None} when nothing was sent.
    @ivar bytes_in: request body bytes received from the client.
    @ivar bytes_out: response body bytes sent to the client.
    """

    record: RequestRecord
    method: bytes
    path: bytes
    status: int
    duration: float
    time_to_first_byte: float | None
    bytes_in: int
    bytes_out: int

    def fields(self) -> dict[str, Any]:
        """The access line's structured fields (plain JSON-able values, for log shippers)."""
        record = self.record
        return {
            "method": self.method.decode("latin-1"),
            "path": self.path.decode("utf-8", "replace"),
            "route": record.route or "-",
            "status": self.status,
            "worker": record.worker or "-",
            "duration_ms": round(self.duration * 1000, 3),
            "ttfb_ms": None if self.time_to_first_byte is None else round(self.time_to_first_byte * 1000, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "request_id": record.request_id,
            "weight_version": record.weight_version or "-",
        }
