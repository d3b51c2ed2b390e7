"""
An in-memory fleet of fake workers for router tests: no sockets, no real time.

Each fake worker is a small programmable resource. The fleet's agent routes an
upstream request to the worker named by its host:port, or fails it the way a
dead worker's connection would, so the router under test runs unmodified on
top of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IReactorTime
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.support.deferreds import success_result_of
from twisted_router.config import RouterConfig
from twisted_router.pool import Worker
from twisted_router.service import RouterParts, build_router
from twisted_router.simulator.app import SimulatedWorker
from twisted_router.simulator.config import SimulatorConfig

Handler = Callable[[Request], "bytes | int"]


def json_answer(request: Request, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode()


@dataclass
class SeenRequest:
    method: bytes
    uri: bytes
    body: bytes
    headers: dict[bytes, list[bytes]]
    request: Request


class FakeWorker(Resource):
    """
    A worker that answers like a real one by default and can be programmed per path.

    C{hold(path)} makes matching requests wait: they are kept in C{held} and the
    test writes and finishes them itself.
    """

    isLeaf = True

    def __init__(self, name: str, task_type: str = "T2I", model_id: str = "fake/model") -> None:
        super().__init__()
        self.name = name
        self.task_type = task_type
        self.model_id = model_id
        self.seen: list[SeenRequest] = []
        self.handlers: dict[tuple[bytes, bytes], Handler] = {}
        self.held: list[Request] = []
        self.health_status = 200
        self.images: set[str] = set()
        self._counter = 0

    def on(self, method: bytes, path: bytes, handler: Handler) -> None:
        self.handlers[(method, path)] = handler

    def hold(self, method: bytes, path: bytes) -> None:
        def keep(request: Request) -> int:
            self.held.append(request)
            return NOT_DONE_YET

        self.on(method, path, keep)

    def paths(self) -> list[bytes]:
        return [s.request.path for s in self.seen]

    def render(self, request: Request) -> bytes | int:
        request.content.seek(0)
        body = request.content.read()
        self.seen.append(
            SeenRequest(request.method, request.uri, body, dict(request.requestHeaders.getAllRawHeaders()), request)
        )
        request.setHeader(b"x-worker-id", self.name.encode())
        handler = self.handlers.get((request.method, request.path))
        if handler is not None:
            return handler(request)
        return self.default(request, body)

    def default(self, request: Request, body: bytes) -> bytes:
        path = request.path.decode()
        self._counter += 1
        job_id = f"{self.name}-{self._counter}"
        if path == "/health":
            return json_answer(request, self.health_status, {"status": "ok"})
        if path == "/v1/models":
            card = {"id": self.model_id, "object": "model", "task_type": self.task_type}
            return json_answer(request, 200, {"object": "list", "data": [card]})
        if path == "/v1/images/generations":
            self.images.add(job_id)
            return json_answer(
                request,
                200,
                {
                    "id": job_id,
                    "created": 1,
                    "data": [{"url": f"/v1/images/{job_id}/content", "b64_json": None}],
                },
            )
        if path.startswith("/v1/images/") and path.endswith("/content"):
            if path.split("/")[3] not in self.images:  # only the worker that made an image has it
                return json_answer(request, 404, {"detail": "Image not found"})
            request.setHeader(b"content-type", b"image/jpeg")
            return b"JPEG:" + path.encode()
        if path == "/v1/videos" and request.method == b"POST":
            return json_answer(request, 200, {"id": job_id, "object": "video", "status": "queued"})
        if path.startswith("/v1/videos/"):
            return json_answer(request, 200, {"id": path.split("/")[3], "status": "completed"})
        if path in ("/update_weights_from_disk",):
            return json_answer(request, 200, {"success": True, "message": "Updated 1 modules (transformer)."})
        if path == "/release_memory_occupation":
            return json_answer(request, 200, {"success": True, "sleeping": True, "message": "released"})
        if path == "/resume_memory_occupation":
            return json_answer(request, 200, {"success": True, "sleeping": False, "message": "resumed"})
        return json_answer(request, 200, {"worker": self.name, "path": path, "body": body.decode("latin-1")})


class _HostRouter(Resource):
    """Root resource that hands each request to the fake worker named by its Host header."""

    isLeaf = True

    def __init__(self, workers: dict[str, FakeWorker]) -> None:
        super().__init__()
        self._workers = workers

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader(b"host") or b"").decode()
        worker = self._workers.get(host)
        if worker is None:
            request.setResponseCode(599)
            return b"no such fake worker"
        return worker.render(request)


@implementer(IAgent)
class FleetAgent:
    """An agent over the fleet: refused connections for workers marked down."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self.inner = RequestTraversalAgent(_HostRouter(fleet.workers))

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Any = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        netloc = urlsplit(uri.decode()).netloc
        if netloc in self._fleet.down or netloc not in self._fleet.workers:
            return fail(ConnectionRefusedError("Connection refused"))
        return self.inner.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        self.inner.flush()


