"""RL control endpoints (§5, §10.7): weights, checksums, sleep and wake, all in the FIFO queue."""

from __future__ import annotations

import pytest

from tests.support.deferreds import assert_no_result
from twisted_router.simulator.model import SLEEPING_MESSAGE
from twisted_router.simulator.testing import InMemoryWorker

RELEASED = {"success": True, "sleeping": True,
            "message": "released GPU memory (moved active modules to CPU)"}
RESUMED = {"success": True, "sleeping": False,
           "message": "resumed GPU memory (restored modules to original devices)"}


@pytest.fixture
def sim() -> InMemoryWorker:
    return InMemoryWorker(model_path="base/model", weights_prefixes=("/ckpt/",))


def test_release_and_resume_exact_bodies_and_idempotence(sim: InMemoryWorker) -> None:
    assert sim.post("/release_memory_occupation", {}).json() == RELEASED
    again = sim.post("/release_memory_occupation", {})
    assert (again.code, again.json()) == (200, {"success": True, "sleeping": True, "message": "already sleeping"})
    assert sim.post("/resume_memory_occupation", {}).json() == RESUMED
    again = sim.post("/resume_memory_occupation", {})
    assert (again.code, again.json()) == (200, {"success": True, "sleeping": False, "message": "already awake"})


def test_sleep_body_is_ignored(sim: InMemoryWorker) -> None:
    r = sim.call("POST", "/release_memory_occupation", data=b"not json at all")
    assert r.json() == RELEASED


