"""
The C{ray} launcher backend as operators run it: C{python -m twisted_router
--launcher-config fleet.yaml} with C{ray_address: local}, which starts a
private single-node Ray cluster (CPU only, no dashboard, a small object
store) and three simulated workers as Ray actors.

The router runs in a session of its own, so every process it started —
Ray's own (GCS, raylet, workers) and the simulators — carries its session
id, even after being reparented: that is how the test checks that nothing
is left, and how it cleans up whatever a failing run leaves, without
touching any other process named ray on the machine.

Skipped only when C{ray} is not installed and C{CI} is not set; under
C{CI=true} a missing C{ray} fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.launched import write_fleet
from tests.support.live import (
    SMALL_IMAGE,
    all_routable,
    call,
    session_of,
    terminate,
    wait_until,
    workers_by_url,
)
from tests.support.processes import sigkill_all

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise AssertionError("ray is not installed, but CI must run the Ray backend test: pip install -e '.[ray]'")
    pytest.skip("ray is not installed (pip install -e '.[ray]')", allow_module_level=True)

pytestmark = pytest.mark.timeout(150)

STARTED = re.compile(r"\[worker (\d+)\] started(?: again \(start \d+\))?, pid (\d+); waiting for (http://\S+)/health")


def in_session(sid: int) -> list[int]:
    """Every live process of session C{sid}."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and session_of(int(p)) == sid]


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            out.append(f"{pid}: {command!r}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return "\n".join(out)


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    # Short: Ray puts unix sockets under it, and their paths are limited to ~107 bytes.
    path = Path(tempfile.mkdtemp(prefix="trray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sessions() -> Iterator[set[int]]:
    """Sessions of routers under test; anything left in them is SIGKILLed at the end."""
    sids: set[int] = set()
    try:
        yield sids
    finally:
        for sid in sids:
            sigkill_all(os.kill, in_session(sid))


def started(router_lines: list[str]) -> dict[int, list[tuple[int, str]]]:
    """Worker index -> (pid on its node, URL) of each start, from the router's log."""
    seen: dict[int, list[tuple[int, str]]] = {}
    for line in router_lines:
        m = STARTED.search(line)
        if m:
            seen.setdefault(int(m.group(1)), []).append((int(m.group(2)), m.group(3)))
    return seen


def test_ray_fleet_serves_replaces_a_killed_actor_and_leaves_nothing(
    processes: Processes, sessions: set[int], ray_dir: Path, tmp_path: Path
) -> None:
    fleet = write_fleet(
        tmp_path,
        f"""
        launcher:
          backend: ray
          ray_address: local
          ray_temp_dir: {ray_dir}
          worker: simulated
          num_workers: 3
          num_gpus_per_worker: 0
          num_cpus_per_worker: 0.5
          strategy: PACK
          wait_timeout: 60
          shutdown_grace: 5
          restart: {{min_delay: 0.5, max_delay: 2}}
          simulated:
            step_ms: 1
        """,
    )
    began = time.monotonic()
    router = processes.router([], "--launcher-config", str(fleet))
    sessions.add(router.pid)  # start_process gives it a session of its own
    router.wait_for_line(r"3/3 workers ready", timeout=90.0)
    ready_after = time.monotonic() - began
    starts = started(list(router.lines))
    assert sorted(starts) == [0, 1, 2], router.output()
    urls = [runs[0][1] for _, runs in sorted(starts.items())]
    # A private cluster's workers listen on loopback.
    assert all(url.startswith("http://127.0.0.1:") for url in urls), urls

    def routable() -> dict[str, dict[str, Any]] | None:
        return all_routable(router, urls)  # the URLs as they are then: a replacement changes one

    wait_until("all Ray workers routable", routable, 20.0)
    served = {call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE).worker for _ in range(6)}
    assert served <= {u.removeprefix("http://") for u in urls} and served, served

    # SIGKILL worker 1's actor process (the parent of its simulator): the
    # router hears it from the pending actor call, not from health checks.
    victim_pid, victim_url = starts[1][0]
    actor_pid = parent_of(victim_pid)
    assert session_of(actor_pid) == router.pid
    os.kill(actor_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def quarantined() -> dict[str, Any] | None:
        workers = workers_by_url(router)
        return workers[victim_url] if workers and workers[victim_url]["is_dead"] else None

    dead = wait_until("the killed actor's worker to be out of rotation", quarantined, 10.0)
    out_after = time.monotonic() - killed_at
    assert "Ray actor" in dead["dead_reason"], dead

    def replacement() -> tuple[int, str] | None:
        runs = started(list(router.lines)).get(1, [])
        return runs[1] if len(runs) > 1 else None

    new_pid, new_url = wait_until("a replacement actor for worker 1", replacement, 30.0)
    assert new_pid != victim_pid
    urls[1] = new_url  # the same port when it is still free on the node (it usually is)

    def served_by_replacement() -> str | None:
        reply = call(router.url, "POST", "/v1/images/generations", SMALL_IMAGE)
        assert reply.status == 200, reply.body
        return reply.worker if reply.worker == new_url.removeprefix("http://") else None

    wait_until("the replacement serving", served_by_replacement, 30.0)
    replaced_after = time.monotonic() - killed_at
    assert session_of(victim_pid) is None, "the killed actor's simulator outlived it"

    # SIGKILL worker 2's own process (not its actor): the pending call returns its exit status.
    worker_pid, worker_url = starts[2][0]
    os.kill(worker_pid, signal.SIGKILL)

    def exited() -> dict[str, Any] | None:
        workers = workers_by_url(router)
        return workers[worker_url] if workers and workers[worker_url]["is_dead"] else None

    dead = wait_until("the killed worker to be out of rotation", exited, 10.0)
    assert "killed by signal 9" in dead["dead_reason"], dead
    wait_until("a replacement for worker 2",
               lambda: True if len(started(list(router.lines)).get(2, [])) > 1 else None, 30.0)
    urls[2] = started(list(router.lines))[2][1][1]
    wait_until("all Ray workers routable again", routable, 30.0)

    # SIGTERM: exit 0, actors killed, placement group removed, private cluster stopped.
    before = in_session(router.pid)
    assert len(before) > 4, describe(before)  # Ray's processes and the workers
    assert terminate(router, timeout=60.0) == 0, router.output()
    assert "launcher: Ray actors and placement group removed" in router.output()
    left = wait_until("every process of the router's session to be gone",
                      lambda: None if in_session(router.pid) else [], 15.0)
    assert left == []
    print(
        f"\nray backend: 3 workers ready {ready_after:.1f} s after start; killed actor out of rotation "
        f"after {out_after:.2f} s, replacement serving {replaced_after:.1f} s after the kill"
    )
