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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from twisted_router.upstream import (
    BytesProducer,
    describe_failure,
    discard,
    read_body,
    read_limited,
    was_cancelled,
    with_deadline,
)

__all__ = ["MAX_REPLY_BYTES", "WorkerCaller", "WorkerReply", "decode_body"]

#: Larger worker answers are refused: a control or lookup reply is never this big.
MAX_REPLY_BYTES = 8 * 1024 * 1024


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
        keep_body: bool = True,
    ) -> WorkerReply:
        """
        Make one call; never raises except for cancellation of the caller.

        @param keep_body: False when only the status matters (an image lookup):
            the answer, possibly megabytes, is read to its end and dropped.
        """
        headers = Headers({b"Content-Type": [b"application/json"]}) if body is not None else None

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
                await read_body(response, discard)  # to the end, so the connection goes back to the pool
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
