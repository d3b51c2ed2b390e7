"""
Worker host names are resolved at registration and at every connection, and
no address urls.py blocks is ever registered or connected to (a fake
resolver: no DNS).
"""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from tests.support.deferreds import failure_result_of, success_result_of
from tests.support.fleet import Fleet, RouterHarness
from tests.support.resolvers import FakeResolver
from twisted_router.config import RouterConfig
from twisted_router.endpoints import WorkerEndpoints
from twisted_router.resolution import BlockedAddress, check_worker_host
from twisted_router.service import _StartupWorkers, build_router
from twisted_router.urls import (
    BlockedWorkerURL,
    WorkerURLError,
    address_blocked_reason,
    host_name_of,
)

METADATA = "169.254.169.254"


# ---------------------------------------------------------------- pure parts (urls.py)


@pytest.mark.parametrize(
    "address",
    [METADATA, "fe80::1%eth0", "::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe", "0.0.0.0",
     "fd00:ec2::254", "224.0.0.1", "not-an-address"],
)
def test_resolved_blocked_addresses_are_refused(address: str) -> None:
    assert address_blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.0.0.5", "192.168.1.2", "fc00::5"])
def test_resolved_worker_addresses_are_allowed(address: str) -> None:
    assert address_blocked_reason(address) is None


def test_only_host_names_are_resolved() -> None:
    assert host_name_of("http://gpu-node-1:30000") == ("gpu-node-1", 30000)
    assert host_name_of("http://10.0.0.1:30000") is None
    assert host_name_of("http://[::1]:30000") is None


# ---------------------------------------------------------------- registration


def check(url: str, resolver: FakeResolver, clock: Clock | None = None) -> Deferred[None]:
    return Deferred.fromCoroutine(check_worker_host(url, resolver, clock or Clock(), timeout=10))


def test_a_name_resolving_to_any_blocked_address_is_refused() -> None:
    resolver = FakeResolver({"evil.example": ["10.0.0.5", METADATA]})
    failure = failure_result_of(check("http://evil.example:80", resolver), BlockedWorkerURL)
    assert "blocked" in str(failure.value) and METADATA in str(failure.value)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    failure = failure_result_of(check("http://nowhere.example:80", FakeResolver()), WorkerURLError)
    assert "does not resolve" in str(failure.value)


def test_resolution_has_a_timeout() -> None:
    clock = Clock()
    d = check("http://slow.example:80", FakeResolver(hanging=["slow.example"]), clock)
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.2)
    failure = failure_result_of(d, WorkerURLError)
    assert "did not resolve within 10s" in str(failure.value)


def test_ip_literals_are_never_resolved() -> None:
    resolver = FakeResolver()
    success_result_of(check("http://10.0.0.5:80", resolver))
    success_result_of(check("http://[::1]:80", resolver))
    assert resolver.asked == []


def test_localhost_is_allowed_as_its_loopback_addresses() -> None:
    success_result_of(check("http://localhost:80", FakeResolver({"localhost": ["127.0.0.1", "::1"]})))


def harness(resolver: FakeResolver) -> tuple[RouterHarness, str]:
    fleet = Fleet()
    url, _ = fleet.add("gpu-node-1", port=8000)
    return RouterHarness(fleet, resolver=resolver), url


@pytest.mark.parametrize("route", ["/workers", "/add_worker"])
def test_post_workers_refuses_a_name_resolving_to_metadata_and_registers_nothing(route: str) -> None:
    resolver = FakeResolver({"gpu-node-1": [METADATA]})
    h, url = harness(resolver)
    code, body = h.json("POST", f"{route}?url={url}")
    assert code == 400 and "blocked" in body["error"] and METADATA in body["error"]
    assert len(h.pool) == 0 and resolver.asked == ["gpu-node-1"]


def test_post_workers_refuses_an_unresolvable_name_with_400() -> None:
    h, url = harness(FakeResolver())
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 400 and "does not resolve" in body["error"]
    assert len(h.pool) == 0


def test_post_workers_accepts_a_name_resolving_to_allowed_addresses() -> None:
    h, url = harness(FakeResolver({"gpu-node-1": ["10.0.0.5", "fc00::5"]}))
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 200 and body["worker"]["url"] == url
    assert len(h.pool) == 1


