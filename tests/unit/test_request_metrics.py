"""
Request metrics after a scripted in-memory workload through the router's
real Site: counts, and histogram counts, sums and buckets checked exactly
(the fleet's fake clock makes every duration exact).
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.web.server import Request

from tests.support.site import site_router as router
from twisted_router.metrics import LATENCY_BUCKETS, WORKER_STATES, RouterMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
IMAGES = "/v1/images/generations"


def scrape(metrics: RouterMetrics) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def workers_named(samples: Samples) -> set[str]:
    return {dict(labels).get("worker", "") for _, labels in samples} - {""}


def test_a_generation_is_counted_with_exact_latency_ttfb_and_bytes() -> None:
    h, urls, workers = router(1)
    workers[0].hold(b"POST", IMAGES.encode())
    channel_out = h.open(b"POST " + IMAGES.encode() + b' HTTP/1.1\r\nHost: r\r\nContent-Length: 11\r\n\r\n{"p":"cat"}')
    assert len(workers[0].held) == 1
    h.clock.advance(2.0)
    held: Request = workers[0].held[0]
    held.setHeader(b"content-type", b"application/json")
    held.write(b"0123456789")  # the response headers leave now: time to first byte 2 s
    h.pump()
    h.clock.advance(1.5)
    held.write(b"abcde")
    held.finish()
    h.pump()
    assert channel_out.value().startswith(b"HTTP/1.1 200")

    samples = scrape(h.parts.router.metrics)
    w0 = urls[0]
    assert value(samples, "sglang_router_requests_total", route=IMAGES, method="POST", status="200", worker=w0) == 1
    duration = "sglang_router_request_duration_seconds"
    assert value(samples, duration + "_count", route=IMAGES, method="POST", worker=w0) == 1
    assert value(samples, duration + "_sum", route=IMAGES, method="POST", worker=w0) == 3.5
    for bound in LATENCY_BUCKETS:
        le = repr(float(bound))
        expected = 1 if bound >= 3.5 else 0
        assert value(samples, duration + "_bucket", route=IMAGES, method="POST", worker=w0, le=le) == expected, bound
    ttfb = "sglang_router_time_to_first_byte_seconds"
    assert value(samples, ttfb + "_count", route=IMAGES, worker=w0) == 1
    assert value(samples, ttfb + "_sum", route=IMAGES, worker=w0) == 2.0
    assert value(samples, ttfb + "_bucket", route=IMAGES, worker=w0, le="1.0") == 0
    assert value(samples, ttfb + "_bucket", route=IMAGES, worker=w0, le="2.5") == 1
    assert value(samples, "sglang_router_request_body_bytes_total", route=IMAGES, worker=w0) == 11
    assert value(samples, "sglang_router_response_body_bytes_total", route=IMAGES, worker=w0) == 15


def test_routes_are_templates_and_router_answers_have_no_worker() -> None:
    h, urls, _ = router(2, max_request_body=64)
    assert h.send("GET", "/health").status == 200
    for unknown in ("a", "b", "c"):
        assert h.send("GET", f"/workers/{unknown}").status == 404
    assert h.send("POST", IMAGES, body=b"x" * 65).status == 413
    # Three image ids, one series: ids never become label values.
    for image in ("img-1", "img-2"):
        h.send("GET", f"/v1/images/{image}/content")

    samples = scrape(h.parts.router.metrics)
    requests = "sglang_router_requests_total"
    assert value(samples, requests, route="/health", method="GET", status="200", worker="none") == 1
    assert value(samples, requests, route="/workers/<path:worker_key>", method="GET", status="404", worker="none") == 3
    assert value(samples, requests, route="none", method="POST", status="413", worker="none") == 1
    routes = {dict(labels).get("route") for name, labels in samples if name == requests}
    assert routes == {"/health", "/workers/<path:worker_key>", "none", "/v1/images/<image_id>/content"}


def test_a_request_cut_by_the_client_timeout_is_counted_408() -> None:
    h, _, _ = router(1, client_timeout=20.0)
    h.open(b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: r\r\nContent-Length: 10\r\n\r\nhello")
    h.open(b"GET /hea")  # not even its request line
    h.clock.advance(20)
    samples = scrape(h.parts.router.metrics)
    assert value(samples, "sglang_router_requests_total", route="none", method="other", status="408", worker="none") == 2
    duration = "sglang_router_request_duration_seconds_sum"
    assert value(samples, duration, route="none", method="other", worker="none") == 40.0


def test_hostile_methods_share_one_label() -> None:
    h, _, _ = router(1)
    h.send("BREW", "/health")
    h.send("PROPFIND", "/health")
    samples = scrape(h.parts.router.metrics)
    methods = {dict(labels)["method"] for name, labels in samples if name == "sglang_router_requests_total"}
    assert methods == {"other"}
    # Nor do they grow the cache of bound children: one entry for every unknown method.
    for i in range(50):
        h.send(f"X{i}", "/health")
    assert len(h.parts.router.metrics.events._bound) == 1


def test_failover_retry_and_quarantine_are_counted() -> None:
    h, urls, _ = router(2)
    h.fleet.down.add(urls[0].removeprefix("http://"))
    answer = h.send("POST", IMAGES, body=b"{}")
    assert answer.status == 200
    samples = scrape(h.parts.router.metrics)
    w0, w1 = urls
    assert value(samples, "sglang_router_retries_total", worker=w0, reason="unreachable") == 1
    assert value(samples, "sglang_router_failovers_total", worker=w1) == 1
    assert value(samples, "sglang_router_quarantines_total", worker=w0) == 1
    assert value(samples, "sglang_router_requests_total", route=IMAGES, method="POST", status="200", worker=w1) == 1
    assert value(samples, "sglang_router_worker_state", worker=w0, state="dead") == 1
    assert value(samples, "sglang_router_worker_state", worker=w1, state="ready") == 1
    assert sum(value(samples, "sglang_router_worker_state", worker=w0, state=s) for s in WORKER_STATES) == 1


def test_probe_failures_are_counted_per_worker() -> None:
    h, urls, workers = router(2, health_check_failure_threshold=5)
    workers[1].health_status = 500
    h.parts.health.check_all()
    h.pump()
    for _ in range(2):  # a suspect worker is probed every second
        h.clock.advance(1.0)
        h.parts.health.check_suspects()
        h.pump()
    samples = scrape(h.parts.router.metrics)
    assert value(samples, "sglang_router_health_probe_failures_total", worker=urls[1]) == 3
    assert ("sglang_router_health_probe_failures_total", (("worker", urls[0]),)) not in samples
    assert value(samples, "sglang_router_worker_state", worker=urls[1], state="suspect") == 1


def test_broadcasts_are_counted_with_their_duration() -> None:
    h, _, workers = router(2)
    for worker in workers:
        worker.hold(b"POST", b"/update_weights_from_disk")
    body = json.dumps({"model_path": "/ckpt/2"}).encode()
    transport = h.open(
        b"POST /update_weights_from_disk HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    samples = scrape(h.parts.router.metrics)
    updating = [k for k in samples if k[0] == "sglang_router_worker_state" and ("state", "updating") in k[1]]
    assert [samples[k] for k in updating] == [1, 1]
    h.clock.advance(4.0)
    for worker in workers:
        held = worker.held.pop()
        held.setHeader(b"content-type", b"application/json")
        held.write(b'{"success": true, "message": "ok"}')
        held.finish()
    h.pump()
    assert transport.value().startswith(b"HTTP/1.1 200")
    h.send("POST", "/release_memory_occupation", body=b"{}")
    h.send("POST", "/release_memory_occupation", body=b"{}")  # all asleep already: nothing to do

    samples = scrape(h.parts.router.metrics)
    assert value(samples, "sglang_router_broadcasts_total", operation="refit", outcome="success") == 1
    assert value(samples, "sglang_router_broadcast_duration_seconds_sum", operation="refit") == 4.0
    assert value(samples, "sglang_router_broadcasts_total", operation="sleep", outcome="success") == 1
    assert value(samples, "sglang_router_broadcasts_total", operation="sleep", outcome="noop") == 1
    assert value(samples, "sglang_router_broadcast_duration_seconds_count", operation="sleep") == 2
    assert value(samples, "sglang_router_fleet_weight_version_info", version="1") == 1
    for worker in workers:
        url = f"http://{worker.name}:{8000 + int(worker.name[1:])}"
        assert value(samples, "sglang_router_worker_weight_version_info", worker=url, version="1") == 1
        assert value(samples, "sglang_router_worker_state", worker=url, state="sleeping") == 1


def test_queue_wait_is_observed_per_worker() -> None:
    h, urls, workers = router(1, max_inflight_per_worker=1)
    workers[0].hold(b"POST", IMAGES.encode())
    raw = b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}"
    first = h.open(raw)
    second = h.open(raw)
    samples = scrape(h.parts.router.metrics)
    assert samples[("sglang_router_queued_requests", ())] == 1
    h.clock.advance(5.0)
    samples = scrape(h.parts.router.metrics)
    assert samples[("sglang_router_oldest_queued_wait_seconds", ())] == 5.0
    for _ in range(2):
        held = workers[0].held.pop()
        held.write(b"{}")
        held.finish()
        h.pump()
    assert first.value().startswith(b"HTTP/1.1 200") and second.value().startswith(b"HTTP/1.1 200")
    samples = scrape(h.parts.router.metrics)
    assert value(samples, "sglang_router_queue_wait_seconds_count", worker=urls[0]) == 1
    assert value(samples, "sglang_router_queue_wait_seconds_sum", worker=urls[0]) == 5.0
    assert samples[("sglang_router_queued_requests", ())] == 0


def test_a_removed_workers_series_disappear() -> None:
    h, urls, _ = router(2)
    h.fleet.down.add(urls[0].removeprefix("http://"))
    h.send("POST", IMAGES, body=b"{}")
    h.send("POST", IMAGES, body=b"{}")
    assert workers_named(scrape(h.parts.router.metrics)) == {urls[0], urls[1]}
    for url in urls:
        assert h.send("DELETE", "/workers/" + url.removeprefix("http://")).status == 200
    samples = scrape(h.parts.router.metrics)
    assert workers_named(samples) == {"none"}
    # Removed while nothing was in flight: nothing re-creates them.
    assert not [k for k in samples if "w0" in str(k) or "w1" in str(k)]


def test_scrape_sees_predicted_work_and_speed() -> None:
    h, urls, workers = router(1, routing_algorithm="least-work")
    workers[0].hold(b"POST", IMAGES.encode())
    body = json.dumps({"prompt": "cat", "size": "1024x1024", "num_inference_steps": 10}).encode()
    h.open(b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    samples = scrape(h.parts.router.metrics)
    worker = h.pool.workers()[0]
    assert worker.predicted_work > 0
    assert value(samples, "sglang_router_worker_predicted_work_units", worker=urls[0]) == worker.predicted_work
    assert value(samples, "sglang_router_worker_speed_units_per_second", worker=urls[0]) == (
        worker.speed.units_per_second
    )
    assert value(samples, "sglang_router_worker_active_requests", worker=urls[0]) == 1


def test_a_hung_worker_is_a_hung_retry_and_a_failover() -> None:
    h, urls, workers = router(2, timeout=5.0)
    workers[0].hold(b"POST", IMAGES.encode())
    workers[0].health_status = 500  # the probe after the timeout fails: quarantined, retried on w1
    transport = h.open(b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
    h.clock.advance(5.0)
    h.pump()
    assert transport.value().startswith(b"HTTP/1.1 200")
    samples = scrape(h.parts.router.metrics)
    assert value(samples, "sglang_router_retries_total", worker=urls[0], reason="hung") == 1
    assert value(samples, "sglang_router_failovers_total", worker=urls[1]) == 1
    assert value(samples, "sglang_router_quarantines_total", worker=urls[0]) == 1
    assert value(samples, "sglang_router_health_probe_failures_total", worker=urls[0]) == 1
    # The whole exchange, wait included, is on the worker that answered.
    duration = "sglang_router_request_duration_seconds_sum"
    assert value(samples, duration, route=IMAGES, method="POST", worker=urls[1]) == 5.0
