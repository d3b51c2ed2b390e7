"""
HTTP details where the simulator must answer as the real FastAPI/uvicorn worker does.

The expected bodies were taken from FastAPI 0.165 (Starlette 1.10, pydantic
2.14) serving the same route shapes as the real worker: a pydantic body
model (C{/v1/images/generations}), a handler reading C{await request.json()}
(C{/update_weights_from_disk}), a handler without parameters (sleep/wake),
C{GET} routes and C{FileResponse} downloads.
"""

from __future__ import annotations

import base64
import gc
import json
import random
import tracemalloc
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.support.deferreds import success_result_of
from twisted_router.simulator import payloads
from twisted_router.simulator.cli import parse_config, serve
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import TaskType, is_json_content_type
from twisted_router.simulator.testing import InMemoryWorker, multipart

NOT_A_DICT = "Input should be a valid dictionary or object to extract fields from"

#: The body-model endpoints and a minimal valid body for each.
BODY_MODEL_ENDPOINTS = [
    ("/v1/images/generations", {"prompt": "x"}),
    ("/v1/diffusion/generate", {"prompt": "x"}),
    ("/rollout/generate", {"prompt": "x", "seed": 1}),
]


def _worker_for(path: str) -> InMemoryWorker:
    """A worker of the version that serves C{path} (only upstream has /rollout/generate)."""
    return InMemoryWorker(api_version="upstream" if path == "/rollout/generate" else "pinned")


def _post_raw(sim: InMemoryWorker, path: str, body: bytes, ctype: bytes | None) -> Any:
    headers = {b"content-type": [ctype]} if ctype is not None else {}
    return sim.call("POST", path, data=body, headers=headers)


# --------------------------------------------------------------------------- JSON content type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False), ("", False), ("application/json", True), ("APPLICATION/JSON", True),
        ("application/json; charset=utf-8", True), ("application/vnd.api+json", True),
        ("application/problem+json; charset=latin1", True), ("application/x-www-form-urlencoded", False),
        ("text/plain", False), ("text/json", False), ("json", False), ("application/json+x", False),
        ("application/json, text/plain", False), ("multipart/form-data; boundary=x", False),
    ],
)
def test_json_content_types_are_the_ones_fastapi_parses(value: str | None, expected: bool) -> None:
    assert is_json_content_type(value) is expected


@pytest.mark.parametrize(("path", "body"), BODY_MODEL_ENDPOINTS)
@pytest.mark.parametrize(
    "ctype", [None, b"application/x-www-form-urlencoded", b"text/plain", b"application/octet-stream"]
)
def test_a_body_model_refuses_a_body_that_is_not_declared_json(
    path: str, body: dict[str, Any], ctype: bytes | None
) -> None:
    sim = _worker_for(path)
    raw = json.dumps(body).encode()
    answer = _post_raw(sim, path, raw, ctype)
    assert answer.code == 422
    assert answer.content_type == "application/json"
    assert answer.json() == {"detail": [{
        "type": "model_attributes_type", "loc": ["body"], "msg": NOT_A_DICT, "input": raw.decode(),
    }]}
    assert sim.worker.queue.completed == 0 and sim.worker.state.served == 0


@pytest.mark.parametrize(("path", "body"), BODY_MODEL_ENDPOINTS)
def test_a_body_model_refuses_a_form(path: str, body: dict[str, Any]) -> None:
    """A multipart form is not JSON either: the raw form text is the 422's input."""
    sim = _worker_for(path)
    raw, ctype = multipart(fields=[("prompt", "x")])
    answer = _post_raw(sim, path, raw, ctype)
    assert (answer.code, answer.json()) == (422, {"detail": [{
        "type": "model_attributes_type", "loc": ["body"], "msg": NOT_A_DICT, "input": raw.decode(),
    }]})


@pytest.mark.parametrize(("path", "body"), BODY_MODEL_ENDPOINTS)
@pytest.mark.parametrize(
    "ctype", [b"application/json", b"Application/JSON; charset=utf-8", b"application/vnd.api+json"]
)
def test_a_body_model_accepts_every_json_content_type(path: str, body: dict[str, Any], ctype: bytes) -> None:
    sim = _worker_for(path)
    assert _post_raw(sim, path, json.dumps(body).encode(), ctype).code == 200


@pytest.mark.parametrize("ctype", [None, b"application/json", b"text/plain"])
def test_an_empty_body_is_missing_whatever_the_content_type(ctype: bytes | None) -> None:
    answer = _post_raw(InMemoryWorker(), "/v1/images/generations", b"", ctype)
    assert (answer.code, answer.json()) == (422, {"detail": [{
        "type": "missing", "loc": ["body"], "msg": "Field required", "input": None,
    }]})


def test_blank_json_is_a_decode_error_at_its_position() -> None:
    answer = _post_raw(InMemoryWorker(), "/v1/images/generations", b"  ", b"application/json")
    assert (answer.code, answer.json()) == (422, {"detail": [{
        "type": "json_invalid", "loc": ["body", 2], "msg": "JSON decode error", "input": {},
        "ctx": {"error": "Expecting value"},
    }]})


