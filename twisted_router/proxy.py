# -*- test-case-name: tests.unit.test_proxy -*-
"""
Forwarding one client request to one worker, streaming both ways.

Why this module exists rather than C{twisted.web.proxy} or treq: diffusion
workers answer with 10-200 MB bodies (trajectories, videos), so the answer must
be relayed chunk by chunk with end-to-end backpressure (the upstream socket is
registered as a push producer on the downstream request), memory must not grow
with body size, and every way a forward can end (success, worker refused,
worker timed out, worker died mid-body, client went away, the caller cancelled)
must release everything it took: the per-worker slot, timers, the upstream
connection.

The caller (the Klein app) gets typed outcomes so it can decide what to do:

  - L{WorkerUnreachable}: nothing was written to the client; retry elsewhere.
  - L{WorkerTimedOut}: nothing was written to the client; answer 504.
  - L{UpstreamBodyFailed}: the status line was already sent; the client
    connection has been aborted, so the caller must not write or finish.
  - L{CancelledError}: the client went away (or the caller cancelled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
)
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from twisted_router.upstream import (
    BytesProducer,
    FileBodyProducer,
    body_producer,
    describe_failure,
    was_cancelled,
)

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "BodyRelay",
    "ForwardResult",
    "StreamingProxy",
    "UpstreamBodyFailed",
    "WorkerAbandoned",
    "WorkerNotReady",
    "WorkerTimedOut",
    "WorkerUnreachable",
    "upstream_headers",
]

HOP_BY_HOP_HEADERS: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""
Lower-case names of headers that describe one connection, not the message
(RFC 9110 section 7.6.1, plus the de-facto C{Proxy-Connection}); a proxy must
never forward them.
"""

# Request headers we never copy upstream besides the hop-by-hop ones:
# Content-Length is recomputed by the body producer, Host is the worker's
# (Agent sets it), and Expect: 100-continue was already answered by Twisted
# (the body is fully buffered before render), while Agent cannot speak it.
_NOT_FORWARDED_UPSTREAM = frozenset({b"content-length", b"host", b"expect"})

# The narrow parts of the reactor, the response and the transports that the
# relay uses: the public signatures keep Twisted's interfaces, while these
# say exactly what a test double has to provide.


class _DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, secondsLater: float) -> None: ...


class _Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> _DelayedCall: ...


class _Consumer(Protocol):
    def write(self, data: bytes) -> None: ...


class _PushProducer(Protocol):
    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class _Response(Protocol):
    code: int
    phrase: bytes
    headers: Headers
    length: int | object

    def deliverBody(self, protocol: TwistedProtocol) -> None: ...


class WorkerUnreachable(Exception):
    """
    The worker did not answer and nothing reached the client yet: connection
    refused, connect failure or connect timeout, DNS failure, or the connection
    dropped before the response headers arrived.

    The caller should quarantine the worker and retry on another one.
    C{str(e)} is a short human-readable reason.
    """


class WorkerAbandoned(WorkerUnreachable):
    """
    The caller gave up waiting for response headers (C{give_up}) because the
    worker was found hung; nothing was written, so the request may be retried.
    """


class WorkerTimedOut(Exception):
    """
    No response headers arrived within the timeout (the wait for a free
    per-worker slot counts). The upstream request was cancelled and nothing was
    written to the client, so the caller can still answer 504.
    """


class WorkerNotReady(Exception):
    """
    While the request waited for a connection slot, the worker stopped being
    a valid target (a refit or sleep started, it was quarantined or removed);
    nothing was sent. The caller picks another worker or waits.
    """


class UpstreamBodyFailed(Exception):
    """
    The worker failed or stalled after the response headers had been sent to
    the client. The client connection has already been aborted, so the client
    sees a truncated transfer instead of a complete-looking short body; the
    caller must not write to or finish the request.
    """


@dataclass(frozen=True)
class ForwardResult:
    """
    The outcome of a completed forward.

    @ivar status: The worker's status code (relayed unchanged).
    @ivar body_bytes: Number of body bytes relayed to the client.
    @ivar captured: The complete body if C{capture_limit > 0} and the body was
        at most C{capture_limit} bytes, else L{None}.
    @ivar head: The first C{capture_limit} bytes of the body (all of it when
        shorter), for reading an id at the start of a large answer.
    """

    status: int
    body_bytes: int
    captured: bytes | None
    head: bytes = b""


