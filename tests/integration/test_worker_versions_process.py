"""
The router process in front of simulated workers of each worker version
(docs/worker-api.md): the pinned fork, and a fast subset against upstream
(msgpack rollouts, warm-up). Real processes on 127.0.0.1, ephemeral ports,
every wait bounded, every process stopped by the C{processes} fixture.
"""

from __future__ import annotations

import http.client
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgpack

from tests.support.live import (
    SMALL_IMAGE,
    Reply,
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def get_range(base_url: str, path: str, byte_range: str, timeout: float = 30.0) -> Reply:
    """GET C{path} with a C{Range} header."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Range": byte_range})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def _check_range_through_router(router_url: str) -> None:
    created = post_image(router_url, {**SMALL_IMAGE, "response_format": "url"})
    assert created.status == 200, created
    url = created.json()["data"][0]["url"]
    whole = call(router_url, "GET", url)
    assert whole.status == 200 and whole.headers.get("accept-ranges") == "bytes", whole.headers
    part = get_range(router_url, url, "bytes=100-1123")
    assert part.status == 206, part
    assert part.body == whole.body[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(whole.body)}"
    assert part.headers["etag"] == whole.headers["etag"]
    past = get_range(router_url, url, f"bytes={len(whole.body) + 10}-")
    assert past.status == 416, past


def test_router_against_pinned_workers(processes: Processes) -> None:
    workers = processes.workers(
        sim("p0", "--api-version", "pinned", "--image-bytes", "50000"),
        sim("p1", "--api-version", "pinned", "--image-bytes", "50000"),
    )
    router = processes.router(workers)
    wait_for_workers(router, 2)

    _check_range_through_router(router.url)

    native = call(router.url, "POST", "/v1/diffusion/generate", {"prompt": "x", "width": 64, "height": 64})
    assert native.status == 200, native
    # The pinned fork has no /rollout/generate: the worker's 404 is relayed as is.
    missing = call(router.url, "POST", "/rollout/generate", {"prompt": "x", "seed": 1})
    assert (missing.status, missing.json()) == (404, {"detail": "Not Found"})

    # A checkpoint no worker can load: every worker refuses, nobody is quarantined.
    refused = call(router.url, "POST", "/update_weights_from_disk", {"model_path": "/nowhere/step-1"})
    assert refused.status == 502, refused
    assert all(r["status_code"] == 400 for r in refused.json()["results"]), refused.json()
    states = {w["state"] for w in call(router.url, "GET", "/workers").json()["workers"]}
    assert states == {"ready"}, states
    accepted = call(router.url, "POST", "/update_weights_from_disk", {"model_path": "/ckpt/1"})
    assert accepted.status == 200, accepted

    asleep = call(router.url, "POST", "/release_memory_occupation", {})
    assert asleep.status == 200 and asleep.json()["success"] is True, asleep
    awake = call(router.url, "POST", "/resume_memory_occupation", {})
    assert awake.status == 200, awake


def test_router_against_a_fleet_without_sleep(processes: Processes) -> None:
    no_sleep = ("--disable-endpoint", "/release_memory_occupation", "--disable-endpoint", "/resume_memory_occupation")
    workers = processes.workers(sim("n0", *no_sleep), sim("n1", *no_sleep))
    router = processes.router(workers)
    wait_for_workers(router, 2)
    answer = call(router.url, "POST", "/release_memory_occupation", {})
    assert answer.status == 501, answer
    assert "every worker answered 404" in answer.json()["message"]
    states = {w["state"] for w in call(router.url, "GET", "/workers").json()["workers"]}
    assert states == {"ready"}, states
    assert post_image(router.url).status == 200


def test_router_relays_msgpack_rollouts_from_upstream_workers(processes: Processes) -> None:
    workers = processes.workers(sim("u0", "--api-version", "upstream"), sim("u1", "--api-version", "upstream"))
    router = processes.router(workers)
    wait_for_workers(router, 2)
    body = {
        "prompt": "x", "seed": 11, "width": 512, "height": 512, "num_inference_steps": 4,
        "num_outputs_per_prompt": 2, "rollout_return_dit_trajectory": True,
    }
    direct = call(workers[0].url, "POST", "/rollout/generate", body)
    relayed = call(router.url, "POST", "/rollout/generate", body)
    assert relayed.status == 200, relayed
    assert relayed.headers["content-type"] == "application/msgpack"
    assert "x-sgld-timing" in relayed.headers and "x-sgld-stages" in relayed.headers
    items: list[dict[str, Any]] = msgpack.unpackb(relayed.body)
    assert [i["seed"] for i in items] == [11, 11]
    # Byte for byte what a worker sends, but for the request id and timing.
    assert len(relayed.body) == len(direct.body)
    latents = items[0]["dit_trajectory"]["latents"]
    count = 1
    for dim in latents["shape"]:
        count *= dim
    assert len(latents["data"]) == 4 * count
    _check_range_through_router(router.url)
    # Upstream has no /v1/diffusion/generate: the 404 is relayed as is.
    assert call(router.url, "POST", "/v1/diffusion/generate", {"prompt": "x"}).status == 404


def test_a_warming_worker_gets_no_traffic_until_health_is_200(processes: Processes) -> None:
    (ready,) = processes.workers(sim("ready", "--api-version", "upstream"))
    (warming,) = processes.workers(sim("warming", "--api-version", "upstream", "--warmup-seconds", "10"))
    router = processes.router([ready, warming])

    def states() -> dict[str, str]:
        workers = call(router.url, "GET", "/workers", timeout=5.0).json()["workers"]
        return {w["url"]: w["state"] for w in workers}

    wait_until("the ready worker", lambda: True if states().get(ready.url) == "ready" else None)
    seen = states()[warming.url]
    # Read after the router's answer: if the worker still warms up now, it did then.
    assert call(warming.url, "GET", "/health").status == 503, "warm-up ended before it could be observed"
    assert seen == "starting", seen
    served = {post_image(router.url).worker for _ in range(6)}
    if call(warming.url, "GET", "/health").status == 503:
        assert served == {"ready"}, served
    wait_until("the warmed-up worker", lambda: True if states()[warming.url] == "ready" else None, timeout=30)
    workers = call(router.url, "GET", "/workers").json()["workers"]
    assert not any(w["is_dead"] for w in workers), workers
    served = {post_image(router.url).worker for _ in range(10)}
    assert served == {"ready", "warming"}, served
