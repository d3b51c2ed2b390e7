# -*- test-case-name: tests.unit.test_health -*-
"""
Health probing and capability discovery: the only parts of the worker state
that the router learns by asking the workers on its own initiative.

The reactor (for time) and the HTTP client are injected, so the whole module
runs on C{task.Clock} and C{treq.testing.StubTreq} in tests.

The loop must never die: a C{LoopingCall} whose function fails stops for
good, and then a dead worker is never noticed. So every probe catches and logs
its own errors, has its own timeout (the loop waits for the slowest probe),
and a round always succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_router.pool import Activity, Worker, WorkerPool
from twisted_router.upstream import (
    describe_failure,
    discard,
    read_body,
    read_limited,
    with_deadline,
)

__all__ = ["HealthChecker", "probe_health", "refresh_capabilities"]

_log = Logger()

#: Largest C{/v1/models} body we read; a real one is well under 1 KiB.
_MAX_MODELS_BODY = 1024 * 1024

class _BadModelCard(Exception):
    """A worker's C{/v1/models} answer has no usable model card."""


def _parse_model_card(body: bytes) -> tuple[str | None, str | None, int | None]:
    """
    C{(task_type, model_id, num_gpus)} from a C{/v1/models} body. A real worker serves
    exactly one card; anything not shaped like a list of cards is refused.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadModelCard("/v1/models is not JSON") from e
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise _BadModelCard("/v1/models has no model card in 'data'")
    card = data[0]
    task_type = card.get("task_type")
    model_id = card.get("id")
    task_type = (task_type.strip().upper() or None) if isinstance(task_type, str) else None
    model_id = model_id if isinstance(model_id, str) and model_id else None
    num_gpus = card.get("num_gpus")
    num_gpus = num_gpus if isinstance(num_gpus, int) and not isinstance(num_gpus, bool) and num_gpus > 0 else None
    return task_type, model_id, num_gpus


async def _fetch_capabilities(http: HTTPClient, url: str) -> tuple[str | None, str | None, int | None]:
    response = await http.get(url + "/v1/models", allow_redirects=False, unbuffered=True)
    body = await read_limited(response, _MAX_MODELS_BODY)
    if response.code != 200:
        raise _BadModelCard(f"/v1/models answered HTTP {response.code}")
    return _parse_model_card(body)


async def refresh_capabilities(
    pool: WorkerPool,
    worker: Worker,
    http: HTTPClient,
    clock: IReactorTime,
    timeout: float = 5.0,
) -> bool:
    """
    Learn what a worker serves from C{GET {url}/v1/models} (C{data[0].task_type}
    and C{data[0].id}) and record it with L{WorkerPool.set_capabilities}.

    Never raises: a worker that cannot tell us is logged and left as it was
    (an unknown task type already means "not video-capable").

    @return: C{True} iff a model card was read and recorded.
    """
    try:
        d = Deferred.fromCoroutine(_fetch_capabilities(http, worker.url))
        task_type, model_id, num_gpus = await with_deadline(d, timeout, clock)
    except Exception as e:  # never raise: the caller only wants to know if it worked
        reason = str(e) if isinstance(e, _BadModelCard) else describe_failure(Failure(), timeout)
        _log.warn(
            "could not read capabilities of worker {worker}: {reason}",
            worker=worker.url,
            reason=reason,
        )
        return False
    try:
        changed = (worker.task_type, worker.model_id) != (task_type, model_id)
        pool.set_capabilities(worker, task_type=task_type, model_id=model_id, num_gpus=num_gpus)
    except Exception:
        _log.failure("recording capabilities of worker {worker} failed", worker=worker.url)
        return False
    if changed:
        _log.info(
            "worker {worker} serves {model_id} (task type {task_type}, video: {video})",
            worker=worker.url,
            model_id=model_id,
            task_type=task_type,
            video=worker.video_support,
        )
    return True


#: Largest C{/health} body we read; a real worker answers with a few bytes.
_MAX_HEALTH_BODY = 64 * 1024


def probe_health(http: HTTPClient, clock: IReactorTime, url: str, timeout: float) -> Deferred[int]:
    """
    Ask C{GET {url}/health} once; fire with the status code, or fail (with
    C{defer.TimeoutError} after C{timeout} seconds on C{clock}).

    The one probe of a worker's health: the health checker judges running
    workers by it and the launcher decides that a loading worker is up by it,
    so both agree on what "answers its health check" means.
    """
    return with_deadline(Deferred.fromCoroutine(_get_health(http, url)), timeout, clock)


async def _get_health(http: HTTPClient, url: str) -> int:
    response = await http.get(url + "/health", allow_redirects=False, unbuffered=True)
    # Read the body to the end even though we ignore it: only then does the
    # connection go back to the pool.
    await read_body(response, discard, _MAX_HEALTH_BODY)
    return int(response.code)


class _Probe:
    """A probe in flight, and whether its outcome still counts."""

    def __init__(self, deferred: Deferred[Any]) -> None:
        self.deferred = deferred
        self.abandoned = False

    def abandon(self) -> None:
        """Stop waiting (service stopping); whatever happens is not counted."""
        self.abandoned = True
        self.deferred.cancel()


class HealthChecker(Service):
    """
    Probes C{GET {url}/health} of every routable worker every C{interval}
    seconds and quarantines a worker after C{failure_threshold} consecutive
    failures.

    Quarantined (dead) workers are not probed and never re-admitted here: a
    worker that was away may have missed a weight update, so only an operator
    (C{PUT /workers/{id}} C{is_dead=false}) brings it back. Sleeping workers
    are not probed either; they get no traffic, and the wake broadcast tells
    whether they are back.

    A worker whose probe fails or times out is I{suspect} at once: it gets
    no new requests, and it is probed every C{suspect_interval} seconds (not
    every C{interval}) until a probe succeeds (routable again) or the failure
    threshold quarantines it. So a hung worker stops getting requests at most
    C{interval + probe_timeout} seconds after it hangs. L{probe_now} is the
    router's fast path: a request that got no response headers in time has
    the worker probed at once, and a failure then quarantines it outright.

    A worker whose model card is still unknown (registered before it was up)
    has it fetched after its first successful probe, and again after it
    recovers from failed probes, so C{video_support} does not stay false
    for want of a retry.

    @ivar interval: seconds between rounds.
    @ivar failure_threshold: consecutive failures that quarantine a worker.
    @ivar probe_timeout: limit for one probe (request and body).
    @ivar suspect_interval: seconds between probes of a suspect worker.
    """

    log = Logger()

    def __init__(
        self,
        pool: WorkerPool,
        http: HTTPClient,
        clock: IReactorTime,
        *,
        interval: float,
        failure_threshold: int,
        probe_timeout: float = 5.0,
        on_quarantine: Callable[[Worker, str], None] | None = None,
        on_first_answer: Callable[[Worker], Deferred[Any]] | None = None,
        fetch_missing_capabilities: bool = True,
        suspect_interval: float = 1.0,
    ) -> None:
        """
        @param on_quarantine: called with the worker and the reason when a
            probe quarantines a worker. (Requests waiting for a worker learn
            of a probe's verdict from the pool's own change signal.)
        """
        if interval <= 0:
            raise ValueError(f"health check interval must be positive, not {interval!r}")
        if failure_threshold < 1:
            raise ValueError(
                f"health check failure threshold must be at least 1, not {failure_threshold!r}"
            )
        if probe_timeout <= 0:
            raise ValueError(f"health probe timeout must be positive, not {probe_timeout!r}")
        if suspect_interval <= 0:
            raise ValueError(f"suspect probe interval must be positive, not {suspect_interval!r}")
        self._pool = pool
        self._http = http
        self._clock = clock
        self.interval = interval
        self.failure_threshold = failure_threshold
        self.probe_timeout = probe_timeout
        self.suspect_interval = suspect_interval
        self._suspect_loop: LoopingCall | None = None
        #: Workers whose next failed probe quarantines them outright (see L{probe_now}).
        self._strict: WeakSet[Worker] = WeakSet()
        #: When each worker's last probe started, so a worker that turned
        #: suspect in a round is not probed again by the suspect loop at once.
        self._probed_at: WeakKeyDictionary[Worker, float] = WeakKeyDictionary()
        self._on_quarantine = on_quarantine
        self._on_first_answer = on_first_answer
        #: Told about every failed probe of a worker (metrics).
        self.on_probe_failure: Callable[[Worker], None] | None = None
        self._fetch_missing_capabilities = fetch_missing_capabilities
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[None] | None = None
        #: Probes in flight, so a manual L{check_all} during a round does not
        #: probe (and count) a worker twice, and L{stopService} can cancel them.
        self._probes: dict[Worker, _Probe] = {}
        #: Workers whose capabilities we already tried to fetch on our own.
        self._capabilities_tried: WeakSet[Worker] = WeakSet()

    # -- service --------------------------------------------------------

    def startService(self) -> None:
        """Start probing now, then every C{interval} seconds."""
        super().startService()
        loop = LoopingCall(self.check_all)
        loop.clock = self._clock
        self._loop = loop
        done = loop.start(self.interval, now=True)
        self._loop_done = done.addCallbacks(lambda _: None, self._loop_failed)
        suspects = LoopingCall(self.check_suspects)
        suspects.clock = self._clock
        self._suspect_loop = suspects
        suspects.start(self.suspect_interval, now=False).addErrback(self._loop_failed)

    def stopService(self) -> Deferred[None] | None:
        """
        Stop the loop and cancel probes in flight (their outcome is not
        counted). The Deferred fires once the loop has let go.
        """
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        suspects, self._suspect_loop = self._suspect_loop, None
        if suspects is not None and suspects.running:
            suspects.stop()
        for probe in list(self._probes.values()):
            probe.abandon()
        done, self._loop_done = self._loop_done, None
        return done

    def _loop_failed(self, failure: Failure) -> None:
        # check_all never fails, so this is a bug; say so loudly.
        self.log.failure("health check loop stopped unexpectedly", failure)

    # -- probing --------------------------------------------------------

    def check_all(self) -> Deferred[None]:
        """
        Probe every routable worker concurrently.

        @return: a Deferred that fires with C{None} when every probe has
            finished or timed out; it never fails.
        """
        try:
            probes = []
            for worker in self._pool:
                if worker.is_dead or worker.is_sleeping or worker.is_suspect or worker in self._probes:
                    continue  # (suspects are on their own, faster schedule: check_suspects)
                probes.append(self._probe(worker))
        except Exception:
            self.log.failure("starting a health check round failed")
            return succeed(None)
        if not probes:
            return succeed(None)
        round_done: Deferred[Any] = DeferredList(probes, consumeErrors=True)
        round_done.addCallbacks(lambda _: None, self._round_failed)
        return round_done

    def check_suspects(self) -> Deferred[None]:
        """
        Probe every suspect worker that is not being probed already; never
        fails (it runs in a C{LoopingCall}).
        """
        try:
            probes = [
                self._probe(w)
                for w in self._pool
                if w.is_suspect
                and not w.is_dead
                and not w.is_sleeping
                and w not in self._probes
                and self._clock.seconds() - self._probed_at.get(w, float("-inf")) >= self.suspect_interval / 2
            ]
        except Exception:
            self.log.failure("starting suspect probes failed")
            return succeed(None)
        if not probes:
            return succeed(None)
        done: Deferred[Any] = DeferredList(probes, consumeErrors=True)
        return done.addCallbacks(lambda _: None, self._round_failed)

    def probe_now(self, worker: Worker) -> Deferred[bool]:
        """
        Probe C{worker} now (or join the probe in flight), and quarantine it
        if that probe fails: the router calls this when a request got no
        response headers within C{--timeout}, which together with a failed
        probe means the worker hangs, not that it is merely slow.

        @return: fires with whether the worker is still in rotation
            afterwards (not quarantined); never fails.
        """
        if worker.is_dead or worker not in self._pool:
            return succeed(not worker.is_dead)
        self._strict.add(worker)
        probe = self._probes.get(worker)
        running = probe.deferred if probe is not None else self._probe(worker)
        done: Deferred[bool] = Deferred()

        def report(result: object) -> object:
            self._strict.discard(worker)
            done.callback(not worker.is_dead)
            return result

        running.addBoth(report)
        return done

    def _round_failed(self, failure: Failure) -> None:
        self.log.failure("health check round failed", failure)

    def _probe(self, worker: Worker) -> Deferred[None]:
        """One probe; its Deferred never fails."""
        d: Deferred[Any] = probe_health(self._http, self._clock, worker.url, self.probe_timeout)
        probe = _Probe(d)
        self._probed_at[worker] = self._clock.seconds()
        d.addCallbacks(
            self._answered,
            self._not_answered,
            callbackArgs=(worker, probe),
            errbackArgs=(worker, probe),
        )
        d.addErrback(self._probe_crashed, worker)
        self._probes[worker] = probe

        def forget(result: object) -> None:
            if self._probes.get(worker) is probe:
                del self._probes[worker]

        d.addBoth(forget)
        return d

    def _is_current(self, worker: Worker) -> bool:
        """Whether a probe result still concerns a worker we should judge."""
        return worker in self._pool and not worker.is_dead

    def _answered(self, code: int, worker: Worker, probe: _Probe) -> Deferred[None] | None:
        if probe.abandoned or not self._is_current(worker):
            return None
        if code != 200:
            self._failed(worker, f"HTTP {code}")
            return None
        previous_failures = worker.consecutive_failures
        self._pool.record_probe_success(worker)
        if worker.activity is Activity.STARTING and self._on_first_answer is not None:
            # A registered worker finished loading: the router brings it into
            # rotation (capabilities, weights catch-up) from here.
            self.log.info("worker {worker} answered its first health check", worker=worker.url)
            return self._on_first_answer(worker).addCallback(lambda _: None)
        if previous_failures:
            self.log.info(
                "worker {worker} passed its health check again after {failures} failure(s)",
                worker=worker.url,
                failures=previous_failures,
            )
        wants_card = worker.task_type is None and (
            previous_failures or worker not in self._capabilities_tried
        )
        if self._fetch_missing_capabilities and wants_card and not worker.is_sleeping:
            self._capabilities_tried.add(worker)
            d = Deferred.fromCoroutine(
                refresh_capabilities(
                    self._pool, worker, self._http, self._clock, self.probe_timeout
                )
            )
            return d.addCallback(lambda _: None)
        return None

    def _not_answered(self, failure: Failure, worker: Worker, probe: _Probe) -> None:
        if probe.abandoned or not self._is_current(worker):
            # Cancelled by stopService (not the worker's fault), or about a
            # worker that was removed or quarantined meanwhile.
            return None
        self._failed(worker, describe_failure(failure, self.probe_timeout))
        return None

    def _failed(self, worker: Worker, reason: str) -> None:
        if self.on_probe_failure is not None:
            self.on_probe_failure(worker)
        if worker in self._strict:
            self._strict.discard(worker)
            reason = f"no response headers within the request timeout, then the health probe failed ({reason})"
            with self._pool.changes():
                became_dead = self._pool.record_probe_failure(worker, reason, self.failure_threshold)
                became_dead = self._pool.quarantine(worker, reason) or became_dead
        else:
            became_dead = self._pool.record_probe_failure(worker, reason, self.failure_threshold)
        if worker.activity is Activity.STARTING:
            self._still_starting(worker, reason)
            return
        if not became_dead:
            self.log.warn(
                "worker {worker} failed health check ({failures}/{threshold}): {reason}",
                worker=worker.url,
                failures=worker.consecutive_failures,
                threshold=self.failure_threshold,
                reason=reason,
            )
            return
        self.log.error(
            "worker {worker} quarantined after {failures} failed health checks: {reason}",
            worker=worker.url,
            failures=worker.consecutive_failures,
            reason=reason,
        )
        if self._on_quarantine is not None:
            try:
                self._on_quarantine(worker, reason)
            except Exception:
                self.log.failure("quarantine hook failed for worker {worker}", worker=worker.url)

    def _still_starting(self, worker: Worker, reason: str) -> None:
        """
        A worker that never answered is loading (or has a wrong address), not
        failing: say so, never as "failed health check (4/3)", and less and
        less often (after probe 1, 2, 4, 8, ...) so a model that loads for
        ten minutes does not flood the log.
        """
        probes = worker.consecutive_failures
        if probes & (probes - 1):
            return
        self.log.warn(
            "worker {worker} has not answered yet ({probes} probe(s) in {waited:.0f}s): still starting, "
            "not quarantined; last: {reason}",
            worker=worker.url,
            probes=probes,
            waited=max(0.0, self._clock.seconds() - worker.registered_at),
            reason=reason,
        )

    def _probe_crashed(self, failure: Failure, worker: Worker) -> None:
        # A bug in our own bookkeeping; the loop must survive it anyway.
        self.log.failure("health check of worker {worker} failed", failure, worker=worker.url)
