# -*- test-case-name: tests.unit.test_simulator_streaming -*-
"""
Writing a large answer to a request with backpressure.

The router's memory tests download 200 MB videos and 70 MB trajectories
through it; the simulator must serve them without holding a copy per
request and without writing faster than the client reads. L{ChunkProducer}
is a push producer over an iterator of byte chunks: it writes until the
transport pauses it, resumes when the transport drains, and fires a
Deferred when the last chunk is written so the Klein route can finish the
request.

A push producer rather than a pull producer: C{HTTPChannel} adapts pull
producers with a cooperator on the I{global} reactor, which would tie the
simulator to the global reactor and break in-memory tests.
"""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer


@implementer(IPushProducer)
class ChunkProducer:
    """
    Write C{chunks} to C{request}, pausing when the client is slow.

    Memory use is one chunk at a time plus what the chunks' source holds
    (for the simulator, cached payloads shared by all requests).
    """

    def __init__(self, request: Request, chunks: Iterator[bytes]) -> None:
        self._request = request
        self._chunks = chunks
        self._paused = False
        self._stopped = False
        self._producing = False
        self._done: Deferred[None] = Deferred(self._cancel)

    def start(self) -> Deferred[None]:
        """
        Register with the request and start writing.

        @return: fires when every chunk has been written (the caller then
            finishes the request); fails with L{CancelledError} if the
            client goes away first.
        """
        self._request.registerProducer(self, True)
        self._produce()
        return self._done

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop writing until resumed."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The transport drained: write more."""
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        """The connection is gone: stop for good and give up on the answer."""
        self._stopped = True
        if not self._done.called:
            self._done.errback(CancelledError("client went away"))

    def _cancel(self, d: Deferred[None]) -> None:
        # Klein cancels the route when the client disconnects; the request's
        # channel may already be gone, so do not touch the request here.
        self._stopped = True

    def _produce(self) -> None:
        if self._producing:
            return
        self._producing = True
        try:
            while not self._paused and not self._stopped:
                chunk = next(self._chunks, None)
                if chunk is None:
                    self._stopped = True
                    self._request.unregisterProducer()
                    self._done.callback(None)
                    return
                self._request.write(chunk)
        finally:
            self._producing = False
