"""Tests for L{twisted_router.listener}: a listening-port service that says where it listens."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from tests.support.deferreds import (
    assert_no_result,
    failure_result_of,
    success_result_of,
)
from twisted_router.listener import ListenerService, describe_address


class FakePort:
    def __init__(self, address: Any, stop_result: Deferred[None] | None = None) -> None:
        self._address = address
        self._stop_result = stop_result
        self.stopped = 0

    def getHost(self) -> Any:
        return self._address

    def stopListening(self) -> Deferred[None] | None:
        self.stopped += 1
        return self._stop_result


class FakeEndpoint:
    """An endpoint whose C{listen} answers with a Deferred the test controls."""

    def __init__(self, result: Deferred[Any] | None = None) -> None:
        self.result: Deferred[Any] = result if result is not None else Deferred()
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return self.result


def make_service(endpoint: Any, **kwargs: Any) -> ListenerService:
    return ListenerService(endpoint, Factory(), name=kwargs.pop("name", "test-server"), **kwargs)


def messages(events: list[Any]) -> list[str]:
    return [formatEvent(e) for e in events]


# -- describe_address -------------------------------------------------------------


def test_describe_ipv4_address() -> None:
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 4321))
    assert describe_address(port) == "http://127.0.0.1:4321"  # type: ignore[arg-type]


def test_describe_ipv6_address_in_brackets() -> None:
    port = FakePort(IPv6Address("TCP", "::1", 4321))
    assert describe_address(port, "https") == "https://[::1]:4321"  # type: ignore[arg-type]


def test_describe_unix_address() -> None:
    """A UNIX port's address name is bytes (UNIXAddress encodes it); show it as a path."""
    port = FakePort(UNIXAddress("/tmp/router.sock"))
    assert describe_address(port) == "http+unix:///tmp/router.sock"  # type: ignore[arg-type]


# -- binding ----------------------------------------------------------------------


def test_logs_the_bound_address() -> None:
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 40123))
    service = make_service(FakeEndpoint(succeed(port)), name="sglang-d-router")
    with capturedLogs() as events:
        service.startService()
    listening = [m for m in messages(events) if "listening on" in m]
    assert listening == ["sglang-d-router listening on http://127.0.0.1:40123"]
    [event] = [e for e in events if "listening on" in formatEvent(e)]
    assert event["log_level"] == LogLevel.info


def test_logs_once_binding_completes_not_before() -> None:
    endpoint = FakeEndpoint()
    service = make_service(endpoint)
    with capturedLogs() as events:
        service.startService()
        assert not [m for m in messages(events) if "listening on" in m]
        endpoint.result.callback(FakePort(IPv4Address("TCP", "127.0.0.1", 5555)))
    assert [m for m in messages(events) if "listening on" in m] == [
        "test-server listening on http://127.0.0.1:5555"
    ]


def test_listens_with_the_given_factory() -> None:
    endpoint = FakeEndpoint(succeed(FakePort(IPv4Address("TCP", "127.0.0.1", 1))))
    factory = Factory()
    service = ListenerService(endpoint, factory, name="x")  # type: ignore[arg-type]
    assert endpoint.factories == []
    service.startService()
    assert endpoint.factories == [factory]
    assert service.running


def test_listens_on_a_memory_reactor_endpoint() -> None:
    reactor = MemoryReactorClock()
    factory = Factory()
    service = ListenerService(
        serverFromString(reactor, "tcp:30999:interface=127.0.0.1"), factory, name="x"
    )
    service.startService()
    assert [(p, f, i) for p, f, _b, i in reactor.tcpServers] == [(30999, factory, "127.0.0.1")]
    assert success_result_of(service.when_listening()).getHost().port == 30999


def test_when_listening_before_binding_fires_once_bound() -> None:
    endpoint = FakeEndpoint()
    service = make_service(endpoint)
    early = service.when_listening()
    service.startService()
    also_early = service.when_listening()
    assert_no_result(early)
    assert_no_result(also_early)
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 5556))
    endpoint.result.callback(port)
    assert success_result_of(early) is port
    assert success_result_of(also_early) is port


def test_when_listening_after_binding_fires_at_once() -> None:
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 5557))
    service = make_service(FakeEndpoint(succeed(port)))
    service.startService()
    assert success_result_of(service.when_listening()) is port
    assert success_result_of(service.when_listening()) is port


# -- failure --------------------------------------------------------------------


def test_failing_endpoint_calls_on_failure_and_fails_when_listening() -> None:
    reasons: list[Failure] = []
    endpoint = FakeEndpoint()
    service = make_service(endpoint, on_failure=reasons.append)
    early = service.when_listening()
    with capturedLogs() as events:
        service.startService()
        endpoint.result.errback(CannotListenError("127.0.0.1", 80, OSError("address in use")))
    assert len(reasons) == 1
    assert reasons[0].check(CannotListenError)
    failure_result_of(early, CannotListenError)
    failure_result_of(service.when_listening(), CannotListenError)
    critical = [e for e in events if e["log_level"] == LogLevel.critical]
    assert len(critical) == 1
    assert "test-server could not listen" in formatEvent(critical[0])
    assert "address in use" in formatEvent(critical[0])
    assert not [m for m in messages(events) if "listening on" in m]


def test_failing_endpoint_without_on_failure_still_fails_when_listening() -> None:
    service = make_service(FakeEndpoint(fail(CannotListenError("", 80, OSError("denied")))))
    with capturedLogs():
        service.startService()
    failure_result_of(service.when_listening(), CannotListenError)
    # Stopping a service that never bound is harmless.
    success_result_of(service.stopService())


# -- stopping -------------------------------------------------------------------


def test_stop_service_stops_listening_and_waits_for_it() -> None:
    stopped: Deferred[None] = Deferred()
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 5558), stop_result=stopped)
    service = make_service(FakeEndpoint(succeed(port)))
    service.startService()
    d = service.stopService()
    assert port.stopped == 1
    assert not service.running
    assert_no_result(d)
    stopped.callback(None)
    assert success_result_of(d) is None


def test_stop_service_accepts_a_port_whose_stop_listening_returns_none() -> None:
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 5559), stop_result=None)
    service = make_service(FakeEndpoint(succeed(port)))
    service.startService()
    assert success_result_of(service.stopService()) is None
    assert port.stopped == 1


def test_stop_service_twice_stops_the_port_once() -> None:
    port = FakePort(IPv4Address("TCP", "127.0.0.1", 5560), stop_result=succeed(None))
    service = make_service(FakeEndpoint(succeed(port)))
    service.startService()
    success_result_of(service.stopService())
    success_result_of(service.stopService())
    assert port.stopped == 1


@pytest.mark.parametrize("outcome", ["bound", "failed"])
def test_stop_before_binding_completes_leaves_no_port_listening(outcome: str) -> None:
    """
    A service stopped while its endpoint is still binding must not be left
    with a listening port once the bind completes.
    """
    endpoint = FakeEndpoint()
    service = make_service(endpoint)
    service.startService()
    waiting = service.when_listening()
    with capturedLogs():
        success_result_of(service.stopService())
        port = FakePort(IPv4Address("TCP", "127.0.0.1", 5561), stop_result=succeed(None))
        if outcome == "bound":
            endpoint.result.callback(port)
        else:
            endpoint.result.errback(CannotListenError("", 5561, OSError("in use")))
    if outcome == "bound":
        assert port.stopped == 1
    else:
        # Whoever waits still learns the outcome.
        failure_result_of(waiting, CannotListenError)
