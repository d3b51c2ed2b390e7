#!/usr/bin/env python3
"""
Conformance probe for an SGLang diffusion worker (real or simulated).

Checks that a live worker answers every endpoint the twisted_router relies
on, with the shapes documented in docs/worker-api.md, and prints
one PASS/FAIL/INFO line per check and a summary. Exit status 0 if and only
if no check failed (2 for a usage error).

    python sglang/check_worker.py http://gpu-node-3:30000
    python sglang/check_worker.py http://127.0.0.1:30000 --skip-control

Standard library only, so it runs on a GPU node without the router
installed. Generations are kept small (--size, --steps, --video-frames) so a
real GPU answers in seconds.

What it does to the worker: it generates a few small outputs, and, unless
--skip-control is given, puts the worker to sleep and wakes it again (it
always tries to wake it before exiting). It never changes the weights
unless --update-model-path is given. Use --skip-control on a worker that is
serving production traffic.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import struct
import sys
import time
import traceback
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TASK_TYPES = {"T2V", "I2V", "TI2V", "T2I", "I2I", "TI2I", "I2M"}
IMAGE_TASKS = {"T2I", "I2I", "TI2I"}
VIDEO_TASKS = {"T2V", "I2V", "TI2V"}
REQUIRES_IMAGE = {"I2V", "I2I", "I2M"}
CARD_FIELDS = (
    "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "num_gpus",
    "task_type", "dit_precision", "vae_precision", "pipeline_name", "pipeline_class",
)
IMAGE_ITEM_FIELDS = ("b64_json", "url", "revised_prompt", "file_path")
VIDEO_FIELDS = (
    "id", "object", "model", "status", "progress", "created_at", "size", "seconds",
    "quality", "url", "completed_at", "error",
)
#: Every key of /v1/diffusion/generate's trajectory (a pydantic model: nulls are sent).
TRAJECTORY_FIELDS = ("latents", "latents_shape", "latents_dtype", "timesteps", "log_probs", "log_probs_shape")

ROLLOUT_ITEM_FIELDS = (
    "request_id", "prompt", "seed", "generated_output", "rollout_log_probs",
    "inference_time_s", "peak_memory_mb",
)
SLEEPING_PREFIX = "[SLEEPING]"


class CheckFailed(Exception):
    """A check's expectation did not hold; the message says what was seen."""


class Unreachable(Exception):
    """The worker does not accept connections: nothing else can be checked."""


@dataclass
class Answer:
    """One HTTP answer, body fully read (or counted, for downloads)."""

    code: int
    headers: dict[str, str]
    body: bytes
    length: int = 0

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CheckFailed(
                f"status {self.code}: body is not JSON: {self.body[:200]!r}"
            ) from None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass
class Report:
    """Collects results and prints them as they come."""

    out: Any = sys.stdout
    results: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.results.append((status, name, detail))
        line = f"{status:<5} {name}"
        if detail:
            line += f": {detail}"
        print(line, file=self.out, flush=True)

    def count(self, status: str) -> int:
        return sum(1 for s, _, _ in self.results if s == status)