# --------------------------------------------------------------------------
# Header hygiene


def _connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """
    Header names listed in C{Connection} values: the sender declares them
    hop-by-hop, so they must be dropped together with C{Connection}.
    """
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def _client_host(request: Request) -> str:
    """
    The client's address for X-Forwarded-For. Listening on a UNIX socket (or
    behind an exotic transport) yields an address without C{host}; RFC 7239
    spells an unknown node C{unknown}, which is better than failing the
    request.
    """
    try:
        address = request.getClientAddress()
    except Exception:
        return "unknown"
    host = getattr(address, "host", None)
    return host if isinstance(host, str) and host else "unknown"


def upstream_headers(request: Request) -> Headers:
    """
    The headers sent to the worker: the client's own, minus everything that
    described the client's connection, plus the X-Forwarded-* trio so the
    worker can still see who asked and how.
    """
    client_headers = request.requestHeaders
    drop = (
        HOP_BY_HOP_HEADERS
        | _NOT_FORWARDED_UPSTREAM
        | _connection_tokens(client_headers.getRawHeaders(b"connection", []))
    )
    headers = Headers()
    for name, values in client_headers.getAllRawHeaders():
        if name.lower() not in drop:
            headers.setRawHeaders(name, list(values))

    forwarded_for = headers.getRawHeaders(b"x-forwarded-for", [])
    client = _client_host(request).encode("ascii", "replace")
    headers.setRawHeaders(b"X-Forwarded-For", [b", ".join([*forwarded_for, client])])
    headers.setRawHeaders(b"X-Forwarded-Proto", [b"https" if request.isSecure() else b"http"])
    host = client_headers.getRawHeaders(b"host")
    if host:
        headers.setRawHeaders(b"X-Forwarded-Host", [host[0]])
    return headers


def _copy_response_headers(request: Request, response: _Response, method: bytes) -> None:
    """
    Copy the worker's headers onto the downstream request.

    Headers are I{replaced} (C{setRawHeaders}), so Twisted's defaults
    (C{Server}, C{Date}, C{Content-Type: text/html}) are not duplicated; and if
    the worker sent no Content-Type, Twisted's default is suppressed so the
    answer passes through untouched. C{Content-Length} comes from
    C{response.length}, because L{Agent} moves it out of C{response.headers}
    (except for HEAD, where it is an entity header and stays). The real Agent
    also hides the worker's C{Connection} header; tokens are still honoured if
    another L{IAgent} leaves it in place.
    """
    upstream = response.headers
    drop = (
        HOP_BY_HOP_HEADERS
        | _connection_tokens(upstream.getRawHeaders(b"connection", []))
        | {b"content-length"}
    )
    for name, values in upstream.getAllRawHeaders():
        if name.lower() not in drop:
            request.responseHeaders.setRawHeaders(name, list(values))

    if not upstream.hasHeader(b"content-type"):
        request.responseHeaders.removeHeader(b"content-type")
        request.defaultContentType = None

    request.responseHeaders.removeHeader(b"content-length")
    if method == b"HEAD":
        head_length = upstream.getRawHeaders(b"content-length")
        if head_length:
            request.responseHeaders.setRawHeaders(b"Content-Length", [head_length[-1]])
    elif (
        response.length is not UNKNOWN_LENGTH
        and response.code not in NO_BODY_CODES
        and not 100 <= response.code < 200
    ):
        request.responseHeaders.setRawHeaders(
            b"Content-Length", [b"%d" % (cast(int, response.length),)]
        )


# --------------------------------------------------------------------------
# Failure classification


_UNREACHABLE = (
    ConnectError,  # refused, connect timeout, no route, cancelled connect
    DNSLookupError,
    ConnectionError,  # builtin refused/reset/aborted
    ConnectionClosed,  # Twisted ConnectionLost / ConnectionDone
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestNotSent,
)


def _abort_client(request: Request) -> None:
    """
    Drop the client connection without a clean end, so a truncated body can
    never look complete (a chunked body without its last chunk, or fewer bytes
    than Content-Length). C{transport.abortConnection()} comes first because
    it is the plain abort for both HTTP/1.1 and HTTP/2 streams, while
    C{HTTPChannel.forceAbortClient} logs a misleading "Forcibly timing out
    client".
    """
    transport = getattr(request, "transport", None)
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
        return
    channel = getattr(request, "channel", None)
    force = getattr(channel, "forceAbortClient", None)
    if force is not None:
        force()


