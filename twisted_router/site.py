"""
The router's HTTP server side: a Site whose requests have a bounded body, a
bounded time to arrive, and a canonical request-target.

Twisted buffers a whole request body (in memory, then a temporary file)
before any route runs and sets no limit. A router open to a fleet's clients
needs one: a body over C{max_request_body} bytes is not stored at all, and the
request is answered 413 as soon as that is known (from C{Content-Length},
with the headers; a chunked body, once it is too long), before the body is
read, so a client waiting for C{100 Continue} never sends it.

Routes (and the key each needs) are known only once Klein matches the whole
request, after its body; but a request's headers come first
(L{BoundedRequest.gotLength}). A request with a body that carries no valid
key (with C{--api-key}/C{--admin-api-key}) therefore never has its body
stored: it is read and dropped, and the route's own check answers 401 (the
one open route, C{/health}, reads no body). Under C{Expect: 100-continue}
it is answered 401 at once, and the client sends no body at all.

Every request must arrive whole within C{--client-timeout} seconds of its
first byte (L{RouterChannel}): Twisted's own timeout is an idle timeout,
reset by every byte, which a client sending one header byte every few
seconds (slowloris) would hold open forever. Answers are not limited by it:
once the request is whole, the deadline is off, so a video download may
stream for as long as it takes (the proxy bounds stalls).

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
L{BoundedRequest.write}, and the answers sent before a request is whole:
413, 401, 408), and, with the request's route, worker, status,
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
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request, Site

from twisted_router.auth import Access, Keys, Unauthorized
from twisted_router.drain import InFlight
from twisted_router.errors import AuthenticationRequired
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

#: The method and path recorded for a request answered before they were read (C{--client-timeout}'s 408).
UNREAD = b"-"


class RouterChannel(HTTPChannel):
    """
    An HTTP/1.1 channel whose timeout is a deadline while a request arrives,
    and that can answer a request before it is whole (L{answer_early}).

    Twisted's timeout (C{timeOut}, the site's C{--client-timeout}) is reset
    by every byte received; here, while a request arrives, only its first
    byte resets it, so the request must be whole within C{timeOut} seconds of
    that byte. Between requests it is the idle timeout it always was, and
    while a request is answered Twisted suspends it. No timer is added: the
    one Twisted keeps anyway is reset less often.
    """

    _log = Logger()
    #: The status of the answer to a request on this channel that was answered
    #: before it was whole (0: none); the connection closes once its body is
    #: read or its time is up.
    answered_early = 0
    #: A request has started arriving and is not whole yet.
    _receiving = False

    def dataReceived(self, data: bytes) -> None:
        if not self._receiving and not self._handlingRequest and data:
            # The first byte of a request (bytes of the next request that arrive
            # while one is answered are buffered, and come back through here).
            self._receiving = True
            super().resetTimeout()
        super().dataReceived(data)

    def resetTimeout(self) -> None:
        if not self._receiving:
            super().resetTimeout()

    def allContentReceived(self) -> None:
        self._receiving = False  # the request is whole: answering it may take as long as it takes
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        if self._receiving and not self.answered_early:
            self._log.info(
                "client {peer} did not send a whole request within {timeout}s (--client-timeout): closing",
                peer=str(self.transport.getPeer()) if self.transport is not None else "?",
                timeout=self.timeOut,
            )
            self._time_out()
        super().timeoutConnection()

    def _time_out(self) -> None:
        """
        Answer 408 to the request that did not arrive in time, with its id,
        and report it (access line, metrics) as ended now, having started
        C{timeOut} seconds ago (its first byte: the deadline runs from it).
        """
        message = f"the request did not arrive within {self.timeOut:g}s (--client-timeout)"
        site = getattr(self, "site", None)
        if not isinstance(site, RouterSite):
            self.answer_early(408, message)
            return
        started = site.clock.seconds() - (self.timeOut or 0)  # set: it has just run out
        # The request arriving is the last one (a finished one has been removed);
        # none when not even its request line is in.
        request = self.requests[-1] if self.requests else None
        if isinstance(request, BoundedRequest):
            request.answer_early(408, message, started=started)
            site.end(request, 408)
        else:
            record = site.new_record(started)
            self.answer_early(408, message, {REQUEST_ID_HEADER: record.request_id.encode()})
            site.report(record, UNREAD, UNREAD, 408, bytes_in=0, bytes_out=0)

    def answer_early(
        self, status: int, message: str, headers: dict[bytes, bytes] | None = None
    ) -> None:
        """
        Send the router's JSON error for a request that is not whole yet
        (Twisted's Request can only answer once it is), with
        C{Connection: close}. Nothing more is answered on this connection.
        """
        if self.answered_early:
            return
        self.answered_early = status
        body = json.dumps({"error": message}).encode()
        head = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error"))]
        for name, value in {
            b"content-type": b"application/json",
            b"content-length": str(len(body)).encode(),
            b"connection": b"close",
            **(headers or {}),
        }.items():
            head.append(name + b": " + value)
        if self.transport is not None:
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)


class BoundedRequest(Request):
    """
    A request that stops storing its body once it is larger than the site
    allows, or when it carries no valid key, and answers the first at once.
    """

    _dropping = False
    _received = 0
    _bad_target: str | None = None
    #: Set by the Site when processing starts (L{RouterSite.begin}).
    record: RequestRecord | None = None
    _reported = False

    def _site(self) -> RouterSite | None:
        site = getattr(self.channel, "site", None)
        return site if isinstance(site, RouterSite) else None

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_request_body", 0) or 0

    def _expects_continue(self) -> bool:
        expect = self.requestHeaders.getRawHeaders(b"expect") or []
        return bool(expect) and expect[0].lower() == b"100-continue"

    def gotLength(self, length: int | None) -> None:
        # Called once the headers are in, before any of the body (length None: chunked).
        limit = self._limit()
        if limit and length is not None and length > limit:
            self._refuse_body(413, f"request body larger than {limit} bytes (--max-request-body)")
            return
        site = self._site()
        if site is not None and length != 0 and site.keys.any:
            try:
                site.keys.check(Access.CLIENT, self.requestHeaders.getRawHeaders(b"authorization"))
            except Unauthorized as exc:
                if self._expects_continue():
                    # Nothing of the body is on its way yet: say so now, and it never will be.
                    self._refuse_body(401, str(exc), AuthenticationRequired(str(exc)).headers)
                else:
                    # No key, no storage: the route's own check answers 401.
                    self._drop_body()
                return
        super().gotLength(length)

    def _refuse_body(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        """
        Answer now, before the body, and close: at once when the client waits
        for C{100 Continue} (no body is on its way), else once what it sends
        of the body has been read and dropped (closing on unread data would
        reset the connection and could lose the answer) or its time is up.
        """
        waiting = self._expects_continue()
        # No "100 Continue" for a body we refuse: the client skips the upload.
        self.requestHeaders.removeHeader(b"expect")
        self._drop_body()
        self.answer_early(status, message, headers)
        if waiting and self.channel is not None:
            self.channel.loseConnection()

    def answer_early(
        self, status: int, message: str, headers: dict[bytes, bytes] | None = None, *, started: float | None = None
    ) -> None:
        """
        Answer before this request is whole (413, 401, 408), with its id
        (given now if it has none yet, as starting at C{started}).
        """
        channel = self.channel
        site = self._site()
        headers = dict(headers or {})
        if site is not None:
            if self.record is None:
                site.begin(self, started)
            assert self.record is not None
            headers[REQUEST_ID_HEADER] = self.record.request_id.encode()
        if isinstance(channel, RouterChannel):
            channel.answer_early(status, message, headers)

    def _drop_body(self) -> None:
        self._dropping = True
        old: IO[bytes] | None = self.content
        if old is not None:
            old.close()
        empty: Any = BytesIO()
        self.content = empty

    def handleContentChunk(self, data: bytes) -> None:
        if self._dropping:
            return
        self._received += len(data)
        limit = self._limit()
        if limit and self._received > limit:  # chunked bodies announce no length
            self._refuse_body(413, f"request body larger than {limit} bytes (--max-request-body)")
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
        channel = self.channel
        if isinstance(site, RouterSite) and self.record is None:
            site.begin(self)
        if isinstance(channel, RouterChannel) and channel.answered_early:
            # Answered before its body (413, 401): the body is read now, close.
            if isinstance(site, RouterSite):
                site.end(self, channel.answered_early)
            channel.loseConnection()
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
        channel = self.channel
        site = getattr(channel, "site", None)
        super().connectionLost(reason)
        if not self.finished and isinstance(site, RouterSite):
            early = channel.answered_early if isinstance(channel, RouterChannel) else 0
            # Answered before it was whole (and gone before its body was read): that answer;
            # else the client went away before the answer was complete.
            site.end(self, early or CLIENT_GONE)

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
    The router's Site: bounded request bodies and request times, request
    ids, and one C{twisted.logger} access line per request when asked for
    (instead of Twisted's own access log).

    @ivar on_finished: told about every request once it has ended (metrics).
    """

    requestFactory = BoundedRequest
    # HTTP/1.1 only, as before (Twisted's HTTP/2 needs the h2 package, not installed).
    protocol = RouterChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: object,
        *,
        access_log: bool,
        reactor: IReactorTime,
        max_request_body: int,
        client_timeout: float | None = None,
        keys: Keys | None = None,
        on_finished: Callable[[FinishedRequest], None] | None = None,
        request_ids: RequestIds | None = None,
    ) -> None:
        """
        @param client_timeout: C{--client-timeout}: seconds a request may take
            to arrive whole (from its first byte), and an idle kept-alive
            connection may stay open between requests (None: Twisted's 12
            hours of idle time, and no request deadline).
        @param keys: the router's keys: a request with a body and no valid
            key never has its body stored.
        """
        # parsePOSTFormSubmission=False: the router never reads form fields, bodies
        # go to workers untouched. Otherwise Twisted parses the Content-Type of
        # every POST through the email package (py-spy: ~8% of the router's
        # request-path samples) and decodes whole multipart uploads into args.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.noisy = False
        if client_timeout is not None:
            # A deadline while a request arrives, the idle timeout between
            # requests (RouterChannel); suspended while a request is answered
            # (the proxy bounds stalls there).
            self.timeOut = client_timeout
        self.max_request_body = max_request_body
        self.keys = keys or Keys()
        self._access_log = access_log
        self.in_flight = InFlight()
        self.draining = False
        self.clock = reactor
        self.on_finished = on_finished
        self._ids = request_ids or RequestIds()

    def set_draining(self, draining: bool) -> None:
        """While draining, new requests are answered 503 (C{/health}: C{draining}) and their connections closed."""
        self.draining = draining

    def begin(self, request: BoundedRequest, started: float | None = None) -> None:
        """
        Give C{request} its id and its record. The id replaces the client's
        C{X-Request-ID} (and a hostile C{X-Correlation-ID} is dropped), so
        the worker receives exactly the id the client gets back.

        @param started: when it started, if earlier than now (reactor seconds).
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
        request.record = RequestRecord(request_id, self.clock.seconds() if started is None else started)

    def new_record(self, started: float) -> RequestRecord:
        """The record, with a new id, of a request that has none to read it from (its headers never came)."""
        return RequestRecord(self._ids.new(), started)

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
        # Twisted sets a request's method and path once it is whole: not for one
        # answered (408, 413, 401) and gone before that.
        whole = request.path is not None
        self.report(
            record,
            request.method if whole else UNREAD,
            request.path if whole else UNREAD,
            status,
            bytes_in=request._received,
            bytes_out=request.sentLength,
        )

    def report(
        self, record: RequestRecord, method: bytes, path: bytes, status: int, *, bytes_in: int, bytes_out: int
    ) -> None:
        """One request has ended now with C{status}: tell the observer, and log its access line."""
        now = self.clock.seconds()
        done = FinishedRequest(
            record=record,
            method=method,
            path=path,
            status=status,
            duration=now - record.started,
            time_to_first_byte=None if record.first_byte is None else record.first_byte - record.started,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
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
