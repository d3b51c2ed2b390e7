"""The simulator's pure rules: task types, the service-time model, request validation."""

from __future__ import annotations

from typing import Any

import pytest

from twisted_router.simulator.model import (
    IMAGE_GENERATION_FIELDS,
    PROFILES,
    TaskType,
    ValidationFailed,
    clamp_n,
    image_extension,
    latent_shape,
    parse_size,
    resolve_dimensions,
    resolve_steps,
    service_seconds,
    timestep_values,
    validate,
    video_frames,
)


def test_task_types_are_exactly_the_real_enum() -> None:
    assert {t.name for t in TaskType} == {"T2V", "I2V", "TI2V", "T2I", "I2I", "TI2I", "I2M"}


@pytest.mark.parametrize(
    ("task", "image_gen", "requires", "accepts", "data_type"),
    [
        (TaskType.T2I, True, False, False, "image"),
        (TaskType.I2I, True, True, True, "image"),
        (TaskType.TI2I, True, False, True, "image"),
        (TaskType.T2V, False, False, False, "video"),
        (TaskType.I2V, False, True, True, "video"),
        (TaskType.TI2V, False, False, True, "video"),
        (TaskType.I2M, False, True, True, "mesh"),
    ],
)
def test_task_type_helper_sets(
    task: TaskType, image_gen: bool, requires: bool, accepts: bool, data_type: str
) -> None:
    assert task.is_image_gen is image_gen
    assert task.requires_image_input is requires
    assert task.accepts_image_input is accepts
    assert task.data_type == data_type


def test_every_task_type_has_a_profile() -> None:
    assert set(PROFILES) == set(TaskType)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"step_ms": 1.0, "steps": 8, "width": 1024, "height": 1024}, 0.008),
        ({"step_ms": 286.0, "steps": 50, "width": 1024, "height": 1024}, 14.3),
        ({"step_ms": 1.0, "steps": 8, "width": 512, "height": 512}, 0.002),
        ({"step_ms": 1.0, "steps": 8, "width": 1024, "height": 1024, "n": 3}, 0.024),
        ({"step_ms": 1.0, "steps": 4, "width": 1024, "height": 1024, "frames": 96}, 0.384),
        ({"step_ms": 1.0, "steps": 4, "width": 1024, "height": 1024, "frames": 0}, 0.004),
        ({"step_ms": 1.0, "steps": 8, "width": 1024, "height": 1024, "speed": 4.0}, 0.002),
        ({"step_ms": 1.0, "steps": 8, "width": 1024, "height": 1024, "base_ms": 2.0}, 0.010),
        ({"step_ms": 0.0, "steps": 8, "width": 1024, "height": 1024}, 0.0),
    ],
)
def test_service_time_formula(kwargs: dict[str, Any], expected: float) -> None:
    assert service_seconds(**kwargs) == pytest.approx(expected)


def test_service_time_is_linear_in_steps_pixels_frames_and_n() -> None:
    base = service_seconds(step_ms=3.0, steps=10, width=640, height=480, frames=5, n=2)
    assert service_seconds(step_ms=3.0, steps=20, width=640, height=480, frames=5, n=2) == pytest.approx(2 * base)
    assert service_seconds(step_ms=3.0, steps=10, width=1280, height=480, frames=5, n=2) == pytest.approx(2 * base)
    assert service_seconds(step_ms=3.0, steps=10, width=640, height=480, frames=10, n=2) == pytest.approx(2 * base)
    assert service_seconds(step_ms=3.0, steps=10, width=640, height=480, frames=5, n=4) == pytest.approx(2 * base)


def test_parse_size() -> None:
    assert parse_size("832x480") == (832, 480)
    assert parse_size("64X32") == (64, 32)
    for bad in ("", "1024", "axb", "0x10", "-1x5", "1x2x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_dimensions_precedence_width_height_then_size_then_model() -> None:
    profile = PROFILES[TaskType.T2I]
    assert resolve_dimensions(None, None, None, profile) == (1024, 1024)
    assert resolve_dimensions(None, None, "512x256", profile) == (512, 256)
    assert resolve_dimensions(300, None, "512x256", profile) == (300, 256)
    assert resolve_dimensions(300, 200, "bogus", profile) == (300, 200)
    with pytest.raises(ValueError):
        resolve_dimensions(0, 10, None, profile)


def test_steps_default_and_rejection() -> None:
    assert resolve_steps(None, 8) == 8
    assert resolve_steps(3, 8) == 3
    with pytest.raises(ValueError):
        resolve_steps(0, 8)


def test_n_is_clamped_to_one_to_ten() -> None:
    assert [clamp_n(v) for v in (None, -5, 0, 1, 7, 10, 11, 500)] == [1, 1, 1, 1, 7, 10, 10, 10]


def test_video_frames_from_num_frames_or_fps_times_seconds() -> None:
    assert video_frames(None, None, None) == (96, 24)
    assert video_frames(None, 16, 5) == (80, 16)
    assert video_frames(33, 16, 5) == (33, 16)
    assert video_frames(None, None, 2) == (48, 24)


def test_image_extension_is_jpeg_unless_asked() -> None:
    assert image_extension(None, None) == "jpg"
    assert image_extension("jpeg", "auto") == "jpg"
    assert image_extension("PNG", None) == "png"
    assert image_extension("webp", None) == "webp"
    assert image_extension("gif", None) == "jpg"
    assert image_extension("jpeg", "transparent") == "png"


def test_latent_shapes_follow_the_request() -> None:
    assert latent_shape(TaskType.T2I, 1, 28, 512, 512, 1) == [1, 28, 1024, 64]
    assert latent_shape(TaskType.T2I, 1, 50, 1024, 1024, 1) == [1, 50, 4096, 64]
    assert latent_shape(TaskType.T2V, 2, 4, 832, 480, 81) == [2, 4, 16, 21, 60, 104]


def test_timesteps_descend_from_1000() -> None:
    values = timestep_values(4)
    assert values == [1000.0, 750.0, 500.0, 250.0]


def test_validate_fills_defaults_and_ignores_unknown_fields() -> None:
    out = validate({"prompt": "cat", "num_images": 4}, IMAGE_GENERATION_FIELDS)
    assert out["prompt"] == "cat"
    assert out["n"] == 1
    assert out["response_format"] == "url"
    assert out["size"] == "1024x1024"
    assert out["seed"] == 1024
    assert "num_images" not in out


def test_validate_coerces_like_pydantic_lax_mode() -> None:
    out = validate({"prompt": "x", "n": "3", "guidance_scale": 4, "seed": 5.0}, IMAGE_GENERATION_FIELDS)
    assert (out["n"], out["guidance_scale"], out["seed"]) == (3, 4.0, 5)


def test_validate_reports_pydantic_errors() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate({"n": "many", "prompt": 5}, IMAGE_GENERATION_FIELDS, "ImageGenerationsRequest")
    errors = {tuple(e["loc"]): e for e in info.value.errors}
    assert errors[("body", "prompt")]["type"] == "string_type"
    assert errors[("body", "n")]["type"] == "int_parsing"
    text = info.value.pydantic_text()
    assert text.startswith("2 validation errors for ImageGenerationsRequest")


def test_validate_missing_required_field() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate({}, IMAGE_GENERATION_FIELDS)
    assert info.value.errors == [
        {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": {}}
    ]


def test_validate_rejects_non_objects() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate([1, 2], IMAGE_GENERATION_FIELDS)
    assert info.value.errors[0]["type"] == "model_attributes_type"
