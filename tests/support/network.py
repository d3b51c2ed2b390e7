"""
Fake-worker networks for tests of the code that calls workers: no sockets, no real time.

Each is several workers behind one in-memory HTTP client or resource, told
apart by host, at the level the code under test talks to them:

  - L{AnsweringWorkers}: a resource for buffered calls (L{Answer} per host);
  - L{ProbedWorkers}, L{RefusingClient}: C{/health} and C{/v1/models} as the
    health checker reads them, with hosts that refuse or whose client breaks;
  - L{HealthAnswers}: a C{GET /health}-only client for the launcher's
    readiness checks;
  - L{tests.support.fleet.Fleet}: whole fake (or simulated) workers behind
    the router's agent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

__all__ = [
    "Answer",
    "AnsweringWorkers",
    "Behaviour",
    "HealthAnswers",
    "ProbedWorkers",
    "RefusingClient",
    "StatusOnly",
    "model_card",
]


# -- buffered calls -------------------------------------------------------------------------


class Answer:
    """What a fake worker answers: status, body, headers; or C{hang=True} for never."""

    def __init__(
        self,
        status: int = 200,
        body: bytes | str | Any = b"",
        *,
        content_type: bytes = b"application/json",
        hang: bool = False,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        self.status = status
        if isinstance(body, bytes):
            self.body = body
        elif isinstance(body, str):
            self.body = body.encode()
        else:
            self.body = json.dumps(body).encode()
        self.content_type = content_type
        self.hang = hang
        self.headers = headers or {}


class AnsweringWorkers(Resource):
    """
    Several workers behind one resource, told apart by the host name of the
    C{Host} header: each answers with its L{Answer} (200 C{{"ok": true}} by
    default), and every request, its body and every lost connection are kept.
    """

    isLeaf = True

    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        super().__init__()
        self.answers = answers or {}
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append(request)
        self.bodies.append(request.content.read())
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        host = request.getHeader(b"host") or b""
        answer = self.answers.get(host.decode().split(":")[0], Answer(200, {"ok": True}))
        if answer.hang:
            return NOT_DONE_YET
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        return answer.body


# -- health probes and model cards ----------------------------------------------------


def model_card(task_type: object = "T2V", model_id: object = "Wan-AI/Wan2.1-T2V-1.3B") -> bytes:
    return json.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": 1760000000,
                    "owned_by": "sglang",
                    "root": model_id,
                    "task_type": task_type,
                    "num_gpus": 1,
                }
            ],
        }
    ).encode()


#: What a fake worker does on one path: a status code, a body (200), "hang"
#: (never answers), or "trickle" (headers and a bit of body, then nothing).
Behaviour = int | bytes | str


class ProbedWorkers(Resource):
    """
    Several workers as the health checker sees them (C{GET /health} and
    C{GET /v1/models}), behind one resource, told apart by the C{Host}
    header (C{host:port}); each path is programmed with a L{Behaviour}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.health: dict[str, Behaviour] = {}
        self.models: dict[str, Behaviour] = {}
        self.seen: list[tuple[str, str]] = []
        self.hanging: list[Request] = []
        #: How each hanging request ended (a Failure when the client went away).
        self.ended: list[object] = []

    def hits(self, host: str, path: str = "/health") -> int:
        return self.seen.count((host, path))

    def render_GET(self, request: Request) -> bytes | int:
        host = (request.getHeader("host") or "").lower()
        path = request.path.decode()
        self.seen.append((host, path))
        if path == "/health":
            behaviour = self.health.get(host, b'{"status":"ok"}')
        elif path == "/v1/models":
            behaviour = self.models.get(host, model_card())
        else:
            request.setResponseCode(404)
            return b'{"detail":"Not Found"}'
        if behaviour in ("hang", "trickle"):
            self.hanging.append(request)
            request.notifyFinish().addBoth(self.ended.append)
        if behaviour == "hang":
            return NOT_DONE_YET
        if behaviour == "trickle":
            request.setHeader(b"content-length", b"1000")
            request.write(b"{")
            return NOT_DONE_YET
        if isinstance(behaviour, int):
            request.setResponseCode(behaviour)
            return b"Internal Server Error"
        assert isinstance(behaviour, bytes)
        request.setHeader(b"content-type", b"application/json")
        return behaviour


class RefusingClient:
    """
    The HTTP client handed to the code under test: StubTreq, plus hosts that
    refuse connections and hosts whose request call itself raises.
    """

    def __init__(self, stub: StubTreq) -> None:
        self.stub = stub
        self.refused: set[str] = set()
        self.broken: set[str] = set()

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        host = urlsplit(url).netloc
        if host in self.broken:
            raise RuntimeError("client exploded")
        if host in self.refused:
            return fail(ConnectionRefusedError())
        return self.stub.get(url, **kwargs)


# -- the launcher's readiness probe ------------------------------------------------------


@dataclass
class StatusOnly:
    """A response whose status is all there is (an empty body)."""

    code: int
    length: int = 0


class HealthAnswers:
    """C{GET /health}: refused until a worker is marked up, then its status code."""

    def __init__(self) -> None:
        self.up: dict[str, int] = {}
        self.hang: set[str] = set()
        self.calls: list[str] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[StatusOnly]:
        self.calls.append(url)
        base = url.removesuffix("/health")
        if base in self.hang:
            return Deferred()
        if base in self.up:
            return succeed(StatusOnly(self.up[base]))
        return fail(ConnectionRefusedError())
