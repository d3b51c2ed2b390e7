"""
Prometheus metrics, read from the pool at scrape time.

Every figure is derived from state the router keeps anyway (in-flight counts,
request and failure totals, quarantine and sleep flags), so serving metrics
adds no work to the request path: the collector walks the pool only when
C{/metrics} is scraped. Each router has its own registry, so two routers in
one process (tests) never share series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twisted_router.pool import WorkerPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PoolCollector(Collector):
    """Per-worker and fleet series from a L{WorkerPool}."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        labels = ["worker"]
        active = GaugeMetricFamily(
            "sglang_router_worker_active_requests", "Requests in flight on the worker", labels=labels
        )
        up = GaugeMetricFamily(
            "sglang_router_worker_routable", "1 when the worker gets new requests (not dead, not sleeping)",
            labels=labels,
        )
        dead = GaugeMetricFamily("sglang_router_worker_dead", "1 when the worker is quarantined", labels=labels)
        sleeping = GaugeMetricFamily("sglang_router_worker_sleeping", "1 when the worker is asleep", labels=labels)
        failures = GaugeMetricFamily(
            "sglang_router_worker_consecutive_health_failures",
            "Failed health probes since the last success",
            labels=labels,
        )
        requests = CounterMetricFamily(
            "sglang_router_worker_requests", "Requests dispatched to the worker", labels=labels
        )
        failed = CounterMetricFamily(
            "sglang_router_worker_failed_requests",
            "Dispatched requests the worker failed to answer (unreachable, timed out, broke off)",
            labels=labels,
        )
        for worker in self._pool.workers():
            name = [worker.url]
            active.add_metric(name, worker.active_requests)
            up.add_metric(name, 1 if worker.routable else 0)
            dead.add_metric(name, 1 if worker.is_dead else 0)
            sleeping.add_metric(name, 1 if worker.is_sleeping else 0)
            failures.add_metric(name, worker.consecutive_failures)
            requests.add_metric(name, worker.total_requests)
            failed.add_metric(name, worker.failed_requests)
        counts = self._pool.counts()
        fleet = GaugeMetricFamily("sglang_router_workers", "Registered workers by state", labels=["state"])
        fleet.add_metric(["total"], counts["total_workers"])
        fleet.add_metric(["routable"], counts["healthy_workers"])
        fleet.add_metric(["dead"], counts["dead_workers"])
        fleet.add_metric(["sleeping"], counts["sleeping_workers"])
        yield from (active, up, dead, sleeping, failures, requests, failed, fleet)


class RouterMetrics:
    """The router's metrics registry and its text exposition."""

    def __init__(self, pool: WorkerPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PoolCollector(pool))

    def render(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
