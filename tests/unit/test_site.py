"""The router's Site: bounded request bodies answered 413 before any route runs."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_router.site import RouterSite


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        self.bodies.append(body)
        return b"got %d" % len(body)


def exchange(raw: bytes, limit: int = 100) -> tuple[bytes, Echo]:
    echo = Echo()
    site = RouterSite(echo, access_log=False, reactor=Clock(), max_request_body=limit)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    channel.connectionLost(None)
    return transport.value(), echo


def test_body_within_the_limit_reaches_the_resource() -> None:
    out, echo = exchange(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"got 100")
    assert echo.bodies == [b"x" * 100]


def test_announced_oversized_body_is_413_and_never_stored() -> None:
    out, echo = exchange(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"application/json" in head.lower()
    assert "--max-request-body" in json.loads(body)["error"]
    assert echo.bodies == []


def test_chunked_oversized_body_is_413() -> None:
    chunk = b"x" * 60
    raw = (
        b"POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3c\r\n" + chunk + b"\r\n" + b"3c\r\n" + chunk + b"\r\n0\r\n\r\n"
    )
    out, echo = exchange(raw)
    assert out.startswith(b"HTTP/1.1 413")
    assert echo.bodies == []


def test_chunked_body_within_the_limit_passes() -> None:
    raw = b"POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    out, echo = exchange(raw)
    assert out.startswith(b"HTTP/1.1 200")
    assert echo.bodies == [b"hello"]


def test_form_bodies_are_not_parsed_into_args() -> None:
    """Bodies are for the worker: a multipart or urlencoded POST leaves request.args to the query."""
    seen: list[dict[bytes, list[bytes]]] = []

    class Args(Resource):
        isLeaf = True

        def render_POST(self, request: Request) -> bytes:
            seen.append(dict(request.args))
            return b"ok"

    site = RouterSite(Args(), access_log=False, reactor=Clock(), max_request_body=1000)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    body = b"a=1&b=2"
    channel.dataReceived(
        b"POST /x?q=1 HTTP/1.1\r\nHost: r\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    channel.connectionLost(None)
    assert seen == [{b"q": [b"1"]}]
