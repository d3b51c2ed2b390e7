"""
A worker registered while the fleet sleeps, for real: the simulated worker is
put to sleep (it refuses generations itself), gets no traffic, and wakes with
the fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.support.live import (
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Processes


def test_worker_registered_while_the_fleet_sleeps_joins_asleep(processes: Processes) -> None:
    first, late = processes.workers(sim("first"), sim("late"))
    router = processes.router([first])
    wait_for_workers(router, 1)
    assert call(router.url, "POST", "/release_memory_occupation", {}).status == 200

    reply = call(router.url, "POST", "/workers", {"url": late.url})
    assert reply.status == 200, reply.body

    def asleep() -> bool | None:
        workers = call(router.url, "GET", "/workers", timeout=5).json()["workers"]
        return True if [w["state"] for w in workers] == ["sleeping", "sleeping"] else None

    wait_until("the late worker to join asleep", asleep, timeout=15)
    # The worker itself sleeps: it refuses a generation sent to it directly.
    direct = post_image(late.url)
    assert direct.status == 400 and "sleep" in direct.body.decode().lower(), direct.body
    through = post_image(router.url)
    assert through.status == 503 and "sleeping" in through.json()["error"]

    woken = call(router.url, "POST", "/resume_memory_occupation", {})
    assert woken.status == 200 and len(woken.json()["results"]) == 2
    served = {post_image(router.url).worker for _ in range(8)}
    assert served == {"first", "late"}
