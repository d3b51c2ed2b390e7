"""
The simulated worker's HTTP contract, in memory on a fake clock (§2-§4.3, §6, §10).

Every test drives a real Klein app through StubTreq; only time is fake.
"""

from __future__ import annotations

import base64

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import Site

from tests.support.deferreds import assert_no_result
from twisted_router.simulator.model import SLEEPING_MESSAGE, TaskType
from twisted_router.simulator.testing import InMemoryWorker

SLEEPING_BODY = {"detail": {"message": SLEEPING_MESSAGE}}


@pytest.fixture
def sim() -> InMemoryWorker:
    return InMemoryWorker()


# --- health and discovery ---------------------------------------------------


def test_health_is_a_constant_ok(sim: InMemoryWorker) -> None:
    r = sim.get("/health")
    assert (r.code, r.json()) == (200, {"status": "ok"})
    assert r.content_type == "application/json"
    assert r.length == len(r.body)


def test_health_generate_is_a_stub_that_runs_nothing(sim: InMemoryWorker) -> None:
    r = sim.get("/health_generate")
    assert (r.code, r.json()) == (200, {"status": "ok"})
    assert sim.worker.queue.completed == 0


def test_every_answer_names_the_worker(sim: InMemoryWorker) -> None:
    for r in (sim.get("/health"), sim.get("/nope"), sim.post("/v1/images/generations", {})):
        assert r.header("x-worker-id") == "sim-test"


def test_models_has_one_full_card_with_task_type() -> None:
    sim = InMemoryWorker(model_path="/models/qwen", task_type=TaskType.TI2I, num_gpus=2)
    sim.clock.advance(1234)
    body = sim.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"] == [{
        "id": "/models/qwen", "object": "model", "created": 1234, "owned_by": "sglang",
        "root": "/models/qwen", "parent": None, "max_model_len": None, "num_gpus": 2,
        "task_type": "TI2I", "dit_precision": "bf16", "vae_precision": "fp32",
        "pipeline_name": "Flux2KleinPipeline", "pipeline_class": "Flux2KleinPipeline",
    }]


def test_default_model_path_follows_the_task_type() -> None:
    assert InMemoryWorker(task_type=TaskType.T2V).get("/v1/model_info").json() == {
        "model_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    }


def test_model_card_by_path_and_openai_404() -> None:
    sim = InMemoryWorker(model_path="Qwen/Qwen-Image")
    assert sim.get("/v1/models/Qwen/Qwen-Image").json()["id"] == "Qwen/Qwen-Image"
    r = sim.get("/v1/models/other/model")
    assert r.code == 404
    assert r.json() == {"error": {
        "message": "The model 'other/model' does not exist", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found",
    }}


def test_deprecated_flat_models(sim: InMemoryWorker) -> None:
    body = sim.get("/models").json()
    assert body["model_path"] == "Qwen/Qwen-Image" and body["task_type"] == "T2I"
    assert body["num_gpus"] == 1


def test_model_info_and_no_get_model_info(sim: InMemoryWorker) -> None:
    assert sim.get("/v1/model_info").json() == {"model_path": "Qwen/Qwen-Image"}
    for path in ("/get_model_info", "/get_server_info"):
        r = sim.get(path)
        assert (r.code, r.json()) == (404, {"detail": "Not Found"})


def test_wrong_method_is_405(sim: InMemoryWorker) -> None:
    r = sim.post("/health", {})
    assert (r.code, r.json()) == (405, {"detail": "Method Not Allowed"})


def test_disabled_endpoint_answers_404() -> None:
    sim = InMemoryWorker(disabled_endpoints=("/rollout/generate",))
    r = sim.post("/rollout/generate", {"prompt": "x"})
    assert (r.code, r.json()) == (404, {"detail": "Not Found"})
    assert sim.get("/health").code == 200


# --- /v1/images/generations ----------------------------------------------------


def test_default_answer_is_one_relative_url_item(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "a cat", "n": 3})
    assert r.code == 200
    body = r.json()
    assert set(body) == {"id", "created", "data", "peak_memory_mb", "inference_time_s"}
    (item,) = body["data"]
    assert item == {
        "b64_json": None,
        "url": f"/v1/images/{body['id']}/content",
        "revised_prompt": "a cat",
        "file_path": f"/tmp/sglang-sim/outputs/{body['id']}_0.jpg",
    }