def test_json_that_is_not_text_is_fastapis_400() -> None:
    answer = _post_raw(InMemoryWorker(), "/v1/images/generations", b"\xff\xfe{", b"application/json")
    assert (answer.code, answer.json()) == (400, {"detail": "There was an error parsing the body"})


def test_a_non_json_body_that_is_not_utf8_is_a_plain_500() -> None:
    # FastAPI's jsonable_encoder fails to decode the bytes it puts in the 422.
    answer = _post_raw(InMemoryWorker(), "/v1/images/generations", b"\xff\xfe{", b"text/plain")
    assert (answer.code, answer.content_type, answer.body) == (
        500, "text/plain; charset=utf-8", b"Internal Server Error"
    )


@pytest.mark.parametrize("ctype", [None, b"application/x-www-form-urlencoded"])
def test_videos_parse_their_body_by_hand_whatever_the_content_type(ctype: bytes | None) -> None:
    """§4.4: C{/v1/videos} reads the JSON itself (multipart aside), so no 422 here."""
    sim = InMemoryWorker(task_type=TaskType.T2V)
    answer = _post_raw(sim, "/v1/videos", b'{"prompt": "x"}', ctype)
    assert answer.code == 200 and answer.json()["status"] == "queued"
    bad = _post_raw(sim, "/v1/videos", b"prompt=x", ctype)
    assert bad.code == 400 and bad.json()["detail"].startswith("Invalid request body: ")


@pytest.mark.parametrize("ctype", [None, b"application/x-www-form-urlencoded", b"text/plain"])
def test_update_weights_reads_json_whatever_the_content_type(ctype: bytes | None) -> None:
    """§5.1: C{await request.json()} ignores the header; a body that is not JSON is a plain 500."""
    sim = InMemoryWorker(weights_prefixes=("/ckpt/",))
    ok = _post_raw(sim, "/update_weights_from_disk", b'{"model_path": "/ckpt/1"}', ctype)
    assert ok.code == 200 and ok.json()["success"] is True
    bad = _post_raw(sim, "/update_weights_from_disk", b"model_path=/ckpt/1", ctype)
    assert (bad.code, bad.body) == (500, b"Internal Server Error")
    checksum = _post_raw(sim, "/get_weights_checksum", b"{}", ctype)
    assert checksum.code == 200 and set(checksum.json()) == {"transformer", "vae", "text_encoder"}


@pytest.mark.parametrize("body", [b"", b"{}", b"model_path=x", b"\xff"])
@pytest.mark.parametrize("ctype", [None, b"application/x-www-form-urlencoded", b"application/json"])
def test_sleep_and_wake_ignore_the_body_entirely(body: bytes, ctype: bytes | None) -> None:
    """§5.3: the handlers take no parameters, so FastAPI never reads the body."""
    sim = InMemoryWorker()
    slept = _post_raw(sim, "/release_memory_occupation", body, ctype)
    assert slept.code == 200 and slept.json()["sleeping"] is True
    woke = _post_raw(sim, "/resume_memory_occupation", body, ctype)
    assert woke.code == 200 and woke.json()["sleeping"] is False


# --------------------------------------------------------------------------- methods


def _completed_video(sim: InMemoryWorker) -> str:
    video_id: str = sim.post("/v1/videos", {"prompt": "x", "num_frames": 1}).json()["id"]
    sim.clock.advance(10)
    assert sim.get(f"/v1/videos/{video_id}").json()["status"] == "completed"
    return video_id


def test_head_on_every_get_route_is_a_bodiless_405() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V)
    image_id = sim.post("/v1/images/generations", {"prompt": "x"}).json()["id"]
    video_id = _completed_video(sim)
    paths = [
        "/health", "/health_generate", "/v1/models", f"/v1/models/{sim.config.served_model}", "/models",
        "/v1/model_info", f"/v1/images/{image_id}/content", "/v1/videos", f"/v1/videos/{video_id}",
        f"/v1/videos/{video_id}/content", "/sim/state",
    ]
    for path in paths:
        assert sim.get(path).code == 200, path
        answer = sim.call("HEAD", path)
        assert (answer.code, answer.body) == (405, b""), path
        # Starlette names the methods of the first route registered for the
        # path: video creation (POST) comes before the listing (§4.4, §4.5).
        assert answer.header("allow") == ("POST" if path == "/v1/videos" else "GET"), path
        assert answer.content_type == "application/json", path


def test_head_on_an_unknown_path_is_404() -> None:
    sim = InMemoryWorker()
    answer = sim.call("HEAD", "/v1/nothing")
    assert (answer.code, answer.body) == (404, b"")
    assert answer.header("allow") is None


