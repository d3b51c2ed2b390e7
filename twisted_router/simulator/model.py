# -*- test-case-name: tests.unit.test_simulator_model -*-
"""
The pure part of the simulated worker: task types, per-model defaults, the
service-time model and request validation.

Nothing here does I/O or looks at a clock, so every rule the simulator follows
(how long a request takes, which field defaults apply, which inputs are
rejected and with which body) can be tested as plain functions. The rules are
read from C{docs/worker-api.md}; section numbers below refer to it.
"""

from __future__ import annotations

import email.message
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted_router.tasks import TaskType


@dataclass(frozen=True)
class ModelProfile:
    """
    What a served model looks like from outside, per task type.

    The simulator's default step counts are deliberately small (a default
    request takes a few milliseconds at C{--step-ms 1}); the real defaults are
    given in C{real_steps} for reference and can be restored with
    C{--default-steps}.

    @ivar model_path: the C{--model-path} used when none is given.
    @ivar pipeline_name: C{pipeline_name}/C{pipeline_class} of the model card.
    @ivar default_steps: denoising steps when a request gives none.
    @ivar real_steps: the real model's default step count.
    @ivar width: default output width.
    @ivar height: default output height.
    @ivar frames: default frame count of the native endpoint (1 for images).
    @ivar fps: the model's default frame rate.
    @ivar peak_memory_mb: the C{peak_memory_mb} reported with every answer.
    """

    model_path: str
    pipeline_name: str
    default_steps: int
    real_steps: int
    width: int
    height: int
    frames: int
    fps: int
    peak_memory_mb: float


PROFILES: Mapping[TaskType, ModelProfile] = {
    TaskType.T2I: ModelProfile(
        "Qwen/Qwen-Image", "QwenImagePipeline", 8, 50, 1024, 1024, 1, 24, 61234.5
    ),
    TaskType.I2I: ModelProfile(
        "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 8, 50, 1024, 1024, 1, 24, 63120.0
    ),
    TaskType.TI2I: ModelProfile(
        "black-forest-labs/FLUX.2-klein", "Flux2KleinPipeline", 4, 4, 1024, 1024, 1, 24, 24576.0
    ),
    TaskType.T2V: ModelProfile(
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline", 4, 50, 832, 480, 81, 16, 20480.0
    ),
    TaskType.I2V: ModelProfile(
        "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "WanImageToVideoPipeline", 4, 40, 832, 480, 81, 16, 71680.0
    ),
    TaskType.TI2V: ModelProfile(
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "WanPipeline", 4, 50, 1280, 704, 121, 24, 40960.0
    ),
    TaskType.I2M: ModelProfile(
        "tencent/Hunyuan3D-2", "Hunyuan3D2Pipeline", 8, 50, 512, 512, 1, 24, 30720.0
    ),
}

#: The modules an update or a checksum can name (§5.1; the real list varies by pipeline).
MODULES: tuple[str, ...] = ("transformer", "vae", "text_encoder")

#: C{DEFAULT_FPS} and C{DEFAULT_VIDEO_SECONDS} of the OpenAI video endpoint (§4.4).
DEFAULT_VIDEO_FPS = 24
DEFAULT_VIDEO_SECONDS = 4
#: C{n} of the OpenAI image endpoints is clamped to this (§4.1).
MAX_IMAGES_PER_REQUEST = 10
#: Default seed of every generation endpoint (§4.1).
DEFAULT_SEED = 1024

SLEEPING_MESSAGE = "[SLEEPING] Server is sleeping. Call resume_memory_occupation first."


def service_seconds(
    *,
    step_ms: float,
    steps: int,
    width: int,
    height: int,
    frames: int = 1,
    n: int = 1,
    speed: float = 1.0,
    base_ms: float = 0.0,
) -> float:
    """
    How long one generation occupies the simulated GPU.

    C{seconds = (base_ms/1000 + step_ms/1000 × steps × (width·height/1024²) ×
    max(1, frames) × n) / speed}. Denoising time of a diffusion transformer is
    roughly linear in steps, in pixels and in frames (§7), and the real worker
    runs the C{n} outputs of one request as one batch that costs about n times
    as much. Real-world calibration: Qwen-Image at 1024² is about 286 ms per
    step (50 steps, 14.96 s on an H100); Wan2.1-T2V-1.3B at 832×480×81 frames
    over 50 steps takes 18.4 s, i.e. about 12 ms per step per frame-megapixel.

    @param step_ms: milliseconds per denoising step of one 1024² frame.
    @param steps: denoising steps.
    @param width: output width in pixels.
    @param height: output height in pixels.
    @param frames: frames of a video (images count as one).
    @param n: outputs produced by the request.
    @param speed: a divisor, to model a faster or slower GPU.
    @param base_ms: a fixed per-request overhead (text encoding, VAE decode).
    @return: seconds, never negative.
    """
    pixels = (width * height) / (1024 * 1024)
    work = step_ms / 1000.0 * steps * pixels * max(1, frames) * n
    return max(0.0, (base_ms / 1000.0 + work) / speed)


