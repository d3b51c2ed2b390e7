"""
A stand-in for the client's request that a relay writes the worker's answer
to (L{twisted_router.proxy.BodyRelay}): it records what the relay does to it
(producer registration, writes), so backpressure can be tested on the relay
alone.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers


class FakeChannel:
    pass


class FakeDownstreamRequest:
    """Records what the relay does to the downstream request."""

    def __init__(self) -> None:
        self.channel: Any = FakeChannel()
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = 0
        self.written: list[bytes] = []
        self.method = b"GET"
        self.uri = b"/"
        self.content = io.BytesIO()
        self.requestHeaders = Headers()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        if self.channel is None:
            raise AttributeError("'NoneType' object has no attribute 'unregisterProducer'")
        self.unregistered += 1
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()