def test_a_registered_worker_is_not_resolved_again_on_re_registration() -> None:
    resolver = FakeResolver({"gpu-node-1": ["10.0.0.5"]})
    h, url = harness(resolver)
    assert h.json("POST", "/workers", json={"url": url})[0] == 200
    assert h.json("POST", "/workers", json={"url": url})[0] == 200
    assert resolver.asked == ["gpu-node-1"]


def test_worker_urls_at_start_up_are_resolved_and_blocked_ones_skipped() -> None:
    fleet = Fleet()
    bad, _ = fleet.add("evil", port=8000)
    good, _ = fleet.add("gpu-node-1", port=8001)
    resolver = FakeResolver({"evil": [METADATA], "gpu-node-1": ["10.0.0.5"]})
    h = RouterHarness(fleet, resolver=resolver, worker_urls=(bad, good))
    service = _StartupWorkers(h.parts)
    with capturedLogs() as events:
        service.startService()
        h.pump()
    assert [w.url for w in h.pool.workers()] == [good]
    assert any("cannot register worker" in formatEvent(e) and "blocked" in formatEvent(e) for e in events)
    service.stopService()


def test_a_launched_worker_whose_name_is_blocked_is_not_registered() -> None:
    h, url = harness(FakeResolver({"gpu-node-1": [METADATA]}))
    d = Deferred.fromCoroutine(h.parts.fleet.worker_ready(url))
    h.pump()
    failure_result_of(d, BlockedWorkerURL)
    assert len(h.pool) == 0


# ---------------------------------------------------------------- connecting (DNS rebinding)


def connect(resolver: FakeResolver, url: bytes) -> tuple[MemoryReactorClock, Deferred[object]]:
    reactor = MemoryReactorClock()
    endpoint = WorkerEndpoints(reactor, connect_timeout=2.5, resolver=resolver).endpointForURI(URI.fromBytes(url))
    d: Deferred[object] = endpoint.connect(Factory.forProtocol(Protocol))  # type: ignore[assignment]
    return reactor, d


def test_connecting_drops_blocked_addresses() -> None:
    reactor, _ = connect(FakeResolver({"w.example": [METADATA, "10.0.0.5"]}), b"http://w.example:8000/")
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("10.0.0.5", 8000)]


def test_connecting_fails_naming_the_cause_when_every_address_is_blocked() -> None:
    reactor, d = connect(FakeResolver({"w.example": [METADATA, "fe80::1"]}), b"http://w.example:8000/")
    failure = failure_result_of(d, BlockedAddress)
    assert reactor.tcpClients == []
    assert str(failure.value).startswith("w.example resolves only to blocked addresses (169.254.169.254 is a link-local")


def test_connecting_to_a_name_that_does_not_resolve_is_a_plain_dns_failure() -> None:
    _, d = connect(FakeResolver(), b"http://w.example:8000/")
    failure = failure_result_of(d, DNSLookupError)
    assert not isinstance(failure.value, BlockedAddress)


def test_a_rebound_name_answers_502_naming_the_blocked_address() -> None:
    """Registered while it resolved to a worker; now it resolves to metadata: no connection, a 502 that says why."""
    resolver = FakeResolver({"gpu-node-1": ["10.0.0.5"]})
    reactor = MemoryReactorClock()
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent: IAgent = Agent.usingEndpointFactory(
        reactor, WorkerEndpoints(reactor, connect_timeout=2.5, resolver=resolver), pool=pool
    )
    parts = build_router(RouterConfig(), reactor, agent=agent, resolver=resolver)
    success_result_of(Deferred.fromCoroutine(parts.fleet.register("http://gpu-node-1:8000")))
    resolver.answers["gpu-node-1"] = [METADATA]
    client = StubTreq(parts.router.app.resource())
    d = client.post("http://router/v1/images/generations", json={"prompt": "x"})
    client.flush()
    response = success_result_of(d)
    body = client.content(response)
    client.flush()
    assert response.code == 502
    error = json.loads(success_result_of(body))["error"]
    assert "resolves only to blocked addresses" in error and METADATA in error
    assert reactor.tcpClients == []
    assert all(w.active_requests == 0 for w in parts.pool.workers())