def parse_size(size: str) -> tuple[int, int]:
    """
    Parse C{"WxH"} as the real C{size} field is parsed.

    @raise ValueError: when C{size} is not two positive integers around an C{x}.
    """
    parts = size.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"Invalid size {size!r}: expected 'WxH'")
    try:
        width, height = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"Invalid size {size!r}: expected 'WxH'") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"Invalid size {size!r}: width and height must be positive")
    return width, height


def lenient_size(size: str | None) -> tuple[int, int] | None:
    """
    C{size} as the real C{_parse_size} reads it: two integers around an
    C{x} (spaces ignored), or C{None} for anything else.

    The worker ignores a C{size} it cannot parse and renders at the model
    default (200, not an error), so only L{parse_size}'s strict form is
    for callers that must refuse it.
    """
    if not size:
        return None
    parts = size.lower().replace(" ", "").split("x")
    if len(parts) != 2:
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None


def resolve_dimensions(
    width: int | None, height: int | None, size: str | None, profile: ModelProfile
) -> tuple[int, int]:
    """
    Apply the real precedence: C{width}/C{height}, then C{size}, then the model.

    C{size} only fills the dimensions that are null (§4.1); a C{size} that
    does not parse is ignored, as the real C{build_sampling_params} does.

    @raise ValueError: on a non-positive dimension; the image and native
        endpoints turn it into a plain 500.
    """
    parsed = lenient_size(size)
    if parsed is not None and (width is None or height is None):
        sw, sh = parsed
        width = sw if width is None else width
        height = sh if height is None else height
    width = profile.width if width is None else width
    height = profile.height if height is None else height
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    return width, height


class RangeNotSatisfiable(ValueError):
    """A C{Range} that starts outside the file: Starlette's 416."""


class MalformedRange(ValueError):
    """A C{Range} Starlette refuses with a plain 400; C{str()} is its body."""


_RANGE_PATTERN = re.compile(r"(\d*)-(\d*)")


def parse_ranges(header: str, length: int) -> list[tuple[int, int]]:
    """
    The C{[start, stop)} ranges a C{Range} header asks of a C{length}-byte
    file, as Starlette's C{FileResponse._parse_range_header} reads them: a
    suffix longer than the file or a start past its end is a 416, an end
    past it is clipped, and overlapping ranges are merged.

    @raise RangeNotSatisfiable: a range starts outside the file.
    @raise MalformedRange: another unit, no C{=}, no range, or start > end.
    """
    units, sep, spec = header.partition("=")
    if not sep:
        raise MalformedRange("Malformed range header.")
    if units.strip().lower() != "bytes":
        raise MalformedRange("Only support bytes range")
    ranges = [
        (
            int(first) if first else length - int(last),
            int(last) + 1 if first and last and int(last) < length else length,
        )
        for first, last in _RANGE_PATTERN.findall(spec)
        if (first, last) != ("", "")
    ]
    if not ranges:
        raise MalformedRange("Range header: range must be requested")
    if any(not 0 <= begin < length for begin, _ in ranges):
        raise RangeNotSatisfiable(header)
    if any(begin > stop for begin, stop in ranges):
        raise MalformedRange("Range header: start must be less than end")
    merged: list[tuple[int, int]] = []
    for begin, stop in ranges:
        for i, (m_begin, m_stop) in enumerate(merged):
            if begin > m_stop:
                continue
            if stop < m_begin:
                merged.insert(i, (begin, stop))
            else:
                merged[i] = (min(begin, m_begin), max(stop, m_stop))
            break
        else:
            merged.append((begin, stop))
    return merged


def resolve_steps(requested: int | None, default: int) -> int:
    """
    The step count of a request: the requested one, or the model default.

    @raise ValueError: for a non-positive request (a plain 500 in the real worker).
    """
    if requested is None:
        return default
    if requested <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {requested}")
    return requested


def clamp_n(n: int | None) -> int:
    """C{n} of the OpenAI image endpoints, clamped to 1..10 (§4.1)."""
    if n is None:
        return 1
    return max(1, min(MAX_IMAGES_PER_REQUEST, n))