def test_health_and_models_answer_while_sleeping(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    assert sim.get("/health").json() == {"status": "ok"}
    assert sim.get("/v1/models").code == 200
    assert sim.get("/v1/model_info").code == 200


def test_generation_after_wake_succeeds(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    assert sim.post("/v1/images/generations", {"prompt": "x"}).json() == {"detail": {"message": SLEEPING_MESSAGE}}
    sim.post("/resume_memory_occupation", {})
    assert sim.post("/v1/images/generations", {"prompt": "x"}).code == 200


def test_release_waits_for_every_generation_queued_before_it(sim: InMemoryWorker) -> None:
    gen = sim.send("POST", "/v1/images/generations", json={"prompt": "x"})
    release = sim.send("POST", "/release_memory_occupation", json={})
    late = sim.send("POST", "/v1/images/generations", json={"prompt": "y"})
    sim.clock.advance(0.007)
    sim.flush()
    assert_no_result(release)
    first = sim.finish(gen)
    assert first.code == 200 and first.finished == pytest.approx(0.008)
    assert sim.finish(release).json() == RELEASED
    rejected = sim.finish(late)
    assert rejected.code == 400 and rejected.finished == pytest.approx(0.008)


def test_sleep_and_wake_take_their_configured_time() -> None:
    sim = InMemoryWorker(sleep_ms=1500)
    r = sim.post("/release_memory_occupation", {})
    assert r.finished == pytest.approx(1.5)
    assert sim.post("/release_memory_occupation", {}).finished == pytest.approx(1.5)  # no-op is instant
    assert sim.post("/resume_memory_occupation", {}).finished == pytest.approx(3.0)


def test_update_requires_model_path(sim: InMemoryWorker) -> None:
    for body in ({}, {"model_path": ""}, {"model_path": None}):
        r = sim.post("/update_weights_from_disk", body)
        assert (r.code, r.json()) == (400, {"success": False, "message": "model_path is required"})


def test_update_succeeds_and_changes_every_checksum(sim: InMemoryWorker) -> None:
    before = sim.post("/get_weights_checksum", {}).json()
    assert set(before) == {"transformer", "vae", "text_encoder"}
    assert all(len(v) == 64 for v in before.values())
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/step-1"})
    assert (r.code, r.json()) == (200, {
        "success": True, "message": "Updated 3 modules (transformer, vae, text_encoder).",
    })
    after = sim.post("/get_weights_checksum", {}).json()
    assert all(after[m] != before[m] for m in before)
    state = sim.get("/sim/state").json()
    assert (state["weights_path"], state["weights_version"]) == ("/ckpt/step-1", 1)
    # The HTTP process keeps reporting the launch path (§3.1).
    assert sim.get("/v1/model_info").json() == {"model_path": "base/model"}


def test_same_update_on_two_workers_gives_equal_checksums() -> None:
    a, b = InMemoryWorker(model_path="m", weights_prefixes=("/ckpt/",)), InMemoryWorker(model_path="m", weights_prefixes=("/ckpt/",))
    for sim in (a, b):
        sim.post("/update_weights_from_disk", {"model_path": "/ckpt/1"})
    assert a.post("/get_weights_checksum", {}).json() == b.post("/get_weights_checksum", {}).json()
    b.post("/update_weights_from_disk", {"model_path": "/ckpt/1"})
    assert a.post("/get_weights_checksum", {}).json() != b.post("/get_weights_checksum", {}).json()


def test_update_of_target_modules_changes_only_those(sim: InMemoryWorker) -> None:
    before = sim.post("/get_weights_checksum", {}).json()
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/2", "target_modules": ["transformer"]})
    assert r.json() == {"success": True, "message": "Updated 1 modules (transformer)."}
    after = sim.post("/get_weights_checksum", {}).json()
    assert after["transformer"] != before["transformer"]
    assert (after["vae"], after["text_encoder"]) == (before["vae"], before["text_encoder"])


def test_unknown_target_module_is_400(sim: InMemoryWorker) -> None:
    r = sim.post("/update_weights_from_disk", {"model_path": "/c", "target_modules": ["unet"]})
    assert r.code == 400 and r.json()["success"] is False
    assert r.json()["message"].startswith("Module(s) requested for update not found in pipeline: ['unet']")


def test_checksum_of_named_and_unknown_modules(sim: InMemoryWorker) -> None:
    r = sim.post("/get_weights_checksum", {"module_names": ["vae", "unet"]})
    body = r.json()
    assert set(body) == {"vae", "unet"} and body["unet"] == "not_found" and len(body["vae"]) == 64


def test_checksum_needs_a_json_body(sim: InMemoryWorker) -> None:
    r = sim.call("POST", "/get_weights_checksum", data=b"")
    assert (r.code, r.body) == (500, b"Internal Server Error")


def test_update_while_sleeping_is_a_plain_500(sim: InMemoryWorker) -> None:
    sim.post("/release_memory_occupation", {})
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/3"})
    assert (r.code, r.body, r.content_type) == (500, b"Internal Server Error", "text/plain; charset=utf-8")
    assert sim.get("/sim/state").json()["weights_version"] == 0


def test_update_with_a_body_that_is_not_json_is_a_plain_500(sim: InMemoryWorker) -> None:
    r = sim.call("POST", "/update_weights_from_disk", data=b"model_path=x")
    assert (r.code, r.body) == (500, b"Internal Server Error")


def test_fail_update_gives_the_rolled_back_400() -> None:
    sim = InMemoryWorker(fail_update=True, weights_prefixes=("/ckpt/",))
    before = sim.post("/get_weights_checksum", {}).json()
    r = sim.post("/update_weights_from_disk", {"model_path": "/ckpt/4"})
    assert r.code == 400
    assert r.json() == {"success": False, "message": (
        "Failed to update module 'vae': simulated load failure. "
        "All modules rolled back to original weights."
    )}
    assert sim.post("/get_weights_checksum", {}).json() == before


def test_update_waits_its_turn_and_takes_its_time() -> None:
    sim = InMemoryWorker(update_ms=2000, weights_prefixes=("/ckpt/",))
    gen = sim.send("POST", "/v1/images/generations", json={"prompt": "x"})
    update = sim.send("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/5"})
    after = sim.send("POST", "/v1/images/generations", json={"prompt": "y"})
    assert sim.finish(gen).finished == pytest.approx(0.008)
    assert sim.finish(update).finished == pytest.approx(2.008)
    assert sim.finish(after).finished == pytest.approx(2.016)
