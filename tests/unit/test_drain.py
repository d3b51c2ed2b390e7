"""
Graceful shutdown on a fake clock: the router stops accepting, answers new
requests 503 (C{/health}: draining), waits for the requests in flight up to
the grace, cuts what is left, and only then stops its other services.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.support.deferreds import assert_no_result, success_result_of
from twisted_router import tap
from twisted_router.config import ConfigError, RouterConfig, config_from_args
from twisted_router.drain import DrainingService, InFlight
from twisted_router.site import RouterSite


class Slow(Resource):
    """Holds every request but C{/health} until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/health":
            return b'{"status": "healthy"}'
        self.held.append(request)
        return NOT_DONE_YET


class Recorder(Service):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def stopService(self) -> None:
        super().stopService()
        self.events.append("child stopped")


class Rig:
    def __init__(self, grace: float = 10.0) -> None:
        self.clock = Clock()
        self.resource = Slow()
        self.site = RouterSite(self.resource, access_log=False, reactor=self.clock, max_request_body=1 << 20)
        self.events: list[str] = []
        self.service = DrainingService(
            in_flight=self.site.in_flight,
            set_draining=self.site.set_draining,
            stop_accepting=self._stop_accepting,
            grace=grace,
            clock=self.clock,
        )
        Recorder(self.events).setServiceParent(self.service)
        self.service.startService()

    def _stop_accepting(self) -> None:
        self.events.append("stopped accepting")

    def connect(self) -> StringTransportWithDisconnection:
        channel = self.site.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = channel
        channel.makeConnection(transport)
        return transport

    def send(self, transport: StringTransportWithDisconnection, target: bytes) -> None:
        transport.protocol.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: router\r\n\r\n")


def finish(request: Request, body: bytes = b"done") -> None:
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def answer_of(transport: StringTransportWithDisconnection) -> tuple[int, bytes, Any]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), json.loads(body) if b"application/json" in head.lower() else body


def test_in_flight_requests_finish_before_anything_else_stops() -> None:
    rig = Rig()
    first, second, idle = rig.connect(), rig.connect(), rig.connect()
    rig.send(first, b"/v1/images/generations")
    rig.send(second, b"/v1/diffusion/generate")
    assert len(rig.site.in_flight) == 2

    stopping = rig.service.stopService()
    assert rig.events == ["stopped accepting"]
    assert_no_result(stopping)

    # A new request on a connection that was already open: 503, and the connection closes.
    rig.send(idle, b"/v1/images/generations")
    code, head, body = answer_of(idle)
    assert code == 503 and b"connection: close" in head
    assert "shutting down" in body["error"]
    assert len(rig.resource.held) == 2  # it never reached a route

    health = rig.connect()
    rig.send(health, b"/health")
    code, _, body = answer_of(health)
    assert (code, body) == (503, {"status": "draining", "in_flight": 2})

    finish(rig.resource.held[0])
    rig.clock.advance(5)
    assert_no_result(stopping)
    assert rig.events == ["stopped accepting"]
    finish(rig.resource.held[1])
    success_result_of(stopping)
    assert rig.events == ["stopped accepting", "child stopped"]
    for transport in (first, second):
        assert transport.value().startswith(b"HTTP/1.1 200") and transport.value().endswith(b"done")
        assert transport.connected  # finished, not cut


def test_grace_expiry_cuts_what_is_left_then_stops() -> None:
    rig = Rig(grace=10)
    quick, slow = rig.connect(), rig.connect()
    rig.send(quick, b"/a")
    rig.send(slow, b"/b")
    stopping = rig.service.stopService()
    finish(rig.resource.held[0])
    rig.clock.advance(9.9)
    assert_no_result(stopping)
    rig.clock.advance(0.1)
    success_result_of(stopping)
    assert rig.events == ["stopped accepting", "child stopped"]
    assert quick.connected and quick.value().endswith(b"done")
    assert not slow.connected and slow.value() == b""  # cut: no partial answer posing as whole
    assert len(rig.site.in_flight) == 0


def test_no_request_in_flight_stops_at_once() -> None:
    rig = Rig()
    success_result_of(rig.service.stopService())
    assert rig.events == ["stopped accepting", "child stopped"]


def test_zero_grace_cuts_at_once() -> None:
    rig = Rig(grace=0)
    held = rig.connect()
    rig.send(held, b"/a")
    stopping = rig.service.stopService()
    rig.clock.advance(0)
    success_result_of(stopping)
    assert not held.connected


def test_stopping_twice_drains_once_and_a_restart_serves_again() -> None:
    rig = Rig()
    held = rig.connect()
    rig.send(held, b"/a")
    first = rig.service.stopService()
    again = rig.service.stopService()
    assert rig.events == ["stopped accepting"]
    finish(rig.resource.held[0])
    success_result_of(first)
    success_result_of(again)
    assert rig.events == ["stopped accepting", "child stopped"]
    rig.service.startService()
    fresh = rig.connect()
    rig.send(fresh, b"/health")
    assert answer_of(fresh)[0] == 200


def test_in_flight_forgets_requests_whose_client_went_away() -> None:
    rig = Rig()
    gone = rig.connect()
    rig.send(gone, b"/a")
    assert len(rig.site.in_flight) == 1
    gone.loseConnection()
    assert len(rig.site.in_flight) == 0
    success_result_of(rig.site.in_flight.idle())
    success_result_of(InFlight().idle())  # nothing ever in flight: idle at once


def test_waiting_for_idle_can_be_cancelled() -> None:
    rig = Rig()
    rig.send(rig.connect(), b"/a")
    d: Deferred[None] = rig.site.in_flight.idle()
    d.cancel()
    d.addErrback(lambda _: None)
    finish(rig.resource.held[0])  # nothing left waiting: no error
    assert len(rig.site.in_flight) == 0


# ---------------------------------------------------------------- the option


def test_shutdown_grace_option() -> None:
    assert RouterConfig().shutdown_grace == 180.0
    assert config_from_args(["--shutdown-grace", "2.5"]).shutdown_grace == 2.5
    assert config_from_args(["--shutdown-grace", "0"]).shutdown_grace == 0.0
    options = tap.Options()
    options.parseOptions(["--shutdown-grace", "7"])
    assert options.config.shutdown_grace == 7.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_shutdown_grace_must_be_a_finite_non_negative_number(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config_from_args(["--shutdown-grace", value])
    assert "--shutdown-grace" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--shutdown-grace"):
        RouterConfig(shutdown_grace=float(value))
