"""
Simulator fidelity to the two worker versions (docs/worker-api.md): the
pinned RL fork and current upstream, and the behaviours the real worker has
in both (video list order, weight-update failures, Range downloads, ...).
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from twisted_router.simulator.cli import parse_config
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import TaskType
from twisted_router.simulator.testing import InMemoryWorker

ITEM_KEYS = {
    "request_id", "prompt", "seed", "generated_output", "rollout_log_probs",
    "rollout_debug_tensors", "denoising_env", "dit_trajectory", "inference_time_s", "peak_memory_mb",
}


def _upstream(**overrides: Any) -> InMemoryWorker:
    return InMemoryWorker(api_version="upstream", **overrides)


def _raw_shape(tensor: dict[str, Any]) -> tuple[int, ...]:
    """Check a msgpack tensor's raw bytes against its shape; return the shape."""
    assert tensor["__tensor__"] is True and tensor["dtype"] == "torch.float32"
    assert isinstance(tensor["data"], bytes)
    shape = tuple(tensor["shape"])
    assert len(tensor["data"]) == 4 * int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(tensor["data"], dtype="<f4")
    assert np.isfinite(values).all()
    return shape


def _json_shape(tensor: dict[str, Any]) -> tuple[int, ...]:
    """Decode a JSON tensor (base64 safetensors {"t": ...}); return its shape."""
    raw = base64.b64decode(tensor["data"])
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["t"]["shape"] == tensor["shape"]
    return tuple(tensor["shape"])


# --- /rollout/generate ---------------------------------------------------------

ROLLOUT = {
    "prompt": "x", "width": 64, "height": 32, "num_inference_steps": 5,
    "num_outputs_per_prompt": 2, "seed": 7, "rollout_return_dit_trajectory": True,
}


def test_msgpack_rollout_is_raw_bytes_with_timing_headers() -> None:
    sim = _upstream()
    r = sim.post("/rollout/generate", ROLLOUT)
    assert r.code == 200 and r.content_type == "application/msgpack"
    assert r.length == len(r.body)
    items = msgpack.unpackb(r.body)
    assert isinstance(items, list) and len(items) == 2 and set(items[0]) == ITEM_KEYS
    # One request: one request_id and one seed for every sample.
    assert {i["request_id"] for i in items} == {items[0]["request_id"]}
    assert [i["seed"] for i in items] == [7, 7]
    assert _raw_shape(items[0]["generated_output"]) == (3, 32, 64)
    assert _raw_shape(items[0]["rollout_log_probs"]) == (5,)
    traj = items[0]["dit_trajectory"]
    assert set(traj) == {"latents", "timesteps", "sigmas"}
    assert _raw_shape(traj["latents"]) == (6, 8, 64)
    assert _raw_shape(traj["timesteps"]) == (5,)
    debug = items[0]["rollout_debug_tensors"]  # rollout_debug_mode defaults to true
    assert set(debug) == {
        "rollout_variance_noises", "rollout_prev_sample_means", "rollout_noise_std_devs",
        "rollout_model_outputs",
    }
    assert _raw_shape(debug["rollout_variance_noises"]) == (5, 8, 64)
    assert _raw_shape(debug["rollout_noise_std_devs"]) == (5, 1)
    assert items[0]["inference_time_s"] == pytest.approx(r.finished)
    timing = json.loads(r.header("x-sgld-timing") or "")
    assert timing["request_id"] == items[0]["request_id"] and timing["srv_recv"] == 0.0
    assert timing["forward_end"] - timing["forward_start"] == pytest.approx(r.finished, abs=2e-6)  # 6 dp
    assert "DenoisingStage" in json.loads(r.header("x-sgld-stages") or "")