class Worker:
    """A tiny urllib client for one worker."""

    def __init__(self, base: str, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = None,
        keep: int | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """
        Send one request; non-2xx answers are returned, not raised.

        @param body: sent as JSON when not C{None}.
        @param keep: read the whole body but keep only its first C{keep}
            bytes (for large downloads); C{Answer.length} has the full size.
        """
        data = raw
        headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            resp = e
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                raise Unreachable(f"connection refused by {self.base}") from None
            raise Unreachable(f"cannot reach {self.base}: {e.reason}") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise Unreachable(f"cannot reach {self.base}: {e}") from None
        with resp:
            hdrs = {k.lower(): v for k, v in resp.headers.items()}
            if keep is None:
                content = resp.read()
                return Answer(resp.code, hdrs, content, len(content))
            head = b""
            total = 0
            while True:
                chunk = resp.read(64 * 1024)
                if not chunk:
                    break
                if len(head) < keep:
                    head += chunk[: keep - len(head)]
                total += len(chunk)
            return Answer(resp.code, hdrs, head, total)


# ---------------------------------------------------------------------------
# Decoders (no numpy needed)


def image_kind(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def parse_npy(blob: str) -> tuple[tuple[int, ...], str]:
    """Decode a base64 C{.npy} and check its size; return its shape and dtype."""
    raw = base64.b64decode(blob)
    if raw[:6] != b"\x93NUMPY":
        raise CheckFailed("not a .npy file (bad magic)")
    if raw[6] == 1:
        (hlen,) = struct.unpack("<H", raw[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", raw[8:12])
        start = 12
    header = ast.literal_eval(raw[start : start + hlen].decode("latin1"))
    shape = tuple(int(d) for d in header["shape"])
    descr = str(header["descr"])
    itemsize = int(descr[2:]) if descr[2:].isdigit() else 4
    count = 1
    for d in shape:
        count *= d
    if len(raw) - start - hlen != count * itemsize:
        raise CheckFailed(f".npy data is {len(raw) - start - hlen} bytes, shape {shape} needs {count * itemsize}")
    return shape, descr


def parse_tensor(obj: Any) -> tuple[int, ...]:
    """
    Check an upstream C{__tensor__} dict and return its shape: raw bytes in
    C{data} (the msgpack transport) or base64 safetensors (the JSON one).
    """
    if not isinstance(obj, dict) or obj.get("__tensor__") is not True:
        raise CheckFailed(f"not a __tensor__ object: {str(obj)[:120]}")
    if isinstance(obj["data"], bytes):
        shape = tuple(int(d) for d in obj.get("shape", []))
        count = 1
        for dim in shape:
            count *= dim
        if obj.get("dtype") == "torch.float32" and len(obj["data"]) != 4 * count:
            raise CheckFailed(f"raw tensor of shape {list(shape)} has {len(obj['data'])} bytes")
        return shape
    raw = base64.b64decode(obj["data"])
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise CheckFailed("safetensors file holds no tensor")
    entry = header[names[0]]
    shape = tuple(int(d) for d in entry["shape"])
    start, end = entry["data_offsets"]
    if len(raw) - 8 - hlen < end:
        raise CheckFailed("safetensors data shorter than its header says")
    if list(shape) != list(obj.get("shape", [])):
        raise CheckFailed(f"safetensors shape {list(shape)} != declared shape {obj.get('shape')}")
    return shape


def tiny_png(width: int = 64, height: int = 64) -> bytes:
    """A grey RGB PNG, used as the input image of image-conditioned models."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content, ctype in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def expect_code(answer: Answer, code: int) -> None:
    if answer.code != code:
        raise CheckFailed(f"expected status {code}, got {answer.code}: {answer.body[:300]!r}")


def detail_text(answer: Answer) -> str:
    try:
        return json.dumps(answer.json().get("detail"))
    except (CheckFailed, AttributeError):
        return answer.body[:300].decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# The probe


class Probe:
    """Runs every check against one worker."""

    def __init__(self, worker: Worker, report: Report, options: argparse.Namespace) -> None:
        self.w = worker
        self.report = report
        self.opts = options
        self.task = ""
        self.model = ""
        self.width, self.height = (int(v) for v in options.size.lower().split("x"))
        self.vwidth, self.vheight = (int(v) for v in options.video_size.lower().split("x"))
        self.png = tiny_png()
        self.native_available = True
        self.rollout_available = False

    def run(self, name: str, fn: Callable[[], str | None]) -> bool:
        """Run one check; PASS with its detail (none if it returned None), FAIL on CheckFailed or a crash."""
        try:
            detail = fn()
        except (CheckFailed, Unreachable) as e:
            self.report.add("FAIL", name, str(e))
            if isinstance(e, Unreachable):
                raise
            return False
        except Exception as e:  # a bug or an answer too odd to parse: still a failure
            self.report.add("FAIL", name, f"{type(e).__name__}: {e}")
            if self.opts.verbose:
                traceback.print_exc()
            return False
        if detail is not None:  # None: the check reported an INFO line instead
            self.report.add("PASS", name, detail)
        return True

    def info(self, name: str, detail: str) -> None:
        self.report.add("INFO", name, detail)

    # -- discovery ---------------------------------------------------------

    def health(self) -> str:
        started = time.monotonic()
        a = self.w.request("GET", "/health")
        warming = 0.0
        while a.code == 503 and time.monotonic() - started < self.opts.timeout:
            # Upstream answers 503 while it warms up, with its port open.
            time.sleep(0.2)
            warming = time.monotonic() - started
            a = self.w.request("GET", "/health")
        expect_code(a, 200)
        if warming:
            self.info("health.warmup", f"/health answered 503 for {warming:.1f}s before 200 (warm-up)")
        expect(a.json() == {"status": "ok"} or a.json().get("status") == "ok",
               f"unexpected body {a.body[:200]!r}")
        return "200 {\"status\":\"ok\"}"

    def liveness(self) -> str | None:
        a = self.w.request("GET", "/liveness")
        if a.code == 404:
            self.info("liveness", "no /liveness (the pinned fork has none)")
            return None
        expect_code(a, 200)
        return "200"

    def server_info(self) -> str | None:
        a = self.w.request("GET", "/server_info")
        if a.code == 404:
            self.info("server_info", "no /server_info (the pinned fork has none)")
            return None
        expect_code(a, 200)
        j = a.json()
        missing = [k for k in ("model_path", "version") if k not in j]
        expect(not missing, f"/server_info lacks {missing}")
        return f"version {j.get('version')!r}"

    def health_generate(self) -> str:
        a = self.w.request("GET", "/health_generate")
        expect_code(a, 200)
        return "200"

    def models(self) -> str:
        a = self.w.request("GET", "/v1/models")
        expect_code(a, 200)
        body = a.json()
        expect(body.get("object") == "list", f"object is {body.get('object')!r}, expected 'list'")
        data = body.get("data")
        expect(isinstance(data, list) and len(data) == 1, f"expected exactly one model card, got {data!r:.200}")
        card = data[0]
        expect(isinstance(card.get("id"), str) and bool(card["id"]), "card has no id")
        expect(card.get("task_type") in TASK_TYPES, f"task_type {card.get('task_type')!r} is not one of {sorted(TASK_TYPES)}")
        self.task = card["task_type"]
        self.model = card["id"]
        missing = [f for f in CARD_FIELDS if f not in card]
        if missing:
            self.info("models.card_fields", f"card lacks {missing} (the pinned worker has every field)")
        return f"model {self.model!r}, task_type {self.task}"

    def model_info(self) -> str:
        a = self.w.request("GET", "/v1/model_info")
        expect_code(a, 200)
        path = a.json().get("model_path")
        expect(isinstance(path, str) and bool(path), f"no model_path in {a.body[:200]!r}")
        if path != self.model:
            self.info("model_info.model_path", f"{path!r} differs from the card id {self.model!r}")
        return f"model_path {path!r}"

    # -- images ------------------------------------------------------------

    def _image_request(self, fmt: str | None) -> Answer:
        if self.task == "I2I":
            fields = [
                ("prompt", "a grey square"),
                ("response_format", fmt or "b64_json"),
                ("size", f"{self.width}x{self.height}"),
                ("num_inference_steps", str(self.opts.steps)),
            ]
            body, ctype = multipart(fields, [("image", "input.png", self.png, "image/png")])
            return self.w.request("POST", "/v1/images/edits", raw=body, content_type=ctype)
        return self.w.request("POST", "/v1/images/generations", {
            "prompt": "a grey square",
            "size": f"{self.width}x{self.height}",
            "num_inference_steps": self.opts.steps,
            "response_format": fmt,
            "n": 1,
        })

    def _check_image_response(self, body: Any, n: int) -> list[dict[str, Any]]:
        for key in ("id", "created", "data"):
            expect(key in body, f"ImageResponse lacks {key!r}")
        data = body["data"]
        expect(isinstance(data, list) and len(data) == n, f"expected {n} data item(s), got {len(data) if isinstance(data, list) else data!r}")
        for item in data:
            missing = [f for f in IMAGE_ITEM_FIELDS if f not in item]
            expect(not missing, f"data item lacks {missing}")
        return list(data)

    def images_b64(self) -> str:
        a = self._image_request("b64_json")
        expect_code(a, 200)
        (item,) = self._check_image_response(a.json(), 1)
        raw = base64.b64decode(item["b64_json"] or "")
        kind = image_kind(raw)
        expect(kind is not None, f"b64_json is not a JPEG/PNG/WEBP (starts {raw[:8]!r})")
        return f"{kind}, {len(raw)} bytes, inference_time_s={a.json().get('inference_time_s')}"

    def images_url(self) -> str:
        a = self._image_request("url")
        expect_code(a, 200)
        (item,) = self._check_image_response(a.json(), 1)
        url = item["url"]
        expect(isinstance(url, str) and bool(url), "url is empty")
        if url.startswith(("http://", "https://")):
            self.info("images.content", f"url is absolute ({url[:60]}...): cloud storage, /content not checked")
            return "absolute url"
        expect(url.startswith("/v1/images/") and url.endswith("/content"), f"unexpected url {url!r}")
        c = self.w.request("GET", url)
        expect_code(c, 200)
        expect(c.content_type.startswith("image/"), f"content-type {c.content_type!r}")
        expect(image_kind(c.body) is not None, "content is not an image")
        return f"{url} -> 200 {c.content_type}, {len(c.body)} bytes"

    def images_422(self) -> str:
        a = self.w.request("POST", "/v1/images/generations", {"size": "64x64"})
        expect_code(a, 422)
        detail = a.json().get("detail")
        expect(isinstance(detail, list) and any("prompt" in map(str, e.get("loc", [])) for e in detail),
               f"422 detail does not name prompt: {detail!r:.200}")
        return "422 names 'prompt'"

    def edits_422(self) -> str:
        body, ctype = multipart([("prompt", "x")], [])
        a = self.w.request("POST", "/v1/images/edits", raw=body, content_type=ctype)
        expect_code(a, 422)
        expect(a.json().get("detail") == "Field 'image' or 'url' is required", f"detail {detail_text(a)}")
        return "422 Field 'image' or 'url' is required"

    def images_format_spelling(self) -> str:
        """C{response_format} is lower-cased, and null means b64_json."""
        seen = []
        for fmt in ("B64_JSON", None):
            if self.task == "I2I" and fmt is None:
                continue  # a form cannot send null
            a = self._image_request(fmt)
            expect_code(a, 200)
            (item,) = self._check_image_response(a.json(), 1)
            expect(bool(item.get("b64_json")), f"response_format={fmt!r} gave no b64_json")
            seen.append(repr(fmt))
        return f"{', '.join(seen)} answered b64_json"

    def images_bad_size(self) -> str:
        if self.task == "I2I":
            body, ctype = multipart(
                [("prompt", "a grey square"), ("size", "big"), ("num_inference_steps", "1"),
                 ("response_format", "b64_json")],
                [("image", "input.png", self.png, "image/png")],
            )
            a = self.w.request("POST", "/v1/images/edits", raw=body, content_type=ctype)
        else:
            a = self.w.request("POST", "/v1/images/generations", {
                "prompt": "a grey square", "size": "big", "num_inference_steps": 1,
                "response_format": "b64_json",
            })
        expect_code(a, 200)
        return "size 'big' ignored: 200 at the model's default size"

    def images_range(self) -> str | None:
        a = self._image_request("url")
        expect_code(a, 200)
        (item,) = self._check_image_response(a.json(), 1)
        url = item["url"]
        if not url.startswith("/v1/images/"):
            self.info("images.range", "url is not a /content path: not checked")
            return None
        return self._range_download(url)

    def _range_download(self, url: str) -> str:
        """A /content download answers Range with 206 and carries the file headers."""
        whole = self.w.request("GET", url)
        expect_code(whole, 200)
        for name in ("accept-ranges", "etag", "last-modified"):
            expect(name in whole.headers, f"no {name} header on the download")
        size = len(whole.body)
        expect(size > 16, f"download is only {size} bytes")
        part = self.w.request("GET", url, headers={"Range": "bytes=4-11"})
        expect_code(part, 206)
        expect(part.body == whole.body[4:12], "206 body is not bytes 4-11 of the file")
        expect(part.headers.get("content-range") == f"bytes 4-11/{size}",
               f"content-range {part.headers.get('content-range')!r}")
        return f"206 bytes 4-11/{size}, accept-ranges/etag/last-modified present"

    def image_404(self) -> str:
        a = self.w.request("GET", f"/v1/images/{uuid.uuid4()}/content")
        expect_code(a, 404)
        expect(a.json().get("detail") == "Image not found", f"detail {detail_text(a)}")
        return "404 Image not found"

    # -- videos ------------------------------------------------------------

    def videos(self) -> None:
        body: dict[str, Any] = {
            "prompt": "a grey square",
            "size": f"{self.vwidth}x{self.vheight}",
            "num_frames": self.opts.video_frames,
            "num_inference_steps": self.opts.steps,
        }
        if self.task in REQUIRES_IMAGE:
            body["reference_url"] = data_url(self.png)
        job: dict[str, Any] = {}

        def create() -> str:
            a = self.w.request("POST", "/v1/videos", body)
            expect_code(a, 200)
            j = a.json()
            missing = [f for f in VIDEO_FIELDS if f not in j]
            expect(not missing, f"VideoResponse lacks {missing}")
            expect(j["object"] == "video", f"object {j['object']!r}")
            expect(j["status"] == "queued", f"status {j['status']!r}, expected 'queued' at creation")
            job.update(j)
            return f"id {j['id']}, status queued"

        if not self.run("videos.create", create):
            return
        vid = job["id"]

        def early_content() -> str | None:
            a = self.w.request("GET", f"/v1/videos/{vid}/content", keep=64)
            if a.code == 200:
                self.info("videos.content_in_progress", "job already finished; the in-progress 404 was not observed")
                return None
            expect_code(a, 404)
            expect(a.json().get("detail") == "Generation is still in-progress", f"detail {detail_text(a)}")
            return "404 Generation is still in-progress"

        self.run("videos.content_in_progress", early_content)

        def poll() -> str:
            deadline = time.monotonic() + self.opts.video_timeout
            delay = 0.05
            while True:
                a = self.w.request("GET", f"/v1/videos/{vid}")
                expect_code(a, 200)
                j = a.json()
                if j["status"] == "completed":
                    expect(j.get("progress") == 100, f"completed with progress {j.get('progress')!r}")
                    return f"completed in {j.get('inference_time_s')}s of GPU time"
                if j["status"] == "failed":
                    raise CheckFailed(f"job failed: {j.get('error')!r}")
                expect(j["status"] == "queued", f"unexpected status {j['status']!r}")
                if time.monotonic() > deadline:
                    raise CheckFailed(f"still {j['status']} after {self.opts.video_timeout}s")
                time.sleep(delay)
                delay = min(1.0, delay * 2)

        if not self.run("videos.poll", poll):
            return

        def listing() -> str:
            a = self.w.request("GET", "/v1/videos")
            expect_code(a, 200)
            j = a.json()
            expect(j.get("object") == "list" and isinstance(j.get("data"), list), f"unexpected list body {a.body[:200]!r}")
            expect(any(v.get("id") == vid for v in j["data"]), "the new job is not listed")
            return f"{len(j['data'])} job(s) listed"

        self.run("videos.list", listing)

        def list_order() -> str:
            for order in ("ASC", "sideways"):
                a = self.w.request("GET", f"/v1/videos?order={order}")
                expect_code(a, 200)
                expect(any(v.get("id") == vid for v in a.json()["data"]), f"order={order}: job not listed")
            return "order is case-insensitive, unknown values answer 200 (desc)"

        self.run("videos.list_order", list_order)
        self.run("videos.range", lambda: self._range_download(f"/v1/videos/{vid}/content"))

        def content() -> str:
            a = self.w.request("GET", f"/v1/videos/{vid}/content", keep=64)
            expect_code(a, 200)
            expect(a.content_type.startswith("video/mp4"), f"content-type {a.content_type!r}")
            expect(a.body[4:8] == b"ftyp", f"not an MP4 (starts {a.body[:12]!r})")
            declared = a.headers.get("content-length")
            if declared is not None:
                expect(int(declared) == a.length, f"content-length {declared} but {a.length} bytes")
            return f"200 video/mp4, {a.length} bytes"

        self.run("videos.content", content)

        def delete() -> str:
            a = self.w.request("DELETE", f"/v1/videos/{vid}")
            expect_code(a, 200)
            expect(a.json().get("status") == "deleted", f"status {a.json().get('status')!r}")
            b = self.w.request("GET", f"/v1/videos/{vid}")
            expect_code(b, 404)
            expect(b.json().get("detail") == "Video not found", f"detail {detail_text(b)}")
            return "deleted, then 404 Video not found"

        self.run("videos.delete", delete)

    # -- native RL endpoints -----------------------------------------------

    def _native_body(self) -> dict[str, Any]:
        video = self.task in VIDEO_TASKS
        body: dict[str, Any] = {
            "prompt": "a grey square",
            "width": self.vwidth if video else self.width,
            "height": self.vheight if video else self.height,
            "num_inference_steps": self.opts.steps,
        }
        if video:
            body["num_frames"] = self.opts.video_frames
        return body

    def diffusion_generate(self) -> str:
        body = self._native_body()
        body["get_log_probs"] = True
        if self.task in REQUIRES_IMAGE:
            body["image_path"] = data_url(self.png)
        a = self.w.request("POST", "/v1/diffusion/generate", body)
        if a.code == 404:
            self.native_available = False
            raise CheckFailed("404: /v1/diffusion/generate is not served")
        expect_code(a, 200)
        j = a.json()
        for key in ("id", "created", "output_b64", "output_format", "trajectory"):
            expect(key in j, f"DiffusionGenerateResponse lacks {key!r}")
        out = base64.b64decode(j["output_b64"] or "")
        if j["output_format"] == "png":
            expect(image_kind(out) == "png", "output_format png but output_b64 is not a PNG")
        traj = j["trajectory"]
        expect(isinstance(traj, dict), "get_log_probs=true gave no trajectory")
        missing = [k for k in TRAJECTORY_FIELDS if k not in traj]
        expect(not missing, f"trajectory lacks {missing} (every key is sent, null when not computed)")
        steps = self.opts.steps
        shape, descr = parse_npy(traj["latents"])
        expect(list(shape) == list(traj.get("latents_shape", [])), f"latents .npy shape {shape} != latents_shape {traj.get('latents_shape')}")
        expect(descr == "<f4", f"latents dtype {descr}, expected float32")
        expect(len(shape) >= 3 and shape[0] == 1 and shape[1] == steps, f"latents shape {shape} is not [1, {steps}, ...]")
        timesteps = traj.get("timesteps")
        expect(isinstance(timesteps, list) and len(timesteps) == steps, f"expected {steps} timesteps")
        expect(parse_npy(timesteps[0])[0] == (), "timesteps are not 0-d arrays")
        lp_shape, _ = parse_npy(traj["log_probs"])
        expect(list(lp_shape) == [1, steps] == list(traj.get("log_probs_shape", [])), f"log_probs shape {lp_shape}, log_probs_shape {traj.get('log_probs_shape')}")
        return f"{j['output_format']} output, latents {list(shape)}, log_probs {list(lp_shape)}, {len(a.body)} bytes"

    def diffusion_422(self) -> str | None:
        a = self.w.request("POST", "/v1/diffusion/generate", {"get_log_probs": True})
        if a.code == 404:
            # Upstream replaced it with /rollout/generate (docs/worker-api.md).
            self.native_available = False
            self.info("diffusion.generate", "not available in this version (404); upstream serves /rollout/generate instead")
            return None
        expect_code(a, 422)
        return "422 without prompt"

    def rollout_generate(self) -> str | None:
        body = self._native_body()
        body["rollout"] = True
        body["num_outputs_per_prompt"] = 1
        if self.task in REQUIRES_IMAGE:
            body["image_path"] = [data_url(self.png)]
        body.setdefault("seed", 42)
        a = self.w.request("POST", "/rollout/generate", body)
        if a.code == 404:
            self.info("rollout.generate", "not available in this version (404); the pinned fork serves /v1/diffusion/generate instead")
            return None
        self.rollout_available = True
        expect_code(a, 200)
        if a.content_type.startswith("application/msgpack"):
            # Current upstream: msgpack with raw tensor bytes, and timing headers.
            try:
                import msgpack
            except ImportError:
                raise CheckFailed("the answer is msgpack: pip install msgpack to check it") from None
            items = msgpack.unpackb(a.body)
            for header in ("x-sgld-timing", "x-sgld-stages"):
                if header not in a.headers:
                    self.info("rollout.headers", f"no {header} header (added upstream after the msgpack transport)")
        else:
            items = a.json()
        expect(isinstance(items, list) and len(items) == 1, f"expected a list of 1 sample, got {str(items)[:200]}")
        item = items[0]
        missing = [f for f in ROLLOUT_ITEM_FIELDS if f not in item]
        expect(not missing, f"sample lacks {missing}")
        out_shape = parse_tensor(item["generated_output"])
        detail = f"generated_output {list(out_shape)}"
        if item["rollout_log_probs"] is not None:
            detail += f", rollout_log_probs {list(parse_tensor(item['rollout_log_probs']))}"
        return detail

    def rollout_no_seed(self) -> str:
        """Without C{seed} the response model cannot be built: a plain 500 after the work."""
        body = self._native_body()
        body.pop("seed", None)
        if self.task in REQUIRES_IMAGE:
            body["image_path"] = [data_url(self.png)]
        a = self.w.request("POST", "/rollout/generate", body)
        expect_code(a, 500)
        return "500 without seed"

    # -- control -------------------------------------------------------------

    def update_refusals(self) -> str:
        """Updates that cannot load are 400s that change nothing (no weights are touched)."""
        missing = f"/nonexistent/check-worker-{uuid.uuid4().hex}"
        a = self.w.request("POST", "/update_weights_from_disk", {"model_path": missing})
        expect_code(a, 400)
        expect(a.json().get("success") is False, f"body {a.body[:200]!r}")
        b = self.w.request("POST", "/update_weights_from_disk", {"model_path": missing, "target_modules": []})
        expect_code(b, 400)
        expect(b.json().get("success") is False, f"body {b.body[:200]!r}")
        return f"missing path 400 ({str(a.json().get('message'))[:60]}...), target_modules [] 400"

    def update_missing_path(self) -> str:
        a = self.w.request("POST", "/update_weights_from_disk", {})
        expect_code(a, 400)
        j = a.json()
        expect(j.get("success") is False and j.get("message") == "model_path is required", f"body {a.body[:200]!r}")
        return "400 model_path is required"

    def checksum(self) -> dict[str, str]:
        a = self.w.request("POST", "/get_weights_checksum", {})
        expect_code(a, 200)
        j = a.json()
        expect(isinstance(j, dict) and bool(j) and "error" not in j, f"body {a.body[:200]!r}")
        sums = {str(k): str(v) for k, v in j.items()}
        bad = {k: v for k, v in sums.items() if not (v == "not_found" or len(v) == 64)}
        expect(not bad, f"values are not sha256 hex: {bad}")
        return sums

    def _small_generation(self) -> Answer:
        """
        The cheapest generation that passes request validation on this model.

        Validation (e.g. "I2V requires an image") runs before the scheduler
        sees the request, so an invalid request would get a 500 instead of the
        sleeping 400; hence the image for image-conditioned models.
        """
        video = self.task in VIDEO_TASKS
        if self.native_available:
            body: dict[str, Any] = {
                "prompt": "a grey square", "width": 64, "height": 64, "num_inference_steps": 1,
            }
            if video:
                body["num_frames"] = 5
            if self.task in REQUIRES_IMAGE:
                body["image_path"] = data_url(self.png)
            return self.w.request("POST", "/v1/diffusion/generate", body)
        if self.task == "I2I":
            form, ctype = multipart(
                [("prompt", "a grey square"), ("size", "64x64"), ("num_inference_steps", "1")],
                [("image", "input.png", self.png, "image/png")],
            )
            return self.w.request("POST", "/v1/images/edits", raw=form, content_type=ctype)
        return self.w.request("POST", "/v1/images/generations", {
            "prompt": "a grey square", "size": "64x64", "num_inference_steps": 1,
            "response_format": "b64_json",
        })

    def sleep_wake(self) -> None:
        def memory_call(path: str, sleeping: bool, expected: str) -> Callable[[], str]:
            def check() -> str:
                a = self.w.request("POST", path, {})
                expect_code(a, 200)
                j = a.json()
                expect(j.get("success") is True and j.get("sleeping") is sleeping, f"body {a.body[:200]!r}")
                if expected:
                    expect(j.get("message") == expected, f"message {j.get('message')!r}, expected {expected!r}")
                return f"{'sleeping' if sleeping else 'awake'}, {j.get('message')!r}"
            return check

        def release(expected: str) -> Callable[[], str]:
            return memory_call("/release_memory_occupation", True, expected)

        def resume(expected: str) -> Callable[[], str]:
            return memory_call("/resume_memory_occupation", False, expected)

        def rejected() -> str:
            a = self._small_generation()
            expect_code(a, 400)
            detail = a.json().get("detail")
            message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
            expect(message.startswith(SLEEPING_PREFIX), f"detail {detail!r}")
            return f"400 {message[:40]}..."

        def alive() -> str:
            h = self.w.request("GET", "/health")
            expect_code(h, 200)
            m = self.w.request("GET", "/v1/models")
            expect_code(m, 200)
            return "/health and /v1/models answer 200 while sleeping"

        def generates() -> str:
            a = self._small_generation()
            expect_code(a, 200)
            return "generation succeeds after waking"

        if not self.run("sleep.release", release("")):
            return
        try:
            self.run("sleep.release_again", release("already sleeping"))
            self.run("sleep.health", alive)
            self.run("sleep.generation_rejected", rejected)
        finally:
            woke = self.run("wake.resume", resume(""))
        if woke:
            self.run("wake.resume_again", resume("already awake"))
            self.run("wake.generation", generates)

    def update_weights(self, path: str, before: dict[str, str] | None) -> str:
        a = self.w.request("POST", "/update_weights_from_disk", {"model_path": path})
        expect_code(a, 200)
        j = a.json()
        expect(j.get("success") is True, f"body {a.body[:200]!r}")
        after = self.checksum()
        if before is not None and before == after:
            self.info("update_weights.checksum", "checksums unchanged (same weights loaded again?)")
        return str(j.get("message"))

    # -- all ---------------------------------------------------------------------

    def all(self) -> None:
        if not self.run("health", self.health):
            return
        self.run("liveness", self.liveness)
        self.run("server_info", self.server_info)
        self.run("health_generate", self.health_generate)
        if not self.run("models", self.models):
            return
        self.run("model_info", self.model_info)

        if self.task in IMAGE_TASKS:
            self.run("images.generations.422", self.images_422)
            self.run("images.edits.422", self.edits_422)
            self.run("images.b64_json", self.images_b64)
            self.run("images.url_and_content", self.images_url)
            self.run("images.content.404", self.image_404)
            self.run("images.response_format_spelling", self.images_format_spelling)
            self.run("images.bad_size", self.images_bad_size)
            self.run("images.range", self.images_range)
        elif self.task in VIDEO_TASKS:
            self.videos()
            self.run("videos.unknown.404", self.video_404)
            self.run("videos.bad_requests", self.video_bad_requests)
        else:
            self.info("videos", f"task type {self.task}: mesh models are not probed on /v1/videos")

        self.run("diffusion.generate.422", self.diffusion_422)
        if self.native_available:
            self.run("diffusion.generate", self.diffusion_generate)
        self.run("rollout.generate", self.rollout_generate)
        if self.rollout_available:
            self.run("rollout.no_seed", self.rollout_no_seed)
        self.info("version", self._version())

        if self.opts.skip_control:
            self.info("control", "skipped (--skip-control)")
            return
        self.run("update_weights.missing_model_path", self.update_missing_path)
        self.run("update_weights.refused", self.update_refusals)
        sums: dict[str, dict[str, str]] = {}

        def checksum() -> str:
            sums["before"] = self.checksum()
            return f"{len(sums['before'])} module(s)"

        self.run("weights_checksum", checksum)
        self.sleep_wake()
        if self.opts.update_model_path:
            path = self.opts.update_model_path
            self.run("update_weights", lambda: self.update_weights(path, sums.get("before")))
        else:
            self.info("update_weights", "not exercised (give --update-model-path to load new weights)")

    def video_bad_requests(self) -> str:
        """A form-encoded body and a video of no frames are 400s, and create no job."""
        before = self.w.request("GET", "/v1/videos?limit=100")
        expect_code(before, 200)
        a = self.w.request("POST", "/v1/videos", raw=b"prompt=a+grey+square",
                           content_type="application/x-www-form-urlencoded")
        expect_code(a, 400)
        z = self.w.request("POST", "/v1/videos", {"prompt": "a grey square", "num_frames": 0})
        expect(400 <= z.code < 500, f"num_frames=0 answered {z.code}: {z.body[:200]!r}")
        after = self.w.request("GET", "/v1/videos?limit=100")
        expect(len(after.json()["data"]) == len(before.json()["data"]), "a refused request created a job")
        return f"form-encoded 400, num_frames=0 {z.code}"

    def _version(self) -> str:
        """Which worker version the native endpoints say this is (see docs/worker-api.md)."""
        if self.native_available and not self.rollout_available:
            return "pinned fork (/v1/diffusion/generate, no /rollout/generate)"
        if self.rollout_available and not self.native_available:
            return "upstream (/rollout/generate, no /v1/diffusion/generate)"
        if self.rollout_available:
            return "both native endpoints served (not a released version)"
        return "neither native endpoint served"

    def video_404(self) -> str:
        a = self.w.request("GET", f"/v1/videos/{uuid.uuid4()}")
        expect_code(a, 404)
        expect(a.json().get("detail") == "Video not found", f"detail {detail_text(a)}")
        return "404 Video not found"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check_worker.py",
        description="Check that a live SGLang diffusion worker (real or simulated) answers every "
        "endpoint the router relies on, with the documented shapes.",
    )
    parser.add_argument("url", help="base URL of the worker, e.g. http://127.0.0.1:30000")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for any one answer (default: %(default)s)")
    parser.add_argument("--video-timeout", type=float, default=900.0,
                        help="seconds to wait for the test video job (default: %(default)s)")
    parser.add_argument("--skip-control", action="store_true",
                        help="do not sleep/wake the worker or call the weights endpoints")
    parser.add_argument("--update-model-path", default=None,
                        help="also update the weights from this path (changes the worker's weights!)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of test generations")
    parser.add_argument("--size", default="256x256", help="WxH of test images")
    parser.add_argument("--video-size", default="480x272", help="WxH of test videos")
    parser.add_argument("--video-frames", type=int, default=9, help="frames of test videos")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of crashed checks")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    report = Report()
    print(f"checking {options.url}", flush=True)
    probe = Probe(Worker(options.url, options.timeout), report, options)
    try:
        probe.all()
    except Unreachable as e:
        print(f"worker unreachable, remaining checks skipped: {e}", flush=True)
    passed, failed, info = report.count("PASS"), report.count("FAIL"), report.count("INFO")
    if passed == 0 and failed == 0:
        report.add("FAIL", "probe", "no check ran")
        failed = 1
    print(f"SUMMARY: PASS {passed}, FAIL {failed}, INFO {info}", flush=True)
    print("RESULT: PASS" if failed == 0 else "RESULT: FAIL", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
