"""The native RL endpoints: /v1/diffusion/generate (§4.6, §10.6) and /rollout/generate (§9)."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest

from twisted_router.simulator.model import SLEEPING_MESSAGE, TaskType
from twisted_router.simulator.testing import InMemoryWorker


def _npy(blob: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(blob)))


def _tensor(obj: dict) -> np.ndarray:
    """Decode an upstream __tensor__ dict (base64 safetensors of {"t": tensor})."""
    assert obj["__tensor__"] is True and obj["dtype"] == "torch.float32"
    raw = base64.b64decode(obj["data"])
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    entry = header["t"]
    assert entry["dtype"] == "F32" and entry["shape"] == obj["shape"]
    start, end = entry["data_offsets"]
    data = raw[8 + hlen + start : 8 + hlen + end]
    return np.frombuffer(data, dtype="<f4").reshape(entry["shape"])


@pytest.fixture
def sim() -> InMemoryWorker:
    return InMemoryWorker()


def test_plain_generation_is_a_png_without_trajectory(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/diffusion/generate", {"prompt": "x"})
    assert r.code == 200
    body = r.json()
    assert set(body) == {
        "id", "created", "output_b64", "output_format", "file_path", "peak_memory_mb",
        "inference_time_s", "trajectory",
    }
    assert body["output_format"] == "png"
    assert base64.b64decode(body["output_b64"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert body["file_path"].endswith(f"/{body['id']}.png")
    assert body["trajectory"] is None


def test_log_probs_trajectory_shapes_follow_the_request(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "width": 512, "height": 512, "num_inference_steps": 28,
        "get_log_probs": True,
    })
    traj = r.json()["trajectory"]
    latents = _npy(traj["latents"])
    assert latents.shape == (1, 28, 1024, 64) and latents.dtype == np.float32
    assert traj["latents_shape"] == [1, 28, 1024, 64]
    assert traj["latents_dtype"] == "torch.float32"
    assert len(traj["timesteps"]) == 28
    steps = [_npy(t) for t in traj["timesteps"]]
    assert all(t.shape == () and t.dtype == np.float32 for t in steps)
    assert float(steps[0]) == 1000.0 and float(steps[1]) < float(steps[0])
    log_probs = _npy(traj["log_probs"])
    assert log_probs.shape == (1, 28) and traj["log_probs_shape"] == [1, 28]
    assert np.all(log_probs < 0)
    assert len(traj["latents"]) == 9_786_880  # §7: 9.79 MB of base64


def test_get_latents_alone_has_null_log_probs(sim: InMemoryWorker) -> None:
    """TrajectoryData is a pydantic model: every key is sent, null when not computed."""
    traj = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "size": "256x128", "num_inference_steps": 3, "get_latents": True,
    }).json()["trajectory"]
    assert _npy(traj["latents"]).shape == (1, 3, 128, 64)
    assert traj["log_probs"] is None and traj["log_probs_shape"] is None


def test_batch_and_default_steps(sim: InMemoryWorker) -> None:
    traj = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "width": 64, "height": 64, "num_outputs_per_prompt": 3, "get_log_probs": True,
    }).json()["trajectory"]
    assert traj["latents_shape"] == [3, 8, 16, 64]
    assert _npy(traj["log_probs"]).shape == (3, 8)


def test_video_model_answers_mp4_and_video_latents() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V, video_bytes=5000)
    body = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "width": 160, "height": 96, "num_frames": 17, "num_inference_steps": 2,
        "get_log_probs": True,
    }).json()
    assert body["output_format"] == "mp4"
    out = base64.b64decode(body["output_b64"])
    assert out[4:8] == b"ftyp" and len(out) == 5000
    assert _npy(body["trajectory"]["latents"]).shape == (1, 2, 16, 5, 12, 20)


def test_large_trajectory_is_streamed_intact() -> None:
    sim = InMemoryWorker()
    r = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "width": 1024, "height": 1024, "num_inference_steps": 10, "get_latents": True,
    })
    assert r.length == len(r.body) > 10_000_000
    assert _npy(r.json()["trajectory"]["latents"]).shape == (1, 10, 4096, 64)


def test_timing_counts_every_output(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/diffusion/generate", {
        "prompt": "x", "num_outputs_per_prompt": 4, "num_inference_steps": 10,
    })
    assert r.finished == pytest.approx(0.04)


def test_missing_prompt_is_422(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/diffusion/generate", {"get_log_probs": True})
    assert r.code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_sleeping_is_the_sleeping_400(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    r = sim.post("/v1/diffusion/generate", {"prompt": "x"})
    assert (r.code, r.json()) == (400, {"detail": {"message": SLEEPING_MESSAGE}})


def test_failure_and_bad_params_are_plain_500s() -> None:
    failing = InMemoryWorker(fail_rate=1.0)
    r = failing.post("/v1/diffusion/generate", {"prompt": "x"})
    assert (r.code, r.body) == (500, b"Internal Server Error")
    r = InMemoryWorker().post("/v1/diffusion/generate", {"prompt": "x", "num_outputs_per_prompt": 0})
    assert (r.code, r.content_type) == (500, "text/plain; charset=utf-8")


def test_image_conditioned_model_needs_image_path() -> None:
    sim = InMemoryWorker(task_type=TaskType.I2V)
    assert sim.post("/v1/diffusion/generate", {"prompt": "x"}).code == 500
    r = sim.post("/v1/diffusion/generate", {"prompt": "x", "image_path": "/in.png", "num_frames": 5,
                                            "width": 64, "height": 64})
    assert r.code == 200