def _cancel_timer(call: _DelayedCall | None) -> None:
    """Cancel a timer if it is still pending."""
    if call is not None and call.active():
        call.cancel()


def _client_gone(request: Request) -> bool:
    """Twisted sets C{channel} to None in C{Request.connectionLost}."""
    return getattr(request, "channel", None) is None


# --------------------------------------------------------------------------
# Response body relay


class _DownstreamRequest(Protocol):
    """What the relay needs of the downstream request (eases unit testing)."""

    channel: Any

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def write(self, data: bytes) -> None: ...


@implementer(IPushProducer)
class _BodyRelayProducer:
    """
    The push producer registered on the downstream request: it forwards pause
    and resume to the upstream transport (end-to-end backpressure) and tells
    the relay, which stops its idle timer while the I{client} is the slow one.
    """

    def __init__(self, relay: BodyRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._pause()

    def resumeProducing(self) -> None:
        self._relay._resume()

    def stopProducing(self) -> None:
        # The channel calls this when the client connection goes away.
        self._relay.client_gone()


class BodyRelay(TwistedProtocol):
    """
    Relays the upstream response body to the downstream request.

    C{done} fires with L{None} when the body completed, fails with
    L{CancelledError} when the client went away or the forward was cancelled,
    with L{UpstreamBodyFailed} on the idle timeout, and with the upstream's
    failure otherwise. C{done} is cancellable: cancelling stops the upstream
    transport, so that connection is closed rather than pooled half-read.
    Every way out goes through L{_end}, which cancels the idle timer and
    unregisters the producer (only while the client is still connected:
    after a disconnect C{unregisterProducer} raises AttributeError).
    """

    _log = Logger()

    def __init__(
        self,
        request: _DownstreamRequest,
        reactor: _Clock,
        *,
        idle_timeout: float,
        capture_limit: int = 0,
        write_body: bool = True,
        worker: str = "",
    ) -> None:
        self._request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._capture_limit = capture_limit
        self._head: list[bytes] = []
        self._head_bytes = 0
        self._write_body = write_body
        self._worker = worker
        self._idle_call: _DelayedCall | None = None
        self._stall_call: _DelayedCall | None = None
        self._registered = False
        self._ended = False
        self._draining = False
        self._drain_call: _DelayedCall | None = None
        #: Keep reading (and discarding) the answer when the client goes away,
        #: so the request counts as load until the worker has finished it.
        self.drain_if_abandoned = False
        self.paused = False
        self.body_bytes = 0
        self.done: Deferred[None] = Deferred(self._cancel)

    @property
    def captured(self) -> bytes | None:
        """The whole body if capturing was on and it fit, else None."""
        if self._capture_limit <= 0 or self.body_bytes > self._capture_limit:
            return None
        return self.head

    @property
    def head(self) -> bytes:
        """The first C{capture_limit} bytes of the body."""
        return b"".join(self._head)

    # IProtocol

    def connectionMade(self) -> None:
        if self._ended:
            return
        if self._request.channel is None:
            # The client is already gone: registerProducer would raise.
            self.client_gone()
            return
        self._request.registerProducer(_BodyRelayProducer(self), True)
        self._registered = True
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        self._arm_idle()
        self.body_bytes += len(data)
        room = self._capture_limit - self._head_bytes
        if room > 0:
            kept = data[:room]
            self._head.append(kept)
            self._head_bytes += len(kept)
        if self._write_body:
            self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._ended:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            self._end(reason)

    # Backpressure (called through _BodyRelayProducer)

    @property
    def upstream(self) -> _PushProducer | None:
        """The upstream C{TransportProxyProducer}, once connected."""
        return cast("_PushProducer | None", self.transport)

    def _pause(self) -> None:
        self.paused = True
        self._disarm_idle()
        if self.upstream is not None:
            self.upstream.pauseProducing()
        if not self._ended:
            self._stall_call = self._reactor.callLater(self._idle_timeout, self._client_stalled)

    def _resume(self) -> None:
        self.paused = False
        self._disarm_stall()
        if self.upstream is not None:
            self.upstream.resumeProducing()
        self._arm_idle()

    def _client_stalled(self) -> None:
        """
        The client read nothing for the whole idle timeout: it holds a worker
        slot and an in-flight count for nothing. Drop it; the disconnect path
        then stops the upstream and releases everything.
        """
        self._stall_call = None
        if self._ended:
            return
        self._log.warn(
            "client of {worker} read nothing for {timeout}s; dropping it",
            worker=self._worker,
            timeout=self._idle_timeout,
        )
        _abort_client(cast(Request, self._request))

    def _disarm_stall(self) -> None:
        _cancel_timer(self._stall_call)
        self._stall_call = None

    # Ways out

    def client_gone(self, reason: object = None) -> None:
        """
        The client disconnected: stop writing, and stop the upstream, or, with
        C{drain_if_abandoned}, read the rest of the answer and discard it
        (for at most the idle timeout in all), because the worker computes
        it anyway and it is load on that worker until it is done.
        """
        if self._ended or self._draining:
            return
        if not self.drain_if_abandoned:
            self._stop_upstream()
            self._end(Failure(CancelledError("client disconnected")))
            return
        self._draining = True
        self._write_body = False
        if self._registered:
            self._registered = False
            if self._request.channel is not None:
                self._request.unregisterProducer()
        self._disarm_stall()
        if self.paused:
            self.paused = False
            if self.upstream is not None:
                self.upstream.resumeProducing()
        self._arm_idle()
        self._drain_call = self._reactor.callLater(self._idle_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self._drain_call = None
        if self._ended:
            return
        self._stop_upstream()
        self._end(Failure(CancelledError("client disconnected; the rest of the answer was not awaited")))

    def _cancel(self, d: Deferred[None]) -> None:
        # Canceller of self.done: Klein cancels the route when the client
        # leaves; the caller may also cancel (e.g. its own deadline).
        if self._ended:
            return
        self._stop_upstream()
        self._end(Failure(CancelledError("forward cancelled")))

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self._ended:
            return
        self._log.warn(
            "worker {worker} sent no body bytes for {timeout}s; aborting",
            worker=self._worker,
            timeout=self._idle_timeout,
        )
        self._stop_upstream()
        self._end(Failure(UpstreamBodyFailed(f"no body bytes for {self._idle_timeout:g}s")))

    def _stop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.stopProducing()

    def _end(self, outcome: Failure | None) -> None:
        self._ended = True
        self._disarm_idle()
        self._disarm_stall()
        _cancel_timer(self._drain_call)
        self._drain_call = None
        if self._draining and not (outcome is not None and outcome.check(CancelledError)):
            # Drained to the end (or the worker failed): either way the client is gone.
            outcome = Failure(CancelledError("client disconnected; answer drained"))
        if self._registered:
            self._registered = False
            if self._request.channel is not None:
                self._request.unregisterProducer()
        if self.done.called:
            return
        if outcome is None:
            self.done.callback(None)
        else:
            self.done.errback(outcome)

    # Idle timer: runs only while we wait for the worker. While the client is
    # the bottleneck (paused) a separate stall timer runs instead: a slow
    # client is fine, one that reads nothing for the whole timeout is dropped.

    def _arm_idle(self) -> None:
        if self._ended or self.paused:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._reactor.callLater(self._idle_timeout, self._idle_expired)

    def _disarm_idle(self) -> None:
        _cancel_timer(self._idle_call)
        self._idle_call = None


# --------------------------------------------------------------------------
# The proxy


class _Exchange:
    """
    Bookkeeping for one forward before the body phase: which Deferred it is
    waiting on (so a client disconnect or the headers timeout can cancel it)
    and why it ended.
    """

    def __init__(self, request: Request, *, keep_if_abandoned: bool = False) -> None:
        self.request = request
        self.keep_if_abandoned = keep_if_abandoned
        #: The request went to the worker: from here on, with
        #: C{keep_if_abandoned}, a client leaving no longer stops the exchange.
        self.sent = False
        self.current: Deferred[Any] | None = None
        self.timed_out = False
        self.abandoned: str | None = None
        self.gone = _client_gone(request)
        self.relay: BodyRelay | None = None
        if not self.gone:
            # notifyFinish after a disconnect would never fire, hence the check.
            request.notifyFinish().addErrback(self._on_client_gone)

    def _on_client_gone(self, reason: Failure) -> None:
        # Klein cancels the route first (it hooked notifyFinish earlier), but
        # forward may run outside Klein or be shielded: act on it ourselves.
        self.gone = True
        if self.relay is not None:
            self.relay.client_gone(reason)
        elif self.current is not None and not self._keeping:
            self.current.cancel()

    def time_out(self) -> None:
        self.timed_out = True
        if self.current is not None:
            self.current.cancel()

    def give_up(self, reason: str) -> str:
        """Stop waiting for response headers (the worker was found hung); ignored once they are in."""
        if self.relay is None and self.abandoned is None:
            self.abandoned = reason
            if self.current is not None:
                self.current.cancel()
        return reason

    @property
    def _keeping(self) -> bool:
        return self.keep_if_abandoned and self.sent

    async def wait(self, d: Deferred[Any]) -> Any:
        self.current = d
        try:
            if not self._keeping:
                return await d
            return await self._wait_through_cancellation(d)
        finally:
            self.current = None

    async def _wait_through_cancellation(self, d: Deferred[Any]) -> Any:
        """
        Await C{d}, but let a cancellation from above (Klein cancels the
        route when the client leaves) only mark the client gone: the worker
        got the request, and the exchange goes on until it has answered.
        Our own timers still cancel C{d} itself.
        """
        outcome: list[Any] = []
        waiters: list[Deferred[None]] = []

        def arrived(result: Any) -> None:
            outcome.append(result)
            while waiters:
                waiters.pop().callback(None)

        d.addBoth(arrived)
        while not outcome:
            waiter: Deferred[None] = Deferred()
            waiters.append(waiter)
            try:
                await waiter
            except CancelledError:
                waiters.clear()
                self.gone = True
                if self.relay is not None:
                    self.relay.client_gone()
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    @property
    def cancelled(self) -> bool:
        return self.gone or _client_gone(self.request)


class StreamingProxy:
    """
    Forwards requests to workers over a shared L{IAgent}, streaming the answer
    back with backpressure and at most C{max_connections_per_worker}
    concurrent upstream requests per worker.

    @ivar _semaphores: Per-worker-URL concurrency caps, created on first use
        and dropped as soon as they are idle, so workers that were removed
        leave nothing behind.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        agent: IAgent,
        *,
        timeout: float,
        max_connections_per_worker: int = 100,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_connections_per_worker < 1:
            raise ValueError(
                f"max_connections_per_worker must be >= 1, got {max_connections_per_worker!r}"
            )
        self._reactor: _Clock = cast(_Clock, reactor)
        self._agent = agent
        self._timeout = timeout
        self._max_per_worker = max_connections_per_worker
        self._semaphores: dict[str, DeferredSemaphore] = {}

    # Introspection (metrics, tests)

    def active_count(self, worker_url: str) -> int:
        """Upstream requests to C{worker_url} currently holding a slot."""
        sem = self._semaphores.get(worker_url)
        return 0 if sem is None else sem.limit - sem.tokens

    def waiting_count(self, worker_url: str) -> int:
        """Forwards to C{worker_url} queued for a free slot."""
        sem = self._semaphores.get(worker_url)
        return 0 if sem is None else len(sem.waiting)

    def tracked_workers(self) -> frozenset[str]:
        """Worker URLs that currently have a (non-idle) slot semaphore."""
        return frozenset(self._semaphores)

    def _semaphore(self, worker_url: str) -> DeferredSemaphore:
        sem = self._semaphores.get(worker_url)
        if sem is None:
            sem = self._semaphores[worker_url] = DeferredSemaphore(self._max_per_worker)
        return sem

    def _drop_if_idle(self, worker_url: str, sem: DeferredSemaphore) -> None:
        """Forget an idle semaphore so removed workers leave nothing behind."""
        if sem.tokens == sem.limit and not sem.waiting and self._semaphores.get(worker_url) is sem:
            del self._semaphores[worker_url]

    async def forward(
        self,
        request: Request,
        worker_url: str,
        *,
        path: bytes | None = None,
        method: bytes | None = None,
        body: IO[bytes] | None = None,
        extra_response_headers: (
            Mapping[bytes, bytes] | Callable[[IResponse], Mapping[bytes, bytes]] | None
        ) = None,
        capture_limit: int = 0,
        timeout: float | None = None,
        ready: Callable[[], bool] | None = None,
        give_up: Deferred[str] | None = None,
        keep_load_if_abandoned: bool = False,
    ) -> ForwardResult:
        """
        Forward C{request} to C{worker_url} and relay the answer.

        Returns once the whole body was written to C{request}; does not call
        C{request.finish()} (Klein does when the route returns).

        @param path: Upstream path; defaults to the raw C{request.uri}.
        @param method: Upstream method; defaults to C{request.method}.
        @param body: Upstream body; defaults to C{request.content}. It is
            rewound and never closed, so a retry can reuse it.
        @param extra_response_headers: Headers set on the answer after the
            worker's (they win), or a callable computing them from the
            worker's response.
        @param capture_limit: Keep the body in memory up to this many bytes
            (0: don't capture).
        @param timeout: Seconds to wait for response headers (including the
            wait for a per-worker slot), and the longest gap between body
            chunks; defaults to the proxy's timeout.
        @param ready: Asked once a connection slot is held, just before the
            request is sent: the worker's state may have changed while the
            request queued for a slot. C{False} raises L{WorkerNotReady}.
        @param give_up: Fires with a reason when the caller has found the
            worker hung: if no response headers have arrived by then, the
            forward stops waiting and raises L{WorkerAbandoned} (a
            L{WorkerUnreachable}: the caller may retry elsewhere); afterwards
            it is ignored.
        @param keep_load_if_abandoned: once the request is sent, a client
            that goes away does not end the forward: the answer is awaited
            (up to the timeout) and read to the end and discarded (up to the
            timeout again), so the caller's in-flight count covers the time
            the worker spends on it; then L{CancelledError} is raised.

        @raise WorkerUnreachable: The worker could not be reached or dropped
            the connection before answering; nothing was written.
        @raise WorkerTimedOut: No response headers in time; nothing written.
        @raise WorkerNotReady: C{ready()} said no; nothing was sent or written.
        @raise UpstreamBodyFailed: The worker failed mid-body; the client
            connection was aborted.
        @raise CancelledError: The client disconnected, or the caller
            cancelled; the upstream request was cancelled or aborted.
        """
        limit = self._timeout if timeout is None else timeout
        method = request.method if method is None else method
        # The Site has already reduced every request-target to origin form (targets.py).
        upstream_path = request.uri if path is None else path
        url = worker_url.rstrip("/").encode() + upstream_path
        body_file = request.content if body is None else body

        exchange = _Exchange(request, keep_if_abandoned=keep_load_if_abandoned)
        if exchange.gone:
            raise CancelledError("client already disconnected")

        timer = self._reactor.callLater(limit, exchange.time_out)
        if give_up is not None:
            give_up.addCallback(exchange.give_up)
        sem = self._semaphore(worker_url)
        acquired = False
        producer: BytesProducer | FileBodyProducer | None = None
        try:
            try:
                await exchange.wait(sem.acquire())
                acquired = True
                if ready is not None and not ready():
                    raise WorkerNotReady(f"{worker_url} stopped being routable while the request queued")
                headers = upstream_headers(request)
                producer = body_producer(self._reactor, method, body_file)
                exchange.sent = True
                response: _Response = await exchange.wait(
                    cast(Any, self._agent).request(method, url, headers, producer)
                )
            except Exception as exc:
                mapped = self._before_headers_error(
                    exc, exchange, worker_url, limit, waiting_for_slot=not acquired
                )
                if mapped is exc:
                    raise
                raise mapped from exc
            finally:
                if timer.active():
                    timer.cancel()
            return await self._relay(
                request,
                response,
                exchange,
                worker_url=worker_url,
                method=method,
                extra_response_headers=extra_response_headers,
                capture_limit=capture_limit,
                idle_timeout=limit,
            )
        finally:
            if isinstance(producer, FileBodyProducer) and producer.active:
                producer.stopProducing()
            if acquired:
                sem.release()
            self._drop_if_idle(worker_url, sem)

    def _before_headers_error(
        self,
        exc: Exception,
        exchange: _Exchange,
        worker_url: str,
        limit: float,
        *,
        waiting_for_slot: bool,
    ) -> Exception:
        """
        Map a failure before the response headers to the public outcome.
        Flags beat exception types: cancelling the Agent's Deferred can
        surface as C{ResponseNeverReceived([CancelledError])}, which would
        otherwise look like an unreachable worker.
        """
        if exchange.abandoned is not None:
            self._log.warn(
                "gave up waiting for {worker}: {reason}", worker=worker_url, reason=exchange.abandoned
            )
            return WorkerAbandoned(f"no response headers, and {exchange.abandoned}")
        if exchange.timed_out:
            reason = (
                f"no free connection slot within {limit:g}s"
                if waiting_for_slot
                else f"no response headers within {limit:g}s"
            )
            self._log.warn("worker {worker} timed out: {reason}", worker=worker_url, reason=reason)
            return WorkerTimedOut(reason)
        if exchange.cancelled or was_cancelled(exc):
            self._log.info(
                "forward to {worker} cancelled before response headers (client gone: {gone})",
                worker=worker_url,
                gone=exchange.cancelled,
            )
            return exc if isinstance(exc, CancelledError) else CancelledError(str(exc))
        if isinstance(exc, _UNREACHABLE):
            reason = describe_failure(exc)
            self._log.warn(
                "worker {worker} unreachable: {reason}", worker=worker_url, reason=reason
            )
            return WorkerUnreachable(reason)
        return exc

    async def _relay(
        self,
        request: Request,
        response: _Response,
        exchange: _Exchange,
        *,
        worker_url: str,
        method: bytes,
        extra_response_headers: (
            Mapping[bytes, bytes] | Callable[[IResponse], Mapping[bytes, bytes]] | None
        ),
        capture_limit: int,
        idle_timeout: float,
    ) -> ForwardResult:
        """Send the status and headers, then stream the body through a L{BodyRelay}."""
        relay = BodyRelay(
            request,
            self._reactor,
            idle_timeout=idle_timeout,
            capture_limit=capture_limit,
            write_body=method != b"HEAD",
            worker=worker_url,
        )
        relay.drain_if_abandoned = exchange.keep_if_abandoned
        if exchange.cancelled and exchange.keep_if_abandoned:
            # The client left while the worker computed: read the answer to
            # its end (the worker is busy until then), then report the client gone.
            exchange.relay = relay
            response.deliverBody(relay)
            relay.client_gone()
            try:
                await exchange.wait(relay.done)
            except Exception:
                pass
            raise CancelledError("client disconnected")
        if exchange.cancelled:
            # The client left while the headers were on their way: connecting
            # the relay lets it abort the upstream instead of pooling it.
            response.deliverBody(relay)
            relay.client_gone()
            relay.done.addErrback(lambda _: None)  # nobody awaits it
            raise CancelledError("client disconnected")

        request.setResponseCode(response.code, response.phrase)
        _copy_response_headers(request, response, method)
        extra = (
            extra_response_headers(cast(IResponse, response))
            if callable(extra_response_headers)
            else extra_response_headers
        )
        for name, value in (extra or {}).items():
            request.responseHeaders.setRawHeaders(name, [value])

        exchange.relay = relay
        response.deliverBody(relay)
        # Response._deliverBody_INITIAL resumes the upstream transport after
        # connectionMade; if the client paused us meanwhile, re-apply the pause.
        if relay.paused and not relay.done.called and relay.upstream is not None:
            relay.upstream.pauseProducing()
        try:
            await exchange.wait(relay.done)
        except CancelledError:
            self._log.info(
                "forward from {worker} ended mid-body after {nbytes} bytes: "
                "client gone or cancelled",
                worker=worker_url,
                nbytes=relay.body_bytes,
            )
            if not _client_gone(request):
                # Cancelled by the caller while the client is still here: the
                # status line may be out, so a clean end would lie.
                _abort_client(request)
            raise
        except Exception as exc:
            _abort_client(request)
            if isinstance(exc, UpstreamBodyFailed):
                raise
            reason = describe_failure(exc)
            self._log.warn(
                "worker {worker} failed mid-body after {nbytes} bytes: {reason}",
                worker=worker_url,
                nbytes=relay.body_bytes,
                reason=reason,
            )
            raise UpstreamBodyFailed(reason) from exc
        return ForwardResult(
            status=response.code, body_bytes=relay.body_bytes, captured=relay.captured, head=relay.head
        )
