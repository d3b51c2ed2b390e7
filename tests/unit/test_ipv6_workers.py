"""IPv6 worker URLs: a worker at C{http://[::1]:PORT} is reachable for every kind of call."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from tests.support.fleet import Fleet, RouterHarness
from twisted_router.upstream import make_http_client


@implementer(IAgent)
class RecordingAgent:
    def __init__(self) -> None:
        self.uris: list[bytes] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        self.uris.append(uri)
        return Deferred()  # never answered: only the URI matters here


def test_buffered_calls_pass_ipv6_literals_through_unchanged() -> None:
    # treq's own URL handling IDNA-encodes the host, which fails on '::1'.
    agent = RecordingAgent()
    http = make_http_client(agent)  # type: ignore[arg-type]
    http.get("http://[::1]:31401/v1/videos/a%20b?x=1")
    http.request("POST", "http://[2001:db8::5]:30000/update_weights_from_disk", data=b"{}")
    assert agent.uris == [
        b"http://[::1]:31401/v1/videos/a%20b?x=1",
        b"http://[2001:db8::5]:30000/update_weights_from_disk",
    ]


def ipv6_router() -> tuple[RouterHarness, str]:
    fleet = Fleet()
    harness = RouterHarness(fleet)
    url, _ = fleet.add("[::1]", port=31401)
    harness.register(url)
    return harness, url


def test_ipv6_worker_comes_up_and_serves() -> None:
    harness, url = ipv6_router()
    code, body = harness.json("GET", "/workers")
    assert code == 200
    [worker] = body["workers"]
    assert (worker["url"], worker["state"], worker["task_type"]) == ("http://[::1]:31401", "ready", "T2I")
    code, _, response = harness.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 200
    assert response.headers.getRawHeaders(b"x-worker-id") == [b"[::1]"]


def test_ipv6_worker_is_refitted_not_quarantined() -> None:
    harness, url = ipv6_router()
    code, body = harness.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert code == 200, body
    assert [r["worker_url"] for r in body["results"]] == [url]
    code, body = harness.json("GET", "/workers")
    [worker] = body["workers"]
    assert (worker["state"], worker["weight_version"]) == ("ready", "1")


def test_ipv6_worker_answers_health_probes() -> None:
    harness, _ = ipv6_router()
    harness.parts.health.startService()
    try:
        for _ in range(3):
            harness.clock.advance(harness.config.health_check_interval)
            harness.pump()
        [worker] = harness.pool.workers()
        assert (worker.is_dead, worker.consecutive_failures) == (False, 0)
        assert worker.payload()["last_probe_ok_at"] is not None
    finally:
        harness.parts.health.stopService()