def video_frames(num_frames: int | None, fps: int | None, seconds: int | None) -> tuple[int, int]:
    """
    Frames and frame rate of a C{/v1/videos} job (§4.4).

    C{num_frames} wins; otherwise C{fps × seconds} with C{fps} 24 and
    C{seconds} 4 by default.

    @return: C{(frames, fps)}.
    @raise ValueError: for C{num_frames} or C{fps} that are not positive: the
        real worker's sampling parameters refuse a video of no frames, and a
        non-positive rate gives no frames (C{fps × seconds}).
    """
    # SamplingParams' own checks, in its order and words (sampling_params.py).
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    rate = fps if fps else DEFAULT_VIDEO_FPS
    if num_frames is not None:
        return num_frames, rate
    secs = DEFAULT_VIDEO_SECONDS if seconds is None else seconds
    return max(1, rate * secs), rate


def image_extension(output_format: str | None, background: str | None) -> str:
    """
    File extension of an OpenAI-endpoint image (C{choose_output_image_ext}).

    JPEG unless PNG or WEBP is asked for, and PNG for a transparent background.
    """
    if (background or "").lower() == "transparent":
        return "png"
    fmt = (output_format or "").lower()
    if fmt in ("png", "webp"):
        return fmt
    return "jpg"


MEDIA_TYPES: Mapping[str, str] = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "mp4": "video/mp4",
}