def test_head_on_a_missing_image_is_still_405() -> None:
    # Starlette checks the method before the handler runs: no 404 "Image not found".
    answer = InMemoryWorker().call("HEAD", "/v1/images/nope/content")
    assert answer.code == 405


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/health", "GET"),
        ("POST", "/health", "GET"),
        ("GET", "/update_weights_from_disk", "POST"),
        ("PUT", "/v1/videos", "POST"),  # the first route registered for the path
        ("PATCH", "/v1/videos/abc", "GET"),
        ("GET", "/v1/images/generations", "POST"),
    ],
)
def test_a_wrong_method_is_405_naming_the_first_routes_methods(method: str, path: str, allow: str) -> None:
    answer = InMemoryWorker().call(method, path)
    assert (answer.code, answer.json()) == (405, {"detail": "Method Not Allowed"})
    assert answer.header("allow") == allow


def test_right_methods_on_shared_paths_still_route() -> None:
    sim = InMemoryWorker(task_type=TaskType.T2V)
    video_id = sim.post("/v1/videos", {"prompt": "x"}).json()["id"]
    assert sim.get("/v1/videos").code == 200
    assert sim.delete(f"/v1/videos/{video_id}").json()["status"] == "deleted"
    assert sim.delete(f"/v1/videos/{video_id}").code == 404


def test_a_disabled_get_route_is_404_for_head_too() -> None:
    sim = InMemoryWorker(disabled_endpoints=("/v1/model_info",))
    assert sim.call("HEAD", "/v1/model_info").code == 404


# --------------------------------------------------------------------------- idle keep-alive


def _site(config: SimulatorConfig) -> tuple[MemoryReactorClock, Any]:
    reactor = MemoryReactorClock()
    success_result_of(Deferred.fromCoroutine(serve(reactor, config)))  # type: ignore[arg-type]
    return reactor, reactor.tcpServers[0][1]


def test_idle_connections_close_after_the_keep_alive_timeout_but_not_while_serving() -> None:
    reactor, site = _site(SimulatorConfig(port=0, step_ms=1000.0))  # a default request: 8 s
    assert site.timeOut == 5.0
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    body = b'{"prompt": "x"}'
    protocol.dataReceived(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    reactor.advance(7.9)  # generating: longer than the idle timeout, still open
    assert not transport.disconnecting and transport.value() == b""
    reactor.advance(0.1)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    reactor.advance(4.9)  # answered, now idle
    assert not transport.disconnecting
    reactor.advance(0.1)
    assert transport.disconnecting


def test_keep_alive_timeout_is_configurable() -> None:
    assert parse_config(["--keep-alive-timeout", "2.5"]).keep_alive_timeout == 2.5
    _, site = _site(SimulatorConfig(port=0, keep_alive_timeout=0.5))
    assert site.timeOut == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_keep_alive_timeouts_exit_with_usage(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config([f"--keep-alive-timeout={value}"])
    assert info.value.code == 2
    assert "keep-alive-timeout must be" in capsys.readouterr().err


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(
    "flag", ["--step-ms", "--base-ms", "--speed", "--startup-delay", "--update-ms", "--sleep-ms"]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config([f"{flag}={value}"])
    assert info.value.code == 2
    assert f"{flag[2:]} must be a finite number" in capsys.readouterr().err


# --------------------------------------------------------------------------- image memory


@pytest.mark.parametrize("seed", range(40))
def test_base64_of_runs_equals_the_direct_encoding(seed: int) -> None:
    rng = random.Random(seed)
    runs = []
    for _ in range(rng.randint(1, 5)):
        block = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 3, 4, 5, 7, 64, 1000, 4097])))
        runs.append((block, rng.choice([0, 1, 2, 6, 7, 13, 100])))
    expected = base64.b64encode(b"".join(block * count for block, count in runs))
    assert payloads.runs_b64(runs).to_bytes() == expected


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("size", [0, 5000, payloads.CHUNK_SIZE * 3 + 1, 2_000_003])
def test_big_images_are_shared_blocks_with_a_matching_base64(ext: str, size: int) -> None:
    image = payloads.image_payload(ext, size)
    data = image.to_bytes()
    assert len(data) == image.length
    # Exact, but for the documented round-ups: sizes just above the minimum,
    # and odd WebP sizes (RIFF chunks are even).
    assert 0 <= image.length - max(size, len(payloads.image_bytes(ext, 0))) <= (ext == "webp")
    chunks = list(image.chunks())
    assert all(len(c) <= payloads.CHUNK_SIZE for c in chunks)
    assert len({id(c) for c in chunks}) <= 5  # head, two padding blocks (or zero block + rest), tail
    assert payloads.image_b64(ext, size).to_bytes() == base64.b64encode(data)
    assert data == payloads.image_bytes(ext, size)


def test_a_big_image_download_streams_without_keeping_it() -> None:
    size = 16_000_000
    sim = InMemoryWorker(image_bytes=size)
    url = sim.post("/v1/images/generations", {"prompt": "x", "output_format": "png"}).json()["data"][0]["url"]
    gc.collect()
    tracemalloc.start()
    try:
        answer = sim.get(url)
        assert answer.code == 200 and answer.length == size == len(answer.body)
        assert answer.content_type == "image/png" and answer.body[:8] == b"\x89PNG\r\n\x1a\n"
        del answer
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 4_000_000, f"{retained / 1e6:.1f} MB kept after one 16 MB download"
