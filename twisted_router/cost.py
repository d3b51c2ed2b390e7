# -*- test-case-name: tests.unit.test_cost -*-
"""
How much work a generation request is, and how fast a worker does work.

Pure: no reactor, no I/O beyond reading an already-buffered request body, so
every rule here is a plain function tested on plain values.

B{The work unit.} One denoising step of one 1024×1024 image without
classifier-free guidance is 1.0 unit. A request's work scales linearly with
what a diffusion transformer's denoising time scales with: steps, pixels
(width × height ÷ 1024²), frames, outputs (C{n}), and ×2 when classifier-free
guidance runs the model twice per step. A 1024², 50-step image is 50 units; a
512² one is 12.5; a 4-second 24 fps 1280×720 video at 50 steps is 4,219.

Only the ratios between requests matter for scheduling: a worker's speed is
learned in units per second (L{SpeedEstimate}), so a default that is off by a
constant factor for every request of a model is absorbed by the speed.

B{Bounded parsing.} The router reads a body only on the generation endpoints,
only when it is JSON and at most L{MAX_PARSED_BODY} bytes; anything else
(a multipart upload, a huge prompt, bad JSON) gets the defaults without being
read, so a small request never costs more than one bounded C{json.loads}.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import IO, Any

__all__ = [
    "DEFAULT_SECONDS_PER_UNIT",
    "DEFAULT_STEPS",
    "GENERATION_KINDS",
    "MAX_PARSED_BODY",
    "Kind",
    "SpeedEstimate",
    "predict_work",
    "read_small_body",
    "work_from_fields",
    "work_units",
]

#: Bodies larger than this are never parsed: they get the defaults. A JSON
#: generation request is a few hundred bytes; 64 KiB leaves room for long
#: prompts while bounding the parse cost.
MAX_PARSED_BODY = 64 * 1024
#: Denoising steps assumed when a request gives none (the real default of the
#: common image and video models, Qwen-Image and Wan, is 40–50).
DEFAULT_STEPS = 50
#: Largest value of any one field taken from a request: a typo such as
#: 10^9 steps must not make one request look like a year of work.
_MAX_STEPS = 1000
_MAX_SIDE = 16384
_MAX_FRAMES = 10_000
_MAX_OUTPUTS = 64
#: Video defaults, as the worker applies them (C{fps × seconds} = 24 × 4).
DEFAULT_VIDEO_FPS = 24
DEFAULT_VIDEO_SECONDS = 4
DEFAULT_IMAGE_SIZE = (1024, 1024)
DEFAULT_VIDEO_SIZE = (1280, 720)
#: Seconds per work unit assumed for a one-GPU worker before it has finished
#: anything: Qwen-Image at 1024² on an H100 takes about 286 ms per step. It
#: only orders workers until each has completed one generation.
DEFAULT_SECONDS_PER_UNIT = 0.286

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×*]\s*(\d{1,6})\s*$")


class Kind(Enum):
    """Which body format a generation endpoint takes."""

    #: JSON image generation (OpenAI C{/v1/images/generations} and C{/generate}).
    IMAGE = "image"
    #: Multipart image edit: never parsed (the upload may be megabytes).
    IMAGE_EDIT = "image-edit"
    #: The native JSON endpoints (C{/v1/diffusion/generate}, C{/rollout/generate}).
    NATIVE = "native"
    #: Asynchronous video job creation (C{/v1/videos}, C{/generate_video}).
    VIDEO = "video"


#: The generation endpoints, by exact path: nothing else is ever parsed.
GENERATION_KINDS: dict[bytes, Kind] = {
    b"/v1/images/generations": Kind.IMAGE,
    b"/generate": Kind.IMAGE,
    b"/v1/images/edits": Kind.IMAGE_EDIT,
    b"/v1/diffusion/generate": Kind.NATIVE,
    b"/rollout/generate": Kind.NATIVE,
    b"/v1/videos": Kind.VIDEO,
    b"/generate_video": Kind.VIDEO,
}


def work_units(
    *, steps: float, width: float, height: float, frames: float = 1, outputs: float = 1, cfg: bool = False
) -> float:
    """
    The work of one request in units (one 1024² step without CFG = 1.0).

    Linear in every factor, because denoising time is: each step runs the
    transformer once (twice with classifier-free guidance) over every latent
    token, and tokens are proportional to pixels × frames; C{n} outputs run
    as one batch that costs about C{n} times as much.
    """
    return steps * (width * height / (1024 * 1024)) * max(1.0, frames) * max(1.0, outputs) * (2.0 if cfg else 1.0)


def _int_field(body: dict[str, Any], key: str, upper: int) -> int | None:
    """A positive integer field (ints, or floats/strings that are whole numbers), clamped; else None."""
    value = body.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        value = int(value)
    if isinstance(value, int) and value > 0:
        return min(value, upper)
    return None


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _size(body: dict[str, Any], default: tuple[int, int]) -> tuple[int, int]:
    """C{width}/C{height} when both are given, else C{size} ("WxH"), else the default."""
    width = _int_field(body, "width", _MAX_SIDE)
    height = _int_field(body, "height", _MAX_SIDE)
    if width is not None and height is not None:
        return width, height
    size = body.get("size")
    if isinstance(size, str):
        match = _SIZE.match(size)
        if match:
            w, h = int(match.group(1)), int(match.group(2))
            if w > 0 and h > 0:
                return min(w, _MAX_SIDE), min(h, _MAX_SIDE)
    return default


def _uses_cfg(body: dict[str, Any]) -> bool:
    """
    Whether classifier-free guidance doubles the work: a true CFG scale above
    1 (Qwen-Image's C{true_cfg_scale}), or a negative prompt, which is only
    used by running an unconditional (negative) pass each step. A plain
    C{guidance_scale} is not counted: distilled models (FLUX) embed it in one
    pass, and the others apply it only together with a negative prompt.
    """
    true_cfg = _number(body, "true_cfg_scale")
    if true_cfg is not None and true_cfg > 1.0:
        return True
    negative = body.get("negative_prompt")
    return isinstance(negative, str) and bool(negative.strip())


def work_from_fields(kind: Kind, body: dict[str, Any] | None, *, default_steps: int = DEFAULT_STEPS) -> float:
    """
    The predicted work of a generation whose body is C{body} (C{None}: not
    readable, use every default).

    Fields: C{num_inference_steps}; C{width}+C{height} or C{size}; for videos
    C{num_frames}, else C{fps × seconds}; outputs C{n} or
    C{num_outputs_per_prompt}; CFG per L{_uses_cfg}. Missing or malformed
    fields take the defaults, never an error: the worker validates the
    request, the router only estimates it.
    """
    fields: dict[str, Any] = body if body is not None else {}
    steps = _int_field(fields, "num_inference_steps", _MAX_STEPS) or default_steps
    outputs = _int_field(fields, "n", _MAX_OUTPUTS) or _int_field(fields, "num_outputs_per_prompt", _MAX_OUTPUTS) or 1
    if kind is Kind.VIDEO:
        width, height = _size(fields, DEFAULT_VIDEO_SIZE)
        frames = _int_field(fields, "num_frames", _MAX_FRAMES)
        if frames is None:
            fps = _int_field(fields, "fps", 240) or DEFAULT_VIDEO_FPS
            seconds = _int_field(fields, "seconds", 600) or DEFAULT_VIDEO_SECONDS
            frames = min(fps * seconds, _MAX_FRAMES)
    else:
        width, height = _size(fields, DEFAULT_IMAGE_SIZE)
        # The native endpoint may ask for frames too (a video model behind it).
        frames = (_int_field(fields, "num_frames", _MAX_FRAMES) or 1) if kind is Kind.NATIVE else 1
    return work_units(steps=steps, width=width, height=height, frames=frames, outputs=outputs, cfg=_uses_cfg(fields))


def read_small_body(content: IO[bytes] | None, limit: int = MAX_PARSED_BODY) -> bytes | None:
    """
    The buffered request body if it is at most C{limit} bytes, else C{None}
    without reading it. The position is left at the start, where the proxy
    reads it from.
    """
    if content is None:
        return None
    try:
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        if length > limit:
            return None
        data = content.read(length)
        content.seek(0)
    except (OSError, ValueError):  # closed (the client went away)
        return None
    return data


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def predict_work(
    path: bytes,
    content_type: bytes | None,
    content: IO[bytes] | None,
    *,
    default_steps: int = DEFAULT_STEPS,
) -> float | None:
    """
    The predicted work of a request to C{path}, or C{None} when C{path} is
    not a generation endpoint (then its body is not looked at).

    Only a JSON body (by C{content-type}, or none given) of at most
    L{MAX_PARSED_BODY} bytes is read; a multipart edit is never read.
    """
    kind = GENERATION_KINDS.get(path.rstrip(b"/") or b"/")
    if kind is None:
        return None
    body: dict[str, Any] | None = None
    if kind is not Kind.IMAGE_EDIT and _is_json(content_type):
        body = _json_object(read_small_body(content))
    return work_from_fields(kind, body, default_steps=default_steps)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json") or media in (b"", b"text/plain")


@dataclass
class SpeedEstimate:
    """
    One worker's speed, in seconds per work unit, learned from the
    generations it completes.

    B{Service time, not latency.} A worker runs its generations one after
    another (FIFO), so a request's latency includes the time it waited behind
    the worker's earlier requests. The service time of a completion is
    measured from the later of its send time and the worker's previous
    completion: while the worker was busy with the previous request, this one
    was only waiting. With the router the only client of the worker this is
    exact for a FIFO worker; other clients' requests make it an overestimate,
    which is the right direction (that worker is busier).

    B{Reaction.} Each sample moves the estimate by an exponentially weighted
    average with weight L{alpha}; a sample more than L{jump} times the
    estimate (a slowdown: throttling, a co-tenant) uses weight L{fast_alpha},
    so a worker that became 4× slower is seen as such after two or three
    completions rather than ten. The first sample replaces the seed.

    @ivar seconds_per_unit: the current estimate.
    @ivar samples: completions learned from.
    """

    seconds_per_unit: float = DEFAULT_SECONDS_PER_UNIT
    samples: int = 0
    gpus: int = 1
    alpha: float = 0.3
    fast_alpha: float = 0.7
    jump: float = 1.5
    _last_completion: float | None = None

    def seed(self, num_gpus: int | None) -> None:
        """
        Before any completion: assume a worker with C{num_gpus} GPUs is that
        many times faster than a one-GPU worker (sequence parallelism scales
        nearly linearly for the large images and videos that matter here).
        """
        if num_gpus is not None and num_gpus > 0:
            if self.samples == 0:
                self.seconds_per_unit = self.seconds_per_unit * self.gpus / num_gpus
            self.gpus = num_gpus

    def adopt(self, peer: SpeedEstimate) -> None:
        """
        Before any completion of its own: take a peer's learned speed, scaled
        by the GPU counts. The absolute seed is a guess (a simulated or a
        different GPU may be 100× off); a worker seeded far slower than its
        learned peers would never be chosen, and so never learn, and one
        seeded far faster would get every request until its first
        completion.
        """
        if self.samples == 0 and peer.samples > 0:
            self.seconds_per_unit = peer.seconds_per_unit * peer.gpus / self.gpus

    @property
    def units_per_second(self) -> float:
        """The speed the scheduler divides by."""
        return 1.0 / self.seconds_per_unit

    def service_time(self, sent: float, completed: float) -> float:
        """The time this worker spent on a request sent at C{sent} that completed at C{completed}."""
        start = sent if self._last_completion is None else max(sent, self._last_completion)
        return max(0.0, completed - start)

    def observe(self, sent: float, completed: float, work: float) -> None:
        """
        A generation of C{work} units sent at C{sent} completed at
        C{completed} (both on the same clock). Zero-work or zero-time
        samples only move the previous-completion mark.
        """
        service = self.service_time(sent, completed)
        if self._last_completion is None or completed > self._last_completion:
            self._last_completion = completed
        self.observe_service(service, work)

    def observe_service(self, service: float, work: float) -> None:
        """
        A generation of C{work} units took the worker C{service} seconds of
        its own time, as the worker itself reports it (a finished video job's
        C{inference_time_s}): no queueing correction needed.
        """
        if not (work > 0 and service > 0 and math.isfinite(service)):
            return
        sample = service / work
        if self.samples == 0:
            self.seconds_per_unit = sample
        else:
            weight = self.fast_alpha if sample > self.jump * self.seconds_per_unit else self.alpha
            self.seconds_per_unit += weight * (sample - self.seconds_per_unit)
        self.samples += 1
