"""
An IPv6 worker, for real: a simulated worker listening on ::1, registered as
C{http://[::1]:PORT}, comes up, serves, is refitted and answers health checks.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from tests.support.live import SMALL_IMAGE, call, wait_until
from tests.support.processes import python_module

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to listen on")
def test_worker_on_ipv6_loopback(processes: Processes) -> None:
    worker = processes.start(
        python_module(
            "twisted_router.simulator", "--host", "::1", "--port", "0", "--weights-prefix", "/ckpt/"
        ),
        wait_url=False,
    )
    worker_url = worker.wait_for_line(r"listening on (http://\[::1\]:\d+)", timeout=30).group(1)
    router = processes.router([], "--worker-urls", worker_url)

    def ready() -> dict[str, object] | None:
        workers = call(router.url, "GET", "/workers", timeout=5).json()["workers"]
        return workers[0] if workers and workers[0]["state"] == "ready" else None

    entry = wait_until("the IPv6 worker to be ready", ready, timeout=20)
    assert entry["url"] == worker_url and entry["task_type"] == "T2I"

    reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE, timeout=30)
    assert reply.status == 200, reply.body
    assert reply.worker == worker_url.removeprefix("http://")

    refit = call(router.url, "POST", "/update_weights_from_disk", {"model_path": "/ckpt/v6"}, timeout=30)
    assert refit.status == 200, refit.body
    # Several health intervals (1 s) later it is still ready: probes reach it too.
    wait_until(
        "a health probe of the IPv6 worker",
        lambda: call(router.url, "GET", "/workers", timeout=5).json()["workers"][0]["last_probe_ok_at"],
        timeout=10,
    )
    [after] = call(router.url, "GET", "/workers", timeout=5).json()["workers"]
    assert (after["state"], after["weight_version"], after["is_dead"]) == ("ready", "1", False)