def test_b64_json_is_a_jpeg_by_default(sim: InMemoryWorker) -> None:
    body = sim.post("/v1/images/generations", {"prompt": "x", "response_format": "b64_json"}).json()
    (item,) = body["data"]
    raw = base64.b64decode(item["b64_json"])
    assert raw[:3] == b"\xff\xd8\xff" and raw[-2:] == b"\xff\xd9"
    assert len(raw) == 2048  # --image-bytes default
    assert item["url"] is None and item["file_path"].endswith(f"/{body['id']}.jpg")


@pytest.mark.parametrize(
    ("extra", "signature", "ext"),
    [
        ({"output_format": "png"}, b"\x89PNG", "png"),
        ({"output_format": "webp"}, b"RIFF", "webp"),
        ({"background": "transparent"}, b"\x89PNG", "png"),
        ({"output_format": "jpeg"}, b"\xff\xd8\xff", "jpg"),
    ],
)
def test_output_format(sim: InMemoryWorker, extra: dict[str, str], signature: bytes, ext: str) -> None:
    body = sim.post("/v1/images/generations", {"prompt": "x", "response_format": "b64_json", **extra}).json()
    item = body["data"][0]
    assert base64.b64decode(item["b64_json"]).startswith(signature)
    assert item["file_path"].endswith(f".{ext}")


