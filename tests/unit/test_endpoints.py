"""Worker endpoints are built once per worker, with the cheapest endpoint type that fits."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI

from twisted_router.endpoints import WorkerEndpoints
from twisted_router.resolution import CheckedEndpoint


def endpoints() -> WorkerEndpoints:
    return WorkerEndpoints(MemoryReactorClock(), connect_timeout=2.5)


def test_one_endpoint_per_worker_reused_across_requests() -> None:
    factory = endpoints()
    first = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/v1/images/generations"))
    again = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/health"))
    other = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30002/health"))
    assert first is again and first is not other


def test_ip_literals_skip_name_resolution() -> None:
    factory = endpoints()
    v4 = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/"))
    v6 = factory.endpointForURI(URI.fromBytes(b"http://[::1]:30000/"))
    named = factory.endpointForURI(URI.fromBytes(b"http://gpu-node-1:30000/"))
    assert isinstance(v4, TCP4ClientEndpoint) and isinstance(v6, TCP6ClientEndpoint)
    assert isinstance(named, CheckedEndpoint)  # a HostnameEndpoint whose resolver drops blocked addresses


def test_connect_uses_the_configured_timeout() -> None:
    reactor = MemoryReactorClock()
    factory = WorkerEndpoints(reactor, connect_timeout=2.5)
    factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/")).connect(Factory.forProtocol(Protocol))
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("10.0.0.1", 30000, 2.5)


def test_https_workers_get_tls() -> None:
    factory = endpoints()
    plain = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/"))
    tls = factory.endpointForURI(URI.fromBytes(b"https://10.0.0.1:30000/"))
    assert tls is not plain and not isinstance(tls, TCP4ClientEndpoint)


def test_quiet_endpoints_connect_factories_that_do_not_log_their_start() -> None:
    reactor = MemoryReactorClock()
    factory = WorkerEndpoints(reactor, connect_timeout=2.5, quiet=True)
    endpoint = factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/"))
    assert factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:30000/health")) is endpoint
    client = Factory.forProtocol(Protocol)
    endpoint.connect(client)
    assert client.noisy is False
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("10.0.0.1", 30000, 2.5)
