# -*- test-case-name: tests.unit.test_simulator_app -*-
"""
The simulated worker's HTTP surface: a Klein app speaking the real API.

Every route follows C{docs/worker-api.md} (section numbers below refer to
it): status codes, error bodies and field names are the real worker's, so
the router is tested against the answers it will really get, including the
awkward ones (text/plain 500s, 422 lists, the C{[SLEEPING]} 400, jobs that
fail after a 200). Handlers are thin: they validate with
L{twisted_router.simulator.model}, queue GPU work on the
L{GpuQueue<twisted_router.simulator.queue.GpuQueue>}, change
L{WorkerState<twisted_router.simulator.state.WorkerState>} when the work
completes, and answer with bodies from
L{twisted_router.simulator.payloads}.

Simulator-only additions, all harmless to a router: an C{X-Worker-Id}
header on every answer, C{GET /sim/state} and C{POST /sim/faults}.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, MapAdapter, Rule

from twisted_router.simulator import payloads
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import (
    DIFFUSION_GENERATE_FIELDS,
    IMAGE_EDIT_FIELDS,
    IMAGE_GENERATION_FIELDS,
    MEDIA_TYPES,
    ROLLOUT_FIELDS,
    SLEEPING_MESSAGE,
    VIDEO_FIELDS,
    Field,
    MalformedRange,
    RangeNotSatisfiable,
    TaskType,
    ValidationFailed,
    clamp_n,
    finite_non_negative,
    image_extension,
    is_json_content_type,
    json_decode_error,
    latent_shape,
    parse_ranges,
    resolve_dimensions,
    resolve_steps,
    service_seconds,
    timestep_values,
    validate,
    video_frames,
)
from twisted_router.simulator.queue import GpuQueue, Work, as_clock
from twisted_router.simulator.state import WorkerState
from twisted_router.simulator.streaming import ChunkProducer

#: Bodies up to this size are returned whole; larger ones are streamed.
INLINE_LIMIT = 1024 * 1024

JSON = b"application/json"
PLAIN = b"text/plain; charset=utf-8"

#: The message every injected generation failure carries (§1: the real
#: C{process_generation_batch} raises C{RuntimeError} with this prefix).
INJECTED_FAILURE = "Model generation returned no output. Error from scheduler: simulated failure"

#: What C{/server_info} reports as C{version} under C{--api-version upstream}.
UPSTREAM_VERSION = "0.5.10-sim"

#: Paths each imitated version does not serve (404 {"detail":"Not Found"}).
MISSING_BY_VERSION: Mapping[str, frozenset[str]] = {
    "pinned": frozenset({"/rollout/generate", "/server_info", "/model_info", "/liveness"}),
    "upstream": frozenset({"/v1/diffusion/generate"}),
}

MSGPACK = b"application/msgpack"

#: Paths upstream's warm-up middleware (C{http_server.py},
#: C{wait_for_server_warmup}) answers at once; every other request waits
#: until the warm-up ends.
#: How many received requests C{GET /sim/requests} shows (the most recent).
RECEIVED_KEPT = 256

WARMUP_BYPASS_PATHS = frozenset({"/health", "/health_generate", "/model_info", "/server_info", "/liveness"})


class Reply(Exception):
    """
    An answer other than the success path, raised from a handler or a job.

    @ivar code: HTTP status.
    @ivar body: the JSON value of the body, or C{None} for the plain-text
        C{Internal Server Error} that uncaught exceptions give (§1).
    @ivar reason: why, for the log (never sent).
    """

    def __init__(self, code: int, body: Any = None, reason: str = "") -> None:
        super().__init__(code, body, reason)
        self.code = code
        self.body = body
        self.reason = reason

    @classmethod
    def plain500(cls, reason: str) -> Reply:
        """FastAPI's answer to an uncaught exception: text/plain 500."""
        return cls(500, None, reason)

    @classmethod
    def sleeping(cls) -> Reply:
        """The 400 a generation gets while the worker sleeps (§5.3)."""
        return cls(400, {"detail": {"message": SLEEPING_MESSAGE}}, "sleeping")


@dataclass
class StoredImage:
    """An entry of the per-worker C{IMAGE_STORE}: what C{/content} serves."""

    ext: str
    size: int
    created: float


@dataclass
class VideoJob:
    """
    One C{/v1/videos} job: its public C{VideoResponse} fields and bookkeeping.

    @ivar fields: the C{VideoResponse} as served (mutated as the job runs).
    @ivar seq: arrival number, to keep list order stable for equal C{created_at}.
    """

    fields: dict[str, Any]
    seq: int
    deleted: bool = field(default=False)

    @property
    def id(self) -> str:
        return str(self.fields["id"])

    @property
    def status(self) -> str:
        return str(self.fields["status"])


def _tensor(shape: list[int], kind: str) -> dict[str, Any]:
    """An upstream C{__tensor__} dict: base64 safetensors of C{{"t": tensor}}."""
    return {
        "__tensor__": True,
        "data": payloads.Blob(payloads.safetensors_b64(tuple(shape), kind)),
        "shape": list(shape),
        "dtype": "torch.float32",
    }


def _raw_tensor(shape: list[int], kind: str) -> dict[str, Any]:
    """The same tensor for the msgpack transport: raw little-endian bytes, no base64."""
    return {
        "__tensor__": True,
        "data": payloads.RawTensor(tuple(shape), kind),
        "shape": list(shape),
        "dtype": "torch.float32",
    }


async def _settle(result: bytes | Deferred[None]) -> bytes | None:
    """Turn what L{SimulatedWorker._send} returns into a Klein route result."""
    if isinstance(result, Deferred):
        await result
        return None
    return result


