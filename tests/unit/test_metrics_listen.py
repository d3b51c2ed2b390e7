"""C{--metrics-listen}: a second port serving C{/metrics} only, without keys, and stopped with the router."""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twisted_router.config import RouterConfig
from twisted_router.service import make_router_service
from twisted_router.site import RouterSite

KEY = "k" * 20


def exchange(site: RouterSite, raw: bytes) -> bytes:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    channel.connectionLost(Failure(ConnectionDone()))
    return transport.value()


def test_metrics_port_serves_metrics_without_keys_and_nothing_else() -> None:
    reactor = MemoryReactorClock()
    config = RouterConfig(
        host="127.0.0.1", port=30123, metrics_listen="tcp:9100:interface=127.0.0.1", api_key=KEY,
        worker_urls=("http://10.0.0.1:30000",),
    )
    service, _, _ = make_router_service(config, reactor)
    service.startService()
    (main_port, main_site, _, _), (port, site, _, interface) = reactor.tcpServers
    assert (main_port, port, interface) == (30123, 9100, "127.0.0.1")

    scraped = exchange(site, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    head, _, body = scraped.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=0.0.4" in head
    assert b'sglang_router_workers{state="total"} 1.0' in body
    assert b'sglang_router_worker_state{state="starting",worker="http://10.0.0.1:30000"} 1.0' in body

    assert exchange(site, b"GET /workers HTTP/1.1\r\nHost: m\r\n\r\n").startswith(b"HTTP/1.1 404")
    too_big = b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000
    assert exchange(site, too_big).startswith(b"HTTP/1.1 413")
    # The main port's /metrics still asks for the key.
    assert exchange(main_site, b"GET /metrics HTTP/1.1\r\nHost: r\r\n\r\n").startswith(b"HTTP/1.1 401")

    service.stopService()
    reactor.advance(200)
    assert not service.running


def test_every_other_answer_of_the_metrics_port_is_json() -> None:
    """Like the main port: a 404 (or 405) is C{{"error": ...}} as JSON, never Twisted's HTML page."""
    reactor = MemoryReactorClock()
    config = RouterConfig(host="127.0.0.1", port=30123, metrics_listen="tcp:9100:interface=127.0.0.1")
    service, _, _ = make_router_service(config, reactor)
    service.startService()
    site = reactor.tcpServers[1][1]
    for request, status in [
        (b"GET / HTTP/1.1", b"404"),
        (b"GET /workers HTTP/1.1", b"404"),
        (b"GET /metrics/extra HTTP/1.1", b"404"),
        (b"POST /nothing/here HTTP/1.1", b"404"),
        (b"DELETE /metrics HTTP/1.1", b"405"),
        (b"POST /metrics HTTP/1.1", b"405"),
    ]:
        head, _, body = exchange(site, request + b"\r\nHost: m\r\nContent-Length: 0\r\n\r\n").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), (request, head)
        assert b"\r\nContent-Type: application/json" in head, (request, head)
        answer = json.loads(body)
        assert set(answer) == {"error"} and "/metrics" in answer["error"], (request, answer)
        if status == b"405":
            assert b"\r\nAllow: GET, HEAD" in head
    head = exchange(site, b"HEAD /metrics HTTP/1.1\r\nHost: m\r\n\r\n").partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=0.0.4" in head
    service.stopService()
    reactor.advance(200)


def test_no_metrics_port_by_default() -> None:
    reactor = MemoryReactorClock()
    service, _, _ = make_router_service(RouterConfig(host="127.0.0.1", port=30123), reactor)
    service.startService()
    assert len(reactor.tcpServers) == 1
    assert "metrics" not in service.namedServices
