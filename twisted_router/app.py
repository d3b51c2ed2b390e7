"""
The router's HTTP surface: the Klein routes, and nothing else.

Each route parses its request, delegates to the piece that owns the job
(L{Dispatcher} for sending a request to a worker, L{Fleet} for workers
joining and leaving, L{JobOwners} for who owns an image or a job,
L{FleetController} for refits and sleep/wake), and answers. Everything the
router says itself is JSON C{{"error": ...}}, raised anywhere below as a
L{RouterError} and answered by the one error handler at the end; every
worker answer is passed through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.routing import RequestRedirect

from twisted_router.auth import (
    BASIC_ENDPOINTS,
    BROWSER_ENDPOINTS,
    CATCH_ALL_ENDPOINTS,
    Forbidden,
    Keys,
    Unauthorized,
    access_of,
)
from twisted_router.control import BroadcastReport, FleetController, Refit
from twisted_router.cost import predict_work
from twisted_router.dashboard import DashboardPage, load_page
from twisted_router.dispatch import Dispatcher
from twisted_router.errors import (
    AuthenticationRequired,
    BadRequest,
    InsufficientScope,
    NotFound,
    RouterError,
    answer_json,
)
from twisted_router.fleet import Fleet, unavailable
from twisted_router.jobs import IMAGE_CAPTURE_LIMIT, JOB_CAPTURE_LIMIT, JobOwners, parse_json
from twisted_router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from twisted_router.metrics import RouterMetrics, broadcast_outcome
from twisted_router.policies import LeastRequest
from twisted_router.pool import Worker, WorkerPool
from twisted_router.proxy import ForwardResult, UpstreamBodyFailed
from twisted_router.requestid import record_of
from twisted_router.urls import WorkerURLError

__all__ = ["Router", "memory_status", "parse_refit", "refit_status"]

#: Largest JSON body accepted on the router's own management endpoints.
MAX_ADMIN_BODY = 1024 * 1024

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


#: Route label of the catch-all: every path no route knows, as one series.
CATCH_ALL_ROUTE = "/*"


def route_template(endpoint: str) -> str:
    """
    The route template of a Klein endpoint (C{/workers/<path:worker_key>}),
    never the raw path, so ids cannot multiply metric series or log fields.
    """
    if endpoint in CATCH_ALL_ENDPOINTS:
        return CATCH_ALL_ROUTE
    return _ROUTES.get(endpoint, endpoint)


class GuardedKlein(Klein):
    """
    Klein, with the router's one access check: after Klein has matched the
    route and before its handler runs, the request must carry the key the
    endpoint's class (L{twisted_router.auth.ENDPOINT_ACCESS}) requires.
    A refusal is a L{RouterError}, answered by L{Router.answer_failure}.
    """

    def execute_endpoint(self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        router = self._instance
        record = record_of(request)
        if record is not None:
            record.route = route_template(endpoint)
        if isinstance(router, Router):
            router.admit(endpoint, request)
        return super().execute_endpoint(endpoint, request, *args, **kwargs)


class Router:
    """The Klein application: one instance per running router."""

    app = GuardedKlein()
    log = Logger()

    def __init__(
        self,
        *,
        pool: WorkerPool,
        fleet: Fleet,
        dispatcher: Dispatcher,
        jobs: JobOwners,
        control: FleetController,
        timeout: float,
        keys: Keys | None = None,
        catch_all: bool = True,
        dashboard: DashboardPage | None = None,
    ) -> None:
        """
        @param timeout: C{--timeout}, for the job-list calls the router makes itself.
        @param keys: C{--api-key} and C{--admin-api-key} (none: every endpoint open).
        @param catch_all: C{--catch-all}; off, paths no route knows are answered 404.
        @param dashboard: the fleet page (default: the one shipped in the package).
        """
        self._dashboard = dashboard or load_page()
        self._keys = keys or Keys()
        self._catch_all = catch_all
        self._pool = pool
        self._fleet = fleet
        self._dispatcher = dispatcher
        self._jobs = jobs
        self._control = control
        self._timeout = timeout
        self._least_loaded = LeastRequest()
        self.metrics = RouterMetrics(pool, fleet_version=lambda: control.version, queue_status=dispatcher.queue_status)

    def admit(self, endpoint: str, request: IRequest) -> None:
        """
        The access check of every request, run once Klein knows the endpoint.
        An admitted request's C{Authorization} header is removed when the
        router has keys, so no worker ever receives a router key.

        @raise AuthenticationRequired: no key or a wrong one (401).
        @raise InsufficientScope: the API key where the admin key is needed (403).
        @raise NotFound: the catch-all with C{--catch-all off}.
        """
        try:
            self._keys.check(
                access_of(endpoint),
                request.requestHeaders.getRawHeaders(b"authorization"),
                basic=endpoint in BASIC_ENDPOINTS,
            )
        except Unauthorized as exc:
            raise AuthenticationRequired(str(exc), basic=endpoint in BROWSER_ENDPOINTS) from None
        except Forbidden as exc:
            raise InsufficientScope(str(exc)) from None
        if self._keys.any:
            # The router's key is the router's: never pass it on to a worker
            # (nor into a worker's logs). Without router keys it is forwarded
            # as before, for workers that check keys of their own.
            request.requestHeaders.removeHeader(b"authorization")
        if endpoint in CATCH_ALL_ENDPOINTS and not self._catch_all:
            shown = request.path.decode("utf-8", "replace")
            raise NotFound(f"no route for {shown} (the catch-all to worker paths is off: --catch-all off)")

    # ------------------------------------------------------------------ generation

    @app.route("/v1/images/generations", methods=["POST"])
    async def images_generations(self, request: Request) -> None:
        await self._generate_image(request, path=None)

    @app.route("/generate", methods=["POST"])
    async def legacy_generate(self, request: Request) -> None:
        await self._generate_image(request, path=_with_query(request, b"/v1/images/generations"))

    @app.route("/v1/images/edits", methods=["POST"])
    async def images_edits(self, request: Request) -> None:
        await self._generate_image(request, path=None)

    def _work(self, request: Request, route: bytes) -> float | None:
        """The predicted work of a generation to C{route}, when the dispatcher weighs work."""
        if not self._dispatcher.weighs_work:
            return None
        return predict_work(route, request.getHeader(b"content-type"), request.content)

    async def _generate_image(self, request: Request, *, path: bytes | None) -> None:
        out = await self._dispatcher.dispatch(
            request,
            image=True,
            path=path,
            capture=IMAGE_CAPTURE_LIMIT,
            work=self._work(request, request.path),
        )
        self._jobs.learn_images(out.worker, out.result)

    @app.route("/v1/images/<image_id>/content", methods=["GET", "HEAD"])
    async def image_content(self, request: Request, image_id: str) -> None:
        owner = await self._jobs.image_owner(image_id)
        if owner is None:
            raise NotFound(f"Unknown image_id: {image_id}")
        await self._dispatcher.forward_to(request, owner)

    @app.route("/v1/diffusion/generate", methods=["POST"])
    async def diffusion_generate(self, request: Request) -> None:
        await self._dispatcher.dispatch(request, work=self._work(request, b"/v1/diffusion/generate"))

    @app.route("/rollout/generate", methods=["POST"])
    async def rollout_generate(self, request: Request) -> None:
        await self._dispatcher.dispatch(request, work=self._work(request, b"/rollout/generate"))

    # ------------------------------------------------------------------ videos

    @app.route("/v1/videos", methods=["POST"])
    async def create_video(self, request: Request) -> None:
        await self._create_video(request, path=None)

    @app.route("/generate_video", methods=["POST"])
    async def legacy_generate_video(self, request: Request) -> None:
        await self._create_video(request, path=_with_query(request, b"/v1/videos"))

    async def _create_video(self, request: Request, *, path: bytes | None) -> None:
        work = self._work(request, b"/v1/videos")

        def created(worker: Worker, result: ForwardResult) -> None:
            # Inside the creation's lease, so the job takes over its slot without a gap.
            job = parse_json(result.captured)
            self._jobs.learn_job(worker, job)
            if 200 <= result.status < 300:
                self._jobs.job_started(worker, job, work)

        await self._dispatcher.dispatch(
            request, video=True, path=path, capture=JOB_CAPTURE_LIMIT, work=work, on_answer=created
        )

    async def _video_request(self, request: Request, video_id: str, *, path: bytes | None = None) -> None:
        owner = await self._video_owner(video_id)
        out = await self._dispatcher.forward_to(request, owner, path=path, capture=JOB_CAPTURE_LIMIT)
        if request.method == b"DELETE" and 200 <= out.result.status < 300:
            self._jobs.forget_video(video_id)
        else:
            self._jobs.learn_job(owner, parse_json(out.result.captured))

    async def _video_owner(self, video_id: str) -> Worker:
        owner = await self._jobs.video_owner(video_id)
        if owner is None:
            raise NotFound(f"Unknown video_id: {video_id}")
        return owner

    @app.route("/v1/videos/<video_id>", methods=["GET", "DELETE"])
    async def video_job(self, request: Request, video_id: str) -> None:
        await self._video_request(request, video_id)

    @app.route("/v1/videos/<video_id>/content", methods=["GET", "HEAD"])
    async def video_content(self, request: Request, video_id: str) -> None:
        await self._dispatcher.forward_to(request, await self._video_owner(video_id))

    @app.route("/v1/videos", methods=["GET"])
    async def list_videos(self, request: Request) -> bytes | None:
        video_id = query_arg(request, "video_id", "id")
        if video_id is not None:
            await self._video_request(request, video_id, path=b"/v1/videos/" + quote(video_id, safe="").encode())
            return None
        workers = [w for w in self._pool.workers() if not w.is_dead and w.video_support]
        if not workers:
            raise unavailable(self._pool, video=True)
        if len(workers) == 1:
            out = await self._dispatcher.forward_to(request, workers[0], capture=JOB_CAPTURE_LIMIT)
            self._jobs.learn_job_list(out.worker, parse_json(out.result.captured))
            return None
        # Each worker lists only its own jobs: the router applies order,
        # after and limit to the merged list, by the workers' own rules
        # (order lower-cased, anything else is desc).
        order = (query_arg(request, "order") or "desc").lower()
        if order not in ("asc", "desc"):
            order = "desc"
        limit = query_int(request, "limit")
        if limit is not None and not 1 <= limit <= 100:
            raise BadRequest(f"limit must be between 1 and 100, got {limit}")
        answer = await self._jobs.merged_video_list(
            workers, order=order, after=query_arg(request, "after"), limit=limit, timeout=self._timeout
        )
        return answer_json(request, 200, answer)

    # ------------------------------------------------------------------ models and health

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: Request) -> bytes:
        cards = await self._fleet.model_cards()
        return answer_json(request, 200, {"object": "list", "data": cards})

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Request) -> bytes:
        counts = self._pool.counts()
        # Workers mid-refit or mid-catch-up count: requests wait for them.
        healthy = counts["healthy_workers"] + counts["busy_workers"] > 0
        return answer_json(
            request,
            200 if healthy else 503,
            {
                "status": "healthy" if healthy else "unhealthy",
                **counts,
                **self._control.status(),
                **self._dispatcher.queue_status(),
            },
        )

    @app.route("/metrics", methods=["GET"])
    def prometheus_metrics(self, request: Request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        return self.metrics.render()

    @app.route("/dashboard", methods=["GET", "HEAD"])
    def dashboard(self, request: Request) -> bytes:
        """The live fleet page; its script reads C{/health} and C{/workers} (docs: README "Dashboard")."""
        for name, value in self._dashboard.headers.items():
            request.setHeader(name, value)
        return self._dashboard.body

    @app.route("/health_workers", methods=["GET"])
    def health_workers(self, request: Request) -> bytes:
        return answer_json(request, 200, {"workers": [w.payload() for w in self._pool.workers()]})

    # ------------------------------------------------------------------ worker management

    async def _register(self, request: Request) -> Worker:
        url = _url_from_request(request)
        try:
            worker, created = await self._fleet.register(url)
        except WorkerURLError as exc:
            raise BadRequest(str(exc)) from None
        if created:
            await self._fleet.bring_up(worker)
        return worker

    @app.route("/workers", methods=["POST"])
    async def add_worker(self, request: Request) -> bytes:
        worker = await self._register(request)
        return answer_json(request, 200, {"status": "success", "worker": worker.payload()})

    @app.route("/workers", methods=["GET"])
    def list_worker_payloads(self, request: Request) -> bytes:
        queue = {**self._dispatcher.queue_status(), "max_inflight_per_worker": self._dispatcher.max_inflight_per_worker}
        return answer_json(request, 200, {"workers": [w.payload() for w in self._pool.workers()], "queue": queue})

    @app.route("/workers/<path:worker_key>", methods=["GET"])
    def get_worker(self, request: Request, worker_key: str) -> bytes:
        return answer_json(request, 200, {"worker": self._fleet.lookup(worker_key).payload()})

    @app.route("/workers/<path:worker_key>", methods=["PUT"])
    async def update_worker(self, request: Request, worker_key: str) -> bytes:
        worker = self._fleet.lookup(worker_key)
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
            self._fleet.set_dead(worker, changes["is_dead"])
        if changes.get("refresh_video_support"):
            await self._fleet.refresh_capabilities(worker)
        return answer_json(request, 200, {"status": "success", "worker": worker.payload()})

    @app.route("/workers/<path:worker_key>", methods=["DELETE"])
    def delete_worker(self, request: Request, worker_key: str) -> bytes:
        worker = self._fleet.deregister(worker_key)
        return answer_json(request, 200, {"status": "success", "worker_id": worker.worker_id})

    @app.route("/add_worker", methods=["POST"])
    async def legacy_add_worker(self, request: Request) -> bytes:
        await self._register(request)
        return answer_json(request, 200, {"status": "success", "worker_urls": self._urls()})

    @app.route("/list_workers", methods=["GET"])
    def legacy_list_workers(self, request: Request) -> bytes:
        return answer_json(request, 200, {"urls": self._urls()})

    @app.route("/remove_worker", methods=["POST"])
    def legacy_remove_worker(self, request: Request) -> bytes:
        self._fleet.deregister(_url_from_request(request))
        return answer_json(request, 200, {"status": "success", "worker_urls": self._urls()})

    def _urls(self) -> list[str]:
        return [w.url for w in self._pool.workers()]

    # ------------------------------------------------------------------ control plane

    @app.route("/update_weights_from_disk", methods=["POST"])
    async def update_weights(self, request: Request) -> bytes:
        refit = parse_refit(request_body(request))
        report = await _to_the_end(self._control.update_weights(refit))
        self._broadcast_logged(request, "refit", report)
        return answer_json(request, refit_status(report), report.payload())

    @app.route("/release_memory_occupation", methods=["POST"])
    async def release_memory(self, request: Request) -> bytes:
        report = await _to_the_end(self._control.release_memory(memory_body(request)))
        self._broadcast_logged(request, "sleep", report)
        return answer_json(request, memory_status(report), report.payload())

    @app.route("/resume_memory_occupation", methods=["POST"])
    async def resume_memory(self, request: Request) -> bytes:
        report = await _to_the_end(self._control.resume_memory(memory_body(request)))
        self._broadcast_logged(request, "wake", report)
        return answer_json(request, memory_status(report), report.payload())

    def _broadcast_logged(self, request: Request, operation: str, report: BroadcastReport) -> None:
        """One line per refit, sleep or wake, with the id of the request that asked for it."""
        record = record_of(request)
        failed = [r.worker_url for r in report.replies if not r.success]
        self.log.info(
            "{operation} by request {request_id}: {outcome} ({succeeded}/{total} workers){failed_note}",
            operation=operation,
            request_id=record.request_id if record is not None else "-",
            outcome=broadcast_outcome(report),
            succeeded=len(report.replies) - len(failed),
            total=len(report.replies),
            failed_workers=failed,
            failed_note=f"; failed: {', '.join(failed)}" if failed else "",
            weight_version=report.weight_version,
        )

    # ------------------------------------------------------------------ catch-all

    @app.route("/", branch=True)
    async def catch_all(self, request: Request) -> None:
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
        await self._dispatcher.dispatch(request, policy=self._least_loaded)

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
        if failure.check(RequestRedirect) and not request.startedWriting:  # type: ignore[attr-defined]
            # Werkzeug matches some paths only once it has merged the empty segments
            # an encoded slash (%2F) leaves, and asks for a redirect; the router never
            # redirects, and such a path names nothing (found by test_hostile_input).
            shown = request.path.decode("utf-8", "replace")[:200]
            return answer_json(
                request, 400, {"error": f"Invalid path {shown!r}: an encoded slash (%2F) leaves an empty segment"}
            )
        if failure.check(RouterError) and not request.startedWriting:  # type: ignore[attr-defined]
            error: RouterError = failure.value
            for name, value in error.headers.items():
                request.setHeader(name, value)
            return answer_json(request, error.status, {"error": error.message})
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
        return answer_json(request, 500, {"error": f"internal router error: {failure.getErrorMessage()}"})


#: Endpoint name -> route template, once the routes above are all declared.
_ROUTES: dict[str, str] = {rule.endpoint: rule.rule for rule in Router.app.url_map.iter_rules()}


# ---------------------------------------------------------------------- parsing requests


def request_body(request: Request, limit: int = -1) -> bytes:
    """The request body Twisted buffered before the route ran (read from the start)."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read(limit)


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


