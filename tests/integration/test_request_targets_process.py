"""
Request-target spellings against a real router and simulated workers: an
absolute-form or oddly spelled control call is the router's fleet-wide call,
never a call to one worker, and an unreadable path is a 400 without a traceback.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tests.support.live import SMALL_IMAGE, call, wait_for_workers

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def raw_request(base_url: str, method: str, target: str, payload: Any = None) -> tuple[int, Any]:
    """One request with the request-target written exactly as given; (status, JSON body)."""
    parts = urlsplit(base_url)
    assert parts.hostname == "127.0.0.1"
    body = json.dumps(payload).encode() if payload is not None else b""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    header, _, content = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in header.lower():
        decoded = b""
        while content:
            size_line, _, content = content.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, content = decoded + content[:size], content[size + 2 :]
        content = decoded
    return int(header.split(b" ", 2)[1]), json.loads(content)


def test_absolute_form_and_odd_spellings_reach_the_fleet_wide_routes(processes: Processes) -> None:
    workers = processes.workers(["--weights-prefix", "/ckpt/"], ["--weights-prefix", "/ckpt/"])
    router = processes.router(workers)
    wait_for_workers(router, 2)

    status, body = raw_request(router.url, "POST", "http://x/update_weights_from_disk", {"model_path": "/ckpt/a"})
    assert status == 200 and body["weight_version"] == "1" and len(body["results"]) == 2, body
    health = call(router.url, "GET", "/health").json()
    assert health["weight_version"] == "1" and health["model_path"] == "/ckpt/a"
    listed = call(router.url, "GET", "/workers").json()["workers"]
    assert [w["weight_version"] for w in listed] == ["1", "1"]

    status, body = raw_request(router.url, "POST", "//%75pdate_weights_from_disk/", {"model_path": "/ckpt/b"})
    assert status == 200 and body["weight_version"] == "2", body
    # The answers of the generations carry the version every worker really holds.
    reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
    assert reply.status == 200 and reply.headers["x-weight-version"] == "2"

    status, body = raw_request(router.url, "POST", "http://x/release_memory_occupation", {})
    assert status == 200 and len(body["results"]) == 2, body
    listed = call(router.url, "GET", "/workers").json()["workers"]
    assert [w["is_sleeping"] for w in listed] == [True, True]
    reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
    assert reply.status == 503 and "sleeping" in reply.json()["error"]

    status, body = raw_request(router.url, "POST", "/v1/../resume_memory_occupation", {})
    assert status == 200 and len(body["results"]) == 2, body
    reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
    assert reply.status == 200 and reply.headers["x-weight-version"] == "2"

    status, body = raw_request(router.url, "GET", "http://x/workers/")
    assert status == 200 and len(body["workers"]) == 2

    for target in ("/v1/%ZZ", "/v1/%C3%28"):
        status, body = raw_request(router.url, "GET", target)
        assert status == 400 and "error" in body, body
    assert "Traceback" not in router.output()
