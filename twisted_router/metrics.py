# -*- test-case-name: tests.unit.test_metrics,tests.unit.test_request_metrics -*-
"""
Prometheus metrics: the pool read at scrape time, and the request path's
counters and histograms.

Two kinds of series, all named C{sglang_router_*} (the one prefix the
router has always used, so existing dashboards keep working):

  - state the router keeps anyway (in-flight counts, worker states, weight
    versions, predicted work, learned speed, the queue) is read by
    L{PoolCollector} only when C{/metrics} is scraped, so it costs the
    request path nothing;
  - events (requests by route/method/status/worker, latencies, bytes,
    retries, failovers, probe failures, quarantines, broadcasts) are counted
    as they happen by L{RequestMetrics}, whose labelled children are bound
    once per (route, method, status, worker) and cached, so a request pays
    a dict lookup and a few additions.

A removed worker's series disappear: the scrape-time ones with it, the
event ones when L{RequestMetrics} hears of the pool change. Each router has
its own registry (no global one), so two routers in one process (tests)
never share series. The series are listed in C{docs/metrics.md}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from twisted_router.errors import answer_json
from twisted_router.pool import Activity, Worker, WorkerPool
from twisted_router.requestid import FinishedRequest

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "PREFIX",
    "WORKER_STATES",
    "PoolCollector",
    "RequestMetrics",
    "RouterMetrics",
    "broadcast_outcome",
    "metrics_resource",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every series' name starts with this.
PREFIX = "sglang_router_"

#: Seconds, from a 10 ms health answer to an hour-long video job.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)

#: Every word L{Worker.state} can be, in the order C{sglang_router_worker_state} lists them.
WORKER_STATES = ("ready", *(activity.value for activity in Activity), "suspect", "sleeping", "dead")

#: Methods that get their own label value; any other token (clients choose it) is "other".
_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")}

#: Worker state changes, in a namespace of their own (the Logger descriptor would name the class).
_state_log = Logger(namespace="twisted_router.workers")

#: Label value for a request no route or worker handled.
NONE = "none"

QueueStatus = Callable[[], Mapping[str, float]]


@dataclass(frozen=True, eq=False)  # eq=False: the registry keys collectors by identity
class PoolCollector(Collector):
    """
    Per-worker and fleet series from a L{WorkerPool}, read at scrape time.

    @ivar fleet_version: the fleet's weight version now (the controller's).
    @ivar queue_status: the router-side queue's C{queued_requests} and
        C{oldest_queued_wait} (the dispatcher's).
    """

    pool: WorkerPool
    _: KW_ONLY
    fleet_version: Callable[[], str] | None = None
    queue_status: QueueStatus | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["worker"]
        active = GaugeMetricFamily(f"{PREFIX}worker_active_requests", "Requests in flight on the worker", labels=labels)
        up = GaugeMetricFamily(
            f"{PREFIX}worker_routable", "1 when the worker gets new requests (not dead, not sleeping)",
            labels=labels,
        )
        dead = GaugeMetricFamily(f"{PREFIX}worker_dead", "1 when the worker is quarantined", labels=labels)
        sleeping = GaugeMetricFamily(f"{PREFIX}worker_sleeping", "1 when the worker is asleep", labels=labels)
        failures = GaugeMetricFamily(
            f"{PREFIX}worker_consecutive_health_failures",
            "Failed health probes since the last success",
            labels=labels,
        )
        requests = CounterMetricFamily(f"{PREFIX}worker_requests", "Requests dispatched to the worker", labels=labels)
        failed = CounterMetricFamily(
            f"{PREFIX}worker_failed_requests",
            "Dispatched requests the worker failed to answer (unreachable, timed out, broke off)",
            labels=labels,
        )
        state = GaugeMetricFamily(
            f"{PREFIX}worker_state",
            "1 for the worker's current state (ready, starting, updating, syncing, releasing, resuming, "
            "joining, suspect, sleeping, dead), 0 for the others",
            labels=["worker", "state"],
        )
        version = GaugeMetricFamily(
            f"{PREFIX}worker_weight_version_info",
            "1, labelled with the weight version the worker is known to hold (unknown until caught up)",
            labels=["worker", "version"],
        )
        work = GaugeMetricFamily(
            f"{PREFIX}worker_predicted_work_units",
            "Predicted work units outstanding on the worker (in flight and running video jobs)",
            labels=labels,
        )
        speed = GaugeMetricFamily(
            f"{PREFIX}worker_speed_units_per_second", "The worker's learned speed (work units per second)",
            labels=labels,
        )
        jobs = GaugeMetricFamily(
            f"{PREFIX}worker_running_jobs", "Video jobs created on the worker not yet seen finished", labels=labels
        )
        for worker in self.pool.workers():
            name = [worker.url]
            active.add_metric(name, worker.active_requests)
            up.add_metric(name, 1 if worker.routable else 0)
            dead.add_metric(name, 1 if worker.is_dead else 0)
            sleeping.add_metric(name, 1 if worker.is_sleeping else 0)
            failures.add_metric(name, worker.consecutive_failures)
            requests.add_metric(name, worker.total_requests)
            failed.add_metric(name, worker.failed_requests)
            current = worker.state
            for word in WORKER_STATES:
                state.add_metric([worker.url, word], 1 if word == current else 0)
            version.add_metric([worker.url, worker.weight_version or "unknown"], 1)
            work.add_metric(name, worker.predicted_work)
            speed.add_metric(name, worker.speed.units_per_second)
            jobs.add_metric(name, worker.running_jobs)
        counts = self.pool.counts()
        fleet = GaugeMetricFamily(f"{PREFIX}workers", "Registered workers by state", labels=["state"])
        fleet.add_metric(["total"], counts["total_workers"])
        fleet.add_metric(["routable"], counts["healthy_workers"])
        fleet.add_metric(["dead"], counts["dead_workers"])
        fleet.add_metric(["sleeping"], counts["sleeping_workers"])
        fleet.add_metric(["busy"], counts["busy_workers"])
        yield from (active, up, dead, sleeping, failures, requests, failed, state, version, work, speed, jobs, fleet)
        if self.fleet_version is not None:
            info = GaugeMetricFamily(
                f"{PREFIX}fleet_weight_version_info", "1, labelled with the fleet's weight version", labels=["version"]
            )
            info.add_metric([self.fleet_version()], 1)
            yield info
        if self.queue_status is not None:
            status = self.queue_status()
            yield GaugeMetricFamily(
                f"{PREFIX}queued_requests", "Generations waiting in the router-side queue",
                value=status["queued_requests"],
            )
            yield GaugeMetricFamily(
                f"{PREFIX}oldest_queued_wait_seconds", "How long the oldest queued generation has waited",
                value=status["oldest_queued_wait"],
            )


@dataclass(frozen=True, slots=True)
class _Bound:
    """The labelled children one (route, method, status, worker) updates, bound once."""

    requests: Counter
    duration: Histogram
    ttfb: Histogram
    bytes_in: Counter
    bytes_out: Counter


def broadcast_outcome(report: object) -> str:
    """
    One word for how a refit, sleep or wake ended: success, partial, failure,
    unsupported, noop (nothing to do), or refused (no report: refused before
    any worker was called, or interrupted).
    """
    replies = getattr(report, "replies", None)
    if replies is None:
        return "refused"
    if getattr(report, "unsupported", False):
        return "unsupported"
    if not replies:
        return "noop"
    succeeded = sum(1 for reply in replies if reply.success)
    if succeeded == len(replies):
        return "success"
    return "partial" if succeeded else "failure"


class RequestMetrics:
    """
    The counters and histograms updated as things happen, and the pool
    watcher that drops a removed worker's series and counts quarantines.
    """

    def __init__(self, registry: CollectorRegistry, pool: WorkerPool) -> None:
        self._pool = pool
        self.requests = Counter(
            f"{PREFIX}requests", "Requests answered, by route template, method, status and worker",
            ["route", "method", "status", "worker"], registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}request_duration_seconds", "Time from the start of processing to the end of the answer",
            ["route", "method", "worker"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.ttfb = Histogram(
            f"{PREFIX}time_to_first_byte_seconds", "Time from the start of processing to the response headers",
            ["route", "worker"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.bytes_in = Counter(
            f"{PREFIX}request_body_bytes", "Request body bytes received from clients",
            ["route", "worker"], registry=registry,
        )
        self.bytes_out = Counter(
            f"{PREFIX}response_body_bytes", "Response body bytes sent to clients",
            ["route", "worker"], registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}queue_wait_seconds",
            "Time generations waited in the router-side queue, by the worker that took them",
            ["worker"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.retries = Counter(
            f"{PREFIX}retries",
            "Attempts that failed so the request looked for another worker, by the worker and why "
            "(unreachable, abandoned, hung, not_ready)",
            ["worker", "reason"], registry=registry,
        )
        self.failovers = Counter(
            f"{PREFIX}failovers", "Requests answered by another worker after their first one failed them",
            ["worker"], registry=registry,
        )
        self.probe_failures = Counter(
            f"{PREFIX}health_probe_failures", "Failed health probes", ["worker"], registry=registry
        )
        self.quarantines = Counter(
            f"{PREFIX}quarantines", "Times the worker was quarantined", ["worker"], registry=registry
        )
        self.broadcasts = Counter(
            f"{PREFIX}broadcasts",
            "Refit, sleep and wake broadcasts by outcome (success, partial, failure, unsupported, noop, refused)",
            ["operation", "outcome"], registry=registry,
        )
        self.broadcast_duration = Histogram(
            f"{PREFIX}broadcast_duration_seconds", "How long refit, sleep and wake broadcasts took",
            ["operation"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        self._bound: dict[tuple[str, str, int, str], _Bound] = {}
        #: Per worker URL, the (metric, label values) children that name it.
        self._children: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        #: The state each worker was last seen in, from its registration on:
        #: a worker is only signalled as a change when it leaves the state it
        #: registered in, so without this its first transition (the first
        #: worker's "ready", a restored worker's quarantine) had no "was".
        self._states: dict[Worker, str] = {worker: worker.state for worker in pool.workers()}
        pool.on_added(self._worker_added)
        pool.on_change(self._pool_changed)
        pool.on_busy(self._pool_changed)  # a worker going busy (syncing, updating, ...) is a state change too

    def _worker_added(self, worker: Worker) -> None:
        """A newly registered worker's state (C{starting}, usually): its first change is logged from it."""
        self._states[worker] = worker.state

    def _child(self, metric: Counter | Histogram, worker: str, *labels: str) -> Counter | Histogram:
        """A labelled child, remembered under its worker so it can be removed with it."""
        if worker != NONE:
            self._children.setdefault(worker, set()).add((metric, labels))
        return metric.labels(*labels)

    def observe(self, done: FinishedRequest) -> None:
        """Count one finished request (the Site's C{on_finished})."""
        record = done.record
        # The method token is the client's: only known ones get their own key and label.
        key = (record.route, _METHODS.get(done.method, "other"), done.status, record.worker)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bind(key)
        bound.requests.inc()
        bound.duration.observe(done.duration)
        if done.time_to_first_byte is not None:
            bound.ttfb.observe(done.time_to_first_byte)
        if done.bytes_in:
            bound.bytes_in.inc(done.bytes_in)
        if done.bytes_out:
            bound.bytes_out.inc(done.bytes_out)

    def _bind(self, key: tuple[str, str, int, str]) -> _Bound:
        route, method, status, url = key
        route = route or NONE
        worker = url or NONE
        if url and url not in self._children and self._pool.get(url) is None:
            # Removed while its request was in flight: count it, keep no series for it.
            worker = NONE
        bound = _Bound(
            requests=self._child(self.requests, worker, route, method, str(status), worker),  # type: ignore[arg-type]
            duration=self._child(self.duration, worker, route, method, worker),  # type: ignore[arg-type]
            ttfb=self._child(self.ttfb, worker, route, worker),  # type: ignore[arg-type]
            bytes_in=self._child(self.bytes_in, worker, route, worker),  # type: ignore[arg-type]
            bytes_out=self._child(self.bytes_out, worker, route, worker),  # type: ignore[arg-type]
        )
        if worker != NONE or not url:
            self._bound[key] = bound
        return bound

    def queue_waited(self, worker: Worker, seconds: float) -> None:
        """A queued generation got a slot on C{worker} after C{seconds} (the dispatcher's C{on_queue_wait})."""
        self._child(self.queue_wait, worker.url, worker.url).observe(seconds)  # type: ignore[union-attr]

    def retried(self, worker: Worker, reason: str) -> None:
        """The dispatcher's C{on_retry}."""
        self._child(self.retries, worker.url, worker.url, reason).inc()  # type: ignore[union-attr]

    def failed_over(self, worker: Worker) -> None:
        """The dispatcher's C{on_failover}: C{worker} answered a request another worker had failed."""
        self._child(self.failovers, worker.url, worker.url).inc()  # type: ignore[union-attr]

    def probe_failed(self, worker: Worker) -> None:
        """The health checker's C{on_probe_failure}."""
        if worker in self._pool:
            self._child(self.probe_failures, worker.url, worker.url).inc()  # type: ignore[union-attr]

    def broadcast_ended(self, operation: str, report: object, seconds: float) -> None:
        """The controller's C{on_broadcast}."""
        self.broadcasts.labels(operation, broadcast_outcome(report)).inc()
        self.broadcast_duration.labels(operation).observe(seconds)

    def _pool_changed(self) -> None:
        """
        Count quarantines, log state changes, and drop the series of
        workers that left. Runs on pool transitions only, never per request.
        """
        current = self._pool.workers()
        states = {worker: worker.state for worker in current}
        for worker, state in states.items():
            before = self._states.get(worker)  # known from its registration on (None: never, but say so)
            if before == state:
                continue
            if state == "dead":
                self._child(self.quarantines, worker.url, worker.url).inc()  # type: ignore[union-attr]
            if before is None:
                _state_log.info("worker {worker} is now {state}", worker=worker.url, state=state)
            else:
                _state_log.info(
                    "worker {worker} is now {state} (was {previous})", worker=worker.url, state=state, previous=before
                )
        for worker in set(self._states) - set(states):
            _state_log.info("worker {worker} left the pool", worker=worker.url)
        self._states = states
        present = {worker.url for worker in current}
        for url in [url for url in self._children if url not in present]:
            self.forget(url)

    def forget(self, url: str) -> None:
        """Remove every event series labelled with worker C{url}."""
        for metric, labels in self._children.pop(url, set()):
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        for key in [key for key in self._bound if key[3] == url]:
            del self._bound[key]


class RouterMetrics:
    """The router's metrics registry and its text exposition."""

    def __init__(
        self,
        pool: WorkerPool,
        *,
        fleet_version: Callable[[], str] | None = None,
        queue_status: QueueStatus | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PoolCollector(pool, fleet_version=fleet_version, queue_status=queue_status))
        self.events = RequestMetrics(self.registry, pool)

    def render(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)


class _MetricsPage(Resource):
    """C{GET /metrics} of the metrics-only port (C{/metrics/anything}: 404; other methods: 405), JSON errors."""

    isLeaf = True

    def __init__(self, metrics: RouterMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        if request.postpath:
            return _not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return answer_json(request, 405, {"error": "only GET /metrics is served here"})
        return super().render(request)  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self._metrics.render()


def metrics_resource(metrics: RouterMetrics) -> Resource:
    """
    What C{--metrics-listen} serves: C{/metrics} only, without keys (every
    other path is a 404 with a JSON C{{"error": ...}}, as on the main port,
    not Twisted's HTML page).

    Rendered on the reactor thread like the main port's C{/metrics}
    (C{prometheus_client.twisted.MetricsResource} renders in a thread pool,
    where reading the pool would race the reactor).
    """
    root = _MetricsRoot()
    root.putChild(b"metrics", _MetricsPage(metrics))
    return root


def _not_found(request: Request) -> bytes:
    return answer_json(request, 404, {"error": "not found: only GET /metrics is served here"})


class _NotFound(Resource):
    """Any path but C{/metrics} on the metrics port, whatever the method."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _not_found(request)


class _MetricsRoot(Resource):
    """The metrics port's root: C{/metrics}, else 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _not_found(request)
