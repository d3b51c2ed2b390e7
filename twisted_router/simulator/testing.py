# -*- test-case-name: tests.unit.test_simulator_app -*-
"""
An in-memory simulated worker for tests: no sockets, no real time.

L{InMemoryWorker} puts a L{SimulatedWorker} on a C{task.Clock} behind a
C{treq.testing.StubTreq}. L{InMemoryWorker.call} sends a request and then
advances the fake clock exactly as far as the GPU queue needs, one
scheduled event at a time, until the answer is complete, so a test can
assert exact service times (C{worker.clock.seconds()}) and queue order.

Reusable by the router's own tests, which can put several of these behind
their HTTP client to get workers with the real API in memory.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from twisted_router.simulator.app import SimulatedWorker
from twisted_router.simulator.config import SimulatorConfig

T = TypeVar("T")

#: The base URL requests are made against (never resolved).
BASE_URL = "http://simulated-worker.invalid"


@dataclass
class SimResponse:
    """
    A finished answer: status, headers and the whole body.

    @ivar length: the declared C{Content-Length} (treq's agent removes the
        header itself and reports it as C{response.length}), or C{None}.
    @ivar started: fake-clock time the request was sent.
    @ivar finished: fake-clock time the answer was complete.
    """

    code: int
    headers: dict[str, list[str]]
    body: bytes
    length: int | None = None
    started: float = 0.0
    finished: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """The last value of header C{name} (case-insensitive), if any."""
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.header("content-type") or ""


def multipart(
    fields: Iterable[tuple[str, str]] = (),
    files: Iterable[tuple[str, str, bytes, str]] = (),
) -> tuple[bytes, bytes]:
    """
    Encode a multipart/form-data body (C{StubTreq} cannot send C{files=}).

    @param fields: C{(name, value)} pairs; a name may repeat.
    @param files: C{(name, filename, content, content_type)} tuples.
    @return: C{(body, content_type_header_value)}.
    """
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode() + b"\r\n"
        )
    for name, filename, content, ctype in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
            + content + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}".encode()


class InMemoryWorker:
    """
    A simulated worker on a fake clock, with a StubTreq client.

    @ivar clock: the worker's reactor time; advance it to let jobs finish.
    @ivar worker: the L{SimulatedWorker}.
    @ivar client: a C{StubTreq} over the worker's root resource.
    """

    def __init__(self, config: SimulatorConfig | None = None, **overrides: Any) -> None:
        """
        @param config: the base config (if C{None}: the defaults, with
            C{worker_id="sim-test"} so answers carry an C{X-Worker-Id}).
        @param overrides: fields of L{SimulatorConfig} to replace.
        """
        base = config if config is not None else SimulatorConfig(worker_id="sim-test")
        self.config = replace(base, **overrides) if overrides else base
        self.clock = Clock()
        self.worker = SimulatedWorker(self.config, cast(IReactorTime, self.clock))
        self.resource = self.worker.resource()
        # StubTreq builds its treq-like methods at run time: type it loosely.
        self.client: Any = StubTreq(self.resource)

    def url(self, path: str) -> str:
        """The absolute URL of C{path} on this worker."""
        return BASE_URL + path

    def send(self, method: str, path: str, **kwargs: Any) -> Deferred[IResponse]:
        """
        Start a request and deliver it, without advancing the clock.

        Use with L{run} to interleave several requests on the queue.
        """
        d: Deferred[IResponse] = self.client.request(method, self.url(path), **kwargs)
        self.client.flush()
        return d

    def flush(self) -> None:
        """Deliver pending in-memory I/O."""
        self.client.flush()

    def run(self, d: Deferred[T], max_events: int = 100_000) -> T:
        """
        Advance the fake clock, one scheduled event at a time, until C{d} fires.

        @raise AssertionError: if nothing is scheduled and C{d} still has not
            fired (a deadlock), or after C{max_events} events.
        """
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(max_events):
            self.client.flush()
            if results:
                break
            calls: list[Any] = list(self.clock.getDelayedCalls())
            if not calls:
                raise AssertionError(f"{d!r} can never fire: nothing is scheduled")
            step = min(c.getTime() for c in calls) - self.clock.seconds()
            self.clock.advance(max(0.0, step))
        else:
            raise AssertionError(f"{d!r} did not fire within {max_events} events")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def finish(self, d: Deferred[IResponse]) -> SimResponse:
        """Wait (on the fake clock) for a response from L{send} and read its body."""
        started = self.clock.seconds()
        response = self.run(d)
        body: bytes = self.run(self.client.content(response))
        headers = {
            name.decode("latin1").lower(): [v.decode("latin1") for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        length = response.length if isinstance(response.length, int) else None
        return SimResponse(
            code=response.code,
            headers=headers,
            body=body,
            length=length,
            started=started,
            finished=self.clock.seconds(),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> SimResponse:
        """Send one request and return its finished answer (advancing the fake clock)."""
        return self.finish(self.send(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> SimResponse:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> SimResponse:
        """POST C{body} as JSON (unless C{data}/C{files} are given in C{kwargs})."""
        if body is not None:
            kwargs.setdefault("data", json.dumps(body).encode())
            kwargs.setdefault("headers", {b"content-type": [b"application/json"]})
        return self.call("POST", path, **kwargs)

    def post_form(
        self,
        path: str,
        fields: Iterable[tuple[str, str]] = (),
        files: Iterable[tuple[str, str, bytes, str]] = (),
    ) -> SimResponse:
        """POST a multipart/form-data body built by L{multipart}."""
        body, ctype = multipart(fields, files)
        return self.call("POST", path, data=body, headers={b"content-type": [ctype]})

    def delete(self, path: str, **kwargs: Any) -> SimResponse:
        return self.call("DELETE", path, **kwargs)