def test_json_rollout_keeps_the_base64_tensors() -> None:
    sim = _upstream(rollout_format="json")
    r = sim.post("/rollout/generate", ROLLOUT)
    assert r.code == 200 and r.content_type == "application/json"
    items = r.json()
    assert set(items[0]) == ITEM_KEYS
    assert _json_shape(items[1]["generated_output"]) == (3, 32, 64)
    assert _json_shape(items[1]["dit_trajectory"]["latents"]) == (6, 8, 64)
    assert r.header("x-sgld-timing") is not None


def test_rollout_options_switch_parts_off() -> None:
    sim = _upstream()
    (item,) = msgpack.unpackb(sim.post("/rollout/generate", {
        "prompt": "x", "seed": 1, "width": 16, "height": 16, "rollout_debug_mode": False,
    }).body)
    assert item["rollout_debug_tensors"] is None and item["dit_trajectory"] is None
    assert _raw_shape(item["rollout_log_probs"]) == (8,)  # T2I default steps
    (item,) = msgpack.unpackb(sim.post("/rollout/generate", {
        "prompt": "x", "seed": 1, "width": 16, "height": 16, "rollout": False,
    }).body)
    assert item["rollout_log_probs"] is None and item["rollout_debug_tensors"] is None


def test_rollout_without_seed_fails_after_the_work_as_a_plain_500() -> None:
    sim = _upstream(step_ms=100)
    r = sim.post("/rollout/generate", {"prompt": "x", "width": 1024, "height": 1024, "num_inference_steps": 2})
    assert (r.code, r.body) == (500, b"Internal Server Error")
    assert r.finished == pytest.approx(0.2)  # the GPU time was spent first


def test_large_msgpack_rollout_is_streamed_intact() -> None:
    sim = _upstream()
    r = sim.post("/rollout/generate", {
        "prompt": "x", "seed": 3, "width": 1024, "height": 1024, "num_inference_steps": 10,
        "rollout_return_dit_trajectory": True,
    })
    assert r.length == len(r.body) > 10_000_000
    (item,) = msgpack.unpackb(r.body)
    assert _raw_shape(item["dit_trajectory"]["latents"]) == (11, 4096, 64)


def test_rollout_errors_and_sleep() -> None:
    sim = _upstream()
    assert sim.post("/rollout/generate", {}).code == 422
    bad = sim.post("/rollout/generate", {"prompt": "x", "seed": 1, "rollout_sde_type": "ode"})
    assert bad.code == 400 and bad.json()["detail"].startswith("Invalid sampling params: ")
    failing = _upstream(fail_rate=1.0)
    r = failing.post("/rollout/generate", {"prompt": "x", "seed": 1, "width": 16, "height": 16})
    assert (r.code, r.json()) == (500, {"detail": "Generation failed: simulated failure"})
    sim.post("/release_memory_occupation", {})
    assert sim.post("/rollout/generate", {"prompt": "x", "seed": 1}).code == 400


# --- endpoints by version ------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "served", "missing"),
    [
        ("pinned", ["/v1/diffusion/generate"], ["/rollout/generate", "/server_info", "/model_info", "/liveness"]),
        ("upstream", ["/rollout/generate", "/server_info", "/model_info", "/liveness"], ["/v1/diffusion/generate"]),
    ],
)
def test_each_version_serves_its_own_endpoints(version: str, served: list[str], missing: list[str]) -> None:
    sim = InMemoryWorker(api_version=version)
    for path in missing:
        r = sim.get(path) if path in ("/server_info", "/model_info", "/liveness") else sim.post(path, {"prompt": "x"})
        assert (r.code, r.json()) == (404, {"detail": "Not Found"}), path
    for path in served:
        if path in ("/server_info", "/model_info", "/liveness"):
            assert sim.get(path).code == 200, path
        else:
            assert sim.post(path, {"prompt": "x", "seed": 1}).code == 200, path
    # Both versions sleep and wake.
    assert sim.post("/release_memory_occupation", {}).json()["sleeping"] is True


