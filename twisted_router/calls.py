"""
Small buffered calls from the router to workers: control broadcasts, model
cards, video job lookups.

These answers are small JSON documents, so they go through treq (with its
hostile defaults overridden: no cookie jar, no redirects) rather than the
streaming proxy. Every call has its own timeout and every failure becomes a
L{WorkerReply} with an error instead of an exception, so a fan-out over many
workers always yields one result per worker.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, TypeVar

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from twisted_router.proxy import BytesProducer, was_cancelled

_T = TypeVar("_T")

#: Larger worker answers are refused: a control or lookup reply is never this big.
MAX_REPLY_BYTES = 8 * 1024 * 1024


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


@dataclass(frozen=True)
class WorkerReply:
    """One worker's answer to a buffered call; C{status_code} is None when it gave none."""

    worker_url: str
    status_code: int | None
    body: Any
    error: str | None = None

    @property
    def success(self) -> bool:
        """2xx, and not a JSON body that says C{"success": false}."""
        if self.status_code is None or not 200 <= self.status_code < 300:
            return False
        return not (isinstance(self.body, dict) and self.body.get("success") is False)

    def payload(self) -> dict[str, Any]:
        """The per-worker entry of a broadcast answer."""
        out: dict[str, Any] = {
            "worker_url": self.worker_url,
            "status_code": self.status_code,
            "body": self.body,
            "success": self.success,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


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

    # Any: without the mypy-zope plugin, mypy misreads zope interface methods.
    reactor: Any = clock
    timer = reactor.callLater(timeout, expire)

    def settle(result: _T | Failure) -> _T | Failure:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(defer.TimeoutError(f"timed out after {timeout:g}s"))
        return result

    return d.addBoth(settle)


class BodyTooLarge(Exception):
    """A worker's reply was larger than the router is willing to read."""


class _BodyReader(Protocol):
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
    response: Any, sink: Callable[[bytes], None], limit: int | None = None
) -> Deferred[None]:
    """
    Deliver the body of C{response} (an C{IResponse}; typed C{Any} because
    mypy reads zope interface methods without the mypy-zope plugin) to
    C{sink}; see L{_BodyReader}.
    """
    if response.length == 0:
        return succeed(None)
    reader = _BodyReader(sink, limit)
    response.deliverBody(reader)
    return reader.done


async def read_limited(response: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    await read_body(response, chunks.append, limit)
    return b"".join(chunks)


def _drop(data: bytes) -> None:
    """A body sink for answers whose status is all that matters."""


def decode_body(raw: bytes) -> Any:
    """JSON when the worker sent JSON, else the text, so results always serialise."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class WorkerCaller:
    """Makes buffered calls to workers on an injected client and clock."""

    log = Logger()

    def __init__(self, http: HTTPClient, clock: IReactorTime) -> None:
        self._http = http
        self._clock = clock

    async def call(
        self,
        worker_url: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        timeout: float,
        content_type: bytes = b"application/json",
        keep_body: bool = True,
    ) -> WorkerReply:
        """
        Make one call; never raises except for cancellation of the caller.

        @param keep_body: False when only the status matters (an image lookup):
            the answer, possibly megabytes, is read to its end and dropped.
        """
        headers = Headers({b"Content-Type": [content_type]}) if body is not None else None

        async def exchange() -> tuple[int, bytes]:
            response = await self._http.request(
                method,
                worker_url + path,
                data=BytesProducer(body) if body is not None else None,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
            )
            if not keep_body:
                await read_body(response, _drop)  # to the end, so the connection goes back to the pool
                return response.code, b""
            return response.code, await read_limited(response, MAX_REPLY_BYTES)

        try:
            code, raw = await with_deadline(Deferred.fromCoroutine(exchange()), timeout, self._clock)
        except Exception as exc:
            # with_deadline turns its own expiry into TimeoutError, so a
            # cancellation still here came from our caller: let it through.
            if was_cancelled(exc):
                raise CancelledError() from exc
            return WorkerReply(worker_url, None, None, describe_failure(exc, timeout))  # a result, never a crash
        return WorkerReply(worker_url, code, decode_body(raw) if keep_body else None)

    async def fan_out(
        self,
        worker_urls: Sequence[str],
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        timeout: float,
        keep_body: bool = True,
        on_reply: Callable[[int, WorkerReply], object] | None = None,
    ) -> list[WorkerReply]:
        """
        Call every worker concurrently; one reply per worker, in the given order.

        @param on_reply: called with each worker's index and reply as soon as
            that reply is in, so a caller can act on the quick workers without
            waiting for a hung one. An exception it raises is logged, never
            propagated: the other replies still count.
        """

        def early(reply: WorkerReply, index: int) -> WorkerReply:
            if on_reply is not None:
                try:
                    on_reply(index, reply)
                except Exception:
                    self.log.failure("handling the reply of {worker} failed", worker=reply.worker_url)
            return reply

        calls = [
            Deferred.fromCoroutine(
                self.call(url, method, path, body=body, timeout=timeout, keep_body=keep_body)
            ).addCallback(early, i)
            for i, url in enumerate(worker_urls)
        ]
        outcomes = await DeferredList(calls, consumeErrors=True)
        replies: list[WorkerReply] = []
        if any(isinstance(value, Failure) and value.check(CancelledError) for _, value in outcomes):
            # Our caller cancelled: per-worker "failures" made up from that would be lies.
            raise CancelledError()
        for url, (_, value) in zip(worker_urls, outcomes, strict=True):
            if isinstance(value, Failure):  # only a bug lands here; keep one result per worker anyway
                self.log.failure("call to {worker} failed unexpectedly", value, worker=url)
                replies.append(WorkerReply(url, None, None, value.getErrorMessage()))
            else:
                replies.append(value)
        return replies
