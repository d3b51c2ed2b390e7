"""
The RL control plane against real processes: simulated workers and the router on 127.0.0.1.

What is checked is the router's invariant (see L{twisted_router.control}): no generation is
served on weights older than the fleet's. The simulators tell the truth about each worker
(C{GET /sim/state}: weights path, update counter, sleeping flag, generations served) and
every answer names the worker that made it (C{X-Worker-Id}); the router stamps each
generation answer with the version the worker held when it was chosen (C{X-Weight-Version}).

Control calls are made slow with C{--update-ms} so the windows in which a worker is being
refitted or caught up are wide enough to observe and to send traffic into. Every wait is
bounded and the C{processes} fixture stops every process group when a test ends.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tests.support.live import (
    REPO_ROOT,
    Reply,
    call,
    post_image,
    sim,
    wait_for_workers,
    wait_until,
    workers_by_url,
)
from tests.support.processes import ServerProcess

if TYPE_CHECKING:  # the fixture's type; conftest.py is imported by pytest itself
    from tests.integration.conftest import Processes

# A small native (RL) request: 256x256, 8 steps, a fraction of a ms of simulated GPU time.
SMALL_ROLLOUT = {
    "prompt": "a red fox",
    "num_inference_steps": 8,
    "width": 256,
    "height": 256,
    "get_log_probs": True,
}


# -- helpers ----------------------------------------------------------------------------------


def refit(
    router: ServerProcess, version: str, path: str | None = None, timeout: float = 30.0
) -> Reply:
    body = {"model_path": path or f"/ckpt/{version}", "weight_version": version}
    return call(router.url, "POST", "/update_weights_from_disk", body, timeout=timeout)


def control(router: ServerProcess, what: str) -> Reply:
    """C{release} or C{resume} the fleet's memory through the router."""
    return call(router.url, "POST", f"/{what}_memory_occupation", {}, timeout=30.0)


def sim_state(worker: ServerProcess) -> dict[str, Any]:
    reply = call(worker.url, "GET", "/sim/state", timeout=5.0)
    assert reply.status == 200, reply
    state: dict[str, Any] = reply.json()
    return state


def set_worker(router: ServerProcess, worker: ServerProcess, **changes: bool) -> dict[str, Any]:
    reply = call(router.url, "PUT", f"/workers/{worker.url}", changes, timeout=10.0)
    assert reply.status == 200, reply
    payload: dict[str, Any] = reply.json()["worker"]
    return payload


def generate(router: ServerProcess, kind: str = "image", timeout: float = 30.0) -> Reply:
    if kind == "image":
        return post_image(router.url, timeout=timeout)
    return call(router.url, "POST", "/v1/diffusion/generate", SMALL_ROLLOUT, timeout=timeout)


def served_ok(reply: Reply) -> tuple[str | None, str | None]:
    """(X-Worker-Id, X-Weight-Version) of a successful generation."""
    assert reply.status == 200, reply
    return reply.worker, reply.headers.get("x-weight-version")


