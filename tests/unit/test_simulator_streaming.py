"""Large answers are written with backpressure, a chunk at a time (no real sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from twisted_router.simulator.model import TaskType
from twisted_router.simulator.payloads import CHUNK_SIZE
from twisted_router.simulator.streaming import ChunkProducer
from twisted_router.simulator.testing import InMemoryWorker


class _FakeRequest:
    """Records what a producer does to a request."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = False
        self._pause_after = pause_after

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self._pause_after is not None and len(self.written) % self._pause_after == 0:
            self.producer.pauseProducing()


def test_writes_everything_and_then_fires() -> None:
    request = _FakeRequest()
    d = ChunkProducer(request, iter([b"a", b"b", b"c"])).start()  # type: ignore[arg-type]
    assert request.streaming is True
    assert request.written == [b"a", b"b", b"c"]
    assert request.unregistered
    assert success_result_of(d) is None


def test_pause_stops_writing_until_resume() -> None:
    request = _FakeRequest(pause_after=2)
    producer = ChunkProducer(request, iter([b"1", b"2", b"3", b"4", b"5"]))  # type: ignore[arg-type]
    d = producer.start()
    assert request.written == [b"1", b"2"]
    assert_no_result(d)
    producer.resumeProducing()
    assert request.written == [b"1", b"2", b"3", b"4"]
    producer.resumeProducing()
    assert request.written[-1] == b"5"
    success_result_of(d)


def test_stop_producing_gives_up() -> None:
    request = _FakeRequest(pause_after=1)
    producer = ChunkProducer(request, iter([b"1", b"2"]))  # type: ignore[arg-type]
    d = producer.start()
    producer.stopProducing()
    failure_result_of(d, CancelledError)
    producer.resumeProducing()
    assert request.written == [b"1"] and not request.unregistered


def test_cancel_stops_without_touching_the_request() -> None:
    request = _FakeRequest(pause_after=1)
    producer = ChunkProducer(request, iter([b"1", b"2"]))  # type: ignore[arg-type]
    d = producer.start()
    d.cancel()
    failure_result_of(d, CancelledError)
    producer.resumeProducing()
    assert request.written == [b"1"]


class _SmallBufferTransport(StringTransport):
    """A transport that pauses its producer once it holds C{limit} unsent bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.paused and len(self.value()) >= self.limit and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The client reads everything held; the transport resumes its producer."""
        data = self.value()
        self.clear()
        self.paused = False
        self.producer.resumeProducing()
        return data


def test_video_download_follows_the_client_through_a_real_http_channel() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V, video_bytes=2_000_000)
    job = sim.post("/v1/videos", {"prompt": "x"}).json()
    sim.clock.advance(60)

    site = Site(sim.resource, reactor=sim.clock)
    channel = site.buildProtocol(None)
    transport = _SmallBufferTransport(limit=3 * CHUNK_SIZE)
    channel.makeConnection(transport)
    channel.dataReceived(f"GET /v1/videos/{job['id']}/content HTTP/1.1\r\nHost: w\r\n\r\n".encode())

    received = b""
    rounds = 0
    while transport.paused:
        # Never more than one chunk (plus the head) past the point where it was paused.
        assert len(transport.value()) <= 4 * CHUNK_SIZE + 1024
        received += transport.drain()
        rounds += 1
    received += transport.value()

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 2000000" in head
    assert len(body) == 2_000_000 and body[4:8] == b"ftyp"
    assert rounds >= 8
    channel.connectionLost(Failure(ConnectionDone()))
