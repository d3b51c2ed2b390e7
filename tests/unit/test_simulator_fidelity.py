"""Simulator behaviours where the real FastAPI/uvicorn worker differs from a naive stand-in (review findings)."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from tests.support.deferreds import success_result_of
from twisted_router.simulator import cli as sim_cli
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.testing import InMemoryWorker

# --------------------------------------------------------------------------- simulator vs. the real worker


def test_simulator_json_endpoints_refuse_a_non_json_content_type_like_fastapi() -> None:
    """
    FastAPI parses a body model as JSON only when Content-Type is missing or
    application/json (or +json); otherwise the body stays bytes and the model
    fails validation with a 422. C{curl -d '{...}'} sends
    application/x-www-form-urlencoded: the real worker answers 422, the
    simulator generates an image. Router tests that forget the header pass
    against the simulator and fail against a GPU worker.
    """
    sim = InMemoryWorker()
    answer = sim.call(
        "POST", "/v1/images/generations", data=b'{"prompt": "x"}',
        headers={b"content-type": [b"application/x-www-form-urlencoded"]},
    )
    assert answer.code == 422, f"simulator answered {answer.code} to a form-encoded JSON body"


def test_simulator_answers_head_on_get_routes_with_405_like_fastapi() -> None:
    """
    FastAPI's APIRoute registers only the declared methods (no implicit HEAD
    for GET, unlike Starlette's Route), so the real worker answers
    C{HEAD /v1/images/{id}/content} with 405. Werkzeug (Klein) adds HEAD to
    every GET rule, so the simulator answers 200 and the router's HEAD
    routes look tested when they are not.
    """
    sim = InMemoryWorker()
    image_id = sim.post("/v1/images/generations", {"prompt": "x"}).json()["id"]
    answer = sim.call("HEAD", f"/v1/images/{image_id}/content")
    assert answer.code == 405, f"simulator answered HEAD with {answer.code}"


def test_simulator_closes_idle_keep_alive_connections_like_uvicorn() -> None:
    """
    uvicorn (the real worker's server) closes an idle keep-alive connection
    after 5 s; the router's pool must drop its idle connections before that,
    or a POST written onto a just-closed connection looks like an unreachable
    worker and gets it quarantined. The simulator's Site keeps idle
    connections for Twisted's default (60 s here), so that race can never
    show up in a test against it.
    """
    reactor = MemoryReactorClock()
    d = Deferred.fromCoroutine(sim_cli.serve(reactor, SimulatorConfig(port=0)))  # type: ignore[arg-type]
    success_result_of(d)
    site: Any = reactor.tcpServers[0][1]
    idle = site.timeOut  # twisted.web.http.HTTPFactory's idle-connection timeout
    assert idle is not None and idle <= 5, f"simulator keeps idle connections for {idle} s (uvicorn: 5 s)"



def test_simulator_memory_does_not_grow_with_image_bytes() -> None:
    """
    docs/simulator.md: "Memory stays flat whatever the size: payloads are
    cached and shared". Trajectories and MP4s are periodic pieces, but every
    image (raw and base64, per format) is materialised whole and kept in an
    LRU cache: with --image-bytes 16 MB one b64 answer leaves ~37 MB behind.
    """
    sim = InMemoryWorker(image_bytes=16_000_000)
    gc.collect()
    tracemalloc.start()
    try:
        answer = sim.post("/v1/images/generations", {"prompt": "x", "response_format": "b64_json"})
        assert answer.code == 200
        del answer
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 4_000_000, f"{retained / 1e6:.0f} MB kept after one 16 MB image answer"


@pytest.mark.parametrize("field", ["step_ms", "base_ms", "speed", "startup_delay", "update_ms", "sleep_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_simulator_config_refuses_non_finite_numbers(field: str, value: float) -> None:
    """
    C{--step-ms nan} or C{--speed inf} are accepted by the simulator (the
    launcher's YAML refuses them, the command line does not): the service
    time becomes NaN/0 and every generation finishes at once, silently.
    """
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError):
        SimulatorConfig(**kwargs)
