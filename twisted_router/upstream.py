# -*- test-case-name: tests.unit.test_upstream -*-
"""
The router's client side of HTTP, shared by everything that talks to workers:
the streaming proxy, the buffered worker calls, the health checker and the
launcher's readiness probe.

Each of those used to carry its own copy of these pieces, and the copies
drifted: the same refused connection read C{"ConnectionRefusedError: ..."} in
one worker's C{last_error} and C{"connection refused"} in another's. Keeping
them here means one answer to each question:

  - how a request body is produced (L{BytesProducer}, L{FileBodyProducer},
    L{body_producer});
  - how a response body is read without trusting the worker (bounded by
    size with L{read_body}/L{read_limited}, by time with L{with_deadline});
  - how a failure is put into words (L{describe_failure}) and whether it was
    a cancellation (L{was_cancelled});
  - how connections are pooled and opened (L{make_agent},
    L{make_http_client}).

Nothing here knows about workers' state, routing or the HTTP API.
"""

from __future__ import annotations

import builtins
import io
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import IO, Any, Protocol, TypeVar

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IHostnameResolver, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from twisted_router.auth import worker_authorization
from twisted_router.endpoints import WorkerEndpoints

__all__ = [
    "BodyTooLarge",
    "BytesProducer",
    "FileBodyProducer",
    "WorkerKeyAgent",
    "body_producer",
    "describe_failure",
    "discard",
    "make_agent",
    "make_http_client",
    "read_body",
    "read_limited",
    "was_cancelled",
    "with_deadline",
]

_T = TypeVar("_T")

# Methods whose empty body is sent without any Content-Length (no producer).
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})

# Request bodies up to this size are read in one go and written synchronously;
# Twisted keeps bodies below 100 000 bytes in memory anyway.
_SYNC_BODY_LIMIT = 256 * 1024

# The pull loop for large request bodies reads this much per read() call and at
# most _UPLOAD_TICK_BUDGET per reactor turn, so one upload cannot starve others.
_UPLOAD_CHUNK = 64 * 1024
_UPLOAD_TICK_BUDGET = 4 * _UPLOAD_CHUNK


# The narrow parts of the reactor and the consumer that the producers use,
# so a test can hand in a Clock or a list-backed consumer.


class _DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> _DelayedCall: ...


class _Consumer(Protocol):
    def write(self, data: bytes) -> None: ...


# --------------------------------------------------------------------------
# Request bodies