def test_upstream_info_endpoints() -> None:
    sim = _upstream(model_path="Qwen/Qwen-Image")
    info = sim.get("/server_info").json()
    assert info["model_path"] == "Qwen/Qwen-Image" and {"tp_size", "dp_size", "version"} <= set(info)
    model = sim.get("/model_info").json()
    assert (model["model_type"], model["task_type"], model["is_image_gen"]) == ("diffusion", "T2I", True)


# --- warm-up -------------------------------------------------------------------------


def test_health_is_503_until_the_warm_up_ends() -> None:
    sim = _upstream(warmup_seconds=30)
    r = sim.get("/health")
    assert r.code == 503
    assert sim.get("/liveness").code == 200
    sim.clock.advance(29)
    assert sim.get("/health").code == 503
    sim.worker.port_opened()  # the warm-up counts from the port opening
    sim.clock.advance(29.5)
    assert sim.get("/health").code == 503
    sim.clock.advance(1)
    assert (sim.get("/health").code, sim.get("/health").json()) == (200, {"status": "ok"})


# --- video list order ------------------------------------------------------------------


def _video_ids(sim: InMemoryWorker, query: str = "") -> list[str]:
    r = sim.get("/v1/videos" + query)
    assert r.code == 200, r.body
    return [job["id"] for job in r.json()["data"]]


def test_video_order_is_case_insensitive_and_same_second_keeps_insertion_order() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V)
    ids = [sim.post("/v1/videos", {"prompt": f"p{i}"}).json()["id"] for i in range(3)]
    sim.clock.advance(1.5)
    later = sim.post("/v1/videos", {"prompt": "later"}).json()["id"]
    assert _video_ids(sim, "?order=ASC") == [*ids, later]
    # desc: newer seconds first, but the same second stays in insertion order.
    assert _video_ids(sim) == [later, *ids]
    assert _video_ids(sim, "?order=sideways") == [later, *ids]
    assert _video_ids(sim, f"?order=desc&after={ids[0]}") == ids[1:]


# --- weight updates ----------------------------------------------------------------------


def test_update_from_a_path_that_does_not_exist_is_a_400(tmp_path: Any) -> None:
    sim = InMemoryWorker(weights_prefixes=("/ckpt/",))
    before = sim.post("/get_weights_checksum", {}).json()
    r = sim.post("/update_weights_from_disk", {"model_path": "/nowhere/step-1"})
    assert r.code == 400 and r.json()["success"] is False
    assert r.json()["message"].startswith("Failed to download model: /nowhere/step-1")
    assert sim.post("/get_weights_checksum", {}).json() == before
    for accepted in ("/ckpt/step-1", str(tmp_path)):
        assert sim.post("/update_weights_from_disk", {"model_path": accepted}).code == 200


def test_update_of_no_modules_is_a_400() -> None:
    sim = InMemoryWorker(weights_prefixes=("/ckpt/",))
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/1", "target_modules": []})
    assert r.code == 400
    assert r.json()["message"].startswith("No matching modules found for update. Requested: [].")


@pytest.mark.parametrize(
    ("version", "code", "content_type"),
    [("pinned", 500, "text/plain; charset=utf-8"), ("upstream", 500, "application/json")],
)
def test_update_while_sleeping_follows_the_version(version: str, code: int, content_type: str) -> None:
    sim = InMemoryWorker(api_version=version, weights_prefixes=("/ckpt/",))
    sim.post("/release_memory_occupation", {})
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/1"})
    assert (r.code, r.content_type) == (code, content_type)
    if version == "upstream":
        assert r.json() == {"success": False, "message": (
            "Cannot update weights while the server is sleeping. Call resume_memory_occupation first."
        )}


# --- smaller ones ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["B64_JSON", None])
def test_response_format_is_case_insensitive_and_null_is_b64(fmt: str | None) -> None:
    r = InMemoryWorker().post("/v1/images/generations", {"prompt": "x", "n": 2, "response_format": fmt})
    data = r.json()["data"]
    assert r.code == 200 and len(data) == 2 and all(d["b64_json"] for d in data)
    # Files of n > 1 are <id>_<i>.
    assert [d["file_path"].rsplit("/", 1)[1] for d in data] == [f"{r.json()['id']}_{i}.jpg" for i in range(2)]


