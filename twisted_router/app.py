"""
The router's HTTP surface.

Handlers are thin: they parse the request, ask the pool and the policy for a
worker, hand the request to the streaming proxy or the control plane, and
answer. Everything the router says itself is JSON C{{"error": ...}}; every
worker answer is passed through untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlencode

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from twisted_router.affinity import FINISHED_STATES, OwnerMap
from twisted_router.calls import WorkerCaller, WorkerReply
from twisted_router.config import RouterConfig
from twisted_router.control import BroadcastReport, FleetController, Refit
from twisted_router.errors import (
    BadRequest,
    NotFound,
    NoWorkers,
    RouterError,
    WorkerFailed,
    WorkerTimedOutError,
    answer_json,
)
from twisted_router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from twisted_router.metrics import RouterMetrics
from twisted_router.policies import LeastRequest, RoutingPolicy
from twisted_router.pool import STARTING, UnknownWorker, Worker, WorkerPool
from twisted_router.proxy import (
    ForwardResult,
    StreamingProxy,
    UpstreamBodyFailed,
    WorkerAbandoned,
    WorkerNotReady,
    WorkerTimedOut,
    WorkerUnreachable,
)
from twisted_router.urls import WorkerURLError

#: Answers up to this size are kept (while streaming) to learn job ids; of
#: image answers (base64 images, megabytes) only the start is kept, where the id is.
IMAGE_CAPTURE_LIMIT = 4096
JOB_CAPTURE_LIMIT = 256 * 1024
#: How long the router waits for a worker while looking up who owns a job.
LOOKUP_TIMEOUT = 5.0
#: Largest JSON body accepted on the router's own management endpoints.
MAX_ADMIN_BODY = 1024 * 1024

_IMAGE_URL = re.compile(r"/v1/images/([^/?#]+)/content")
#: The worker serialises its image answer with C{id} first: {"id": "<uuid>", "created": ..., "data": [...]}.
_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\]{1,200})"')
_WORKER_UPDATE_KEYS = frozenset({"is_dead", "refresh_video_support"})
_URL_REQUIRED = "worker_url is required (use query ?url=... or JSON body)"
#: Worker endpoints that change weights or memory. The router's own control
#: routes (exact paths) broadcast the first three; any other spelling reaching
#: the catch-all, and the calls it has no broadcast for, are refused.
_FLEET_WIDE_PATHS: dict[bytes, str | None] = {
    b"/update_weights_from_disk": "/update_weights_from_disk",
    b"/release_memory_occupation": "/release_memory_occupation",
    b"/resume_memory_occupation": "/resume_memory_occupation",
    b"/update_weights_from_tensor": None,
    b"/v1/set_lora": None,
    b"/v1/merge_lora_weights": None,
    b"/v1/unmerge_lora_weights": None,
}

CapabilityRefresher = Callable[[Worker], Awaitable[bool]]


@dataclass(frozen=True)
class Dispatched:
    """A request that a worker answered (its body has been streamed to the client)."""

    worker: Worker
    result: ForwardResult


def request_body(request: Request, limit: int = -1) -> bytes:
    """The request body Twisted buffered before the route ran (read from the start)."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read(limit)


json_body = answer_json