@dataclass
class Fleet:
    """
    Fake workers keyed by C{host:port}, with the agent the router uses to reach
    them: L{FakeWorker}s (L{add}) or simulated workers (L{add_simulator}).
    """

    clock: Clock = field(default_factory=Clock)
    workers: dict[str, FakeWorker] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.agent = FleetAgent(self)

    def add_simulator(self, name: str, *, port: int = 9000, **config: Any) -> tuple[str, SimulatedWorker]:
        """
        A simulated worker (the real API, on the fleet's clock) at C{name:port},
        answering as worker C{name}; C{config} are L{SimulatorConfig} fields.
        """
        netloc = f"{name}:{port}"
        simulator = SimulatedWorker(SimulatorConfig(worker_id=name, **config), cast(IReactorTime, self.clock))
        self.workers[netloc] = cast(FakeWorker, simulator.resource())
        return f"http://{netloc}", simulator

    def add(self, name: str, *, port: int | None = None, task_type: str = "T2I") -> tuple[str, FakeWorker]:
        port = port if port is not None else 8000 + len(self.workers)
        netloc = f"{name}:{port}"
        worker = FakeWorker(name, task_type=task_type)
        self.workers[netloc] = worker
        return f"http://{netloc}", worker


class RouterHarness:
    """A router wired to a fake fleet, driven through an in-memory client."""

    def __init__(
        self, fleet: Fleet | None = None, *, resolver: IHostnameResolver | None = None, **config: Any
    ) -> None:
        """@param resolver: resolves workers' host names at registration (none: not resolved)."""
        self.fleet = fleet or Fleet()
        self.clock = self.fleet.clock
        self.config = RouterConfig(**config)
        self.parts: RouterParts = build_router(self.config, self.clock, agent=self.fleet.agent, resolver=resolver)
        self.pool = self.parts.pool
        self.client = StubTreq(self.parts.router.app.resource())

    def pump(self, rounds: int = 10) -> None:
        """Move bytes both ways until nothing more happens."""
        for _ in range(rounds):
            self.client.flush()
            self.fleet.agent.flush()
            self.clock.advance(0)

    def enroll(self, url: str) -> tuple[Worker, bool]:
        """Register a worker without bringing it up (it stays C{starting})."""
        d = Deferred.fromCoroutine(self.parts.fleet.register(url))
        self.pump()
        return success_result_of(d)

    def register(self, url: str) -> None:
        worker, _ = self.enroll(url)
        d = Deferred.fromCoroutine(self.parts.fleet.bring_up(worker))
        self.pump()
        success_result_of(d)

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes, Any]:
        """Make a request and pump it to completion: (status, body, response)."""
        d = self.client.request(method, "http://router" + path, **kwargs)
        self.pump()
        response = success_result_of(d)
        body_d = self.client.content(response)
        self.pump()
        return response.code, success_result_of(body_d), response

    def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        code, body, _ = self.call(method, path, **kwargs)
        return code, json.loads(body)


def make_router(
    n: int = 2, *, task_types: tuple[str, ...] = (), **config: Any
) -> tuple[RouterHarness, list[FakeWorker]]:
    """A router over C{n} registered fake workers named w0, w1, ... (T2I unless C{task_types} says)."""
    fleet = Fleet()
    harness = RouterHarness(fleet, **config)
    workers = []
    for i in range(n):
        task_type = task_types[i] if i < len(task_types) else "T2I"
        url, worker = fleet.add(f"w{i}", task_type=task_type)
        harness.register(url)
        workers.append(worker)
    return harness, workers
