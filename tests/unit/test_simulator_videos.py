"""Video jobs (§4.4, §4.5, §10.5): queued at once, then completed or failed; per-worker store."""

from __future__ import annotations

import pytest

from twisted_router.simulator.model import SLEEPING_MESSAGE, TaskType, service_seconds
from twisted_router.simulator.testing import InMemoryWorker

VIDEO_KEYS = {
    "id", "object", "model", "status", "progress", "created_at", "size", "seconds", "quality",
    "url", "remixed_from_video_id", "completed_at", "expires_at", "error", "file_path",
    "peak_memory_mb", "inference_time_s",
}


@pytest.fixture
def sim() -> InMemoryWorker:
    return InMemoryWorker(task_type=TaskType.T2V)


def _create(sim: InMemoryWorker, **fields: object) -> dict:
    r = sim.post("/v1/videos", {"prompt": "a boat", **fields})
    assert r.code == 200, r.body
    return r.json()


def test_create_returns_a_queued_job_at_once(sim: InMemoryWorker) -> None:
    sim.clock.advance(100)
    job = _create(sim)
    assert set(job) == VIDEO_KEYS
    assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0
    assert job["model"] == "sora-2"
    assert job["created_at"] == 100
    assert job["size"] == "832x480" and job["seconds"] == "4" and job["quality"] == "standard"
    assert job["completed_at"] is None and job["error"] is None and job["url"] is None
    assert job["file_path"].endswith(f"/{job['id']}.mp4")
    assert sim.clock.seconds() == 100  # answered without waiting for the GPU


def test_model_field_is_echoed(sim: InMemoryWorker) -> None:
    assert _create(sim, model="wan")["model"] == "wan"


def test_job_completes_after_its_service_time(sim: InMemoryWorker) -> None:
    job = _create(sim, size="640x480", num_frames=33, num_inference_steps=10)
    expected = service_seconds(step_ms=1.0, steps=10, width=640, height=480, frames=33)
    sim.clock.advance(expected * 0.99)
    assert sim.get(f"/v1/videos/{job['id']}").json()["status"] == "queued"
    sim.clock.advance(expected * 0.02)
    done = sim.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["completed_at"] == 0
    assert done["inference_time_s"] == pytest.approx(expected)
    assert done["peak_memory_mb"] > 0


def test_frames_default_to_fps_times_seconds(sim: InMemoryWorker) -> None:
    job = _create(sim, seconds=2, fps=16)
    assert job["seconds"] == "2"
    sim.clock.advance(60)
    done = sim.get(f"/v1/videos/{job['id']}").json()
    expected = service_seconds(step_ms=1.0, steps=4, width=832, height=480, frames=32)
    assert done["inference_time_s"] == pytest.approx(expected)


def test_extra_body_is_merged(sim: InMemoryWorker) -> None:
    job = _create(sim, extra_body={"num_frames": 48, "fps": 24})
    assert job["seconds"] == "2"


def test_content_before_completion_is_404_in_progress(sim: InMemoryWorker) -> None:
    job = _create(sim)
    r = sim.get(f"/v1/videos/{job['id']}/content")
    assert (r.code, r.json()) == (404, {"detail": "Generation is still in-progress"})


def test_content_after_completion_is_an_mp4_of_the_configured_size() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V, video_bytes=300_000)
    job = _create(sim)
    sim.clock.advance(10)
    r = sim.get(f"/v1/videos/{job['id']}/content?variant=video")
    assert r.code == 200
    assert r.content_type == "video/mp4"
    assert r.header("content-disposition") == f'attachment; filename="{job["id"]}.mp4"'
    assert len(r.body) == r.length == 300_000
    assert r.body[4:8] == b"ftyp"


def test_unknown_video_is_404(sim: InMemoryWorker) -> None:
    for method, path in (("GET", "/v1/videos/nope"), ("DELETE", "/v1/videos/nope"),
                         ("GET", "/v1/videos/nope/content")):
        r = sim.call(method, path)
        assert (r.code, r.json()) == (404, {"detail": "Video not found"})


def test_delete_removes_from_the_store_but_the_job_still_runs(sim: InMemoryWorker) -> None:
    job = _create(sim)
    r = sim.delete(f"/v1/videos/{job['id']}")
    assert r.code == 200 and r.json()["status"] == "deleted" and r.json()["id"] == job["id"]
    assert sim.get(f"/v1/videos/{job['id']}").code == 404
    assert sim.worker.queue.depth == 1
    sim.clock.advance(10)
    assert sim.worker.queue.depth == 0 and sim.worker.state.served == 1