def test_n_is_clamped_to_ten(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", "n": 50, "response_format": "b64_json"})
    data = r.json()["data"]
    assert len(data) == 10
    assert [d["file_path"].rsplit("_", 1)[1] for d in data] == [f"{i}.jpg" for i in range(10)]


def test_num_images_is_ignored(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", "num_images": 4, "response_format": "b64_json"})
    assert len(r.json()["data"]) == 1


def test_image_size_is_settable() -> None:
    sim = InMemoryWorker(image_bytes=300_000)
    body = sim.post("/v1/images/generations", {"prompt": "x", "response_format": "b64_json"}).json()
    assert len(base64.b64decode(body["data"][0]["b64_json"])) == 300_000


def test_missing_prompt_is_a_pydantic_422(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"size": "64x64"})
    assert r.code == 422
    assert r.json() == {"detail": [{
        "type": "missing", "loc": ["body", "prompt"], "msg": "Field required",
        "input": {"size": "64x64"},
    }]}
    assert sim.worker.queue.completed == 0


def test_body_that_is_not_json_is_a_422(sim: InMemoryWorker) -> None:
    r = sim.call(
        "POST", "/v1/images/generations", data=b"{nope",
        headers={b"content-type": [b"application/json"]},
    )
    assert r.code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_bad_field_type_is_a_422(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", "n": "lots"})
    assert r.code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "n"]


@pytest.mark.parametrize(
    "bad",
    [{"num_inference_steps": 0}, {"guidance_scale": -1}, {"width": -5}],
)
def test_invalid_sampling_params_are_a_plain_500(sim: InMemoryWorker, bad: dict[str, object]) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", **bad})
    assert (r.code, r.body) == (500, b"Internal Server Error")
    assert r.content_type == "text/plain; charset=utf-8"


def test_unknown_response_format_is_400_after_the_work(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", "response_format": "gif"})
    assert r.code == 400
    assert "response_format" in r.json()["detail"]
    assert r.finished == pytest.approx(0.008)  # the GPU time was spent first


def test_bad_rollout_sde_type_is_a_plain_500(sim: InMemoryWorker) -> None:
    r = sim.post("/v1/images/generations", {"prompt": "x", "rollout": True, "rollout_sde_type": "ode"})
    assert (r.code, r.body) == (500, b"Internal Server Error")


def test_image_models_that_need_an_input_image_fail_without_one() -> None:
    sim = InMemoryWorker(task_type=TaskType.I2I)
    r = sim.post("/v1/images/generations", {"prompt": "x"})
    assert (r.code, r.body) == (500, b"Internal Server Error")


def test_sleeping_worker_rejects_with_the_sleeping_400(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    r = sim.post("/v1/images/generations", {"prompt": "x"})
    assert (r.code, r.json()) == (400, SLEEPING_BODY)
    assert r.finished == r.started  # rejected at its turn, no GPU time


def test_injected_failure_is_a_text_plain_500() -> None:
    sim = InMemoryWorker(fail_rate=1.0)
    r = sim.post("/v1/images/generations", {"prompt": "x"})
    assert (r.code, r.body) == (500, b"Internal Server Error")
    assert r.content_type == "text/plain; charset=utf-8"
    assert r.finished == pytest.approx(0.008)  # a failure still costs its GPU time
    assert sim.worker.state.failed == 1


def test_failure_rate_is_seeded_and_reproducible() -> None:
    def codes(seed: int) -> list[int]:
        sim = InMemoryWorker(fail_rate=0.5, seed=seed)
        return [sim.post("/v1/images/generations", {"prompt": "x"}).code for _ in range(20)]

    first = codes(7)
    assert first == codes(7)
    assert 0 < first.count(500) < 20
    assert set(first) == {200, 500}


def test_timing_follows_the_service_model() -> None:
    sim = InMemoryWorker(step_ms=10.0, speed=2.0)
    r = sim.post("/v1/images/generations", {
        "prompt": "x", "width": 512, "height": 1024, "num_inference_steps": 20, "n": 2,
    })
    # 10 ms × 20 steps × 0.5 megapixel-units × 2 images / speed 2 = 0.1 s
    assert r.finished - r.started == pytest.approx(0.1)
    assert r.json()["inference_time_s"] == pytest.approx(0.1)


def test_default_steps_come_from_the_model_or_the_flag() -> None:
    assert InMemoryWorker().post("/v1/images/generations", {"prompt": "x"}).finished == pytest.approx(0.008)
    sim = InMemoryWorker(default_steps=50, step_ms=286.0)
    assert sim.post("/v1/images/generations", {"prompt": "x"}).finished == pytest.approx(14.3)


def test_concurrent_generations_finish_one_after_another(sim: InMemoryWorker) -> None:
    ds = [sim.send("POST", "/v1/images/generations", json={"prompt": str(i)}) for i in range(3)]
    sim.clock.advance(0.008)
    sim.flush()
    first = sim.finish(ds[0])
    assert first.finished == pytest.approx(0.008)
    assert_no_result(ds[1])
    finished = [sim.finish(d).finished for d in ds[1:]]
    assert finished == pytest.approx([0.016, 0.024])


# --- /v1/images/edits -------------------------------------------------------------


@pytest.fixture
def editor() -> InMemoryWorker:
    return InMemoryWorker(task_type=TaskType.I2I)


def test_edit_with_an_uploaded_image_defaults_to_b64_json(editor: InMemoryWorker) -> None:
    r = editor.post_form(
        "/v1/images/edits", [("prompt", "make it blue"), ("n", "2")],
        [("image", "in.png", b"\x89PNG fake", "image/png")],
    )
    assert r.code == 200
    data = r.json()["data"]
    assert len(data) == 2
    assert all(base64.b64decode(d["b64_json"])[:2] == b"\xff\xd8" for d in data)
    assert data[0]["revised_prompt"] == "make it blue"


def test_edit_with_urls_and_bracketed_names(editor: InMemoryWorker) -> None:
    tiny = base64.b64encode(b"png-bytes").decode()
    r = editor.post_form("/v1/images/edits", [
        ("prompt", "x"), ("url[]", "https://example.com/a.png"),
        ("url", f"data:image/png;base64,{tiny}"), ("response_format", "url"),
    ])
    assert r.code == 200
    assert r.json()["data"][0]["url"].endswith("/content")


def test_edit_without_image_or_url_is_422(editor: InMemoryWorker) -> None:
    r = editor.post_form("/v1/images/edits", [("prompt", "x")])
    assert (r.code, r.json()) == (422, {"detail": "Field 'image' or 'url' is required"})


def test_edit_without_prompt_is_a_form_422(editor: InMemoryWorker) -> None:
    r = editor.post_form("/v1/images/edits", [], [("image", "in.png", b"x", "image/png")])
    assert r.code == 422
    assert r.json()["detail"] == [
        {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": None}
    ]


@pytest.mark.parametrize("url", ["ftp://host/x.png", "file:///etc/passwd", "data:image/png;base64,@@@"])
def test_edit_with_an_unusable_url_is_400(editor: InMemoryWorker, url: str) -> None:
    r = editor.post_form("/v1/images/edits", [("prompt", "x"), ("url", url)])
    assert r.code == 400
    assert r.json()["detail"].startswith("Failed to process image source: ")


def test_edit_on_a_text_to_image_model_is_a_plain_500(sim: InMemoryWorker) -> None:
    r = sim.post_form("/v1/images/edits", [("prompt", "x")], [("image", "a.png", b"x", "image/png")])
    assert (r.code, r.body) == (500, b"Internal Server Error")


def test_edit_while_sleeping_is_the_sleeping_400(editor: InMemoryWorker) -> None:
    editor.post("/release_memory_occupation", {})
    r = editor.post_form("/v1/images/edits", [("prompt", "x")], [("image", "a.png", b"x", "image/png")])
    assert (r.code, r.json()) == (400, SLEEPING_BODY)


# --- /v1/images/{id}/content ---------------------------------------------------------


def test_content_serves_the_stored_image(sim: InMemoryWorker) -> None:
    body = sim.post("/v1/images/generations", {"prompt": "x"}).json()
    r = sim.get(body["data"][0]["url"])
    assert r.code == 200
    assert r.content_type == "image/jpeg"
    assert r.header("content-disposition") == f'attachment; filename="{body["id"]}.jpg"'
    assert r.body[:3] == b"\xff\xd8\xff" and len(r.body) == 2048


def test_content_of_a_png(sim: InMemoryWorker) -> None:
    body = sim.post("/v1/images/generations", {"prompt": "x", "output_format": "png"}).json()
    r = sim.get(body["data"][0]["url"])
    assert r.content_type == "image/png" and r.body.startswith(b"\x89PNG")


def test_unknown_image_is_404(sim: InMemoryWorker) -> None:
    r = sim.get("/v1/images/3f2b0000-0000-0000-0000-000000000000/content")
    assert (r.code, r.json()) == (404, {"detail": "Image not found"})


def test_images_live_only_on_the_worker_that_made_them(sim: InMemoryWorker) -> None:
    url = sim.post("/v1/images/generations", {"prompt": "x"}).json()["data"][0]["url"]
    assert InMemoryWorker().get(url).code == 404


# --- simulator-only endpoints ----------------------------------------------------------


def test_sim_state_reports_queue_weights_and_counters(sim: InMemoryWorker) -> None:
    sim.send("POST", "/v1/images/generations", json={"prompt": "x"})
    sim.send("POST", "/v1/images/generations", json={"prompt": "y"})
    state = sim.get("/sim/state").json()
    assert state["worker_id"] == "sim-test"
    assert state["queue_depth"] == 2 and state["running"] == "images/generations"
    assert state["weights_version"] == 0 and state["sleeping"] is False
    sim.clock.pump([0.008, 0.008])
    sim.flush()
    assert sim.get("/sim/state").json()["served"] == 2


def test_sim_faults_flip_failures_at_run_time(sim: InMemoryWorker) -> None:
    r = sim.post("/sim/faults", {"fail_rate": 1.0, "fail_update": True})
    assert r.code == 200 and r.json()["fail_rate"] == 1.0 and r.json()["fail_update"] is True
    assert sim.post("/v1/images/generations", {"prompt": "x"}).code == 500
    sim.post("/sim/faults", {"fail_rate": 0})
    assert sim.post("/v1/images/generations", {"prompt": "x"}).code == 200
    assert sim.post("/sim/faults", {"fail_rate": 2}).code == 400


def test_client_gone_while_queued_still_costs_gpu_time_and_logs_no_error(sim: InMemoryWorker) -> None:
    channel = Site(sim.resource, reactor=sim.clock).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    body = b'{"prompt": "x"}'
    with capturedLogs() as events:
        channel.dataReceived(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert sim.worker.queue.depth == 1
        channel.connectionLost(Failure(ConnectionDone()))
        sim.clock.advance(0.008)
    assert sim.worker.queue.depth == 0 and sim.worker.state.served == 1
    assert transport.value() == b""
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
