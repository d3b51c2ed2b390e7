"""Tests for L{twisted_router.metrics}: Prometheus series read from the pool at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from twisted_router.metrics import CONTENT_TYPE, RouterMetrics
from twisted_router.pool import WorkerPool

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"
C = "http://10.0.0.3:30000"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: RouterMetrics) -> Samples:
    """Parse the exposition text into C{(sample name, sorted labels) -> value}."""
    text = metrics.render()
    assert isinstance(text, bytes)
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def worker_value(samples: Samples, name: str, url: str) -> float:
    return samples[(name, (("worker", url),))]


def fleet_value(samples: Samples, state: str) -> float:
    return samples[("sglang_router_workers", (("state", state),))]


def build_pool() -> WorkerPool:
    """A busy, a dead and a sleeping worker, with distinct counters."""
    pool = WorkerPool(now=lambda: 0.0)
    a, _ = pool.add(A)
    b, _ = pool.add(B)
    c, _ = pool.add(C)
    # A: two requests in flight, five dispatched in total, one failed.
    leases = [pool.lease(a) for _ in range(5)]
    for lease in leases:
        lease.__enter__()
    for lease in leases[:3]:
        lease.release()
    pool.record_request_failure(a, "connection refused")
    # B: quarantined after failed probes.
    for _ in range(3):
        pool.record_probe_failure(b, "timed out", threshold=3)
    # C: asleep, one failed probe (counted, not quarantined).
    pool.set_sleeping(c, True)
    pool.record_probe_failure(c, "timed out", threshold=3)
    return pool


def test_per_worker_series() -> None:
    samples = scrape(RouterMetrics(build_pool()))
    expected = {
        "sglang_router_worker_active_requests": {A: 2, B: 0, C: 0},
        "sglang_router_worker_routable": {A: 1, B: 0, C: 0},
        "sglang_router_worker_dead": {A: 0, B: 1, C: 0},
        "sglang_router_worker_sleeping": {A: 0, B: 0, C: 1},
        "sglang_router_worker_consecutive_health_failures": {A: 0, B: 3, C: 1},
        "sglang_router_worker_requests_total": {A: 5, B: 0, C: 0},
        "sglang_router_worker_failed_requests_total": {A: 1, B: 0, C: 0},
    }
    for name, per_worker in expected.items():
        for url, value in per_worker.items():
            assert worker_value(samples, name, url) == value, (name, url)


def test_fleet_series() -> None:
    samples = scrape(RouterMetrics(build_pool()))
    assert fleet_value(samples, "total") == 3
    assert fleet_value(samples, "routable") == 1
    assert fleet_value(samples, "dead") == 1
    assert fleet_value(samples, "sleeping") == 1


def test_counters_and_gauges_are_typed() -> None:
    text = RouterMetrics(build_pool()).render().decode()
    assert "# TYPE sglang_router_worker_requests_total counter" in text
    assert "# TYPE sglang_router_worker_failed_requests_total counter" in text
    assert "# TYPE sglang_router_worker_active_requests gauge" in text
    assert "# TYPE sglang_router_workers gauge" in text


def test_series_are_read_at_scrape_time() -> None:
    pool = WorkerPool(now=lambda: 0.0)
    metrics = RouterMetrics(pool)
    samples = scrape(metrics)
    assert fleet_value(samples, "total") == 0
    assert not [k for k in samples if k[0] == "sglang_router_worker_active_requests"]

    worker, _ = pool.add(A)
    with pool.lease(worker):
        during = scrape(metrics)
    after = scrape(metrics)
    assert worker_value(during, "sglang_router_worker_active_requests", A) == 1
    assert worker_value(after, "sglang_router_worker_active_requests", A) == 0
    assert worker_value(after, "sglang_router_worker_requests_total", A) == 1
    assert fleet_value(after, "total") == 1


def test_removed_workers_disappear() -> None:
    pool = WorkerPool(now=lambda: 0.0)
    pool.add(A)
    pool.add(B)
    metrics = RouterMetrics(pool)
    pool.remove(A)
    samples = scrape(metrics)
    assert ("sglang_router_worker_dead", (("worker", A),)) not in samples
    assert worker_value(samples, "sglang_router_worker_dead", B) == 0
    assert fleet_value(samples, "total") == 1


def test_two_routers_do_not_share_series() -> None:
    first_pool = WorkerPool(now=lambda: 0.0)
    second_pool = WorkerPool(now=lambda: 0.0)
    first_pool.add(A)
    second_pool.add(B)
    second_pool.add(C)
    first = RouterMetrics(first_pool)
    second = RouterMetrics(second_pool)
    assert first.registry is not second.registry

    first_samples = scrape(first)
    second_samples = scrape(second)
    assert fleet_value(first_samples, "total") == 1
    assert fleet_value(second_samples, "total") == 2
    first_workers = {dict(k[1]).get("worker") for k in first_samples} - {None}
    second_workers = {dict(k[1]).get("worker") for k in second_samples} - {None}
    assert first_workers == {A}
    assert second_workers == {B, C}


def test_metrics_on_the_same_pool_can_coexist() -> None:
    pool = build_pool()
    assert scrape(RouterMetrics(pool)) == scrape(RouterMetrics(pool))


def test_content_type_is_the_prometheus_text_format() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