def test_unknown_response_format_is_a_400_after_the_work() -> None:
    r = InMemoryWorker().post("/v1/images/generations", {"prompt": "x", "response_format": "png"})
    assert (r.code, r.json()) == (400, {"detail": "response_format=png is not supported"})


def test_a_bad_size_is_ignored() -> None:
    sim = InMemoryWorker(step_ms=1000)
    r = sim.post("/v1/images/generations", {"prompt": "x", "size": "big", "num_inference_steps": 1})
    assert r.code == 200
    assert r.json()["inference_time_s"] == pytest.approx(1.0)  # the model default, 1024x1024


def _stored_image(sim: InMemoryWorker) -> tuple[str, bytes]:
    image_id = sim.post("/v1/images/generations", {"prompt": "x"}).json()["id"]
    whole = sim.get(f"/v1/images/{image_id}/content")
    assert whole.code == 200 and whole.header("accept-ranges") == "bytes"
    assert whole.header("etag") and whole.header("last-modified")
    return image_id, whole.body


def test_content_answers_a_range_with_206() -> None:
    sim = InMemoryWorker(image_bytes=200_000)
    image_id, whole = _stored_image(sim)
    path = f"/v1/images/{image_id}/content"
    for header, (start, stop) in [
        (b"bytes=0-99", (0, 100)), (b"bytes=70000-", (70000, 200_000)), (b"bytes=-10", (199_990, 200_000)),
        (b"bytes=150000-999999", (150000, 200_000)), (b"bytes=0-9, 5-19", (0, 20)),
    ]:
        part = sim.get(path, headers={b"range": [header]})
        assert part.code == 206, header
        assert part.body == whole[start:stop]
        assert part.header("content-range") == f"bytes {start}-{stop - 1}/{len(whole)}"
        assert part.length == stop - start


@pytest.mark.parametrize(
    ("header", "code", "body"),
    [
        (b"bytes=300000-", 416, b""),
        (b"bytes=-300000", 416, b""),
        (b"bytes=x-y", 400, b"Range header: range must be requested"),
        (b"bytes=9-3", 400, b"Range header: start must be less than end"),
        (b"items=0-9", 400, b"Only support bytes range"),
        (b"0-9", 400, b"Malformed range header."),
    ],
)
def test_content_refuses_ranges_as_starlette_does(header: bytes, code: int, body: bytes) -> None:
    sim = InMemoryWorker(image_bytes=200_000)
    image_id, _ = _stored_image(sim)
    r = sim.get(f"/v1/images/{image_id}/content", headers={b"range": [header]})
    assert (r.code, r.body, r.content_type) == (code, body, "text/plain; charset=utf-8")
    if code == 416:
        assert r.header("content-range") == "*/200000"


def test_if_range_of_another_version_gives_the_whole_file() -> None:
    sim = InMemoryWorker(image_bytes=5000)
    image_id, whole = _stored_image(sim)
    path = f"/v1/images/{image_id}/content"
    etag = sim.get(path).header("etag") or ""
    assert etag.startswith('"') and etag.endswith('"')
    same = sim.get(path, headers={b"range": [b"bytes=0-9"], b"if-range": [etag.encode()]})
    assert same.code == 206
    other = sim.get(path, headers={b"range": [b"bytes=0-9"], b"if-range": [b'"stale"']})
    assert (other.code, other.body) == (200, whole)


def test_disjoint_ranges_are_answered_with_the_whole_file() -> None:
    """Starlette answers multipart/byteranges; the simulator does not build them (documented)."""
    sim = InMemoryWorker(image_bytes=5000)
    image_id, whole = _stored_image(sim)
    r = sim.get(f"/v1/images/{image_id}/content", headers={b"range": [b"bytes=0-9, 100-109"]})
    assert (r.code, r.body) == (200, whole)