class SimulatedWorker:
    """
    A CPU stand-in for one SGLang diffusion worker (C{sglang serve}).

    Construct it with a config and a reactor (anything providing
    L{IReactorTime}: the real reactor, or C{task.Clock} in tests) and serve
    L{resource}.

    @ivar worker_id: the value of the C{X-Worker-Id} header; the command line
        sets it to C{host:port} once bound when C{--worker-id} is not given.
    """

    app = Klein()
    _log = Logger()

    def __init__(self, config: SimulatorConfig, reactor: IReactorTime) -> None:
        self.config = config
        self._clock = as_clock(reactor)
        self.state = WorkerState(config)
        self.queue = GpuQueue(reactor)
        self.worker_id = config.worker_id
        self._images: dict[str, StoredImage] = {}
        self._videos: dict[str, VideoJob] = {}
        self._video_seq = 0
        self._task: TaskType = config.task_type
        self._ready_at = self._clock.seconds() + config.warmup_seconds
        #: The last requests received, with their id and trace headers (C{GET /sim/requests}).
        self.received: deque[dict[str, str | None]] = deque(maxlen=RECEIVED_KEPT)

    def record_received(self, request: Request) -> None:
        """Keep what C{request} carried for C{GET /sim/requests}: ids and W3C trace context, as received."""

        def header(name: bytes) -> str | None:
            value = request.getHeader(name)
            return None if value is None else value.decode("latin-1")

        self.received.append({
            "method": (request.method or b"").decode("latin-1"),
            "path": (request.path or b"").decode("utf-8", "replace"),
            "x_request_id": header(b"x-request-id"),
            "x_correlation_id": header(b"x-correlation-id"),
            "traceparent": header(b"traceparent"),
            "tracestate": header(b"tracestate"),
        })

    def port_opened(self) -> None:
        """The port is open: the warm-up (C{--warmup-seconds}) starts now."""
        self._ready_at = self._clock.seconds() + self.config.warmup_seconds

    @property
    def warming_up(self) -> bool:
        """Whether C{/health} still answers 503 (upstream's warm-up)."""
        return self._clock.seconds() < self._ready_at

    def after_warmup(self, action: Callable[[], object]) -> IDelayedCall:
        """Run C{action} when the warm-up ends (now, if it has)."""
        call: IDelayedCall = self._clock.callLater(max(0.0, self._ready_at - self._clock.seconds()), action)
        return call

    def resource(self) -> Resource:
        """The root resource to serve: the Klein app behind the header wrapper."""
        return _WorkerResource(self, self.app.resource())

    # ------------------------------------------------------------------
    # Answer helpers

    def _now(self) -> int:
        return int(self._clock.seconds())

    def _send(
        self,
        request: Request,
        pieces: list[bytes],
        content_type: bytes = JSON,
        code: int = 200,
        headers: Mapping[bytes, bytes] | None = None,
        chunks: Iterator[bytes] | None = None,
        length: int | None = None,
    ) -> bytes | Deferred[None]:
        """
        Answer with C{pieces} (or an iterator of C{chunks} of C{length} bytes).

        Sets C{Content-Length} as the real (FastAPI) worker does. Small
        bodies are returned whole; large ones are written by a
        L{ChunkProducer}, so the simulator never joins a 70 MB trajectory
        into one string or holds a 200 MB video.
        """
        # Twisted has no phrase for 422; uvicorn sends the standard ones.
        request.setResponseCode(code, HTTPStatus(code).phrase.encode("ascii"))
        request.setHeader(b"content-type", content_type)
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        total = sum(len(piece) for piece in pieces) if length is None else length
        request.setHeader(b"content-length", str(total).encode("ascii"))
        if chunks is None:
            if total <= INLINE_LIMIT:
                return b"".join(pieces)
            chunks = payloads.slices(pieces)
        return ChunkProducer(request, chunks).start()

    def _json(self, request: Request, value: Any, code: int = 200) -> bytes | Deferred[None]:
        return self._send(request, payloads.json_pieces(value), code=code)

    def _seconds(self, steps: int, width: int, height: int, frames: int, n: int) -> float:
        cfg = self.config
        return service_seconds(
            step_ms=cfg.step_ms,
            steps=steps,
            width=width,
            height=height,
            frames=frames,
            n=n,
            speed=cfg.speed,
            base_ms=cfg.base_ms,
        )

    def _file_path(self, request_id: str, ext: str, index: int | None = None) -> str:
        suffix = "" if index is None else f"_{index}"
        return f"{self.config.output_path.rstrip('/')}/{request_id}{suffix}.{ext}"

    def _common(self, seconds: float) -> dict[str, Any]:
        """C{peak_memory_mb} and C{inference_time_s}, null unless positive."""
        return {
            "peak_memory_mb": self.config.profile.peak_memory_mb,
            "inference_time_s": seconds if seconds > 0 else None,
        }

    @staticmethod
    def _read_json(request: Request, fields: Mapping[str, Field], model: str) -> dict[str, Any]:
        """
        Decode and validate a body model as FastAPI does, or raise its error.

        An empty body is a C{missing} 422 whatever the content type. A body
        whose C{Content-Type} is not JSON (or is missing: FastAPI's
        C{strict_content_type}) is validated as the raw text, which is the
        C{model_attributes_type} 422 with the text as C{input} (and a plain
        500 if the text is not UTF-8, where FastAPI's encoder fails). A JSON
        body that does not parse is the C{json_invalid} 422, or a 400 if it
        is not even decodable text.
        """
        raw = request.content.read() if request.content is not None else b""
        if not raw:
            raise Reply(422, {"detail": [{
                "type": "missing", "loc": ["body"], "msg": "Field required", "input": None,
            }]})
        ctypes = request.requestHeaders.getRawHeaders(b"content-type") or []
        body: Any
        if not is_json_content_type(ctypes[0].decode("latin-1") if ctypes else None):
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Reply.plain500("non-JSON body that is not UTF-8") from None
        else:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as e:
                raise Reply(422, {"detail": json_decode_error(e.msg, e.pos)}) from None
            except ValueError:
                raise Reply(400, {"detail": "There was an error parsing the body"}) from None
        try:
            return validate(body, fields, model)
        except ValidationFailed as e:
            raise Reply(422, {"detail": e.errors}) from None

    @staticmethod
    def _raw_json(request: Request) -> Any:
        """Decode a JSON body that the real handler reads unguarded (bad JSON: plain 500)."""
        raw = request.content.read() if request.content is not None else b""
        try:
            return json.loads(raw)
        except ValueError:
            raise Reply.plain500("request body is not JSON") from None

    def _generation(
        self, label: str, seconds: float, fail: bool, on_failure: Reply | None = None
    ) -> Deferred[float]:
        """
        Queue one generation; fires with its GPU seconds.

        At its turn: a sleeping worker rejects it at once (§5.3); otherwise it
        holds the GPU for C{seconds} and then succeeds, or fails as injected
        (by default with the plain 500 of §1).
        """

        def start() -> Work[float]:
            if self.state.sleeping:
                raise Reply.sleeping()

            def finish() -> float:
                if fail:
                    self.state.failed += 1
                    raise on_failure or Reply.plain500(INJECTED_FAILURE)
                self.state.served += 1
                return seconds

            return Work(seconds, finish)

        return self.queue.submit(start, label)

    # ------------------------------------------------------------------
    # Errors

    @app.handle_errors(Reply)  # type: ignore[arg-type]  # Klein types handlers with IRequest
    def _on_reply(self, request: Request, failure: Failure) -> bytes | Deferred[None]:
        reply = failure.value
        assert isinstance(reply, Reply)
        if reply.body is None:
            if reply.reason:
                self._log.debug("plain 500 for {path}: {reason}", path=request.path, reason=reply.reason)
            return self._send(request, [b"Internal Server Error"], PLAIN, reply.code)
        return self._json(request, reply.body, reply.code)

    @app.handle_errors(NotFound)  # type: ignore[arg-type]  # Klein types handlers with IRequest
    def _on_not_found(self, request: Request, failure: Failure) -> bytes | Deferred[None]:
        return self._json(request, {"detail": "Not Found"}, 404)

    @app.handle_errors(MethodNotAllowed)  # type: ignore[arg-type]  # Klein types handlers with IRequest
    def _on_bad_method(self, request: Request, failure: Failure) -> bytes | Deferred[None]:
        # Normally answered earlier by _WorkerResource; a fallback with the same shape.
        error = failure.value
        allowed = sorted(set(getattr(error, "valid_methods", None) or ()) - {"HEAD"})
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        return self._json(request, {"detail": "Method Not Allowed"}, 405)

    @app.handle_errors(Exception)  # type: ignore[arg-type]  # Klein types handlers with IRequest
    def _on_crash(self, request: Request, failure: Failure) -> bytes | Deferred[None]:
        self._log.failure("simulator bug answering {path}", failure=failure, path=request.path)
        return self._send(request, [b"Internal Server Error"], PLAIN, 500)

    # ------------------------------------------------------------------
    # Health and discovery (§2, §3): constant answers, also while sleeping.

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes | Deferred[None]:
        if self.warming_up:
            # Upstream answers 503 from the moment the port opens until its
            # warm-up ends; a router must not send work before a 200.
            return self._json(request, {"status": "warming up"}, 503)
        return self._json(request, {"status": "ok"})

    @app.route("/liveness", methods=["GET"])
    def liveness(self, request: Request) -> bytes | Deferred[None]:
        # Upstream only: the process is up, whether or not it is warm.
        return self._json(request, {"status": "ok"})

    @app.route("/server_info", methods=["GET"])
    def server_info(self, request: Request) -> bytes | Deferred[None]:
        cfg = self.config
        return self._json(request, {
            "model_path": cfg.served_model,
            "served_model_name": cfg.served_model,
            "tp_size": 1,
            "dp_size": 1,
            "version": UPSTREAM_VERSION,
        })

    @app.route("/model_info", methods=["GET"])
    def upstream_model_info(self, request: Request) -> bytes | Deferred[None]:
        return self._json(request, {
            "model_path": self.config.served_model,
            "is_generation": True,
            "model_type": "diffusion",
            "architectures": [self.config.profile.pipeline_name],
            "has_image_understanding": self._task.accepts_image_input,
            "has_audio_understanding": False,
            "task_type": self._task.name,
            "is_image_gen": self._task.data_type == "image",
        })

    @app.route("/health_generate", methods=["GET"])
    def health_generate(self, request: Request) -> bytes | Deferred[None]:
        return self._json(request, {"status": "ok"})

    def _card(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "id": cfg.served_model,
            "object": "model",
            "created": self._now(),
            "owned_by": "sglang",
            "root": cfg.served_model,
            "parent": None,
            "max_model_len": None,
            "num_gpus": cfg.num_gpus,
            "task_type": self._task.name,
            "dit_precision": "bf16",
            "vae_precision": "fp32",
            "pipeline_name": cfg.profile.pipeline_name,
            "pipeline_class": cfg.profile.pipeline_name,
        }

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request: Request) -> bytes | Deferred[None]:
        return self._json(request, {"object": "list", "data": [self._card()]})

    @app.route("/v1/models/<path:model>", methods=["GET"])
    def get_model(self, request: Request, model: str) -> bytes | Deferred[None]:
        if model != self.config.served_model:
            return self._json(request, {"error": {
                "message": f"The model '{model}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }}, 404)
        return self._json(request, self._card())

    @app.route("/models", methods=["GET"])
    def models_flat(self, request: Request) -> bytes | Deferred[None]:
        cfg = self.config
        return self._json(request, {
            "model_path": cfg.served_model,
            "num_gpus": cfg.num_gpus,
            "task_type": self._task.name,
            "dit_precision": "bf16",
            "vae_precision": "fp32",
            "pipeline_name": cfg.profile.pipeline_name,
            "pipeline_class": cfg.profile.pipeline_name,
        })

    @app.route("/v1/model_info", methods=["GET"])
    def model_info(self, request: Request) -> bytes | Deferred[None]:
        # The launch path, even after an update: the HTTP process keeps its
        # own copy of server_args (§3.1, inferred).
        return self._json(request, {"model_path": self.config.served_model})

    # ------------------------------------------------------------------
    # Images (§4.1-4.3)

    def _image_response(
        self, request_id: str, prompt: str, n: int, ext: str, response_format: str, seconds: float
    ) -> dict[str, Any]:
        """The C{ImageResponse} of a finished image job, after storing it for C{/content}."""
        if response_format not in ("url", "b64_json"):
            # Checked after the GPU work, as the real handler does.
            raise Reply(400, {"detail": f"response_format={response_format} is not supported"})
        size = self.config.image_bytes
        self._images[request_id] = StoredImage(ext, size, self._clock.seconds())
        paths = [self._file_path(request_id, ext, i if n > 1 else None) for i in range(n)]
        data: list[dict[str, Any]]
        if response_format == "url":
            data = [{
                "b64_json": None,
                "url": f"/v1/images/{request_id}/content",
                "revised_prompt": prompt,
                "file_path": paths[0],
            }]
        else:
            blob = payloads.Blob(payloads.image_b64(ext, size))
            data = [
                {"b64_json": blob, "url": None, "revised_prompt": prompt, "file_path": path}
                for path in paths
            ]
        return {"id": request_id, "created": self._now(), "data": data, **self._common(seconds)}

    @app.route("/v1/images/generations", methods=["POST"])
    async def images_generations(self, request: Request) -> bytes | None:
        params = self._read_json(request, IMAGE_GENERATION_FIELDS, "ImageGenerationsRequest")
        try:
            width, height = resolve_dimensions(
                params["width"], params["height"], params["size"], self.config.profile
            )
            steps = resolve_steps(params["num_inference_steps"], self.config.steps)
            finite_non_negative("guidance_scale", params["guidance_scale"])
            finite_non_negative("true_cfg_scale", params["true_cfg_scale"])
            if self._task.requires_image_input:
                raise ValueError(
                    f"Served model with task type '{self._task.name}' requires an "
                    "'image_path' input, but none was provided."
                )
        except ValueError as e:
            raise Reply.plain500(str(e)) from None
        n = clamp_n(params["n"])
        ext = image_extension(params["output_format"], params["background"])
        seconds = self._seconds(steps, width, height, 1, n)
        fail = self.state.draw_failure()
        if params["rollout"] and params["rollout_sde_type"] not in ("sde", "cps"):
            fail = True  # a ValueError inside the pipeline: plain 500 after the work
        request_id = str(uuid.uuid4())
        await self._generation("images/generations", seconds, fail)
        # Case-insensitive, and null means b64_json (image_api: ``(format or
        # "b64_json").lower()``); the field's default is "url".
        body = self._image_response(
            request_id, params["prompt"], n, ext, (params["response_format"] or "b64_json").lower(), seconds
        )
        return await _settle(self._json(request, body))

    @app.route("/v1/images/edits", methods=["POST"])
    async def images_edits(self, request: Request) -> bytes | None:
        args: dict[bytes, list[bytes]] = dict(request.args or {})
        form = {
            key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
            for key, values in args.items()
            if values and key not in (b"image", b"image[]", b"mask")
        }
        try:
            params = validate(form, IMAGE_EDIT_FIELDS, "ImageEditsRequest")
        except ValidationFailed as e:
            for error in e.errors:
                if error["type"] == "missing":
                    error["input"] = None
            raise Reply(422, {"detail": e.errors}) from None
        images = args.get(b"image", []) + args.get(b"image[]", [])
        urls = [
            u.decode("utf-8", "replace")
            for u in args.get(b"url", []) + args.get(b"url[]", [])
            if u
        ]
        if not images and not urls:
            raise Reply(422, {"detail": "Field 'image' or 'url' is required"})
        for url in urls:
            problem = _image_url_problem(url)
            if problem:
                raise Reply(400, {"detail": f"Failed to process image source: {problem}"})
        try:
            if not self._task.accepts_image_input:
                raise ValueError(f"input_reference is not supported for {self._task.name} models.")
            width, height = resolve_dimensions(None, None, params["size"], self.config.profile)
            steps = resolve_steps(params["num_inference_steps"], self.config.steps)
            finite_non_negative("guidance_scale", params["guidance_scale"])
            finite_non_negative("true_cfg_scale", params["true_cfg_scale"])
        except ValueError as e:
            raise Reply.plain500(str(e)) from None
        n = clamp_n(params["n"])
        ext = image_extension(params["output_format"], params["background"])
        seconds = self._seconds(steps, width, height, max(1, params["num_frames"] or 1), n)
        fail = self.state.draw_failure()
        request_id = str(uuid.uuid4())
        await self._generation("images/edits", seconds, fail)
        body = self._image_response(
            request_id, params["prompt"], n, ext, (params["response_format"] or "b64_json").lower(), seconds
        )
        return await _settle(self._json(request, body))

    @app.route("/v1/images/<image_id>/content", methods=["GET"])
    async def image_content(self, request: Request, image_id: str) -> bytes | None:
        stored = self._images.get(image_id)
        if stored is None:
            raise Reply(404, {"detail": "Image not found"})
        image = payloads.image_payload(stored.ext, stored.size)
        return await _settle(self._download(
            request, f"{image_id}.{stored.ext}", MEDIA_TYPES[stored.ext].encode(),
            image.chunks, image.length, stored.created,
        ))

    def _download(
        self,
        request: Request,
        filename: str,
        media: bytes,
        chunks: Callable[[], Iterator[bytes]],
        length: int,
        modified: float,
    ) -> bytes | Deferred[None]:
        """
        Answer a C{/content} download as Starlette's C{FileResponse} does.

        C{accept-ranges}, C{etag} (quoted md5 of C{"mtime-size"}) and
        C{last-modified} on every answer; a C{Range} (honoured only if an
        C{If-Range} names this version) is a 206 with C{content-range}, one
        that starts outside the file a 416 with C{content-range: */size}, a
        malformed one a plain 400 with Starlette's words. The file is
        streamed block by block: the blocks are shared, nothing is joined.
        """
        etag = '"' + hashlib.md5(f"{modified}-{length}".encode()).hexdigest() + '"'
        last_modified = datetimeToString(int(modified))
        headers = {
            b"content-disposition": f'attachment; filename="{filename}"'.encode(),
            b"accept-ranges": b"bytes",
            b"etag": etag.encode(),
            b"last-modified": last_modified,
        }
        raw_range = request.getHeader(b"range")
        if_range = request.getHeader(b"if-range")
        if raw_range is not None and if_range not in (None, etag.encode(), last_modified):
            raw_range = None  # If-Range names another version: the whole file
        if raw_range is not None:
            try:
                ranges = parse_ranges(raw_range.decode("latin-1"), length)
            except RangeNotSatisfiable:
                return self._send(request, [], PLAIN, 416, {b"content-range": f"*/{length}".encode()})
            except MalformedRange as e:
                return self._send(request, [str(e).encode()], PLAIN, 400)
            if len(ranges) == 1:
                ((begin, stop),) = ranges
                headers[b"content-range"] = f"bytes {begin}-{stop - 1}/{length}".encode()
                return self._send(
                    request, [], media, 206, headers,
                    chunks=payloads.byte_range(chunks(), begin, stop), length=stop - begin,
                )
            # Several disjoint ranges: Starlette answers multipart/byteranges,
            # which the simulator does not build (docs/simulator.md).
        return self._send(request, [], media, headers=headers, chunks=chunks(), length=length)

    # ------------------------------------------------------------------
    # Videos (§4.4, §4.5): asynchronous jobs

    def _parse_video_request(self, request: Request) -> dict[str, Any]:
        """Validate a JSON or multipart C{/v1/videos} body; errors are 400s."""
        ctype = (request.getHeader(b"content-type") or b"").lower()
        requires = "input_reference or reference_url is required for image-to-video generation"
        if ctype.startswith(b"multipart/form-data"):
            args: dict[bytes, list[bytes]] = dict(request.args or {})
            form: dict[str, Any] = {
                key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
                for key, values in args.items()
                if values and key != b"input_reference"
            }
            if not form.get("prompt"):
                raise Reply(400, {"detail": "prompt is required"})
            extra = form.pop("extra_body", None)
            if extra:
                try:
                    decoded = json.loads(extra)
                except ValueError:
                    decoded = {}
                if isinstance(decoded, dict):
                    for key in ("fps", "num_frames"):
                        if key in decoded:
                            form[key] = decoded[key]
            try:
                params = validate(form, VIDEO_FIELDS, "VideoGenerationsRequest")
            except ValidationFailed as e:
                raise Reply(400, {"detail": e.pydantic_text()}) from None
            has_image = bool(args.get(b"input_reference")) or bool(params["reference_url"])
            if self._task.requires_image_input and not has_image:
                raise Reply(400, {"detail": requires})
            return params
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw)
        except ValueError:
            # The real handler falls back to an empty body (``except
            # Exception: body = {}``), so a form-encoded or broken body is
            # the 400 of a request without a prompt.
            body = {}
        if isinstance(body, dict):
            for key in ("extra_body", "extra_json"):
                extra = body.pop(key, None)
                if isinstance(extra, dict):
                    body.update(extra)
        try:
            params = validate(body, VIDEO_FIELDS, "VideoGenerationsRequest")
        except ValidationFailed as e:
            raise Reply(400, {"detail": f"Invalid request body: {e.pydantic_text()}"}) from None
        has_image = bool(params["input_reference"]) or bool(params["reference_url"])
        if self._task.requires_image_input and not has_image:
            raise Reply(400, {"detail": f"Invalid request body: 400: {requires}"})
        return params

    @app.route("/v1/videos", methods=["POST"])
    def videos_create(self, request: Request) -> bytes | Deferred[None]:
        params = self._parse_video_request(request)
        profile = self.config.profile
        try:
            width, height = resolve_dimensions(None, None, params["size"], profile)
            steps = resolve_steps(params["num_inference_steps"], self.config.steps)
            finite_non_negative("guidance_scale", params["guidance_scale"])
            frames, fps = video_frames(params["num_frames"], params["fps"], params["seconds"])
        except ValueError as e:
            raise Reply(400, {"detail": str(e)}) from None
        seconds = self._seconds(steps, width, height, frames, 1)
        fail = self.state.draw_failure()
        video_id = str(uuid.uuid4())
        job = VideoJob(
            fields={
                "id": video_id,
                "object": "video",
                "model": params["model"] or "sora-2",
                "status": "queued",
                "progress": 0,
                "created_at": self._now(),
                "size": f"{width}x{height}",
                "seconds": str(round(frames / fps)),
                "quality": "standard",
                "url": None,
                "remixed_from_video_id": None,
                "completed_at": None,
                "expires_at": None,
                "error": None,
                "file_path": self._file_path(video_id, "mp4"),
                "peak_memory_mb": None,
                "inference_time_s": None,
            },
            seq=self._video_seq,
        )
        self._video_seq += 1
        self._videos[video_id] = job
        snapshot = dict(job.fields)
        self._run_video(job, seconds, fail)
        return self._json(request, snapshot)

    def _run_video(self, job: VideoJob, seconds: float, fail: bool) -> None:
        """Queue the job; it goes C{queued} → C{completed} or C{failed} (no in-between)."""

        def completed(spent: float) -> None:
            job.fields.update(
                status="completed",
                progress=100,
                completed_at=self._now(),
                **self._common(spent),
            )

        def failed(failure: Failure) -> None:
            reply = failure.value
            if isinstance(reply, Reply) and reply.body is not None:
                # str(HTTPException) of the sleeping 400, as the job records it.
                message = f"{reply.code}: {reply.body['detail']!r}"
            elif isinstance(reply, Reply):
                message = reply.reason
            else:
                message = str(reply)
            job.fields.update(status="failed", error={"message": message})

        d = self._generation("videos", seconds, fail)
        d.addCallbacks(completed, failed)

    def _video(self, video_id: str) -> VideoJob:
        job = self._videos.get(video_id)
        if job is None:
            raise Reply(404, {"detail": "Video not found"})
        return job

    @app.route("/v1/videos", methods=["GET"])
    def videos_list(self, request: Request) -> bytes | Deferred[None]:
        args: dict[bytes, list[bytes]] = request.args or {}

        def query(name: str) -> str | None:
            values = args.get(name.encode())
            return values[-1].decode("utf-8", "replace") if values else None

        errors: list[dict[str, Any]] = []
        limit: int | None = None
        raw_limit = query("limit")
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                errors.append({
                    "type": "int_parsing", "loc": ["query", "limit"],
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                    "input": raw_limit,
                })
            else:
                if limit < 1:
                    errors.append({
                        "type": "greater_than_equal", "loc": ["query", "limit"],
                        "msg": "Input should be greater than or equal to 1",
                        "input": raw_limit, "ctx": {"ge": 1},
                    })
                elif limit > 100:
                    errors.append({
                        "type": "less_than_equal", "loc": ["query", "limit"],
                        "msg": "Input should be less than or equal to 100",
                        "input": raw_limit, "ctx": {"le": 100},
                    })
        # Lower-cased, anything else is desc; then a stable sort on whole
        # seconds, so jobs of the same second stay in insertion order in
        # either direction (video_api.list_videos).
        order = (query("order") or "desc").lower()
        if order not in ("asc", "desc"):
            order = "desc"
        if errors:
            raise Reply(422, {"detail": errors})
        jobs = sorted(
            sorted(self._videos.values(), key=lambda j: j.seq),
            key=lambda j: j.fields["created_at"],
            reverse=order == "desc",
        )
        after = query("after")
        if after is not None:
            ids = [job.id for job in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        if limit is not None:
            jobs = jobs[:limit]
        return self._json(request, {"data": [dict(job.fields) for job in jobs], "object": "list"})

    @app.route("/v1/videos/<video_id>", methods=["GET"])
    def videos_get(self, request: Request, video_id: str) -> bytes | Deferred[None]:
        return self._json(request, dict(self._video(video_id).fields))

    @app.route("/v1/videos/<video_id>", methods=["DELETE"])
    def videos_delete(self, request: Request, video_id: str) -> bytes | Deferred[None]:
        job = self._video(video_id)
        # Removed from the store only: the job itself still runs (§2).
        del self._videos[video_id]
        job.deleted = True
        return self._json(request, {**job.fields, "status": "deleted"})

    @app.route("/v1/videos/<video_id>/content", methods=["GET"])
    async def videos_content(self, request: Request, video_id: str) -> bytes | None:
        job = self._video(video_id)
        if job.status != "completed":
            raise Reply(404, {"detail": "Generation is still in-progress"})
        mp4 = payloads.mp4_payload(self.config.video_bytes)
        completed = job.fields.get("completed_at")
        return await _settle(self._download(
            request, f"{video_id}.mp4", b"video/mp4", mp4.chunks, mp4.length,
            float(completed) if isinstance(completed, (int, float)) else self._clock.seconds(),
        ))

    # ------------------------------------------------------------------
    # Native RL endpoints (§4.6 and upstream §9)

    def _output_frames(self, requested: int | None) -> int:
        if self._task.data_type != "video":
            return 1
        return max(1, requested or self.config.profile.frames)

    @app.route("/v1/diffusion/generate", methods=["POST"])
    async def diffusion_generate(self, request: Request) -> bytes | None:
        params = self._read_json(request, DIFFUSION_GENERATE_FIELDS, "DiffusionGenerateRequest")
        try:
            width, height = resolve_dimensions(
                params["width"], params["height"], params["size"], self.config.profile
            )
            steps = resolve_steps(params["num_inference_steps"], self.config.steps)
            batch = params["num_outputs_per_prompt"]
            if batch < 1:
                raise ValueError(f"num_outputs_per_prompt must be a positive int, got {batch!r}")
            for name in ("guidance_scale", "guidance_scale_2", "true_cfg_scale"):
                finite_non_negative(name, params[name])
            if self._task.requires_image_input and not params["image_path"]:
                raise ValueError(
                    f"Served model with task type '{self._task.name}' requires an "
                    "'image_path' input, but none was provided."
                )
        except ValueError as e:
            raise Reply.plain500(str(e)) from None
        frames = self._output_frames(params["num_frames"])
        seconds = self._seconds(steps, width, height, frames, batch)
        fail = self.state.draw_failure()
        request_id = str(uuid.uuid4())
        await self._generation("diffusion/generate", seconds, fail)

        output: bytes | payloads.Base64
        if self._task.data_type == "video":
            ext = "mp4"
            output = payloads.mp4_b64(self.config.video_bytes)
        else:
            ext = "png"
            output = payloads.image_b64("png", self.config.image_bytes)
        trajectory: dict[str, Any] | None = None
        if params["get_latents"] or params["get_log_probs"]:
            shape = latent_shape(self._task, batch, steps, width, height, frames)
            # A TrajectoryData model: every key is sent, null when not asked
            # for. Latents come with either flag (return_trajectory_latents =
            # get_latents or get_log_probs in the pinned diffusion_api).
            trajectory = {
                "latents": payloads.Blob(payloads.npy_b64(tuple(shape))),
                "latents_shape": shape,
                "latents_dtype": "torch.float32",
                "timesteps": [
                    payloads.Blob(payloads.scalar_npy_b64(t)) for t in timestep_values(steps)
                ],
                "log_probs": None,
                "log_probs_shape": None,
            }
            if params["get_log_probs"]:
                trajectory["log_probs"] = payloads.Blob(payloads.npy_b64((batch, steps), "log_probs"))
                trajectory["log_probs_shape"] = [batch, steps]
        body = {
            "id": request_id,
            "created": self._now(),
            "output_b64": payloads.Blob(output),
            "output_format": ext,
            "file_path": self._file_path(request_id, ext),
            **self._common(seconds),
            "trajectory": trajectory,
        }
        return await _settle(self._json(request, body))

    @app.route("/rollout/generate", methods=["POST"])
    async def rollout_generate(self, request: Request) -> bytes | None:
        params = self._read_json(request, ROLLOUT_FIELDS, "RolloutRequest")
        profile = self.config.profile
        try:
            width = profile.width if params["width"] is None else params["width"]
            height = profile.height if params["height"] is None else params["height"]
            if width <= 0 or height <= 0:
                raise ValueError(f"width and height must be positive, got {width}x{height}")
            steps = resolve_steps(params["num_inference_steps"], self.config.steps)
            batch = params["num_outputs_per_prompt"]
            if batch < 1:
                raise ValueError(f"num_outputs_per_prompt must be a positive int, got {batch!r}")
            if params["rollout"] and params["rollout_sde_type"] not in ("sde", "cps"):
                raise ValueError(f"Unknown rollout_sde_type {params['rollout_sde_type']!r}")
            finite_non_negative("guidance_scale", params["guidance_scale"])
        except ValueError as e:
            raise Reply(400, {"detail": f"Invalid sampling params: {e}"}) from None
        frames = self._output_frames(params["num_frames"])
        seconds = self._seconds(steps, width, height, frames, batch)
        fail = self.state.draw_failure()
        received = self._clock.seconds()
        await self._generation(
            "rollout/generate", seconds, fail,
            on_failure=Reply(500, {"detail": "Generation failed: simulated failure"}),
        )
        seed = params["seed"]
        if seed is None:
            # RolloutResponse.seed is an int: building the answer raises a
            # ValidationError after the GPU work, which FastAPI turns into
            # its plain 500.
            raise Reply.plain500("RolloutResponse.seed: Input should be a valid integer")
        items = self._rollout_items(params, steps, width, height, frames, batch, seconds)
        done = self._clock.seconds()
        # Wall-clock marks as upstream sends them: received, the GPU work
        # (it ended now and took `seconds`), then building the answer, which
        # takes no simulated time.
        marks = {
            "srv_recv": received, "forward_start": done - seconds, "forward_end": done,
            "build_start": done, "build_end": done, "dump_end": done, "msgpack_end": done,
        }
        timing = {name: round(value, 6) for name, value in marks.items()}
        timing_header = {**timing, "request_id": items[0]["request_id"] if items else ""}
        stages = {"DenoisingStage": round(seconds * 1000, 3)}
        headers = {
            b"x-sgld-timing": json.dumps(timing_header, separators=(",", ":")).encode(),
            b"x-sgld-stages": json.dumps(stages, separators=(",", ":")).encode(),
        }
        if self.config.rollout_format == "msgpack":
            return await _settle(self._send(request, payloads.msgpack_pieces(items), MSGPACK, headers=headers))
        return await _settle(self._send(request, payloads.json_pieces(items), headers=headers))

    def _rollout_items(
        self, params: Mapping[str, Any], steps: int, width: int, height: int, frames: int,
        batch: int, seconds: float,
    ) -> list[dict[str, Any]]:
        """
        The C{RolloutResponse} list: one item per sample, sharing one
        C{request_id} and one C{seed} (upstream's C{_build_response}).

        Tensors are raw bytes in msgpack and base64 safetensors in JSON.
        Without C{rollout}, only C{generated_output} is set.
        """
        tensor = _raw_tensor if self.config.rollout_format == "msgpack" else _tensor
        if self._task.data_type == "video":
            output_shape = [3, frames, height, width]
        else:
            output_shape = [3, height, width]
        latent = latent_shape(self._task, 1, steps, width, height, frames)[2:]
        request_id = str(uuid.uuid4())
        items = []
        for _ in range(batch):
            item: dict[str, Any] = {
                "request_id": request_id,
                "prompt": params["prompt"],
                "seed": params["seed"],
                "generated_output": tensor(output_shape, "output"),
                "rollout_log_probs": None,
                "rollout_debug_tensors": None,
                "denoising_env": None,
                "dit_trajectory": None,
                "inference_time_s": seconds if seconds > 0 else None,
                "peak_memory_mb": self.config.profile.peak_memory_mb,
            }
            if params["rollout"]:
                item["rollout_log_probs"] = tensor([steps], "log_probs")
                if params["rollout_debug_mode"]:
                    item["rollout_debug_tensors"] = {
                        "rollout_variance_noises": tensor([steps, *latent], "latents"),
                        "rollout_prev_sample_means": tensor([steps, *latent], "latents"),
                        # One std per step, kept as [T, 1] (scheduler_rl_debug_mixin).
                        "rollout_noise_std_devs": tensor([steps, 1], "output"),
                        "rollout_model_outputs": tensor([steps, *latent], "latents"),
                    }
                if params["rollout_return_denoising_env"]:
                    item["denoising_env"] = {
                        "image_kwargs": None,
                        "pos_cond_kwargs": None,
                        "neg_cond_kwargs": None,
                        "guidance": tensor([1], "output"),
                    }
                if params["rollout_return_dit_trajectory"]:
                    item["dit_trajectory"] = {
                        "latents": tensor([steps + 1, *latent], "latents"),
                        "timesteps": tensor([steps], "output"),
                        "sigmas": tensor([steps + 1], "output"),
                    }
            items.append(item)
        return items

    # ------------------------------------------------------------------
    # RL control (§5): through the same FIFO queue as generations.

    @app.route("/update_weights_from_disk", methods=["POST"])
    async def update_weights(self, request: Request) -> bytes | None:
        body = self._raw_json(request)
        if not isinstance(body, dict):
            raise Reply.plain500("update_weights_from_disk body is not an object")
        model_path = body.get("model_path")
        if not model_path:
            raise Reply(400, {"success": False, "message": "model_path is required"})
        targets = body.get("target_modules")
        names = [str(t) for t in targets] if isinstance(targets, list) else None

        def start() -> Work[dict[str, Any]]:
            if self.state.sleeping:
                message = (
                    "Cannot update weights while the server is sleeping. "
                    "Call resume_memory_occupation first."
                )
                # The scheduler answers an error with no output. The pinned
                # handler crashes reading it (a plain 500, §5.1); upstream's
                # checks for it and answers a JSON 500 with the error.
                if self.config.api_version == "upstream":
                    raise Reply(500, {"success": False, "message": message})
                raise Reply.plain500(message)
            unknown = self.state.unknown_modules(names or [])
            if unknown:
                raise Reply(400, {"success": False, "message": (
                    f"Module(s) requested for update not found in pipeline: {unknown}. "
                    f"Available Module(s): {list(self.state.modules)}"
                )})
            if names == []:
                # weights_updater: an empty selection matches no module.
                raise Reply(400, {"success": False, "message": (
                    "No matching modules found for update. Requested: []. "
                    f"Available nn.Module(s): {list(self.state.modules)}"
                )})
            if not self._weights_found(str(model_path)):
                raise Reply(400, {"success": False, "message": (
                    f"Failed to download model: {model_path} is neither a local directory "
                    "nor a model that can be downloaded"
                )})

            def finish() -> dict[str, Any]:
                if self.state.fail_update:
                    raise Reply(400, {"success": False, "message": (
                        "Failed to update module 'vae': simulated load failure. "
                        "All modules rolled back to original weights."
                    )})
                updated = self.state.update(str(model_path), names)
                self._log.info(
                    "weights updated to {path} (version {version})",
                    path=model_path, version=self.state.weights_version,
                )
                return {
                    "success": True,
                    "message": f"Updated {len(updated)} modules ({', '.join(updated)}).",
                }

            return Work(self.config.update_ms / 1000.0, finish)

        result = await self.queue.submit(start, "update_weights_from_disk")
        return await _settle(self._json(request, result))

    def _weights_found(self, path: str) -> bool:
        """
        Whether a weight update can load C{path}: it exists on disk, is the
        served model, or starts with a C{--weights-prefix}. The real worker
        downloads or reads the path and fails with a 400 when it cannot.
        """
        if path == self.config.served_model or os.path.exists(path):
            return True
        return any(path.startswith(prefix) for prefix in self.config.weights_prefixes)

    @app.route("/get_weights_checksum", methods=["POST"])
    async def weights_checksum(self, request: Request) -> bytes | None:
        body = self._raw_json(request)
        if not isinstance(body, dict):
            raise Reply.plain500("get_weights_checksum body is not an object")
        wanted = body.get("module_names")
        names = [str(n) for n in wanted] if isinstance(wanted, list) else list(self.state.modules)

        def start() -> Work[dict[str, str]]:
            return Work(0.0, lambda: {
                name: self.state.checksum(name) or "not_found" for name in names
            })

        result = await self.queue.submit(start, "get_weights_checksum")
        return await _settle(self._json(request, result))

    def _memory_call(self, label: str, sleep: bool) -> Deferred[dict[str, Any]]:
        """Queue a release (C{sleep=True}) or resume; idempotent, exact messages (§5.3)."""

        def start() -> Work[dict[str, Any]]:
            if self.state.sleeping == sleep:
                message = "already sleeping" if sleep else "already awake"
                return Work(0.0, lambda: {"success": True, "sleeping": sleep, "message": message})

            def finish() -> dict[str, Any]:
                self.state.sleeping = sleep
                self._log.info("worker {what}", what="sleeping" if sleep else "awake")
                message = (
                    "released GPU memory (moved active modules to CPU)"
                    if sleep else
                    "resumed GPU memory (restored modules to original devices)"
                )
                return {"success": True, "sleeping": sleep, "message": message}

            return Work(self.config.sleep_ms / 1000.0, finish)

        return self.queue.submit(start, label)

    @app.route("/release_memory_occupation", methods=["POST"])
    async def release_memory(self, request: Request) -> bytes | None:
        result = await self._memory_call("release_memory_occupation", True)
        return await _settle(self._json(request, result))

    @app.route("/resume_memory_occupation", methods=["POST"])
    async def resume_memory(self, request: Request) -> bytes | None:
        result = await self._memory_call("resume_memory_occupation", False)
        return await _settle(self._json(request, result))

    # ------------------------------------------------------------------
    # Simulator-only (not in the real API; never needed by a router)

    def sim_state(self) -> dict[str, Any]:
        """What C{GET /sim/state} answers."""
        return {
            "worker_id": self.worker_id,
            "task_type": self._task.name,
            "model_path": self.config.served_model,
            **self.state.snapshot(),
            "queue_depth": self.queue.depth,
            "running": self.queue.running,
            "videos": len(self._videos),
        }

    @app.route("/sim/state", methods=["GET"])
    def sim_state_route(self, request: Request) -> bytes | Deferred[None]:
        return self._json(request, self.sim_state())

    @app.route("/sim/requests", methods=["GET"])
    def sim_requests(self, request: Request) -> bytes | Deferred[None]:
        return self._json(request, {"requests": list(self.received)})

    @app.route("/sim/faults", methods=["POST"])
    def sim_faults(self, request: Request) -> bytes | Deferred[None]:
        body = self._raw_json(request)
        if not isinstance(body, dict):
            raise Reply(400, {"detail": "expected a JSON object"})
        if "fail_rate" in body:
            rate = body["fail_rate"]
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
                raise Reply(400, {"detail": "fail_rate must be a number between 0 and 1"})
            self.state.fail_rate = float(rate)
        if "fail_update" in body:
            if not isinstance(body["fail_update"], bool):
                raise Reply(400, {"detail": "fail_update must be a boolean"})
            self.state.fail_update = body["fail_update"]
        self._log.info(
            "faults set: fail_rate={rate} fail_update={update}",
            rate=self.state.fail_rate, update=self.state.fail_update,
        )
        return self._json(request, self.sim_state())


def _image_url_problem(url: str) -> str | None:
    """Why an edit's C{url} field would be refused, or C{None} (not downloaded)."""
    if url.startswith(("http://", "https://")):
        return None
    if url.startswith("data:image/"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64") or not data:
            return "Invalid data URL"
        try:
            base64.b64decode(unquote(data), validate=True)
        except (binascii.Error, ValueError):
            return "Invalid base64 data in data URL"
        return None
    return "Unsupported image url format"


class _WorkerResource(Resource):
    """
    The root resource: stamps C{X-Worker-Id}, refuses disabled paths and
    wrong methods, delegates.

    A leaf, so the Klein resource behind it sees the whole path exactly as
    if it were the root.

    Wrong methods are answered here rather than by Klein because Werkzeug
    adds C{HEAD} to every C{GET} rule, while FastAPI's C{APIRoute} serves
    only the declared methods: the real worker answers C{HEAD} (and
    C{OPTIONS}) on a C{GET} route, C{/content} downloads included, with 405
    C{{"detail":"Method Not Allowed"}} and an C{Allow} header naming the
    methods of the first route registered for the path (Starlette's rule).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, worker: SimulatedWorker, inner: Resource) -> None:
        super().__init__()
        self._worker = worker
        self._inner = inner
        config = worker.config
        self._disabled = frozenset(config.disabled_endpoints) | MISSING_BY_VERSION[config.api_version]
        url_map = worker.app.url_map
        self._map = url_map.bind("sim")
        # One single-rule matcher per route, in registration order, with the
        # declared methods (no route here declares HEAD: Werkzeug added it).
        self._routes: list[tuple[MapAdapter, frozenset[str]]] = [
            (
                Map([Rule(rule.rule, endpoint=rule.endpoint)], converters=url_map.converters).bind("sim"),
                frozenset(rule.methods or ()) - {"HEAD"},
            )
            for rule in url_map.iter_rules()
        ]

    def _allowed(self, path: str, method: str) -> frozenset[str] | None:
        """The C{Allow} set if C{method} is wrong for a known C{path}, else C{None}."""
        if method != "HEAD":
            # The common case in one match: Werkzeug is right for every
            # method but the HEAD it adds.
            try:
                self._map.match(path, method=method)
            except MethodNotAllowed:
                pass
            except HTTPException:
                return None
            else:
                return None
        matching: list[frozenset[str]] = []
        for adapter, methods in self._routes:
            try:
                adapter.match(path, method="GET")
            except HTTPException:
                continue
            if method in methods:
                return None
            matching.append(methods)
        return matching[0] if matching else None

    def render(self, request: Request) -> Any:
        if self._worker.worker_id:
            request.setHeader(b"x-worker-id", self._worker.worker_id.encode("utf-8"))
        path = (request.path or b"").decode("utf-8", "replace")
        if path != "/sim/requests":
            self._worker.record_received(request)
        if self._worker.config.verbose:
            self._log.info("{method} {path}", method=request.method, path=path)
        if self._worker.warming_up and path not in WARMUP_BYPASS_PATHS:
            self._hold(request)
            return NOT_DONE_YET
        return self._dispatch(request, path)

    def _hold(self, request: Request) -> None:
        """Answer C{request} once the warm-up ends; forget it if the client leaves first."""

        def answer() -> None:
            body = self._dispatch(request, (request.path or b"").decode("utf-8", "replace"))
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        call = self._worker.after_warmup(answer)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)

    def _dispatch(self, request: Request, path: str) -> Any:
        if path in self._disabled:
            return _plain_json(request, 404, b'{"detail":"Not Found"}')
        try:
            route_path = "/" + "/".join(seg.decode("utf-8") for seg in request.postpath or [])
        except UnicodeDecodeError:
            route_path = None
        if route_path is not None:
            allowed = self._allowed(route_path, (request.method or b"").decode("latin-1"))
            if allowed is not None:
                request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
                return _plain_json(request, 405, b'{"detail":"Method Not Allowed"}')
        return self._inner.render(request)


def _plain_json(request: Request, code: int, body: bytes) -> bytes:
    """
    Answer a small constant JSON body.

    To C{HEAD}, only the headers, with the body's C{Content-Length} as
    Starlette sends it (returning the body would make Twisted log a warning
    each time before eating it).
    """
    request.setResponseCode(code, HTTPStatus(code).phrase.encode("ascii"))
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body
