"""
Client-side limits of the router's Site, in memory: an oversized body is
refused before it is sent (also under C{Expect: 100-continue}), a body
without a valid key is never stored, and a request must arrive whole within
C{--client-timeout} of its first byte (slowloris), while answers may stream
for longer.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.support.fleet import make_router
from twisted_router.auth import Keys
from twisted_router.site import RouterSite

API_KEY = "client-key-0123456789"
ADMIN_KEY = "admin-key-0123456789ab"


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.held: list[Request] = []

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        self.bodies.append(body)
        return b"got %d" % len(body)

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/stream":
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"


def connect(
    resource: Resource, *, limit: int = 100, timeout: float | None = 60.0, keys: Keys | None = None
) -> tuple[Clock, StringTransport, object]:
    clock = Clock()
    site = RouterSite(
        resource, access_log=False, reactor=clock, max_request_body=limit, client_timeout=timeout, keys=keys
    )
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, transport, channel


def status_of(out: bytes) -> int:
    return int(out.split(b" ", 2)[1])


def error_of(out: bytes) -> str:
    return str(json.loads(out.partition(b"\r\n\r\n")[2])["error"])


# ---------------------------------------------------------------- 413 before the body


def test_expect_continue_with_an_oversized_length_is_413_at_once_and_no_100() -> None:
    echo = Echo()
    _, transport, channel = connect(echo)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    )
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out
    assert "--max-request-body" in error_of(out)
    assert transport.disconnecting and echo.bodies == []


def test_an_oversized_length_is_answered_before_the_body_and_closed_after_it() -> None:
    echo = Echo()
    _, transport, channel = connect(echo)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n")
    assert status_of(transport.value()) == 413  # the body has not been sent
    assert not transport.disconnecting  # closing on unread data would reset the connection
    channel.dataReceived(b"x" * 1000)
    assert transport.value().count(b"HTTP/1.1") == 1  # one answer only
    assert transport.disconnecting and echo.bodies == []


def test_a_chunked_body_is_refused_once_it_is_too_long() -> None:
    echo = Echo()
    _, transport, channel = connect(echo)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
    assert status_of(transport.value()) == 413
    channel.dataReceived(b"0\r\n\r\n")
    assert transport.disconnecting and echo.bodies == []


def test_a_body_within_the_limit_under_expect_gets_100_continue() -> None:
    echo = Echo()
    _, transport, channel = connect(echo)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"hello")
    assert echo.bodies == [b"hello"]


ROUTES = [
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/v1/diffusion/generate"),
    ("POST", "/rollout/generate"),
    ("POST", "/v1/videos"),
    ("POST", "/generate"),
    ("POST", "/generate_video"),
    ("DELETE", "/v1/videos/abc"),
    ("POST", "/workers"),
    ("PUT", "/workers/w0"),
    ("POST", "/add_worker"),
    ("POST", "/remove_worker"),
    ("POST", "/update_weights_from_disk"),
    ("POST", "/release_memory_occupation"),
    ("POST", "/resume_memory_occupation"),
    ("GET", "/health"),
    ("POST", "/some/worker/path"),  # the catch-all
    ("PUT", "/v1/set_lora"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("expect", [True, False])
def test_every_route_refuses_an_oversized_body_before_it_is_sent(method: str, path: str, expect: bool) -> None:
    h, workers = make_router(1)
    before = list(workers[0].paths())  # its bring-up probes
    _, transport, channel = connect(h.parts.router.app.resource(), limit=1000)
    head = f"{method} {path} HTTP/1.1\r\nHost: r\r\nContent-Length: 1001\r\n"
    channel.dataReceived((head + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode())
    out = transport.value()
    assert status_of(out) == 413 and b"100 Continue" not in out
    h.pump()
    assert workers[0].paths() == before  # nothing reached a worker
    assert transport.disconnecting is expect


# ---------------------------------------------------------------- no key, no stored body


def test_a_body_without_a_valid_key_is_never_stored() -> None:
    echo = Echo()
    _, transport, channel = connect(echo, keys=Keys(api=API_KEY))
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nAuthorization: Bearer wrong-key-0123456789\r\n\r\nhello")
    assert echo.bodies == [b""]  # the route (here: no check) sees nothing of it


def test_a_body_sent_with_two_authorization_headers_is_never_stored() -> None:
    """Several headers count as no key (the route then answers 401), even when the last one is valid."""
    echo = Echo()
    _, _, channel = connect(echo, keys=Keys(api=API_KEY))
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n"
        b"Authorization: Bearer wrong-key-0123456789\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n\r\nhello".encode()
    )
    assert echo.bodies == [b""]


def test_a_body_with_a_valid_key_is_stored() -> None:
    echo = Echo()
    _, _, channel = connect(echo, keys=Keys(api=API_KEY, admin=ADMIN_KEY))
    for key in (API_KEY, ADMIN_KEY):
        channel.dataReceived(
            f"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nAuthorization: Bearer {key}\r\n\r\nhello".encode()
        )
    assert echo.bodies == [b"hello", b"hello"]


def test_expect_continue_without_a_key_is_401_before_the_body() -> None:
    echo = Echo()
    _, transport, channel = connect(echo, keys=Keys(admin=ADMIN_KEY))
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n")
    out = transport.value()
    assert status_of(out) == 401 and b"100 Continue" not in out
    assert b'www-authenticate: Bearer realm="sglang-d-router"' in out
    assert transport.disconnecting and echo.bodies == []


def test_without_keys_bodies_are_stored_as_before() -> None:
    echo = Echo()
    _, _, channel = connect(echo)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\nhello")
    assert echo.bodies == [b"hello"]


def test_the_router_answers_401_to_a_keyless_body_and_health_stays_open() -> None:
    h, workers = make_router(1, api_key=API_KEY)
    keys = Keys(api=API_KEY)
    _, transport, channel = connect(h.parts.router.app.resource(), limit=1000, keys=keys)
    channel.dataReceived(b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
    h.pump()
    assert status_of(transport.value()) == 401
    transport.clear()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
    h.pump()
    assert status_of(transport.value()) == 200


# ---------------------------------------------------------------- --client-timeout


def test_slow_headers_are_cut_after_the_client_timeout_from_the_first_byte() -> None:
    """One byte every 5 s never trips an idle timeout; the deadline from the first byte does."""
    clock, transport, channel = connect(Echo(), timeout=20.0)
    request = b"GET / HTTP/1.1\r\nHost: r\r\nX-Slow: " + b"a" * 100
    sent = 0
    while not transport.disconnecting and sent < len(request):
        channel.dataReceived(request[sent : sent + 1])
        sent += 1
        clock.advance(5)
    assert transport.disconnecting
    assert 4 <= sent <= 5  # cut at 20 s, not after the 100 bytes' 500 s
    assert status_of(transport.value()) == 408 and "--client-timeout" in error_of(transport.value())


def test_an_incomplete_body_is_cut_after_the_client_timeout() -> None:
    echo = Echo()
    clock, transport, channel = connect(echo, timeout=20.0)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 10\r\n\r\nhello")
    clock.advance(19.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and status_of(transport.value()) == 408 and echo.bodies == []


def test_a_long_answer_is_not_cut_by_the_client_timeout() -> None:
    echo = Echo()
    clock, transport, channel = connect(echo, timeout=20.0)
    channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: r\r\n\r\n")
    (request,) = echo.held
    for _ in range(30):  # five minutes of a slow download
        request.write(b"x" * 10)
        clock.advance(10)
    assert not transport.disconnecting
    request.finish()
    assert transport.value().startswith(b"HTTP/1.1 200")


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline() -> None:
    echo = Echo()
    clock, transport, channel = connect(echo, timeout=20.0)
    for _ in range(5):
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n")
        clock.advance(15)
        channel.dataReceived(b"ok")
        clock.advance(15)
    assert not transport.disconnecting and echo.bodies == [b"ok"] * 5


def test_an_idle_kept_alive_connection_is_closed_after_the_client_timeout() -> None:
    clock, transport, channel = connect(Echo(), timeout=20.0)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200")
    clock.advance(19)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