def test_video_content_answers_a_range() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V, video_bytes=100_000)
    video_id = sim.post("/v1/videos", {"prompt": "x"}).json()["id"]
    sim.clock.advance(60)
    whole = sim.get(f"/v1/videos/{video_id}/content")
    part = sim.get(f"/v1/videos/{video_id}/content", headers={b"range": [b"bytes=65530-65545"]})
    assert (part.code, part.body, part.header("content-type")) == (206, whole.body[65530:65546], "video/mp4")


def test_form_encoded_video_request_is_a_400() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V)
    r = sim.call("POST", "/v1/videos", data=b"prompt=a+boat",
                 headers={b"content-type": [b"application/x-www-form-urlencoded"]})
    assert r.code == 400 and r.json()["detail"].startswith("Invalid request body: ")
    assert "prompt" in r.json()["detail"]


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        ({"num_frames": 0}, "num_frames must be a positive int, got 0"),
        ({"fps": 0}, "fps must be a positive int, got 0"),
        ({"fps": -24, "num_frames": 0}, "fps must be a positive int, got -24"),
    ],
)
def test_videos_without_frames_are_400s_before_a_job_exists(bad: dict[str, int], detail: str) -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V)
    r = sim.post("/v1/videos", {"prompt": "x", **bad})
    assert (r.code, r.json()) == (400, {"detail": detail})
    assert sim.get("/v1/videos").json()["data"] == []


def test_native_trajectory_has_every_key() -> None:
    traj = InMemoryWorker().post("/v1/diffusion/generate", {
        "prompt": "x", "width": 32, "height": 32, "num_inference_steps": 2, "get_log_probs": True,
    }).json()["trajectory"]
    assert set(traj) == {"latents", "latents_shape", "latents_dtype", "timesteps", "log_probs", "log_probs_shape"}
    assert np.load(io.BytesIO(base64.b64decode(traj["log_probs"]))).shape == (1, 2)


def test_requests_wait_for_the_warm_up_except_health_and_info() -> None:
    """Upstream's warm-up middleware holds everything but a few probe paths."""
    sim = _upstream(warmup_seconds=10, step_ms=0)
    for path in ("/health", "/health_generate", "/model_info", "/server_info", "/liveness"):
        r = sim.get(path)
        assert r.finished == 0.0, path
    held = sim.get("/v1/models")
    assert (held.code, held.finished) == (200, 10.0)
    assert sim.get("/health").code == 200


def test_a_request_held_by_the_warm_up_can_be_abandoned() -> None:
    sim = _upstream(warmup_seconds=10)
    d = sim.send("GET", "/v1/models")
    assert [c.getTime() for c in sim.clock.getDelayedCalls()] == [10.0]
    d.addErrback(lambda _: None)  # the client's own failure: expected
    d.cancel()
    sim.flush()
    assert [c for c in sim.clock.getDelayedCalls() if c.getTime() == 10.0] == []


# --- options -------------------------------------------------------------------------------


def test_version_options_parse() -> None:
    config = parse_config([
        "--api-version", "upstream", "--rollout-format", "json", "--warmup-seconds", "2.5",
        "--weights-prefix", "/a/", "--weights-prefix", "/b/",
    ])
    assert (config.api_version, config.rollout_format, config.warmup_seconds, config.weights_prefixes) == (
        "upstream", "json", 2.5, ("/a/", "/b/"),
    )
    defaults = parse_config([])
    assert (defaults.api_version, defaults.rollout_format, defaults.warmup_seconds) == ("pinned", "msgpack", 0.0)


@pytest.mark.parametrize(
    "argv",
    [["--api-version", "latest"], ["--rollout-format", "cbor"], ["--warmup-seconds", "-1"],
     ["--warmup-seconds", "nan"], ["--weights-prefix", ""]],
)
def test_bad_version_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2


def test_config_refuses_unknown_versions() -> None:
    with pytest.raises(ValueError, match="api-version"):
        SimulatorConfig(api_version="1.0")