def latent_shape(task: TaskType, batch: int, steps: int, width: int, height: int, frames: int) -> list[int]:
    """
    The shape of the returned trajectory latents, C{[B, T, …]} (§4.6).

    Images use the packed Qwen-Image/Flux layout C{[B, T, (H/16)·(W/16), 64]}
    (VAE /8 then 2×2 packing of 16 channels); videos use the Wan layout
    C{[B, T, 16, (F-1)/4+1, H/8, W/8]} (temporal compression 4).
    """
    if task.data_type == "video":
        latent_frames = (max(1, frames) - 1) // 4 + 1
        return [batch, steps, 16, latent_frames, max(1, height // 8), max(1, width // 8)]
    seq = max(1, height // 16) * max(1, width // 16)
    return [batch, steps, seq, 64]


def timestep_values(steps: int) -> list[float]:
    """The scheduler timesteps of a trajectory: 1000 down towards 0, one per step."""
    return [1000.0 * (1.0 - i / steps) for i in range(steps)]


# ---------------------------------------------------------------------------
# Request validation, shaped like FastAPI/pydantic v2 so error bodies match.


@dataclass(frozen=True)
class Field:
    """
    One field of a request model.

    @ivar kind: C{str}, C{int}, C{float}, C{bool}, C{list}, C{dict} or C{any}.
    @ivar required: a missing required field is a C{missing} error.
    @ivar default: the value used when the field is absent (or null, unless
        C{keep_null}).
    @ivar keep_null: an explicit null stays null instead of taking the
        default, where the real handler gives null its own meaning (e.g.
        C{response_format: null} is C{b64_json}, while absent is C{url}).
    """

    kind: str
    required: bool = False
    default: Any = None
    keep_null: bool = False


class ValidationFailed(Exception):
    """
    A request body did not validate; C{errors} are pydantic v2 error dicts.

    FastAPI answers these with 422 C{{"detail": errors}}.
    """

    def __init__(self, errors: list[dict[str, Any]], model: str = "Request") -> None:
        super().__init__(errors)
        self.errors = errors
        self.model = model

    def pydantic_text(self) -> str:
        """The C{str()} of a pydantic C{ValidationError}, used in 400 C{detail}s."""
        n = len(self.errors)
        lines = [f"{n} validation error{'s' if n != 1 else ''} for {self.model}"]
        for error in self.errors:
            loc = [str(part) for part in error["loc"] if part != "body"]
            lines.append(".".join(loc) or "body")
            value = error.get("input")
            lines.append(
                f"  {error['msg']} [type={error['type']}, input_value={value!r}, "
                f"input_type={type(value).__name__}]"
            )
        return "\n".join(lines)


def _error(kind: str, name: str, msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", name], "msg": msg, "input": value}


def _coerce(name: str, kind: str, value: Any) -> tuple[Any, dict[str, Any] | None]:
    """Coerce one value the way pydantic's lax mode does, or return its error."""
    if kind == "any":
        return value, None
    if kind == "str":
        if isinstance(value, str):
            return value, None
        return None, _error("string_type", name, "Input should be a valid string", value)
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int) and value in (0, 1):
            return bool(value), None
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on"), None
        if isinstance(value, str):
            return None, _error(
                "bool_parsing", name, "Input should be a valid boolean, unable to interpret input", value
            )
        return None, _error("bool_type", name, "Input should be a valid boolean", value)
    if kind == "int":
        if isinstance(value, bool):
            return int(value), None
        if isinstance(value, int):
            return value, None
        if isinstance(value, float):
            if value.is_integer():
                return int(value), None
            return None, _error(
                "int_from_float", name,
                "Input should be a valid integer, got a number with a fractional part", value,
            )
        if isinstance(value, str):
            try:
                return int(value.strip()), None
            except ValueError:
                return None, _error(
                    "int_parsing", name,
                    "Input should be a valid integer, unable to parse string as an integer", value,
                )
        return None, _error("int_type", name, "Input should be a valid integer", value)
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value.strip()), None
            except ValueError:
                return None, _error(
                    "float_parsing", name,
                    "Input should be a valid number, unable to parse string as a number", value,
                )
        return None, _error("float_type", name, "Input should be a valid number", value)
    if kind == "list":
        if isinstance(value, list):
            return value, None
        return None, _error("list_type", name, "Input should be a valid list", value)
    if kind == "dict":
        if isinstance(value, dict):
            return value, None
        return None, _error("dict_type", name, "Input should be a valid dictionary", value)
    raise AssertionError(f"unknown field kind {kind!r}")


def validate(body: Any, fields: Mapping[str, Field], model: str = "Request") -> dict[str, Any]:
    """
    Validate a decoded JSON body against C{fields}, ignoring unknown keys.

    Unknown fields are dropped (pydantic's default C{extra="ignore"}), which is
    why C{num_images} has no effect (§4.1). Null counts as absent for optional
    fields.

    @return: every field of C{fields}, with defaults filled in.
    @raise ValidationFailed: with the pydantic error list.
    """
    if not isinstance(body, dict):
        raise ValidationFailed(
            [{
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": body,
            }],
            model,
        )
    out: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, spec in fields.items():
        if name not in body:
            if spec.required:
                errors.append(_error("missing", name, "Field required", body))
            out[name] = spec.default
            continue
        if body[name] is None and not spec.required:
            out[name] = None if spec.keep_null else spec.default
            continue
        value, error = _coerce(name, spec.kind, body[name])
        if error is not None:
            errors.append(error)
        else:
            out[name] = value
    if errors:
        raise ValidationFailed(errors, model)
    return out


def is_json_content_type(value: str | None) -> bool:
    """
    Whether FastAPI parses a body with this C{Content-Type} as JSON.

    FastAPI (0.165, C{strict_content_type=True}, its default) decodes a body
    model's JSON only for C{application/json} or C{application/*+json},
    parameters and case ignored; a missing or empty header, or any other
    type (C{curl -d} sends C{application/x-www-form-urlencoded}), leaves the
    body as bytes, which then fails validation with a 422
    C{model_attributes_type}. The header is parsed with
    C{email.message.Message}, exactly as FastAPI does, so malformed values
    (no C{/}, several types) are not JSON either.
    """
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def json_decode_error(message: str, position: int) -> list[dict[str, Any]]:
    """The 422 C{detail} FastAPI gives for a body that is not valid JSON."""
    return [{
        "type": "json_invalid",
        "loc": ["body", position],
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": message},
    }]


def finite_non_negative(name: str, value: float | None) -> None:
    """
    Guidance scales must be ≥ 0 and finite (§4.1).

    @raise ValueError: otherwise (a plain 500 in the real worker).
    """
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")


IMAGE_GENERATION_FIELDS: Mapping[str, Field] = {
    "prompt": Field("str", required=True),
    "model": Field("str"),
    "n": Field("int", default=1),
    "quality": Field("str", default="auto"),
    "style": Field("str", default="vivid"),
    "user": Field("str"),
    "response_format": Field("str", default="url", keep_null=True),
    "size": Field("str", default="1024x1024"),
    "width": Field("int"),
    "height": Field("int"),
    "background": Field("str", default="auto"),
    "output_format": Field("str"),
    "num_inference_steps": Field("int"),
    "guidance_scale": Field("float"),
    "true_cfg_scale": Field("float"),
    "seed": Field("int", default=DEFAULT_SEED),
    "generator_device": Field("str", default="cuda"),
    "negative_prompt": Field("str"),
    "output_quality": Field("str", default="default"),
    "output_compression": Field("int"),
    "enable_teacache": Field("bool", default=False),
    "rollout": Field("bool", default=False),
    "rollout_sde_type": Field("str", default="sde"),
    "rollout_noise_level": Field("float", default=0.7),
    "diffusers_kwargs": Field("dict"),
}

IMAGE_EDIT_FIELDS: Mapping[str, Field] = {
    "prompt": Field("str", required=True),
    "model": Field("str"),
    "n": Field("int", default=1),
    "response_format": Field("str"),
    "size": Field("str"),
    "output_format": Field("str"),
    "background": Field("str", default="auto"),
    "seed": Field("int", default=DEFAULT_SEED),
    "generator_device": Field("str", default="cuda"),
    "user": Field("str"),
    "negative_prompt": Field("str"),
    "guidance_scale": Field("float"),
    "true_cfg_scale": Field("float"),
    "num_inference_steps": Field("int"),
    "output_quality": Field("str", default="default"),
    "output_compression": Field("int"),
    "enable_teacache": Field("bool", default=False),
    "num_frames": Field("int", default=1),
}

VIDEO_FIELDS: Mapping[str, Field] = {
    "prompt": Field("str", required=True),
    "input_reference": Field("str"),
    "reference_url": Field("str"),
    "model": Field("str"),
    "seconds": Field("int", default=DEFAULT_VIDEO_SECONDS),
    "size": Field("str", default=""),
    "fps": Field("int"),
    "num_frames": Field("int"),
    "seed": Field("int", default=DEFAULT_SEED),
    "generator_device": Field("str", default="cuda"),
    "num_inference_steps": Field("int"),
    "guidance_scale": Field("float"),
    "guidance_scale_2": Field("float"),
    "true_cfg_scale": Field("float"),
    "negative_prompt": Field("str"),
    "enable_teacache": Field("bool", default=False),
    "enable_frame_interpolation": Field("bool", default=False),
    "frame_interpolation_exp": Field("int", default=1),
    "frame_interpolation_scale": Field("float", default=1.0),
    "frame_interpolation_model_path": Field("str"),
    "output_quality": Field("str", default="default"),
    "output_compression": Field("int"),
    "output_path": Field("str"),
    "rollout": Field("bool", default=False),
    "rollout_sde_type": Field("str", default="sde"),
    "rollout_noise_level": Field("float", default=0.7),
    "diffusers_kwargs": Field("dict"),
}

DIFFUSION_GENERATE_FIELDS: Mapping[str, Field] = {
    "prompt": Field("str", required=True),
    "negative_prompt": Field("str"),
    "image_path": Field("str"),
    "size": Field("str"),
    "width": Field("int"),
    "height": Field("int"),
    "num_frames": Field("int"),
    "fps": Field("int"),
    "seed": Field("int", default=DEFAULT_SEED),
    "generator_device": Field("str", default="cuda"),
    "num_inference_steps": Field("int"),
    "guidance_scale": Field("float"),
    "guidance_scale_2": Field("float"),
    "true_cfg_scale": Field("float"),
    "num_outputs_per_prompt": Field("int", default=1),
    "enable_teacache": Field("bool", default=False),
    "get_latents": Field("bool", default=False),
    "get_log_probs": Field("bool", default=False),
    "output_quality": Field("str", default="default"),
    "output_compression": Field("int"),
    "enable_frame_interpolation": Field("bool", default=False),
    "frame_interpolation_exp": Field("int", default=1),
    "frame_interpolation_scale": Field("float", default=1.0),
    "frame_interpolation_model_path": Field("str"),
    "diffusers_kwargs": Field("dict"),
}

ROLLOUT_FIELDS: Mapping[str, Field] = {
    "prompt": Field("str", required=True),
    "negative_prompt": Field("str"),
    # No default upstream: RolloutRequest.seed is optional but
    # RolloutResponse.seed is an int, so a request without one fails after
    # the GPU work (see the rollout handler).
    "seed": Field("int"),
    "width": Field("int"),
    "height": Field("int"),
    "num_inference_steps": Field("int"),
    "num_outputs_per_prompt": Field("int", default=1),
    "guidance_scale": Field("float"),
    "true_cfg_scale": Field("float"),
    "num_frames": Field("int"),
    "fps": Field("int"),
    "rollout": Field("bool", default=True),
    "rollout_sde_type": Field("str", default="sde"),
    "rollout_noise_level": Field("float", default=0.7),
    "rollout_log_prob_no_const": Field("bool", default=False),
    "rollout_debug_mode": Field("bool", default=True),
    "rollout_return_denoising_env": Field("bool", default=False),
    "rollout_return_dit_trajectory": Field("bool", default=False),
    "rollout_sde_step_indices": Field("list"),
    "rollout_return_step_indices": Field("list"),
    "image_path": Field("list"),
    "suppress_logs": Field("bool", default=False),
    "extra_sampling_params": Field("dict"),
}
