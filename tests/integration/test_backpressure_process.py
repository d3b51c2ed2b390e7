"""
Backpressure with a slow reader, real processes on 127.0.0.1: a client that
stops reading a large answer half-way must make the router stop reading from
the worker (its memory does not grow with the unread part), and must still
get every byte once it reads again.

Independent of the streaming test in test_router_process.py, which reads as
fast as it can: here the client is the bottleneck.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.support.live import (
    MB,
    call,
    proc_status_kb,
    sim,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def test_a_stalled_reader_holds_back_the_worker_not_the_routers_memory(processes: Processes) -> None:
    size = 120 * MB
    (worker,) = processes.workers(sim("video", "--task-type", "T2V", "--step-ms", "0.01", "--video-bytes", str(size)))
    router = processes.router([worker])
    wait_for_workers(router, 1)
    video_id = call(router.url, "POST", "/v1/videos", {"prompt": "waves", "seconds": 1}).json()["id"]
    wait_until(
        "the video to complete",
        lambda: True if call(router.url, "GET", f"/v1/videos/{video_id}").json()["status"] == "completed" else None,
        timeout=20.0,
    )

    parts = urlsplit(router.url)
    assert parts.hostname == "127.0.0.1"
    before = proc_status_kb(router.pid)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /v1/videos/{video_id}/content HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body_start = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        got = len(body_start)
        while got < 2 * MB:  # read a little, then stall
            got += len(sock.recv(65536))
        time.sleep(3)  # the client reads nothing: the worker is fast, so only backpressure holds it back
        stalled = proc_status_kb(router.pid)
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    after = proc_status_kb(router.pid)
    print(
        f"\n[slow reader] router VmHWM {before['VmHWM'] / 1024:.1f} MiB before, "
        f"{stalled['VmHWM'] / 1024:.1f} MiB after a 3 s stall at 2 MB of {size / MB:.0f} MB, "
        f"{after['VmHWM'] / 1024:.1f} MiB at the end; {got / MB:.1f} MB received"
    )
    assert got == size
    assert (stalled["VmHWM"] - before["VmHWM"]) * 1024 < 30 * MB, (before, stalled)
    assert (after["VmHWM"] - before["VmHWM"]) * 1024 < 30 * MB, (before, after)
    # Nothing left counted on the worker.
    workers = call(router.url, "GET", "/workers").json()["workers"]
    assert workers[0]["active_requests"] == 0
