"""
Request-targets: every spelling of a path reaches the route its plain
spelling reaches, workers only ever see origin form, and unreadable targets
are a 400 JSON answer with nothing logged as a failure.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from tests.support.fleet import RouterHarness
from tests.support.fleet import make_router as make
from twisted_router.site import RouterSite
from twisted_router.targets import BadTarget, normalize_target


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        (b"/health", b"/health"),
        (b"/", b"/"),
        (b"http://router/update_weights_from_disk", b"/update_weights_from_disk"),
        (b"HTTPS://Router:443/workers?url=x", b"/workers?url=x"),
        (b"http://router", b"/"),
        (b"http://router?q=1", b"/?q=1"),
        (b"/health/", b"/health"),
        (b"//release_memory_occupation", b"/release_memory_occupation"),
        (b"/v1//images///generations/", b"/v1/images/generations"),
        (b"/./v1/./models/.", b"/v1/models"),
        (b"/v1/videos/../../update_weights_from_disk", b"/update_weights_from_disk"),
        (b"/../../..", b"/"),
        (b"/%75pdate_weights_from_disk", b"/update_weights_from_disk"),
        (b"/v1/%2e%2E/x", b"/x"),
        (b"/%7Ex-%5f", b"/~x-_"),
        # Escapes that carry meaning stay escaped (hex upper-cased): a worker id is one segment.
        (b"/workers/http%3a%2f%2f10.0.0.5%3A30000", b"/workers/http%3A%2F%2F10.0.0.5%3A30000"),
        (b"/v1/videos/a%2Fb", b"/v1/videos/a%2Fb"),
        # The query string is never touched.
        (b"/v1/videos?video_id=a/../b&x=%zz&&y=%2f", b"/v1/videos?video_id=a/../b&x=%zz&&y=%2f"),
        (b"/caf%C3%A9", b"/caf%C3%A9"),
        (b"/a#fragment", b"/a"),
    ],
)
def test_canonical_origin_form(target: bytes, canonical: bytes) -> None:
    assert normalize_target(target) == canonical
    assert normalize_target(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (b"/v1/%ZZ", "invalid percent-encoding '%ZZ'"),
        (b"/v1/%4", "invalid percent-encoding '%4'"),
        (b"/v1/abc%", "invalid percent-encoding '%'"),
        (b"/v1/%C3%28", "does not decode to UTF-8"),
        (b"/v1/\xff", "does not decode to UTF-8"),
        (b"*", "expected a path starting with '/'"),
        (b"health", "expected a path starting with '/'"),
        (b"ftp://router/health", "only http and https"),
    ],
)
def test_unreadable_targets(target: bytes, message: str) -> None:
    with pytest.raises(BadTarget, match=message.replace("(", r"\(")):
        normalize_target(target)


# ---------------------------------------------------------------- through the router's Site


def exchange(h: RouterHarness, raw: bytes) -> tuple[int, bytes, bytes]:
    """Send raw bytes to a RouterSite over the harness's router; (status, head, body)."""
    site = RouterSite(h.parts.router.app.resource(), access_log=False, reactor=h.clock, max_request_body=1 << 20)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    h.pump()
    out = transport.value()
    channel.connectionLost(None)
    head, _, body = out.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(head.split(b" ", 2)[1]), head, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def post(target: bytes, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: router\r\n\r\n"


REFIT_SPELLINGS = [
    b"http://x/update_weights_from_disk",
    b"HTTP://router:30080/update_weights_from_disk",
    b"/update_weights_from_disk/",
    b"//update_weights_from_disk",
    b"/%75pdate_weights_from_disk",
    b"/v1/../update_weights_from_disk",
    b"/./update_weights_from_disk",
]


@pytest.mark.parametrize("target", REFIT_SPELLINGS)
def test_every_spelling_of_a_refit_is_the_fleet_wide_refit(target: bytes) -> None:
    h, workers = make(2)
    code, _, body = exchange(h, post(target, {"model_path": "/ckpt/7", "weight_version": "v7"}))
    assert code == 200, body
    answer = json.loads(body)
    assert answer["success"] and answer["weight_version"] == "v7" and len(answer["results"]) == 2
    assert h.parts.control.version == "v7"
    assert [w.weight_version for w in h.pool.workers()] == ["v7", "v7"]
    for worker in workers:  # each got the broadcast, in origin form
        assert [s.uri for s in worker.seen if s.method == b"POST"] == [b"/update_weights_from_disk"]


@pytest.mark.parametrize(
    "target", [b"http://x/release_memory_occupation", b"//release_memory_occupation/", b"/%72elease_memory_occupation"]
)
def test_every_spelling_of_a_sleep_puts_the_whole_fleet_to_sleep(target: bytes) -> None:
    h, _ = make(2)
    code, _, body = exchange(h, post(target, {}))
    assert code == 200, body
    assert [w.is_sleeping for w in h.pool.workers()] == [True, True]
    code, _, body = exchange(h, post(b"/v1/images/generations", {"prompt": "x"}))
    assert code == 503 and b"all workers are sleeping" in body
    code, _, body = exchange(h, post(b"http://x/resume_memory_occupation", {}))
    assert code == 200 and [w.is_sleeping for w in h.pool.workers()] == [False, False]


@pytest.mark.parametrize("target", [b"http://x/workers", b"/workers/", b"//workers", b"/w%6Frkers"])
def test_router_owned_routes_answer_every_spelling(target: bytes) -> None:
    h, workers = make(1)
    code, _, body = exchange(h, get(target))
    assert code == 200 and [w["display_id"] for w in json.loads(body)["workers"]] == ["w0:8000"]
    code, _, body = exchange(h, get(b"http://x/health/"))
    assert code == 200 and json.loads(body)["status"] == "healthy"
    assert [s.uri for s in workers[0].seen if s.uri not in (b"/health", b"/v1/models")] == []  # never proxied (bring-up probes aside)


def test_worker_lookup_by_plain_url_survives_slash_merging() -> None:
    h, _ = make(1)
    code, _, body = exchange(h, get(b"/workers/http://w0:8000"))
    assert code == 200 and json.loads(body)["worker"]["url"] == "http://w0:8000"
    code, _, body = exchange(h, get(b"/workers/http%3A%2F%2Fw0%3A8000"))
    assert code == 200 and json.loads(body)["worker"]["url"] == "http://w0:8000"


def test_per_worker_control_calls_are_refused_in_every_spelling() -> None:
    h, workers = make(1)
    for target in (b"http://x/v1/set_lora", b"/v1//set_lora/", b"/v1/set%5Flora"):
        code, _, body = exchange(h, post(target, {"lora_nickname": "a"}))
        assert code == 400 and b"split the fleet" in body
    assert [s.uri for s in workers[0].seen if s.method == b"POST"] == []


def test_workers_receive_origin_form_with_the_raw_query() -> None:
    h, (w0,) = make(1)
    code, _, _ = exchange(h, get(b"http://x/v1//custom/./thing/?a=%2F&b=1&b=2"))
    assert code == 200
    assert w0.seen[-1].uri == b"/v1/custom/thing?a=%2F&b=1&b=2"
    code, _, _ = exchange(h, post(b"HTTP://x/v1/images/generations?trace=1", {"prompt": "x"}))
    assert code == 200 and w0.seen[-1].uri == b"/v1/images/generations?trace=1"


@pytest.mark.parametrize("target", [b"/v1/%ZZ", b"/v1/%C3%28", b"/v1/videos/%E2%82", b"*"])
def test_unreadable_target_is_400_json_and_nothing_is_logged_as_a_failure(target: bytes) -> None:
    h, (w0,) = make(1)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, head, body = exchange(h, get(target) + get(b"/health"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert code == 400 and b"application/json" in head.lower()
    assert "error" in json.loads(body.split(b"HTTP/1.1")[0])
    assert [s.uri for s in w0.seen if s.uri not in (b"/health", b"/v1/models")] == []  # bring-up probes aside
    assert not [e for e in events if "log_failure" in e or "Traceback" in str(e.get("log_format", ""))]
    assert b"HTTP/1.1 200" in body  # the connection stays usable: the next request is answered
