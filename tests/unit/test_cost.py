"""Tests for L{twisted_router.cost}: the work model and the speed estimator."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from twisted_router.cost import (
    DEFAULT_SECONDS_PER_UNIT,
    DEFAULT_STEPS,
    MAX_PARSED_BODY,
    Kind,
    SpeedEstimate,
    predict_work,
    read_small_body,
    work_from_fields,
    work_units,
)

JSON = b"application/json"


def body(fields: Any) -> io.BytesIO:
    return io.BytesIO(json.dumps(fields).encode())


# -- work_units -------------------------------------------------------------


def test_unit_is_one_1024_step() -> None:
    assert work_units(steps=1, width=1024, height=1024) == 1.0
    assert work_units(steps=50, width=1024, height=1024) == 50.0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"steps": 10, "width": 512, "height": 512}, 2.5),
        ({"steps": 10, "width": 1024, "height": 1024, "frames": 81}, 810.0),
        ({"steps": 10, "width": 1024, "height": 1024, "outputs": 4}, 40.0),
        ({"steps": 10, "width": 1024, "height": 1024, "cfg": True}, 20.0),
        ({"steps": 8, "width": 2048, "height": 1024, "frames": 2, "outputs": 3, "cfg": True}, 192.0),
    ],
)
def test_work_units_scale_linearly(kwargs: dict[str, Any], expected: float) -> None:
    assert work_units(**kwargs) == pytest.approx(expected)


# -- work_from_fields: each field and combination ---------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, DEFAULT_STEPS),
        ({"num_inference_steps": 10}, 10.0),
        ({"num_inference_steps": 10, "size": "512x512"}, 2.5),
        ({"num_inference_steps": 10, "size": "768x768"}, 5.625),
        ({"num_inference_steps": 10, "width": 512, "height": 1024}, 5.0),
        # width/height win over size; one of them alone does not
        ({"num_inference_steps": 10, "width": 512, "height": 512, "size": "1024x1024"}, 2.5),
        ({"num_inference_steps": 10, "width": 512}, 10.0),
        ({"num_inference_steps": 10, "n": 4}, 40.0),
        ({"num_inference_steps": 10, "num_outputs_per_prompt": 2}, 20.0),
        ({"num_inference_steps": 10, "true_cfg_scale": 4.0}, 20.0),
        ({"num_inference_steps": 10, "true_cfg_scale": 1.0}, 10.0),
        ({"num_inference_steps": 10, "negative_prompt": "blurry"}, 20.0),
        ({"num_inference_steps": 10, "negative_prompt": "  "}, 10.0),
        ({"num_inference_steps": 10, "guidance_scale": 7.5}, 10.0),
        ({"num_inference_steps": 8, "size": "512x512", "n": 2, "negative_prompt": "x"}, 8.0),
        ({"num_inference_steps": 10, "num_frames": 81}, 10.0),  # the image endpoint makes one frame
    ],
)
def test_image_fields(fields: dict[str, Any], expected: float) -> None:
    assert work_from_fields(Kind.IMAGE, fields) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"num_inference_steps": 10, "num_frames": 5}, 50.0),
        ({"num_inference_steps": 10, "num_frames": 5, "width": 512, "height": 512}, 12.5),
        ({"num_inference_steps": 10}, 10.0),
    ],
)
def test_native_fields(fields: dict[str, Any], expected: float) -> None:
    assert work_from_fields(Kind.NATIVE, fields) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"num_inference_steps": 10, "size": "1024x1024", "num_frames": 81}, 810.0),
        ({"num_inference_steps": 10, "size": "1024x1024", "fps": 8, "seconds": 2}, 160.0),
        ({"num_inference_steps": 10, "size": "1024x1024", "seconds": 2}, 480.0),  # fps 24
        ({"num_inference_steps": 10, "size": "1024x1024"}, 960.0),  # 24 fps × 4 s
        # num_frames wins over fps × seconds
        ({"num_inference_steps": 10, "size": "1024x1024", "num_frames": 9, "fps": 8, "seconds": 2}, 90.0),
        ({}, DEFAULT_STEPS * 1280 * 720 / 1024**2 * 96),
    ],
)
def test_video_fields(fields: dict[str, Any], expected: float) -> None:
    assert work_from_fields(Kind.VIDEO, fields) == pytest.approx(expected)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_inference_steps": -3},
        {"num_inference_steps": 0},
        {"num_inference_steps": "many"},
        {"num_inference_steps": True},
        {"num_inference_steps": 2.5},
        {"num_inference_steps": float("nan")},
        {"num_inference_steps": None},
        {"size": "huge"},
        {"size": "0x1024"},
        {"size": 1024},
        {"n": -1},
        {"n": [2]},
        {"true_cfg_scale": "lots"},
        {"negative_prompt": ["a"]},
    ],
)
def test_malformed_fields_take_defaults(fields: dict[str, Any]) -> None:
    assert work_from_fields(Kind.IMAGE, fields) == DEFAULT_STEPS


def test_numeric_strings_and_whole_floats_are_read() -> None:
    assert work_from_fields(Kind.IMAGE, {"num_inference_steps": "10"}) == 10.0
    assert work_from_fields(Kind.IMAGE, {"num_inference_steps": 10.0}) == 10.0


def test_absurd_values_are_clamped() -> None:
    huge = work_from_fields(Kind.IMAGE, {"num_inference_steps": 10**12, "n": 10**6, "size": "999999x999999"})
    assert huge == work_units(steps=1000, width=16384, height=16384, outputs=64)


def test_default_steps_is_a_parameter() -> None:
    assert work_from_fields(Kind.IMAGE, None, default_steps=8) == 8.0


# -- predict_work: endpoints and bounded parsing ------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/v1/images/generations", 2.5),
        (b"/generate", 2.5),
        (b"/v1/diffusion/generate", 2.5),
        (b"/rollout/generate", 2.5),
        (b"/v1/videos", 10.0 * 0.25 * 96),
        (b"/generate_video", 10.0 * 0.25 * 96),
    ],
)
def test_each_generation_endpoint(path: bytes, expected: float) -> None:
    fields = {"prompt": "a cat", "num_inference_steps": 10, "size": "512x512"}
    assert predict_work(path, JSON, body(fields)) == pytest.approx(expected)


def test_non_generation_paths_are_not_read() -> None:
    class Exploding(io.BytesIO):
        def read(self, *args: Any) -> bytes:
            raise AssertionError("read")

    for path in (b"/health", b"/v1/models", b"/workers", b"/v1/videos/abc", b"/anything"):
        assert predict_work(path, JSON, Exploding(b"{}")) is None


def test_multipart_edit_is_never_read() -> None:
    class Exploding(io.BytesIO):
        def read(self, *args: Any) -> bytes:
            raise AssertionError("read")

        def seek(self, *args: Any) -> int:
            raise AssertionError("seek")

    work = predict_work(b"/v1/images/edits", b"multipart/form-data; boundary=x", Exploding(b"--x"))
    assert work == DEFAULT_STEPS


def test_large_body_gets_defaults_without_being_read() -> None:
    fields = {"num_inference_steps": 10, "prompt": "x" * MAX_PARSED_BODY}
    content = body(fields)
    reads: list[int] = []
    original = content.read

    def counting_read(*args: Any) -> bytes:
        reads.append(1)
        return original(*args)

    content.read = counting_read  # type: ignore[method-assign]
    assert predict_work(b"/v1/images/generations", JSON, content) == DEFAULT_STEPS
    assert reads == []
    assert content.tell() == 0


def test_body_position_is_left_at_start() -> None:
    content = body({"num_inference_steps": 10})
    content.seek(3)
    assert predict_work(b"/generate", JSON, content) == 10.0
    assert content.tell() == 0


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_00, b'"string"', b"null"]
)
def test_unreadable_bodies_take_defaults(raw: bytes) -> None:
    assert predict_work(b"/v1/images/generations", JSON, io.BytesIO(raw)) == DEFAULT_STEPS


def test_non_json_content_type_is_not_parsed() -> None:
    content = body({"num_inference_steps": 10})
    assert predict_work(b"/v1/images/generations", b"application/x-www-form-urlencoded", content) == DEFAULT_STEPS
    assert predict_work(b"/v1/images/generations", b"application/json; charset=utf-8", content) == 10.0
    assert predict_work(b"/v1/images/generations", None, content) == 10.0


def test_closed_or_missing_body() -> None:
    closed = io.BytesIO(b"{}")
    closed.close()
    assert read_small_body(closed) is None
    assert read_small_body(None) is None
    assert predict_work(b"/generate", JSON, closed) == DEFAULT_STEPS


# -- SpeedEstimate ------------------------------------------------------------


def test_seeded_from_num_gpus() -> None:
    estimate = SpeedEstimate()
    assert estimate.seconds_per_unit == DEFAULT_SECONDS_PER_UNIT
    estimate.seed(4)
    assert estimate.seconds_per_unit == pytest.approx(DEFAULT_SECONDS_PER_UNIT / 4)
    estimate.seed(None)
    estimate.seed(0)
    assert estimate.seconds_per_unit == pytest.approx(DEFAULT_SECONDS_PER_UNIT / 4)


def test_first_sample_replaces_seed_and_seed_never_overrides_learning() -> None:
    estimate = SpeedEstimate()
    estimate.observe(sent=0.0, completed=2.0, work=10.0)
    assert estimate.seconds_per_unit == pytest.approx(0.2)
    estimate.seed(8)
    assert estimate.seconds_per_unit == pytest.approx(0.2)
    assert estimate.units_per_second == pytest.approx(5.0)


def fifo_worker(estimate: SpeedEstimate, sends: list[float], works: list[float], spu: float) -> float:
    """Simulate a FIFO worker at C{spu} seconds per unit; feed completions to the estimate."""
    free_at = 0.0
    for sent, work in zip(sends, works, strict=True):
        start = max(sent, free_at)
        free_at = start + work * spu
        estimate.observe(sent, free_at, work)
    return free_at


def test_converges_despite_fifo_queueing() -> None:
    # 20 requests sent at once: latency grows with queue position, service time does not.
    estimate = SpeedEstimate()
    fifo_worker(estimate, [0.0] * 20, [10.0, 40.0] * 10, spu=0.05)
    assert estimate.seconds_per_unit == pytest.approx(0.05, rel=1e-6)


def test_idle_gaps_do_not_count() -> None:
    estimate = SpeedEstimate()
    fifo_worker(estimate, [0.0, 100.0, 250.0], [10.0, 10.0, 10.0], spu=0.1)
    assert estimate.seconds_per_unit == pytest.approx(0.1)


def test_reacts_fast_to_a_slowdown() -> None:
    estimate = SpeedEstimate()
    end = fifo_worker(estimate, [0.0] * 10, [10.0] * 10, spu=0.1)
    assert estimate.seconds_per_unit == pytest.approx(0.1)
    fifo_worker(estimate, [end] * 3, [10.0] * 3, spu=0.4)  # 4× slower from now on
    assert estimate.seconds_per_unit > 0.35
    # and recovers (more slowly) when the worker is fast again
    end2 = estimate._last_completion or 0.0
    fifo_worker(estimate, [end2] * 20, [10.0] * 20, spu=0.1)
    assert estimate.seconds_per_unit == pytest.approx(0.1, rel=0.01)


def test_zero_work_or_time_moves_only_the_mark() -> None:
    estimate = SpeedEstimate()
    estimate.observe(0.0, 5.0, 0.0)
    assert estimate.samples == 0
    assert estimate.seconds_per_unit == DEFAULT_SECONDS_PER_UNIT
    # the next request, sent at 0, only started when the previous one ended at 5
    estimate.observe(0.0, 6.0, 10.0)
    assert estimate.seconds_per_unit == pytest.approx(0.1)


def test_unlearned_worker_adopts_a_learned_peer_scaled_by_gpus() -> None:
    learned = SpeedEstimate()
    learned.seed(2)
    learned.observe(0.0, 1.0, 100.0)  # 0.01 s/unit on 2 GPUs
    fresh = SpeedEstimate()
    fresh.seed(1)
    fresh.adopt(learned)
    assert fresh.seconds_per_unit == pytest.approx(0.02)
    assert fresh.samples == 0
    fresh.observe(0.0, 1.0, 10.0)
    fresh.adopt(learned)  # its own learning wins from now on
    assert fresh.seconds_per_unit == pytest.approx(0.1)
    unlearned = SpeedEstimate()
    fresh.adopt(unlearned)
    assert fresh.seconds_per_unit == pytest.approx(0.1)


def test_seed_rescales_an_adopted_prior() -> None:
    estimate = SpeedEstimate(seconds_per_unit=0.02)
    estimate.seed(4)
    assert estimate.seconds_per_unit == pytest.approx(0.005)


def test_reported_service_time_is_taken_as_is() -> None:
    estimate = SpeedEstimate()
    estimate.observe_service(8.0, 80.0)
    assert estimate.seconds_per_unit == pytest.approx(0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        estimate.observe_service(bad, 80.0)
    estimate.observe_service(5.0, 0.0)
    assert (estimate.seconds_per_unit, estimate.samples) == (pytest.approx(0.1), 1)
