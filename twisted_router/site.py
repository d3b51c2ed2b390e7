"""
The router's HTTP server side: a Site whose requests have a bounded body and
a canonical request-target.

Twisted buffers a whole request body (in memory, then a temporary file)
before any route runs and sets no limit. A router open to a fleet's clients
needs one: a body over C{max_request_body} bytes is not stored at all, and the
request is answered 413 without reaching a route or a worker.

Every request-target is rewritten to its canonical origin form
(L{twisted_router.targets}) before routing, so an absolute-form or oddly
spelled path reaches the same route as its plain spelling; one that cannot be
read is answered 400 here, before Klein (which would log a traceback).

The site also counts the requests it is processing, so a stopping router can
wait for them (L{twisted_router.drain}); while it drains, new requests are
answered 503 here.

Every request gets an id (the client's C{X-Request-ID} when it is safe,
else a new one, L{twisted_router.requestid}) before anything else happens:
it is forwarded to the worker on every attempt, returned on every answer
(the router's own errors too, which are written through the same
L{BoundedRequest.write}), and, with the request's route, worker, status,
duration and sizes, handed to the site's C{on_finished} observer (metrics)
and to the access log when the request ends, answered or abandoned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request, Site

from twisted_router.drain import InFlight
from twisted_router.requestid import (
    CORRELATION_ID_HEADER,
    REQUEST_ID_HEADER,
    FinishedRequest,
    RequestIds,
    RequestRecord,
)
from twisted_router.targets import BadTarget, normalize_target

#: The access log: its own namespace, so it can be filtered or routed apart from the rest.
_access_log = Logger(namespace="twisted_router.access")

#: The status recorded for a request whose client went away before its answer was complete (nginx's convention).
CLIENT_GONE = 499


class BoundedRequest(Request):
    """A request that stops storing its body once it is larger than the site allows."""

    _too_large = False
    _received = 0
    _bad_target: str | None = None
    #: Set by the Site when processing starts (L{RouterSite.begin}).
    record: RequestRecord | None = None
    _reported = False

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_request_body", 0) or 0

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if limit and length is not None and length > limit:
            self._too_large = True
            # No "100 Continue" for a body we will refuse: the client may then skip the upload.
            self.requestHeaders.removeHeader(b"expect")
            self._discard_body()
            return
        super().gotLength(length)

    def _discard_body(self) -> None:
        old: IO[bytes] | None = self.content
        if old is not None:
            old.close()
        empty: Any = BytesIO()
        self.content = empty

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        limit = self._limit()
        if limit and self._received > limit:  # chunked bodies announce no length
            self._too_large = True
            self._discard_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        try:
            path = normalize_target(path)
        except BadTarget as exc:
            self._bad_target = str(exc)
            path = b"/"  # parse nothing of it; process() answers 400
        super().requestReceived(command, path, version)

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, RouterSite):
            site.begin(self)
        if self._too_large:
            # The rest of the refused body may still be on its way: close.
            self._refuse(413, f"request body larger than {self._limit()} bytes (--max-request-body)", close=True)
        elif self._bad_target is not None:
            self._refuse(400, self._bad_target, close=False)
        elif isinstance(site, RouterSite) and site.draining:
            if self.path == b"/health":  # load balancers: stop sending here
                self._answer(503, {"status": "draining", "in_flight": len(site.in_flight)}, close=True)
            else:
                self._refuse(503, "the router is shutting down; send the request to another router", close=True)
        else:
            if isinstance(site, RouterSite):
                site.in_flight.track(self)
            super().process()

    def write(self, data: bytes) -> None:
        record = self.record
        if not self.startedWriting and record is not None:
            # The one place every answer passes before its headers go out:
            # the worker's relayed ones, the router's JSON errors, 401s, 413s, 503s.
            self.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [record.request_id.encode()])
            site = getattr(self.channel, "site", None)
            if isinstance(site, RouterSite):
                record.first_byte = site.clock.seconds()
        super().write(data)

    def connectionLost(self, reason: object) -> None:
        site = getattr(self.channel, "site", None)
        super().connectionLost(reason)
        if not self.finished and isinstance(site, RouterSite):
            site.end(self, CLIENT_GONE)  # the client went away before the answer was complete

    def _refuse(self, status: int, message: str, *, close: bool) -> None:
        """Answer with the router's JSON error without reaching a route."""
        self._answer(status, {"error": message}, close=close)

    def _answer(self, status: int, payload: dict[str, Any], *, close: bool) -> None:
        self.site = getattr(self.channel, "site", None)
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        if close:
            self.setHeader(b"connection", b"close")
        body = json.dumps(payload).encode()
        self.setHeader(b"content-length", str(len(body)).encode())
        channel = self.channel
        self.write(body)
        self.finish()
        if close and channel is not None:
            channel.loseConnection()