def test_sleeping_worker_accepts_the_job_then_fails_it(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    job = _create(sim)
    assert job["status"] == "queued"
    done = sim.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "failed" and done["progress"] == 0
    assert done["error"] == {"message": f"400: {{'message': {SLEEPING_MESSAGE!r}}}"}
    assert sim.get(f"/v1/videos/{job['id']}/content").code == 404


def test_injected_failure_fails_the_job() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V, fail_rate=1.0)
    job = _create(sim)
    sim.clock.advance(10)
    done = sim.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "failed"
    assert done["error"]["message"].startswith("Model generation returned no output")


def test_jobs_share_the_fifo_queue_with_other_generations(sim: InMemoryWorker) -> None:
    first = _create(sim, num_frames=1, size="1024x1024", num_inference_steps=100)  # 0.1 s
    second = _create(sim, num_frames=1, size="1024x1024", num_inference_steps=100)
    sim.clock.advance(0.1)
    assert sim.get(f"/v1/videos/{first['id']}").json()["status"] == "completed"
    assert sim.get(f"/v1/videos/{second['id']}").json()["status"] == "queued"


def test_list_orders_by_creation_and_pages(sim: InMemoryWorker) -> None:
    ids = []
    for _ in range(3):
        sim.clock.advance(1)
        ids.append(_create(sim)["id"])
    listed = sim.get("/v1/videos?video_id=ignored").json()
    assert listed["object"] == "list"
    assert [v["id"] for v in listed["data"]] == ids[::-1]  # desc by default, filter ignored
    assert [v["id"] for v in sim.get("/v1/videos?order=asc").json()["data"]] == ids
    assert [v["id"] for v in sim.get(f"/v1/videos?order=asc&after={ids[0]}").json()["data"]] == ids[1:]
    assert [v["id"] for v in sim.get("/v1/videos?limit=1").json()["data"]] == [ids[2]]
    assert sim.get("/v1/videos?after=unknown").json()["data"] == []


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x"])
def test_list_validation_is_422(sim: InMemoryWorker, query: str) -> None:
    r = sim.get(f"/v1/videos?{query}")
    assert r.code == 422 and r.json()["detail"][0]["loc"][0] == "query"


def test_store_is_per_worker(sim: InMemoryWorker) -> None:
    job = _create(sim)
    other = InMemoryWorker(task_type=TaskType.T2V)
    assert other.get(f"/v1/videos/{job['id']}").code == 404
    assert other.get("/v1/videos").json()["data"] == []


def test_json_validation_errors_are_400_invalid_request_body(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/videos", {"size": "64x64"})
    assert r.code == 400
    detail = r.json()["detail"]
    assert detail.startswith("Invalid request body: 1 validation error for VideoGenerationsRequest")
    assert "prompt" in detail
    bad = sim.call("POST", "/v1/videos", data=b"not json")
    assert bad.code == 400 and bad.json()["detail"].startswith("Invalid request body: ")


def test_bad_sampling_params_are_400(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/videos", {"prompt": "x", "num_inference_steps": -1})
    assert r.code == 400 and "num_inference_steps" in r.json()["detail"]


def test_multipart_create(sim: InMemoryWorker) -> None:
    r = sim.post_form("/v1/videos", [("prompt", "x"), ("extra_body", '{"num_frames": 24}')])
    assert r.code == 200 and r.json()["status"] == "queued" and r.json()["seconds"] == "1"
    missing = sim.post_form("/v1/videos", [("seconds", "4")])
    assert (missing.code, missing.json()) == (400, {"detail": "prompt is required"})


def test_image_to_video_requires_a_reference() -> None:
    sim = InMemoryWorker(task_type=TaskType.I2V)
    r = sim.post("/v1/videos", {"prompt": "x"})
    assert r.code == 400
    assert r.json()["detail"] == (
        "Invalid request body: 400: input_reference or reference_url is required "
        "for image-to-video generation"
    )
    assert sim.post("/v1/videos", {"prompt": "x", "reference_url": "https://e/x.png"}).code == 200
    form = sim.post_form("/v1/videos", [("prompt", "x")])
    assert form.json() == {
        "detail": "input_reference or reference_url is required for image-to-video generation"
    }
    ok = sim.post_form("/v1/videos", [("prompt", "x")], [("input_reference", "a.png", b"x", "image/png")])
    assert ok.code == 200
