"""
Worker state changes in the log (namespace C{twisted_router.workers}): every
transition once, from the state the worker registered in, with the state
names C{GET /workers} documents. The first worker to come up used to get no
line (the watcher first saw it already ready), and a restored, quarantined
worker was said to be dead "was registered", which is no state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.filepath import FilePath

from tests.support.fleet import Fleet, RouterHarness
from twisted_router.persist import StateKeeper
from twisted_router.state import StateDocument, WorkerRecord
from twisted_router.statefile import StateFile

#: The words C{GET /workers} "state" may hold (README, Dashboard).
DOCUMENTED = {"ready", "starting", "joining", "syncing", "updating", "releasing", "resuming", "sleeping", "suspect", "dead"}


@pytest.fixture
def changes() -> Iterator[list[tuple[str, str, str | None]]]:
    """(worker, state, previous) of each state-change line logged."""
    seen: list[tuple[str, str, str | None]] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "twisted_router.workers" and "state" in event:
            seen.append((event["worker"], event["state"], event.get("previous")))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_the_first_worker_to_come_up_is_logged_like_the_others(changes: list[tuple[str, str, str | None]]) -> None:
    fleet = Fleet()
    h = RouterHarness(fleet)
    first, _ = fleet.add("w0")
    second, _ = fleet.add("w1")
    h.register(first)
    h.register(second)
    assert changes == [
        ("http://w0:8000", "ready", "starting"),
        ("http://w1:8001", "ready", "starting"),
    ]


def test_a_restored_quarantined_worker_changes_from_a_documented_state(
    changes: list[tuple[str, str, str | None]], tmp_path: Path
) -> None:
    fleet = Fleet()
    h = RouterHarness(fleet)
    quarantined, _ = fleet.add("w0")
    sleeping, _ = fleet.add("w1")
    keeper = StateKeeper(
        StateFile(FilePath(str(tmp_path))),
        pool=h.parts.pool, control=h.parts.control, fleet=h.parts.fleet, jobs=h.parts.jobs, clock=h.clock,
    )
    keeper.restore(
        StateDocument(workers=(WorkerRecord(quarantined, reason="hung"), WorkerRecord(sleeping, sleeping=True)))
    )
    assert sorted(changes) == [("http://w0:8000", "dead", "starting"), ("http://w1:8001", "sleeping", "starting")]
    assert all(state in DOCUMENTED and previous in DOCUMENTED for _, state, previous in changes)
    # Re-admitted: one more line, from "dead".
    h.json("PUT", "/workers/" + h.pool.workers()[0].worker_id, json={"is_dead": False})
    h.pump()
    assert changes[2][0] == "http://w0:8000" and changes[2][2] == "dead", changes
    assert len(changes) == 3


def test_a_refit_is_logged_going_busy_and_coming_back(changes: list[tuple[str, str, str | None]]) -> None:
    fleet = Fleet()
    h = RouterHarness(fleet)
    url, _ = fleet.add("w0")
    h.register(url)
    del changes[:]
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/m/2"})
    assert code == 200, body
    assert changes == [("http://w0:8000", "updating", "ready"), ("http://w0:8000", "ready", "updating")]