class RouterSite(Site):
    """
    The router's Site: bounded request bodies, request ids, and one
    C{twisted.logger} access line per request when asked for (instead of
    Twisted's own access log).

    @ivar on_finished: told about every request once it has ended (metrics).
    """

    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: object,
        *,
        access_log: bool,
        reactor: IReactorTime,
        max_request_body: int,
        idle_timeout: float | None = None,
        on_finished: Callable[[FinishedRequest], None] | None = None,
        request_ids: RequestIds | None = None,
    ) -> None:
        # parsePOSTFormSubmission=False: the router never reads form fields, bodies
        # go to workers untouched. Otherwise Twisted parses the Content-Type of
        # every POST through the email package (py-spy: ~8% of the router's
        # request-path samples) and decodes whole multipart uploads into args.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.noisy = False
        if idle_timeout is not None:
            # How long an idle kept-alive client connection stays open between
            # requests (Twisted's default is 12 hours of held sockets). During a
            # request Twisted suspends it; the proxy bounds stalls there.
            self.timeOut = idle_timeout
        self.max_request_body = max_request_body
        self._access_log = access_log
        self.in_flight = InFlight()
        self.draining = False
        self.clock = reactor
        self.on_finished = on_finished
        self._ids = request_ids or RequestIds()

    def set_draining(self, draining: bool) -> None:
        """While draining, new requests are answered 503 (C{/health}: C{draining}) and their connections closed."""
        self.draining = draining

    def begin(self, request: BoundedRequest) -> None:
        """
        Give C{request} its id and its record. The id replaces the client's
        C{X-Request-ID} (and a hostile C{X-Correlation-ID} is dropped), so
        the worker receives exactly the id the client gets back.
        """
        headers = request.requestHeaders
        given = headers.getRawHeaders(REQUEST_ID_HEADER)
        fallback = headers.getRawHeaders(CORRELATION_ID_HEADER)
        request_id, _ = self._ids.for_headers(
            _single(given), _single(fallback) if given is None else None
        )
        headers.setRawHeaders(REQUEST_ID_HEADER, [request_id.encode()])
        if fallback is not None and given is None and _single(fallback) != request_id.encode():
            headers.removeHeader(CORRELATION_ID_HEADER)
        request.record = RequestRecord(request_id, self.clock.seconds())

    def log(self, request: HTTPRequest) -> None:
        # Called by Request.finish() instead of Twisted's access log line.
        if isinstance(request, BoundedRequest):
            self.end(request, request.code)

    def end(self, request: BoundedRequest, status: int) -> None:
        """C{request} has ended with C{status}: tell the observer, and log its access line."""
        record = request.record
        if record is None or request._reported:
            return
        request._reported = True
        now = self.clock.seconds()
        done = FinishedRequest(
            record=record,
            method=request.method,
            path=request.path,
            status=status,
            duration=now - record.started,
            time_to_first_byte=None if record.first_byte is None else record.first_byte - record.started,
            bytes_in=request._received,
            bytes_out=request.sentLength,
        )
        if self.on_finished is not None:
            self.on_finished(done)
        if self._access_log:
            _access_log.info(
                "{method} {path} {status} {worker} {duration_ms:.1f}ms in={bytes_in} out={bytes_out} "
                "id={request_id} version={weight_version}",
                **done.fields(),
            )


def _single(values: Sequence[bytes] | None) -> bytes | None:
    """The one value of a header; several are treated as a bad value (C{b""}), absent as C{None}."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else b""