def wait_state(
    router: ServerProcess, worker: ServerProcess, state: str, timeout: float = 15.0
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        payload = workers_by_url(router)[worker.url]
        return payload if payload["state"] == state else None

    return wait_until(f"{worker.url} to be {state!r}", reached, timeout)


Served = tuple[str | None, str | None]


def traffic_while_syncing(
    router: ServerProcess, syncing: ServerProcess
) -> tuple[list[Served], Served]:
    """
    Send generations one after another while C{syncing} catches up; stop when it is done.

    Returns (worker, version) of each generation that was provably sent while the worker
    was syncing (the router still showed it syncing after the answer came back, and a
    worker enters "syncing" once and leaves it once), and of the last one, which may have
    been sent just after the catch-up ended.
    """
    during: list[Served] = []
    deadline = time.monotonic() + 15.0
    kinds = ["image", "native"]
    while time.monotonic() < deadline:
        reply = generate(router, kinds[len(during) % 2])
        payload = workers_by_url(router)[syncing.url]
        if not payload["syncing"]:
            return during, served_ok(reply)
        assert payload["state"] == "syncing", payload
        during.append(served_ok(reply))
        time.sleep(0.05)
    raise AssertionError(f"{syncing.url} still syncing after 15s: {workers_by_url(router)[syncing.url]}")


def spread(router: ServerProcess, count: int) -> Counter[Served]:
    """C{count} sequential generations (images and native alternately): who served them, on what."""
    kinds = ["image", "native"]
    return Counter(served_ok(generate(router, kinds[i % 2])) for i in range(count))


# -- 1. a refit reaches every worker and every answer says so --------------------------------


def test_refit_updates_every_worker_and_every_answer(processes: Processes) -> None:
    a, b = processes.workers(sim("a"), sim("b"))
    router = processes.router([a, b])
    wait_for_workers(router, 2)
    assert served_ok(generate(router))[1] == "0"  # start-up weights

    reply = refit(router, "a1", "/ckpt/a")

    assert reply.status == 200, reply
    body = reply.json()
    assert body["success"] is True, body
    assert body["weight_version"] == "a1", body
    assert sorted(r["worker_url"] for r in body["results"]) == sorted([a.url, b.url]), body
    assert all(r["success"] and r["status_code"] == 200 for r in body["results"]), body
    for payload in workers_by_url(router).values():
        assert payload["state"] == "ready", payload
        assert (payload["weight_version"], payload["model_path"]) == ("a1", "/ckpt/a"), payload
    for worker in (a, b):
        state = sim_state(worker)
        assert (state["weights_path"], state["weights_version"]) == ("/ckpt/a", 1), state
    health = call(router.url, "GET", "/health").json()
    assert (health["weight_version"], health["model_path"]) == ("a1", "/ckpt/a"), health

    served = spread(router, 12)
    assert set(served) == {("a", "a1"), ("b", "a1")}, served


# -- 2. a failed refit quarantines the worker ------------------------------------------------


def test_failed_refit_quarantines_the_worker(processes: Processes) -> None:
    good, bad, flipped = processes.workers(sim("good"), sim("bad", "--fail-update"), sim("flipped"))
    router = processes.router([good, bad, flipped])
    wait_for_workers(router, 3)

    first = refit(router, "u1")

    assert first.status == 502, first
    body = first.json()
    assert body["success"] is False, body
    results = {r["worker_url"]: r for r in body["results"]}
    assert set(results) == {good.url, bad.url, flipped.url}, body
    assert results[bad.url]["success"] is False and results[bad.url]["status_code"] == 400, body
    assert "rolled back" in str(results[bad.url]["body"]), body
    assert results[good.url]["success"] and results[flipped.url]["success"], body
    dead = workers_by_url(router)[bad.url]
    assert dead["is_dead"] is True and dead["state"] == "dead", dead
    assert "u1" in dead["dead_reason"] and "failed" in dead["dead_reason"], dead
    assert sim_state(bad)["weights_version"] == 0  # the worker rolled back

    # The same through a fault flipped at run time.
    flip = call(flipped.url, "POST", "/sim/faults", {"fail_update": True})
    assert flip.status == 200 and flip.json()["fail_update"] is True, flip
    second = refit(router, "u2")

    assert second.status == 502, second
    body = second.json()
    assert body["success"] is False, body
    results = {r["worker_url"]: r for r in body["results"]}
    assert set(results) == {good.url, flipped.url}, body  # the dead worker is not asked
    assert results[flipped.url]["success"] is False and results[good.url]["success"] is True, body
    workers = workers_by_url(router)
    assert workers[flipped.url]["is_dead"] is True, workers[flipped.url]
    assert "u2" in workers[flipped.url]["dead_reason"], workers[flipped.url]
    assert workers[good.url]["weight_version"] == "u2", workers[good.url]

    served = spread(router, 12)
    assert served == {("good", "u2"): 12}, served
    assert sim_state(bad)["served"] == 0 and sim_state(flipped)["served"] == 0

    # Re-admitted, a worker is caught up to the fleet's weights; one that still cannot load
    # them goes straight back to quarantine and never serves.
    assert call(flipped.url, "POST", "/sim/faults", {"fail_update": False}).status == 200
    set_worker(router, flipped, is_dead=False)
    set_worker(router, bad, is_dead=False)
    payload = wait_state(router, flipped, "ready")
    assert payload["weight_version"] == "u2", payload
    dead = wait_state(router, bad, "dead")
    assert "catch-up" in dead["dead_reason"] and "u2" in dead["dead_reason"], dead
    assert sim_state(flipped)["weights_path"] == "/ckpt/u2"
    served = spread(router, 8)
    assert set(served) == {("good", "u2"), ("flipped", "u2")}, served
    assert sim_state(bad)["served"] == 0


# -- 3. catch-up: re-admitted after quarantine, and slept through a refit ----------------------


def test_readmitted_worker_is_caught_up_before_it_serves(processes: Processes) -> None:
    a, b = processes.workers(sim("a"), sim("b", "--update-ms", "1500"))
    router = processes.router([a, b])
    wait_for_workers(router, 2)

    assert set_worker(router, b, is_dead=True)["is_dead"] is True
    reply = refit(router, "v1")
    assert reply.status == 200, reply
    assert [r["worker_url"] for r in reply.json()["results"]] == [a.url], reply
    assert sim_state(b)["weights_version"] == 0  # b missed the refit

    readmitted = set_worker(router, b, is_dead=False)

    assert readmitted["is_dead"] is False, readmitted
    assert readmitted["syncing"] is True and readmitted["state"] == "syncing", readmitted
    during, last = traffic_while_syncing(router, b)
    assert during and set(during) == {("a", "v1")}, during
    assert last[1] == "v1", last
    payload = wait_state(router, b, "ready")
    assert (payload["weight_version"], payload["model_path"]) == ("v1", "/ckpt/v1"), payload
    state = sim_state(b)
    assert (state["weights_path"], state["weights_version"]) == ("/ckpt/v1", 1), state

    served = spread(router, 8)
    assert set(served) == {("a", "v1"), ("b", "v1")}, served


def test_worker_that_slept_through_a_refit_is_caught_up_on_wake(processes: Processes) -> None:
    # a and b sleep; b is quarantined so the wake reaches only a; a is refitted to v1 while
    # b still sleeps. Re-admitting b keeps it sleeping (the router remembers); the next wake
    # finds it behind the fleet and catches it up before it gets any traffic.
    a, b = processes.workers(sim("a"), sim("b", "--update-ms", "1500"))
    router = processes.router([a, b])
    wait_for_workers(router, 2)

    released = control(router, "release")
    assert released.status == 200 and released.json()["success"] is True, released
    assert sim_state(a)["sleeping"] and sim_state(b)["sleeping"]
    nobody = refit(router, "v1")
    assert nobody.status == 503, nobody
    assert nobody.json()["error"].startswith("No healthy workers available in the pool"), nobody

    set_worker(router, b, is_dead=True)
    woke = control(router, "resume")
    assert woke.status == 200, woke
    assert [r["worker_url"] for r in woke.json()["results"]] == [a.url], woke
    assert not sim_state(a)["sleeping"] and sim_state(b)["sleeping"]
    reply = refit(router, "v1")
    assert reply.status == 200, reply
    assert [r["worker_url"] for r in reply.json()["results"]] == [a.url], reply

    back = set_worker(router, b, is_dead=False)
    assert back["state"] == "sleeping" and back["is_sleeping"] is True, back
    assert set(spread(router, 4)) == {("a", "v1")}

    woke = control(router, "resume")

    assert woke.status == 200, woke
    body = woke.json()
    assert [r["worker_url"] for r in body["results"]] == [b.url], body
    assert body["catching_up"] == [b.url], body
    assert workers_by_url(router)[b.url]["syncing"] is True
    during, last = traffic_while_syncing(router, b)
    assert during and set(during) == {("a", "v1")}, during
    assert last[1] == "v1", last
    payload = wait_state(router, b, "ready")
    assert payload["weight_version"] == "v1", payload
    state = sim_state(b)
    assert state["sleeping"] is False, state
    served_by_b = int(last[0] == "b")  # only the generation sent after the catch-up, if any
    assert (state["weights_path"], state["weights_version"], state["served"]) == (
        "/ckpt/v1",
        1,
        served_by_b,
    ), state

    served = spread(router, 8)
    assert set(served) == {("a", "v1"), ("b", "v1")}, served


def test_worker_asleep_during_a_refit_is_caught_up_on_wake(processes: Processes) -> None:
    # No quarantine involved: a sleeps, b (a version without the sleep endpoint) refuses the
    # sleep with a 404 and stays awake, and alone takes the refit. (A worker that *joins* a
    # sleeping fleet is put to sleep too: test_join_sleeping_process.py.)
    a, b = processes.workers(
        sim("a", "--update-ms", "1500"), sim("b", "--disable-endpoint", "/release_memory_occupation")
    )
    router = processes.router([a, b])
    wait_for_workers(router, 2)
    released = control(router, "release").json()
    assert [r["success"] for r in released["results"]] == [True, False], released
    states = {w["url"]: w["state"] for w in call(router.url, "GET", "/workers").json()["workers"]}
    assert states == {a.url: "sleeping", b.url: "ready"}, states

    reply = refit(router, "v1")
    assert reply.status == 200, reply
    assert [r["worker_url"] for r in reply.json()["results"]] == [b.url], reply
    assert sim_state(a)["weights_version"] == 0

    woke = control(router, "resume")

    assert woke.status == 200 and woke.json()["catching_up"] == [a.url], woke
    during, last = traffic_while_syncing(router, a)
    assert during and set(during) == {("b", "v1")}, during
    assert last[1] == "v1", last
    wait_state(router, a, "ready")
    state = sim_state(a)
    served_by_a = int(last[0] == "a")
    assert (state["weights_path"], state["weights_version"], state["served"]) == (
        "/ckpt/v1",
        1,
        served_by_a,
    ), state
    assert set(spread(router, 8)) == {("a", "v1"), ("b", "v1")}


# -- 4. a worker registered after a refit ----------------------------------------------------


def test_new_worker_is_caught_up_before_its_first_generation(processes: Processes) -> None:
    (a,) = processes.workers(sim("a"))
    router = processes.router([a])
    wait_for_workers(router, 1)
    assert refit(router, "v1").status == 200
    (late,) = processes.workers(sim("late", "--update-ms", "1500"))

    joined = call(router.url, "POST", "/workers", {"url": late.url})

    assert joined.status == 200, joined
    worker = joined.json()["worker"]
    assert worker["syncing"] is True and worker["state"] == "syncing", worker
    during, last = traffic_while_syncing(router, late)
    assert during and set(during) == {("a", "v1")}, during
    assert last[1] == "v1", last
    payload = wait_state(router, late, "ready")
    assert (payload["weight_version"], payload["model_path"]) == ("v1", "/ckpt/v1"), payload
    state = sim_state(late)
    assert (state["weights_path"], state["weights_version"]) == ("/ckpt/v1", 1), state

    served = spread(router, 8)
    assert set(served) == {("a", "v1"), ("late", "v1")}, served
    assert sim_state(late)["served"] == served[("late", "v1")] + int(last[0] == "late")


# -- 5. concurrent refits are serialised ---------------------------------------------------


def _in_thread(fn: Callable[[], Reply]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {"started": time.monotonic()}

    def run() -> None:
        try:
            out["reply"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc
        out["done"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _joined(thread: threading.Thread, out: dict[str, Any], timeout: float = 30.0) -> Reply:
    thread.join(timeout)
    assert not thread.is_alive(), "call did not finish"
    assert "error" not in out, out["error"]
    reply: Reply = out["reply"]
    return reply


def _wait_updating(router: ServerProcess, count: int) -> None:
    def updating() -> bool | None:
        states = [w["state"] for w in workers_by_url(router).values()]
        return True if states.count("updating") == count else None

    wait_until(f"{count} worker(s) updating", updating, timeout=10.0)


def test_concurrent_refits_run_one_after_the_other(processes: Processes) -> None:
    workers = processes.workers(sim("a", "--update-ms", "500"), sim("b", "--update-ms", "500"))
    router = processes.router(workers)
    wait_for_workers(router, 2)

    # Watch the simulators' queues: with refits serialised by the router, a worker never
    # holds more than one control job at a time.
    most_queued = {w.url: 0 for w in workers}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for w in workers:
                try:
                    most_queued[w.url] = max(most_queued[w.url], sim_state(w)["queue_depth"])
                except (OSError, AssertionError):
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        started = time.monotonic()
        first = _in_thread(lambda: refit(router, "first"))
        _wait_updating(router, 2)  # the first call holds the control lock
        second = _in_thread(lambda: refit(router, "second"))
        first_reply, second_reply = _joined(*first), _joined(*second)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        watcher.join(5.0)

    assert first_reply.status == 200 and first_reply.json()["weight_version"] == "first", (
        first_reply
    )
    assert second_reply.status == 200 and second_reply.json()["weight_version"] == "second", (
        second_reply
    )
    assert second[1]["started"] < first[1]["done"] < second[1]["done"]  # overlapping calls
    assert elapsed >= 1.0, elapsed
    assert most_queued == {w.url: 1 for w in workers}, most_queued
    assert call(router.url, "GET", "/health").json()["weight_version"] == "second"
    for payload in workers_by_url(router).values():
        assert payload["weight_version"] == "second", payload
    for w in workers:
        state = sim_state(w)
        assert (state["weights_version"], state["weights_path"]) == (2, "/ckpt/second"), state


# -- 6. requests during a refit wait for it --------------------------------------------------


def test_generations_during_a_refit_wait_for_the_new_weights(processes: Processes) -> None:
    workers = processes.workers(sim("a", "--update-ms", "1000"), sim("b", "--update-ms", "1000"))
    router = processes.router(workers)
    wait_for_workers(router, 2)
    assert served_ok(generate(router))[1] == "0"

    update = _in_thread(lambda: refit(router, "v1"))
    _wait_updating(router, 2)
    kinds = ["image", "native"] * 4

    def one(kind: str) -> tuple[Reply, float]:
        sent = time.monotonic()
        return generate(router, kind), sent

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, kinds))
    update_reply = _joined(*update)

    assert update_reply.status == 200, update_reply
    versions = Counter(served_ok(reply)[1] for reply, _ in results)
    assert versions == {"v1": 8}, versions
    # Every one was sent while the refit was still running (it had not answered yet), so
    # each was held back until the workers had the new weights.
    assert all(sent < update[1]["done"] for _, sent in results)
    served = sum(sim_state(w)["served"] for w in workers)
    assert served == 9, served  # nothing lost, nothing retried


# -- 7. a sleeping fleet -------------------------------------------------------------------


def test_all_workers_sleeping_answers_503_at_once(processes: Processes) -> None:
    workers = processes.workers(sim("a"), sim("b"))
    router = processes.router(workers)
    wait_for_workers(router, 2)
    released = control(router, "release")
    assert released.status == 200 and released.json()["success"] is True, released

    for kind in ("image", "native"):
        started = time.monotonic()
        reply = generate(router, kind)
        elapsed = time.monotonic() - started
        assert reply.status == 503, reply
        assert reply.json()["error"].startswith("all workers are sleeping"), reply
        assert elapsed < 0.5, elapsed
    nobody = refit(router, "v1")
    assert nobody.status == 503, nobody

    woke = control(router, "resume")
    assert woke.status == 200 and woke.json()["catching_up"] == [], woke
    assert served_ok(generate(router))[1] == "0"


# -- 8. the example controller -------------------------------------------------------------


def test_rl_loop_example_completes(processes: Processes) -> None:
    # rl_loop.py writes its checkpoints under /tmp/rl-loop/ by default.
    workers = processes.workers(sim("a", "--weights-prefix", "/tmp/rl-loop/"), sim("b", "--weights-prefix", "/tmp/rl-loop/"))
    router = processes.router(workers)
    wait_for_workers(router, 2)

    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "rl_loop.py"),
            "--router",
            router.url,
            "--iterations",
            "3",
            "--batch",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "completed 3 iterations" in done.stdout, done.stdout
    assert call(router.url, "GET", "/health").json()["weight_version"] == "3"


# -- joining during a refit ---------------------------------------------------------------


def test_worker_joining_during_the_first_refit_is_caught_up(processes: Processes) -> None:
    (a,) = processes.workers(sim("a", "--update-ms", "1000"))
    router = processes.router([a])
    wait_for_workers(router, 1)
    (late,) = processes.workers(sim("late"))
    update = _in_thread(lambda: refit(router, "v1"))
    _wait_updating(router, 1)  # the fleet's first refit is in flight

    joined = call(router.url, "POST", "/workers", {"url": late.url})
    assert joined.status == 200, joined
    assert _joined(*update).status == 200
    # However the router brings it up to date, it must be done within the refit's own time.
    wait_state(router, late, "ready", timeout=5.0)

    served = spread(router, 8)
    assert ("late", "0") not in served, (
        f"served on start-up weights after the fleet moved to v1: {served}"
    )
    assert set(served) == {("a", "v1"), ("late", "v1")}, served
    state = sim_state(late)
    assert (state["weights_path"], state["weights_version"]) == ("/ckpt/v1", 1), state