def read_json_object(request: Request, *, required: bool) -> dict[str, Any] | None:
    """
    The request body as a JSON object.

    @return: None when the body is empty and not C{required}.
    @raise BadRequest: when the body is not a JSON object.
    """
    raw = request_body(request, MAX_ADMIN_BODY + 1)
    if len(raw) > MAX_ADMIN_BODY:
        raise BadRequest("Invalid JSON body: larger than 1 MiB")
    if not raw.strip():
        if required:
            raise BadRequest("Invalid JSON body: the body is empty, expected a JSON object")
        return None
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRequest("Invalid JSON body: nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("Invalid JSON body: expected a JSON object")
    return value


def query_arg(request: Request, *names: str) -> str | None:
    """The first non-empty query argument among C{names}, decoded."""
    for name in names:
        args: dict[bytes, list[bytes]] = request.args or {}
        values = args.get(name.encode())
        if values and values[0]:
            return str(values[0].decode("utf-8", "replace"))
    return None


def _parse_json(raw: bytes | None) -> Any:
    """A worker answer as JSON, or None for anything unparsable (never raises: the answer is already sent)."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


class Router:
    """The Klein application: one instance per running router."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        *,
        config: RouterConfig,
        pool: WorkerPool,
        policy: RoutingPolicy,
        proxy: StreamingProxy,
        caller: WorkerCaller,
        control: FleetController,
        refresh_capabilities: CapabilityRefresher,
        clock: IReactorTime,
    ) -> None:
        self._config = config
        self._pool = pool
        self._policy = policy
        self._least_loaded = LeastRequest()
        self._proxy = proxy
        self._caller = caller
        self._control = control
        self._refresh = refresh_capabilities
        self._clock = clock
        self.metrics = RouterMetrics(pool)
        #: Probes a worker at once and quarantines it if the probe fails;
        #: fires with whether it is still in rotation (set by build_router).
        self.probe_unanswered: Callable[[Worker], Deferred[bool]] | None = None
        #: Per worker, the forwards still waiting for response headers, so a
        #: worker found hung can hand them to another worker at once.
        self._unanswered: dict[Worker, set[Deferred[str]]] = {}
        self.videos = OwnerMap(config.max_video_jobs)
        self.images = OwnerMap(config.max_image_ids)

    async def worker_ready(self, url: str) -> Worker:
        """
        A managed worker answers its health check: register it (or re-admit it
        after a restart) and learn its capabilities.

        Called by the launcher; raises L{WorkerURLError} for an unusable URL.
        """
        worker, created = self._pool.add(url)
        if worker.is_dead:
            self._pool.readmit(worker)
        if worker.activity == STARTING:
            worker.activity = None  # the launcher saw it answer
        self._pool.set_sleeping(worker, False)  # a fresh process is awake and holds its GPU memory
        self._control.admit(worker)  # ... and its start-up weights
        self.log.info(
            "managed worker {worker} {what}", worker=worker.display_id, what="registered" if created else "re-admitted"
        )
        await self._refresh(worker)
        return worker

    def abandon_unanswered(self, worker: Worker, reason: str) -> None:
        """
        C{worker} was quarantined for not answering: the requests on it that
        have no response headers yet are retried on another worker (once
        each) instead of each waiting out its own timeout.
        """
        waiting = self._unanswered.pop(worker, set())
        if waiting:
            self.log.warn(
                "retrying {count} unanswered request(s) from {worker} elsewhere",
                count=len(waiting),
                worker=worker.display_id,
            )
        for give_up in list(waiting):  # each callback may end its forward, which leaves the set
            give_up.callback(f"the worker was quarantined: {reason}")

    def worker_lost(self, url: str, reason: str) -> None:
        """A managed worker's process is gone: take it out of rotation at once."""
        worker = self._pool.get(url)
        if worker is not None and self._pool.quarantine(worker, reason):
            self.log.warn("managed worker {worker} out of rotation: {reason}", worker=worker.display_id, reason=reason)

    # ------------------------------------------------------------------ dispatch

    def _unavailable(self, *, video: bool, image_only: bool = False) -> RouterError:
        """The right error when no worker can take a request, most specific first."""
        live = [w for w in self._pool.workers() if not w.is_dead]
        if video and not any(w.video_support for w in live):
            # The earlier router's answer, empty pool included: scripts match on it.
            return BadRequest("No video-capable workers available in current worker pool.")
        if len(self._pool) == 0:
            return NoWorkers("No workers registered in the pool")
        eligible = [w for w in live if (not video or w.video_support) and (not image_only or w.image_model)]
        if eligible and all(w.is_sleeping for w in eligible):
            return NoWorkers("all workers are sleeping (call /resume_memory_occupation to wake them)")
        return NoWorkers("No healthy workers available in the pool")

    def _never_answered(self, tried: set[str]) -> list[Worker]:
        """Registered workers still C{starting} that this request has not tried yet."""
        return [w for w in self._pool.workers() if _still_starting(w) and w.url not in tried]

    def _first_contact(self, worker: Worker) -> bool:
        """
        A worker that never answered may take a generation only while the
        fleet runs its start-up weights, which a fresh worker holds too.
        """
        return _still_starting(worker) and not self._control.refitted

    async def _dispatch(
        self,
        request: Request,
        *,
        video: bool = False,
        image: bool = False,
        path: bytes | None = None,
        capture: int = 0,
        policy: RoutingPolicy | None = None,
    ) -> Dispatched:
        """
        Send the request to one routable worker and stream its answer back.

        A worker that cannot be reached is quarantined at once and the request
        goes to the next one, so a dead worker never costs a request that a
        live one could serve. The in-flight lease is held for the whole
        exchange and released on every path, cancellation included.

        @raise RouterError: no worker could answer (the router answers itself).
        @raise UpstreamBodyFailed: the answer broke off after it started.
        """
        chooser = policy or self._policy
        # Image calls skip video and mesh workers while the fleet has image
        # workers; a fleet with none takes them wherever it can.
        image_only = image and any(w.image_model for w in self._pool.workers() if not w.is_dead)
        tried: set[str] = set()
        last_failure: str | None = None
        retried_after_hang = False
        deadline = self._clock.seconds() + self._config.timeout
        while True:
            if getattr(request, "channel", None) is None and tried:
                raise CancelledError("client gone; not retried")
            candidates = [
                w
                for w in self._pool.routable(video=video)
                if w.url not in tried and (not image_only or w.image_model)
            ]
            if not candidates:
                if last_failure is not None:
                    raise WorkerFailed(f"Worker request failed: {last_failure}")
                busy = [w for w in self._pool.coming_back(video=video) if not image_only or w.image_model]
                remaining = deadline - self._clock.seconds()
                if busy and remaining > 0:
                    # Workers mid-refit, mid-catch-up or mid-wake will be back:
                    # wait for them rather than fail, and never reach them early.
                    await self._control.changed.wait(remaining)
                    continue
                if busy:
                    raise NoWorkers(
                        f"No healthy workers available in the pool: {len(busy)} worker(s) still busy "
                        f"({', '.join(sorted({w.activity or w.state for w in busy}))}) after "
                        f"{self._config.timeout:g}s"
                    )
                starting = [] if video or image_only else self._never_answered(tried)
                if not starting:
                    raise self._unavailable(video=video, image_only=image_only)
                if self._control.refitted:
                    raise NoWorkers(
                        f"No healthy workers available in the pool: {len(starting)} worker(s) still starting "
                        f"(never answered); the fleet is at weight version {self._control.version}, so a "
                        "worker must answer and be caught up before it gets traffic"
                    )
                # As the earlier router did: try one, so a wrong address or a
                # worker still loading answers 502 with the cause, not a bare 503.
                candidates = starting
            worker = chooser.choose(candidates)
            sent_version: list[str | None] = [worker.weight_version]

            def ready(worker: Worker = worker, sent_version: list[str | None] = sent_version) -> bool:
                # The request may have queued for a connection slot while a
                # refit or sleep started on this worker: re-check at send time.
                if worker not in self._pool:
                    return False
                if worker.routable:
                    sent_version[0] = worker.weight_version
                    return True
                if self._first_contact(worker):
                    sent_version[0] = self._control.version  # never refitted: start-up weights
                    return True
                return False

            def version_header(_: object, sent_version: list[str | None] = sent_version) -> dict[bytes, bytes]:
                version = sent_version[0]
                return {b"x-weight-version": version.encode()} if version else {}

            give_up: Deferred[str] = Deferred()
            unanswered = self._unanswered.setdefault(worker, set())
            unanswered.add(give_up)
            timed_out: WorkerTimedOut | None = None
            with self._pool.lease(worker):
                try:
                    result = await self._proxy.forward(
                        request,
                        worker.url,
                        path=path,
                        capture_limit=capture,
                        extra_response_headers=version_header,
                        ready=ready,
                        give_up=give_up,
                        keep_load_if_abandoned=True,
                    )
                except WorkerNotReady:
                    continue  # pick again (or wait) with the pool as it is now
                except WorkerAbandoned as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    if retried_after_hang:
                        raise WorkerFailed(f"Worker request failed: {worker.display_id}: {exc}") from None
                    retried_after_hang = True
                    tried.add(worker.url)
                    last_failure = f"{worker.display_id}: {exc}"
                    continue
                except WorkerUnreachable as exc:
                    tried.add(worker.url)
                    last_failure = f"{worker.display_id}: {exc}"
                    self._pool.record_request_failure(worker, str(exc))
                    if worker.activity == STARTING:
                        # It may still be loading: refusing connections is expected, not a fault.
                        self.log.info(
                            "worker {worker} is still starting (not quarantined): {reason}",
                            worker=worker.display_id,
                            reason=str(exc),
                        )
                        continue
                    if self._pool.quarantine(worker, f"unreachable: {exc}"):
                        self.log.warn(
                            "worker {worker} quarantined: unreachable ({reason}); retrying elsewhere",
                            worker=worker.display_id,
                            reason=str(exc),
                        )
                    continue
                except WorkerTimedOut as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    timed_out = exc
                except UpstreamBodyFailed as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    self.log.warn(
                        "answer from {worker} broke off: {reason}",
                        worker=worker.display_id,
                        reason=str(exc),
                    )
                    raise
                finally:
                    unanswered.discard(give_up)
                    if not unanswered and self._unanswered.get(worker) is unanswered:
                        del self._unanswered[worker]
            if timed_out is not None:
                # Slow or hung? Ask at once rather than at the next health
                # round: a hung worker is quarantined, and this request (which
                # got nothing from it) is retried elsewhere, once.
                if self.probe_unanswered is not None and not retried_after_hang:
                    if not await self.probe_unanswered(worker):
                        retried_after_hang = True
                        tried.add(worker.url)
                        last_failure = f"{worker.display_id}: {timed_out}"
                        continue
                raise WorkerTimedOutError(f"Worker request failed: {worker.display_id}: {timed_out}")
            return Dispatched(worker, result)

    async def _forward_to(
        self, request: Request, worker: Worker, *, path: bytes | None = None, capture: int = 0
    ) -> Dispatched:
        """Send a request to one particular worker (sticky routing): no retry elsewhere."""
        with self._pool.lease(worker):
            try:
                result = await self._proxy.forward(request, worker.url, path=path, capture_limit=capture)
            except (WorkerUnreachable, WorkerTimedOut) as exc:
                self._pool.record_request_failure(worker, str(exc))
                failed = WorkerTimedOutError if isinstance(exc, WorkerTimedOut) else WorkerFailed
                raise failed(f"Worker request failed: {worker.display_id}: {exc}") from None
            except UpstreamBodyFailed as exc:
                self._pool.record_request_failure(worker, str(exc))
                raise
        return Dispatched(worker, result)

    # ------------------------------------------------------------------ generation

    @app.route("/v1/images/generations", methods=["POST"])
    async def images_generations(self, request: Request) -> bytes | None:
        return await self._generate_image(request, path=None)

    @app.route("/generate", methods=["POST"])
    async def legacy_generate(self, request: Request) -> bytes | None:
        return await self._generate_image(request, path=_with_query(request, b"/v1/images/generations"))

    @app.route("/v1/images/edits", methods=["POST"])
    async def images_edits(self, request: Request) -> bytes | None:
        return await self._generate_image(request, path=None)

    async def _generate_image(self, request: Request, *, path: bytes | None) -> bytes | None:
        out = await self._dispatch(request, image=True, path=path, capture=IMAGE_CAPTURE_LIMIT)
        self._learn_images(out)
        return None

    def _learn_images(self, out: Dispatched) -> None:
        if not 200 <= out.result.status < 300:
            return
        answer = _parse_json(out.result.captured)
        if not isinstance(answer, dict):
            # Too large to keep (a base64 image): read the id at its start, not the megabytes after.
            match = _LEADING_ID.match(out.result.head)
            if match:
                self.images.remember(match.group(1).decode(), out.worker.url, finished=True)
            return
        ids: set[str] = set()
        if isinstance(answer.get("id"), str):
            ids.add(answer["id"])
        data = answer.get("data")
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                m = _IMAGE_URL.search(item["url"])
                if m:
                    ids.add(unquote(m.group(1)))
        for image_id in ids:
            self.images.remember(image_id, out.worker.url, finished=True)

    @app.route("/v1/images/<image_id>/content", methods=["GET", "HEAD"])
    async def image_content(self, request: Request, image_id: str) -> bytes | None:
        owner = await self._image_owner(image_id)
        if owner is None:
            raise NotFound(f"Unknown image_id: {image_id}")
        await self._forward_to(request, owner)
        return None

    @app.route("/v1/diffusion/generate", methods=["POST"])
    async def diffusion_generate(self, request: Request) -> bytes | None:
        await self._dispatch(request)
        return None

    @app.route("/rollout/generate", methods=["POST"])
    async def rollout_generate(self, request: Request) -> bytes | None:
        await self._dispatch(request)
        return None

    # ------------------------------------------------------------------ videos

    @app.route("/v1/videos", methods=["POST"])
    async def create_video(self, request: Request) -> bytes | None:
        return await self._create_video(request, path=None)

    @app.route("/generate_video", methods=["POST"])
    async def legacy_generate_video(self, request: Request) -> bytes | None:
        return await self._create_video(request, path=_with_query(request, b"/v1/videos"))

    async def _create_video(self, request: Request, *, path: bytes | None) -> bytes | None:
        out = await self._dispatch(request, video=True, path=path, capture=JOB_CAPTURE_LIMIT)
        self._learn_job(out.worker, _parse_json(out.result.captured))
        return None

    def _learn_job(self, worker: Worker, job: Any) -> None:
        """Remember who owns a job from a worker's job object (creation or poll answer)."""
        if not isinstance(job, dict):
            return
        for key in ("id", "video_id", "job_id"):
            job_id = job.get(key)
            if isinstance(job_id, str) and job_id:
                status = job.get("status")
                finished = isinstance(status, str) and status in FINISHED_STATES
                self.videos.remember(job_id, worker.url, finished=finished)
                return

    def _registered(self, worker_url: str | None) -> Worker | None:
        return self._pool.get(worker_url) if worker_url else None

    async def _video_owner(self, video_id: str) -> Worker | None:
        """The worker that owns job C{video_id} (asking the video workers when the router does not know)."""
        return await self._find_owner(
            "video",
            video_id,
            self.videos,
            [w for w in self._pool.workers() if not w.is_dead and w.video_support],
            "/v1/videos/" + quote(video_id, safe=""),
            learn=self._learn_job,
        )

    async def _image_owner(self, image_id: str) -> Worker | None:
        """The worker that holds image C{image_id} (asking the image workers when the router does not know)."""
        live = [w for w in self._pool.workers() if not w.is_dead]
        # Any worker may have made it when the fleet had no image-model workers then.
        suspects = [w for w in live if w.image_model] or live
        return await self._find_owner(
            "image",
            image_id,
            self.images,
            suspects,
            "/v1/images/" + quote(image_id, safe="") + "/content",
            finished=True,
        )

    async def _find_owner(
        self,
        kind: str,
        item_id: str,
        owners: OwnerMap,
        suspects: list[Worker],
        path: str,
        *,
        learn: Callable[[Worker, Any], None] | None = None,
        finished: bool = False,
    ) -> Worker | None:
        """
        The worker that holds C{item_id}: the one the router remembers, else
        the first of C{suspects} that answers C{GET path} with 200.

        Only the worker that made an image or runs a job has it, and the
        router's memory of owners is lost on a restart (or evicted), so asking
        the workers is what keeps ids valid for as long as the workers keep them.
        """
        owner = self._registered(owners.owner(item_id))
        if owner is not None:
            return owner
        if not suspects:
            return None
        # A video poll answer says more about the job (learned); an image's bytes say nothing.
        replies = await self._caller.fan_out(
            [w.url for w in suspects], "GET", path, timeout=LOOKUP_TIMEOUT, keep_body=learn is not None
        )
        for worker, reply in zip(suspects, replies, strict=True):
            if reply.status_code == 200:
                if learn is not None:
                    learn(worker, reply.body)
                if item_id not in owners:
                    owners.remember(item_id, worker.url, finished=finished)
                self.log.info(
                    "found owner {worker} of {kind} {item}", worker=worker.display_id, kind=kind, item=item_id
                )
                return worker
        return None

    @app.route("/v1/videos", methods=["GET"])
    async def list_videos(self, request: Request) -> bytes | None:
        video_id = query_arg(request, "video_id", "id")
        if video_id is not None:
            return await self._video_request(request, video_id, path=b"/v1/videos/" + quote(video_id, safe="").encode())
        workers = [w for w in self._pool.workers() if not w.is_dead and w.video_support]
        if not workers:
            raise self._unavailable(video=True)
        if len(workers) == 1:
            out = await self._forward_to(request, workers[0], capture=JOB_CAPTURE_LIMIT)
            self._learn_job_list(out.worker, _parse_json(out.result.captured))
            return None
        return await self._merged_video_list(request, workers)

    def _learn_job_list(self, worker: Worker, answer: Any) -> None:
        if isinstance(answer, dict) and isinstance(answer.get("data"), list):
            for job in answer["data"]:
                self._learn_job(worker, job)

    async def _merged_video_list(self, request: Request, workers: list[Worker]) -> bytes:
        """
        One job list across several video workers.

        Each worker lists only its own jobs, so the router asks them all and
        applies C{order}, C{after} and C{limit} to the merged list itself.
        """
        # The workers' own rule: lower-cased, anything else is desc; the
        # stable sort below keeps each worker's same-second order.
        order = (query_arg(request, "order") or "desc").lower()
        if order not in ("asc", "desc"):
            order = "desc"
        after = query_arg(request, "after")
        limit_text = query_arg(request, "limit")
        try:
            limit = int(limit_text) if limit_text is not None else None
        except ValueError:
            raise BadRequest(f"limit must be an integer, got {limit_text!r}") from None
        if limit is not None and not 1 <= limit <= 100:
            raise BadRequest(f"limit must be between 1 and 100, got {limit}")
        forwarded = {"order": order, "limit": "100"}
        replies = await self._caller.fan_out(
            [w.url for w in workers], "GET", "/v1/videos?" + urlencode(forwarded), timeout=self._config.timeout
        )
        jobs: list[dict[str, Any]] = []
        template: dict[str, Any] = {"object": "list"}
        failures: list[WorkerReply] = []
        for worker, reply in zip(workers, replies, strict=True):
            body = reply.body
            if reply.status_code == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                template = {k: v for k, v in body.items() if k not in ("data", "first_id", "last_id", "has_more")}
                for job in body["data"]:
                    if isinstance(job, dict):
                        self._learn_job(worker, job)
                        jobs.append(job)
            else:
                failures.append(reply)
        if failures and not jobs and len(failures) == len(workers):
            raise WorkerFailed("Worker request failed: " + "; ".join(
                f"{r.worker_url}: {r.error or r.status_code}" for r in failures))
        jobs.sort(key=_created_at, reverse=(order != "asc"))
        if after is not None:
            ids = [j.get("id") for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        has_more = limit is not None and len(jobs) > limit
        if limit is not None:
            jobs = jobs[:limit]
        answer = dict(template)
        answer["data"] = jobs
        answer["first_id"] = jobs[0].get("id") if jobs else None
        answer["last_id"] = jobs[-1].get("id") if jobs else None
        answer["has_more"] = has_more
        return json_body(request, 200, answer)

    async def _video_request(self, request: Request, video_id: str, *, path: bytes | None = None) -> bytes | None:
        owner = await self._video_owner(video_id)
        if owner is None:
            raise NotFound(f"Unknown video_id: {video_id}")
        out = await self._forward_to(request, owner, path=path, capture=JOB_CAPTURE_LIMIT)
        if request.method == b"DELETE" and 200 <= out.result.status < 300:
            self.videos.forget(video_id)
        else:
            self._learn_job(owner, _parse_json(out.result.captured))
        return None

    @app.route("/v1/videos/<video_id>", methods=["GET", "DELETE"])
    async def video_job(self, request: Request, video_id: str) -> bytes | None:
        return await self._video_request(request, video_id)

    @app.route("/v1/videos/<video_id>/content", methods=["GET", "HEAD"])
    async def video_content(self, request: Request, video_id: str) -> bytes | None:
        owner = await self._video_owner(video_id)
        if owner is None:
            raise NotFound(f"Unknown video_id: {video_id}")
        await self._forward_to(request, owner)
        return None

    # ------------------------------------------------------------------ models and health

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: Request) -> bytes:
        live = [w for w in self._pool.workers() if not w.is_dead]
        if not live:
            raise self._unavailable(video=False)
        replies = await self._caller.fan_out([w.url for w in live], "GET", "/v1/models", timeout=LOOKUP_TIMEOUT)
        cards: dict[str, Any] = {}
        for reply in replies:
            body = reply.body
            if reply.status_code == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                for card in body["data"]:
                    if isinstance(card, dict) and isinstance(card.get("id"), str):
                        cards.setdefault(card["id"], card)
        if not cards:
            raise NoWorkers("No healthy workers available in the pool (no model cards)")
        return json_body(request, 200, {"object": "list", "data": list(cards.values())})

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Request) -> bytes:
        counts = self._pool.counts()
        # Workers mid-refit or mid-catch-up count: requests wait for them.
        healthy = counts["healthy_workers"] + counts["busy_workers"] > 0
        return json_body(
            request,
            200 if healthy else 503,
            {"status": "healthy" if healthy else "unhealthy", **counts, **self._control.status()},
        )

    @app.route("/metrics", methods=["GET"])
    def prometheus_metrics(self, request: Request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        return self.metrics.render()

    @app.route("/health_workers", methods=["GET"])
    def health_workers(self, request: Request) -> bytes:
        return json_body(request, 200, {"workers": [w.payload() for w in self._pool.workers()]})

    # ------------------------------------------------------------------ worker management

    def _url_from_request(self, request: Request) -> str:
        url = query_arg(request, "url", "worker_url")
        if url is not None:
            return url
        body = read_json_object(request, required=False)
        if body is not None:
            for key in ("url", "worker_url"):
                value = body.get(key)
                if isinstance(value, str) and value.strip():
                    return value
                if value is not None and not isinstance(value, str):
                    raise BadRequest(f"{key} must be a string")
        raise BadRequest(_URL_REQUIRED)

    def register(self, url: str) -> tuple[Worker, bool]:
        """
        Register a worker (idempotently). A new worker's weights are unknown,
        so the control plane admits it: current at once when the fleet was
        never refitted, otherwise caught up before it gets traffic.

        @raise WorkerURLError: the URL is invalid or blocked.
        """
        worker, created = self._pool.add(url)
        if created:
            self.log.info("worker {worker} registered", worker=worker.display_id)
            worker.activity = STARTING  # no traffic before it has answered once
        return worker, created

    async def bring_up(self, worker: Worker) -> bool:
        """
        Bring a registered worker into rotation once it answers: learn its
        capabilities, then admit it (caught up to the fleet's weights first
        when needed). A worker still loading stays C{starting}; the health
        checker calls this again when it first answers.

        "Answers" means C{/health} is 200: an upstream worker opens its port
        and serves C{/v1/models} while it warms up, but answers C{/health}
        with 503 until it can take work.
        """
        health = await self._caller.call(worker.url, "GET", "/health", timeout=self._config.timeout)
        if health.status_code != 200:
            self.log.info(
                "worker {worker} is still starting (health: {health})",
                worker=worker.display_id,
                health=health.error or f"HTTP {health.status_code}",
            )
            return False
        if not await self._refresh(worker):
            return False
        if worker.activity == STARTING and worker in self._pool:
            worker.activity = None
            self._control.admit(worker)
            self.log.info("worker {worker} is up", worker=worker.display_id)
        return True

    async def _register(self, request: Request) -> Worker:
        url = self._url_from_request(request)
        try:
            worker, created = self.register(url)
        except WorkerURLError as exc:
            raise BadRequest(str(exc)) from None
        if created:
            await self.bring_up(worker)
        return worker

    def _lookup(self, worker_key: str) -> Worker:
        worker = self._pool.get(worker_key)
        if worker is None:
            raise NotFound("Worker not found")
        return worker

    @app.route("/workers", methods=["POST"])
    async def add_worker(self, request: Request) -> bytes:
        worker = await self._register(request)
        return json_body(request, 200, {"status": "success", "worker": worker.payload()})

    @app.route("/workers", methods=["GET"])
    def list_worker_payloads(self, request: Request) -> bytes:
        return json_body(request, 200, {"workers": [w.payload() for w in self._pool.workers()]})

    @app.route("/workers/<path:worker_key>", methods=["GET"])
    def get_worker(self, request: Request, worker_key: str) -> bytes:
        return json_body(request, 200, {"worker": self._lookup(worker_key).payload()})

    @app.route("/workers/<path:worker_key>", methods=["PUT"])
    async def update_worker(self, request: Request, worker_key: str) -> bytes:
        worker = self._lookup(worker_key)
        changes = read_json_object(request, required=True)
        assert changes is not None
        unknown = sorted(set(changes) - _WORKER_UPDATE_KEYS)
        if unknown:
            raise BadRequest(
                f"unknown field(s) {', '.join(unknown)}; only is_dead and refresh_video_support can be set"
            )
        if not changes:
            raise BadRequest("nothing to update: give is_dead and/or refresh_video_support")
        for key, value in changes.items():
            if not isinstance(value, bool):
                raise BadRequest(f"{key} must be a boolean, got {json.dumps(value)}")
        if "is_dead" in changes:
            if changes["is_dead"]:
                if self._pool.quarantine(worker, "marked dead by operator"):
                    self.log.info("worker {worker} marked dead by operator", worker=worker.display_id)
            elif worker.is_dead:
                self._pool.readmit(worker)
                self._control.admit(worker)
                self.log.info("worker {worker} re-admitted by operator", worker=worker.display_id)
        if changes.get("refresh_video_support"):
            await self._refresh(worker)
        return json_body(request, 200, {"status": "success", "worker": worker.payload()})

    @app.route("/workers/<path:worker_key>", methods=["DELETE"])
    def delete_worker(self, request: Request, worker_key: str) -> bytes:
        worker = self._deregister(worker_key)
        return json_body(request, 200, {"status": "success", "worker_id": worker.worker_id})

    @app.route("/add_worker", methods=["POST"])
    async def legacy_add_worker(self, request: Request) -> bytes:
        await self._register(request)
        return json_body(request, 200, {"status": "success", "worker_urls": self._urls()})

    @app.route("/list_workers", methods=["GET"])
    def legacy_list_workers(self, request: Request) -> bytes:
        return json_body(request, 200, {"urls": self._urls()})

    @app.route("/remove_worker", methods=["POST"])
    def legacy_remove_worker(self, request: Request) -> bytes:
        self._deregister(self._url_from_request(request))
        return json_body(request, 200, {"status": "success", "worker_urls": self._urls()})

    def _deregister(self, key: str) -> Worker:
        try:
            worker = self._pool.remove(key)
        except UnknownWorker:
            raise NotFound("Worker not found") from None
        self.log.info("worker {worker} deregistered", worker=worker.display_id)
        self._control.changed.notify()  # requests waiting for it must not wait any longer
        return worker

    def _urls(self) -> list[str]:
        return [w.url for w in self._pool.workers()]

    # ------------------------------------------------------------------ control plane

    @app.route("/update_weights_from_disk", methods=["POST"])
    async def update_weights(self, request: Request) -> bytes:
        refit = parse_refit(request_body(request))
        report = await _to_the_end(self._control.update_weights(refit))
        return json_body(request, refit_status(report), report.payload())

    @app.route("/release_memory_occupation", methods=["POST"])
    async def release_memory(self, request: Request) -> bytes:
        report = await _to_the_end(self._control.release_memory(request_body(request) or b"{}"))
        return json_body(request, memory_status(report), report.payload())

    @app.route("/resume_memory_occupation", methods=["POST"])
    async def resume_memory(self, request: Request) -> bytes:
        report = await _to_the_end(self._control.resume_memory(request_body(request) or b"{}"))
        return json_body(request, memory_status(report), report.payload())

    # ------------------------------------------------------------------ catch-all

    @app.route("/", branch=True)
    async def catch_all(self, request: Request) -> bytes | None:
        path = request.path.rstrip(b"/")
        if path in _FLEET_WIDE_PATHS:
            # Sent to one worker, these would silently split the fleet's
            # weights or memory state: refuse rather than route.
            shown = request.path.decode("utf-8", "replace")
            broadcast = _FLEET_WIDE_PATHS[path]
            if broadcast is not None:
                message = f"{shown} would reach one worker only; use POST {broadcast} (sent to the whole fleet)"
            else:
                message = (
                    f"{shown} changes one worker's weights; the router does not broadcast it, "
                    "and sending it to one worker would split the fleet's weights"
                )
            raise BadRequest(message)
        await self._dispatch(request, policy=self._least_loaded)
        return None

    # ------------------------------------------------------------------ errors

    @app.handle_errors(Exception)  # type: ignore[arg-type]  # returning the Failure re-raises it
    def answer_failure(self, request: IRequest, failure: Failure) -> bytes | Failure:
        """
        The one place a failure becomes an answer: a L{RouterError} is the
        router's own JSON error, anything else is a bug answered 500.
        """
        if failure.check(CancelledError):
            return failure  # the client went away; Klein finishes nothing and logs nothing
        if failure.check(UpstreamBodyFailed):
            return b""  # the proxy aborted the client connection: nothing more may be written
        if failure.check(RouterError) and not request.startedWriting:  # type: ignore[attr-defined]
            error: RouterError = failure.value
            return json_body(request, error.status, {"error": error.message})
        if request.startedWriting:  # type: ignore[attr-defined]
            # Part of an answer is out: a JSON error appended to it would corrupt
            # the stream (and the next response on a kept-alive connection).
            self.log.failure("error after the answer started: {uri}", failure, uri=request.uri)
            transport = getattr(request, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return b""
        self.log.failure("unexpected error handling {method} {uri}", failure,
                         method=request.method, uri=request.uri)
        return json_body(request, 500, {"error": f"internal router error: {failure.getErrorMessage()}"})


def _still_starting(worker: Worker) -> bool:
    """Registered, awake, not quarantined, and has never answered."""
    return worker.activity == STARTING and not worker.is_dead and not worker.is_sleeping


def _created_at(job: dict[str, Any]) -> float:
    """A job's creation time for sorting; anything but a number sorts as 0."""
    value = job.get("created_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


async def _to_the_end(operation: Coroutine[Any, Any, BroadcastReport]) -> BroadcastReport:
    """
    Run a control operation to its end even if the controller hangs up.

    Cancelling a refit half-way would leave the fleet's weights unknown
    (and every worker's reply a failure), so a client that goes away only
    stops waiting for the answer; the operation completes and is logged.
    """
    report: BroadcastReport = await _shielded(Deferred.fromCoroutine(operation))
    return report


def refit_status(report: BroadcastReport) -> int:
    """A refit is all-or-nothing for the controller: 502 when any worker failed (the body says which)."""
    return 200 if report.success else 502


def memory_status(report: BroadcastReport) -> int:
    """
    A sleep or wake answers 200 even when some workers failed (each worker's
    state is exact either way); 501 when no worker has the call at all.
    """
    return 501 if report.unsupported else 200


def parse_refit(body: bytes) -> Refit:
    """
    The controller's refit request, checked before any worker is called: a
    body every worker would refuse is the controller's mistake, not theirs.

    @raise BadRequest: not a JSON object, no C{model_path}, or a
        C{weight_version} that is neither a string nor an integer.
    """
    try:
        parsed = json.loads(body or b"{}")
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("Invalid JSON body: expected a JSON object")
    model_path = parsed.get("model_path")
    if not isinstance(model_path, str) or not model_path.strip():
        # Every worker refuses this before touching its weights; say so
        # here instead of broadcasting a refit that cannot succeed.
        raise BadRequest("model_path is required (a non-empty string)")
    label = parsed.get("weight_version")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise BadRequest("weight_version must be a string or an integer")
    return Refit(body=body, model_path=model_path, label=None if label in (None, "") else str(label))


def _shielded(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred with C{d}'s result whose cancellation leaves C{d} running."""
    out: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if out.called:
            return  # the waiter was cancelled; the result is not wanted
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(relay)
    return out


def _with_query(request: Request, path: bytes) -> bytes:
    """C{path} plus the request's raw query string, for the legacy aliases."""
    _, sep, query = request.uri.partition(b"?")
    return path + sep + query