@implementer(IBodyProducer)
class BytesProducer:
    """
    A body already in memory, written synchronously: no reactor turn, no
    cooperator, and therefore nothing scheduled that could outlive a forward.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: _Consumer) -> Deferred[None]:
        if self._data:
            consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer, IPushProducer)
class FileBodyProducer:
    """
    Streams a large (spooled-to-disk) request body on the injected reactor.

    Unlike L{twisted.web.client.FileBodyProducer} this does not use the global
    cooperator, and it never closes the file: the caller may retry the same
    body on another worker. It reads at its own offset (seek before each read)
    so a leftover producer from an earlier attempt cannot disturb a retry. The
    upstream transport pauses and resumes it (upload backpressure).
    """

    def __init__(self, reactor: _Clock, body: IO[bytes], length: int) -> None:
        self._reactor = reactor
        self._body = body
        self.length = length
        self._offset = 0
        self._consumer: _Consumer | None = None
        self._finished: Deferred[None] | None = None
        self._call: _DelayedCall | None = None
        self._paused = False
        self._stopped = False

    @property
    def active(self) -> bool:
        """Whether the upload started and neither completed nor was stopped."""
        return self._finished is not None and not self._finished.called and not self._stopped

    def startProducing(self, consumer: _Consumer) -> Deferred[None]:
        self._consumer = consumer
        self._finished = Deferred()
        self._schedule()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True
        self._unschedule()

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        # IBodyProducer: after stopProducing the Deferred must never fire.
        self._stopped = True
        self._unschedule()

    def _schedule(self) -> None:
        if (
            self._call is None
            and self._finished is not None
            and not self._finished.called
            and not self._paused
            and not self._stopped
        ):
            self._call = self._reactor.callLater(0, self._tick)

    def _unschedule(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _tick(self) -> None:
        self._call = None
        assert self._consumer is not None and self._finished is not None
        budget = _UPLOAD_TICK_BUDGET
        while budget > 0 and not self._paused and not self._stopped:
            remaining = self.length - self._offset
            if remaining <= 0:
                self._finished.callback(None)
                return
            try:
                self._body.seek(self._offset)
                data = self._body.read(min(_UPLOAD_CHUNK, remaining))
            except Exception:
                # E.g. the client went away and Twisted closed request.content.
                self._stopped = True
                self._finished.errback(Failure())
                return
            if not data:
                self._stopped = True
                self._finished.errback(
                    Failure(ValueError(f"request body ended {remaining} bytes early"))
                )
                return
            self._offset += len(data)
            budget -= len(data)
            self._consumer.write(data)  # may call pauseProducing synchronously
        if self._offset >= self.length and not self._stopped and not self._finished.called:
            self._finished.callback(None)
            return
        self._schedule()


def body_producer(
    reactor: _Clock, method: bytes, body: IO[bytes] | None
) -> BytesProducer | FileBodyProducer | None:
    """
    Pick the cheapest correct producer for a buffered request body.

    An empty body gets no producer for methods that normally carry none (no
    C{Content-Length} at all), and a zero-length producer otherwise, so a POST
    still says C{Content-Length: 0}.
    """
    if body is None:
        length = 0
    else:
        try:
            body.seek(0, io.SEEK_END)
            length = body.tell()
            body.seek(0)
        except (OSError, ValueError, AttributeError):
            # Not seekable: nothing better to do than to buffer it.
            data = body.read()
            return BytesProducer(data) if data or method not in _BODYLESS_METHODS else None
    if length == 0:
        return None if method in _BODYLESS_METHODS else BytesProducer(b"")
    assert body is not None
    if length <= _SYNC_BODY_LIMIT:
        return BytesProducer(body.read(length))
    return FileBodyProducer(reactor, body, length)


# --------------------------------------------------------------------------
# Connections


@implementer(IAgent)
class WorkerKeyAgent:
    """
    An agent that sends C{Authorization: Bearer <--worker-api-key>} with every
    request to a worker (forwarded requests, probes, control calls), replacing
    any C{Authorization} the request had.
    """

    def __init__(self, agent: IAgent, key: str) -> None:
        self._agent = agent
        self._authorization = worker_authorization(key)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        keyed = headers.copy() if headers is not None else Headers()
        keyed.setRawHeaders(b"authorization", [self._authorization])
        return self._agent.request(method, uri, keyed, bodyProducer)


def make_agent(
    reactor: Any,
    *,
    max_connections: int,
    persistent: bool = True,
    connect_timeout: float = 10.0,
    cached_connection_timeout: int = 4,
    resolver: IHostnameResolver | None = None,
) -> tuple[Agent, HTTPConnectionPool]:
    """
    An L{Agent} for calls to workers and the connection pool under it, which
    the owner closes (C{closeCachedConnections()}) on shutdown, or its idle
    timers leak.

    The agent builds each worker's endpoint once and opens its connections
    quietly (see L{WorkerEndpoints}).

    The router's pool is persistent with C{maxPersistentPerHost =
    max_connections}: Twisted's default of 2 would make almost every request
    to a busy worker open a fresh TCP connection. Idle connections are dropped
    after C{cached_connection_timeout} seconds (Twisted's default is 240)
    because workers run uvicorn, which closes idle keep-alive connections
    after 5 s; a POST written onto a connection the worker just closed fails
    before any response (Agent retries only idempotent requests without a
    body), and that would look like an unreachable worker and get a healthy
    worker quarantined.

    The launcher's probe pool is not persistent: it asks a loading worker
    every half second, and a pool would only keep sockets (and timers) open
    after the router stops.

    @param reactor: An C{IReactorTCP} + C{IReactorTime} provider.
    @param max_connections: Idle connections kept per worker.
    @param persistent: Whether connections are kept for reuse at all.
    @param connect_timeout: Seconds allowed for the TCP connect.
    @param cached_connection_timeout: Seconds an idle pooled connection is
        kept; keep it below the workers' keep-alive timeout.
    @param resolver: resolves workers' host names at each connection
        (default: the reactor's); blocked addresses are never connected to.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = cached_connection_timeout
    agent = Agent.usingEndpointFactory(
        reactor, WorkerEndpoints(reactor, connect_timeout=connect_timeout, quiet=True, resolver=resolver),
        pool=pool,
    )
    return agent, pool


class _AsciiURL(EncodedURL):
    """
    A URL that is already in its wire form.

    treq turns every URL into a URI with hyperlink's C{to_uri}, which
    IDNA-encodes the host and fails on an IPv6 literal (C{'::1'} is no host
    name), so a worker at C{http://[::1]:30000} could never be called. The
    router's worker URLs are canonical ASCII and its paths are quoted, so
    there is nothing left to encode: the URL is used as it is.
    """

    def to_uri(self) -> _AsciiURL:
        return self


class _WorkerHTTPClient(HTTPClient):
    """A treq client whose string URLs skip the re-encoding that breaks IPv6 literals."""

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        if isinstance(url, str):
            url = _AsciiURL.from_text(url)
        return super().request(method, url, **kwargs)


def make_http_client(agent: IAgent) -> HTTPClient:
    """A treq client for worker calls that never stores or replays cookies between workers."""
    jar = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return _WorkerHTTPClient(agent, cookiejar=jar)  # type: ignore[arg-type]  # treq annotates its own jar subclass


# --------------------------------------------------------------------------
# Response bodies


class BodyTooLarge(Exception):
    """A worker's reply was larger than the router is willing to read."""


class _BodyReader(TwistedProtocol):
    """
    Read a response body into C{sink}, up to C{limit} bytes.

    Unlike C{treq.collect}, the Deferred is cancellable and cancelling it
    aborts the connection: a probe that times out while a worker trickles
    its body must not leave that connection open (or, worse, pooled).
    """

    def __init__(self, sink: Callable[[bytes], None], limit: int | None) -> None:
        self._sink = sink
        self._limit = limit
        self._size = 0
        self.done: Deferred[None] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        transport: Any = self.transport  # a TransportProxyProducer: an IPushProducer
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._limit is not None and self._size > self._limit:
            self._abort()
            self.done.errback(BodyTooLarge(f"body larger than {self._limit} bytes"))
            return
        self._sink(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def read_body(
    response: IResponse, sink: Callable[[bytes], None], limit: int | None = None
) -> Deferred[None]:
    """Deliver the body of C{response} to C{sink}; see L{_BodyReader}."""
    if response.length == 0:
        return succeed(None)
    reader = _BodyReader(sink, limit)
    response.deliverBody(reader)
    return reader.done


async def read_limited(response: IResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    await read_body(response, chunks.append, limit)
    return b"".join(chunks)


def discard(data: bytes) -> None:
    """A body sink for answers whose status is all that matters."""


# --------------------------------------------------------------------------
# Failures


def _reasons(exc: BaseException) -> list[BaseException]:
    """The wrapped causes of Twisted's C{_WrapperException}s (ResponseFailed & co)."""
    reasons = getattr(exc, "reasons", None)
    if not isinstance(reasons, list):
        return []
    return [r.value for r in reasons if isinstance(r, Failure)]


def was_cancelled(exc: BaseException) -> bool:
    """
    Whether C{exc} is (or wraps) a cancellation: cancelling the Agent's
    Deferred mid-request surfaces as C{ResponseNeverReceived([CancelledError])}.
    """
    return isinstance(exc, CancelledError) or any(was_cancelled(r) for r in _reasons(exc))


_TIMEOUTS = (defer.TimeoutError, error.TimeoutError, builtins.TimeoutError)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_failure(failure: Failure | BaseException, timeout: float | None = None) -> str:
    """
    A short, human reason for a failed call to a worker ("connection
    refused", "timed out after 5s", "connection lost: ..."), for logs,
    C{last_error} and C{dead_reason}. Tracebacks stay in the log.

    @param timeout: the limit that was applied, to say how long we waited.
    """
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, _TIMEOUTS):
        return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, error.NoRouteError):
        return "no route to host"
    if isinstance(exc, error.TCPTimedOutError):
        return "connect timed out"
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, ResponseNeverReceived | RequestTransmissionFailed | ResponseFailed):
        # These carry the real causes as a list of Failures.
        if isinstance(exc, ResponseNeverReceived):
            label = "no response"
        elif isinstance(exc, RequestTransmissionFailed):
            label = "request not sent"
        else:
            label = "response interrupted"
        causes = [describe_failure(r, timeout) for r in exc.reasons]
        return f"{label}: {'; '.join(causes)}" if causes else label
    if isinstance(exc, error.ConnectionLost | error.ConnectionDone):
        return "connection lost"
    if isinstance(exc, error.ConnectError):
        return _short(f"connection failed: {exc}")
    message = str(exc)
    return _short(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def with_deadline(d: Deferred[_T], timeout: float, clock: IReactorTime) -> Deferred[_T]:
    """
    Cancel C{d} after C{timeout} seconds and make it fail with
    C{defer.TimeoutError} then.

    C{Deferred.addTimeout} is not enough here: it only translates a bare
    C{CancelledError}, but a cancelled treq/Agent request fails with
    C{ResponseNeverReceived([CancelledError])} and a cancelled coroutine
    fails with whatever it raised, so the cause would be lost.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    timer = clock.callLater(timeout, expire)

    def settle(result: _T | Failure) -> _T | Failure:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(defer.TimeoutError(f"timed out after {timeout:g}s"))
        return result

    return d.addBoth(settle)
