"""
The earlier router's answers where scripts depend on them (issue 8 points 2 and 3),
through the router's HTTP surface, in memory.
"""

from __future__ import annotations

import pytest

from tests.support.fleet import make_router

NO_VIDEO = {"error": "No video-capable workers available in current worker pool."}
CONTROL_PATHS = ("/update_weights_from_disk", "/release_memory_occupation", "/resume_memory_occupation")


@pytest.mark.parametrize("path", ["/v1/videos", "/generate_video"])
def test_video_on_an_empty_pool_is_400_no_video_capable_workers(path: str) -> None:
    h, _ = make_router(0)
    assert h.json("POST", path, json={"prompt": "waves"}) == (400, NO_VIDEO)


@pytest.mark.parametrize("path", ["/v1/videos", "/generate_video"])
def test_video_with_only_image_workers_is_400(path: str) -> None:
    h, _ = make_router(2, task_types=("T2I", "I2I"))
    assert h.json("POST", path, json={"prompt": "waves"}) == (400, NO_VIDEO)


def test_video_with_only_a_quarantined_video_worker_is_400() -> None:
    h, _ = make_router(2, task_types=("T2I", "T2V"))
    h.pool.workers()[1].is_dead = True
    assert h.json("POST", "/v1/videos", json={"prompt": "waves"}) == (400, NO_VIDEO)


def test_image_on_an_empty_pool_keeps_its_503() -> None:
    h, _ = make_router(0)
    assert h.json("POST", "/v1/images/generations", json={"prompt": "x"}) == (
        503,
        {"error": "No workers registered in the pool"},
    )


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_broadcast_on_an_empty_pool_is_503_no_healthy_workers(path: str) -> None:
    h, _ = make_router(0)
    code, body = h.json("POST", path, json={"model_path": "/ckpt/1"})
    assert code == 503
    assert body["error"].startswith("No healthy workers available in the pool")


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_broadcast_with_every_worker_quarantined_says_the_same(path: str) -> None:
    h, _ = make_router(2)
    for worker in h.pool.workers():
        worker.is_dead = True
    code, body = h.json("POST", path, json={"model_path": "/ckpt/1"})
    assert code == 503
    assert body["error"].startswith("No healthy workers available in the pool")
    assert "2 registered, 2 dead" in body["error"]