def query_int(request: Request, name: str) -> int | None:
    """
    A whole-number query argument, or None when absent or empty.

    Strict: ASCII digits only. C{int()} alone would take C{"3_0"}, C{"+3"},
    C{" 3"} and non-ASCII digits, none of which a worker would.

    @raise BadRequest: anything else.
    """
    text = query_arg(request, name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"{name} must be an integer, got {text[:50]!r}")
    if len(text) > 20:
        # int() refuses very long digit strings with a ValueError (a 500 here).
        raise BadRequest(f"{name} is out of range ({len(text)} digits)")
    return int(text)


def memory_body(request: Request) -> bytes:
    """
    The body of a sleep or wake, checked before any worker is called: empty
    (sent on as C{{}}) or a JSON object (sent on unchanged).

    @raise BadRequest: anything else (C{Invalid JSON body: ...}).
    """
    if read_json_object(request, required=False) is None:
        return b"{}"
    return request_body(request)


def _url_from_request(request: Request) -> str:
    """The worker URL of a registration or removal: C{?url=}/C{?worker_url=}, else the JSON body's."""
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


def _with_query(request: Request, path: bytes) -> bytes:
    """C{path} plus the request's raw query string, for the legacy aliases."""
    _, sep, query = request.uri.partition(b"?")
    return path + sep + query


# ---------------------------------------------------------------------- answering control calls


def refit_status(report: BroadcastReport) -> int:
    """A refit is all-or-nothing for the controller: 502 when any worker failed (the body says which)."""
    return 200 if report.success else 502


def memory_status(report: BroadcastReport) -> int:
    """
    A sleep or wake answers 200 even when some workers failed (each worker's
    state is exact either way); 501 when no worker has the call at all.
    """
    return 501 if report.unsupported else 200


async def _to_the_end(operation: Coroutine[Any, Any, BroadcastReport]) -> BroadcastReport:
    """
    Run a control operation to its end even if the controller hangs up.

    Cancelling a refit half-way would leave the fleet's weights unknown
    (and every worker's reply a failure), so a client that goes away only
    stops waiting for the answer; the operation completes and is logged.
    """
    report: BroadcastReport = await _shielded(Deferred.fromCoroutine(operation))
    return report


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
