"""
A registered worker that is still starting (its port not open yet) is skipped
by a refit instead of failing it, and is caught up to the fleet's weights when
it first answers: real processes on 127.0.0.1.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from tests.support.live import call, post_image, sim, wait_until, workers_by_url
from tests.support.processes import python_module

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_refit_skips_a_starting_worker_which_is_caught_up_when_it_comes_up(processes: Processes) -> None:
    (ready,) = processes.workers(sim("ready"))
    port = _free_port()
    late_url = f"http://127.0.0.1:{port}"
    late = processes.start(
        python_module(
            "twisted_router.simulator", "--host", "127.0.0.1", "--port", str(port),
            *sim("late", "--startup-delay", "4"),  # sim(): the same worker options as every other test's
        ),
        wait_url=False,
    )
    router = processes.router([], "--worker-urls", ready.url, late_url)
    wait_until(
        "the ready worker to be up",
        lambda: True if workers_by_url(router).get(ready.url, {}).get("state") == "ready" else None,
    )
    assert workers_by_url(router)[late_url]["state"] == "starting"

    refit = call(router.url, "POST", "/update_weights_from_disk", {"model_path": "/ckpt/1", "weight_version": "v1"})
    print(f"\nrefit with a starting worker: HTTP {refit.status} {refit.json()}")
    assert refit.status == 200, refit.json()
    assert [r["worker_url"] for r in refit.json()["results"]] == [ready.url]

    late.wait_for_line(r"listening on", timeout=20)
    entry = wait_until(
        "the late worker to be caught up",
        lambda: (w if (w := workers_by_url(router)[late_url])["state"] in ("ready", "dead") else None),
        timeout=20,
    )
    print(f"late worker after it came up: state {entry['state']}, weight_version {entry['weight_version']}, "
          f"dead_reason {entry['dead_reason']}")
    assert (entry["state"], entry["weight_version"]) == ("ready", "v1")
    served = {post_image(router.url).worker for _ in range(8)}
    assert served == {"ready", "late"}
