"""
Tests for L{twisted_router.persist}: the state file kept in step with the
router (coalesced on a fake clock), the refit journal, and the restore into
pool, control plane and owner maps, all in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.support.fleet import FakeWorker, Fleet, RouterHarness
from twisted_router.persist import OWNER_WRITE_DELAY, StateKeeper
from twisted_router.state import Owners, StateDocument, WorkerRecord
from twisted_router.statefile import StateFile

REFIT = "/update_weights_from_disk"


def keeper_for(h: RouterHarness, path: Path, store: StateFile | None = None) -> StateKeeper:
    parts = h.parts
    return StateKeeper(
        store or StateFile(FilePath(str(path))),
        pool=parts.pool,
        control=parts.control,
        fleet=parts.fleet,
        jobs=parts.jobs,
        clock=h.clock,
    )


def temp_dir(case: TestCase) -> Path:
    """A fresh state directory, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="router-state-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def saved(path: Path) -> StateDocument:
    document = StateFile(FilePath(str(path))).load()
    assert document is not None
    return document


def worker_path(url: str) -> str:
    return "/workers/" + quote(url, safe="")


def refit(h: RouterHarness, model_path: str) -> tuple[int, Any]:
    return h.json("POST", REFIT, json={"model_path": model_path})


def refits_seen(worker: FakeWorker) -> list[Any]:
    return [json.loads(s.body) for s in worker.seen if s.request.path == REFIT.encode()]


def bring_up_all(h: RouterHarness) -> None:
    """What the health checker does for workers that answer: bring each starting one up (it probes no dead or sleeping one)."""
    for worker in h.pool.workers():
        if not worker.is_dead and not worker.is_sleeping:
            Deferred.fromCoroutine(h.parts.fleet.bring_up(worker))
    h.pump()


def restarted(fleet: Fleet, path: Path) -> tuple[RouterHarness, StateKeeper]:
    """A new router on the same workers, restored from the state file, as the service does it."""
    h = RouterHarness(fleet)
    keeper = keeper_for(h, path)
    keeper.restore(saved(path))
    keeper.start()
    bring_up_all(h)
    return h, keeper


class RestoreTests(TestCase):
    def setUp(self) -> None:
        self.path = temp_dir(self)
        self.fleet = Fleet()
        self.urls = {}
        self.workers = {}
        for name, task_type in (("w0", "T2I"), ("w1", "T2V"), ("w2", "T2I")):
            url, worker = self.fleet.add(name, task_type=task_type)
            self.urls[name], self.workers[name] = url, worker
        self.h = RouterHarness(self.fleet)
        self.keeper = keeper_for(self.h, self.path)
        self.keeper.start()
        for url in self.urls.values():
            self.h.register(url)

    def test_weights_quarantine_and_owners_survive_a_restart(self) -> None:
        for step in (1, 2, 3):
            code, body = refit(self.h, f"/ckpt/step-{step}")
            self.assertEqual((code, body["weight_version"]), (200, str(step)))
        code, _ = self.h.json("PUT", worker_path(self.urls["w2"]), json={"is_dead": True})
        self.assertEqual(code, 200)
        code, image = self.h.json("POST", "/v1/images/generations", json={"prompt": "x"})
        self.assertEqual(code, 200)
        code, video = self.h.json("POST", "/v1/videos", json={"prompt": "x"})
        self.assertEqual(code, 200)
        self.h.clock.advance(OWNER_WRITE_DELAY)
        refits_before = {name: len(refits_seen(w)) for name, w in self.workers.items()}

        h, _ = restarted(self.fleet, self.path)
        code, health = h.json("GET", "/health")
        self.assertEqual((health["weight_version"], health["model_path"]), ("3", "/ckpt/step-3"))
        w2 = h.pool.get(self.urls["w2"])
        assert w2 is not None
        self.assertTrue(w2.is_dead)
        self.assertEqual(w2.dead_reason, "marked dead by operator")
        # The others were caught up to the restored weights (the last refit's body) and serve as version 3.
        for name in ("w0", "w1"):
            self.assertEqual(refits_seen(self.workers[name])[refits_before[name] :], [{"model_path": "/ckpt/step-3"}])
        self.assertEqual(refits_seen(self.workers["w2"])[refits_before["w2"] :], [])
        self.assertEqual(sorted(w.url for w in h.pool.routable()), sorted([self.urls["w0"], self.urls["w1"]]))
        code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "y"})
        self.assertEqual(response.headers.getRawHeaders(b"x-weight-version"), [b"3"])
        # The owners are known without asking the workers.
        owner = h.parts.jobs.images.owner(image["id"])
        self.assertIsNotNone(owner)
        self.assertEqual(h.parts.jobs.videos.owner(video["id"]), self.urls["w1"])
        before = {name: len(w.seen) for name, w in self.workers.items()}
        code, content, _ = h.call("GET", f"/v1/images/{image['id']}/content")
        self.assertEqual(code, 200)
        asked = [name for name, w in self.workers.items() if len(w.seen) > before[name]]
        self.assertEqual(len(asked), 1)  # only the owner, no fan-out lookup

    def test_a_refit_interrupted_by_the_stop_leaves_its_workers_out_until_a_refit_succeeds(self) -> None:
        refit(self.h, "/ckpt/step-1")
        for worker in self.workers.values():
            worker.hold(b"POST", REFIT.encode())
        d = self.h.client.request("POST", "http://router" + REFIT, json={"model_path": "/ckpt/step-2"})
        self.h.pump()
        journal = saved(self.path).refit_in_progress
        assert journal is not None
        self.assertEqual((journal.version, set(journal.targets)), ("2", set(self.urls.values())))
        self.assertTrue(all(w.held for w in self.workers.values()))
        # The router dies here: the held refits are never answered.
        for worker in self.workers.values():
            worker.handlers.clear()
        h, _ = restarted(self.fleet, self.path)
        for worker in h.pool.workers():
            self.assertTrue(worker.is_dead)
            self.assertIn("weight update to version 2 (/ckpt/step-2) was in progress", worker.dead_reason or "")
        code, health = h.json("GET", "/health")
        self.assertEqual((health["weight_version"], health["healthy_workers"]), ("1", 0))
        self.assertEqual(saved(self.path).journal[-1].outcome, "interrupted")
        # A new refit reaches them, and brings them back.
        code, body = refit(h, "/ckpt/step-3")
        self.assertEqual((code, body["weight_version"]), (200, "3"))
        self.assertEqual(len(h.pool.routable()), 3)
        self.assertEqual(saved(self.path).journal[-1].outcome, "succeeded")
        d.cancel()
        self.failureResultOf(d)

    def test_an_interrupted_worker_the_operator_marks_dead_stays_out_of_the_next_refit(self) -> None:
        self.workers["w0"].hold(b"POST", REFIT.encode())
        d = self.h.client.request("POST", "http://router" + REFIT, json={"model_path": "/ckpt/step-1"})
        self.h.pump()
        self.workers["w0"].handlers.clear()
        h, _ = restarted(self.fleet, self.path)
        code, _ = h.json("PUT", worker_path(self.urls["w0"]), json={"is_dead": True})
        self.assertEqual(code, 200)
        before = len(refits_seen(self.workers["w0"]))
        code, body = refit(h, "/ckpt/step-2")
        self.assertEqual(code, 200, body)
        self.assertEqual(len(refits_seen(self.workers["w0"])), before)
        w0 = h.pool.get(self.urls["w0"])
        assert w0 is not None
        self.assertTrue(w0.is_dead)
        self.assertEqual(len(h.pool.routable()), 2)
        d.cancel()
        self.failureResultOf(d)

    def test_an_interrupted_worker_comes_back_when_the_operator_readmits_it(self) -> None:
        refit(self.h, "/ckpt/step-1")
        self.workers["w0"].hold(b"POST", REFIT.encode())
        d = self.h.client.request("POST", "http://router" + REFIT, json={"model_path": "/ckpt/step-2"})
        self.h.pump()
        self.workers["w0"].handlers.clear()
        h, _ = restarted(self.fleet, self.path)
        w0 = h.pool.get(self.urls["w0"])
        assert w0 is not None
        self.assertTrue(w0.is_dead)
        # w1 and w2 applied it before the stop, so the fleet moved to version 2; but the journal
        # cannot tell who finished, so every worker the refit was sent to stays out.
        self.assertEqual(h.json("GET", "/health")[1]["weight_version"], "2")
        self.assertEqual(h.pool.routable(), [])
        code, _ = h.json("PUT", worker_path(self.urls["w0"]), json={"is_dead": False})
        self.assertEqual(code, 200)
        h.pump()
        self.assertTrue(w0.routable)
        self.assertEqual(json.loads(self.workers["w0"].seen[-1].body), {"model_path": "/ckpt/step-2"})
        d.cancel()
        self.failureResultOf(d)

    def test_a_quarantined_worker_is_not_refitted_after_restart(self) -> None:
        self.h.json("PUT", worker_path(self.urls["w2"]), json={"is_dead": True})
        h, _ = restarted(self.fleet, self.path)
        seen = len(self.workers["w2"].seen)
        code, _ = refit(h, "/ckpt/step-1")
        self.assertEqual(code, 200)
        self.assertEqual(len(self.workers["w2"].seen), seen)
        w2 = h.pool.get(self.urls["w2"])
        assert w2 is not None
        self.assertTrue(w2.is_dead)

    def test_a_sleeping_fleet_stays_asleep_across_a_restart_and_is_caught_up_when_woken(self) -> None:
        refit(self.h, "/ckpt/step-1")
        code, _ = self.h.json("POST", "/release_memory_occupation", json={})
        self.assertEqual(code, 200)
        self.assertTrue(all(w.sleeping for w in saved(self.path).workers))
        refits_before = {name: len(refits_seen(w)) for name, w in self.workers.items()}
        h, _ = restarted(self.fleet, self.path)
        # Brought up (it answers /health while asleep), but asleep: no traffic, and no catch-up
        # sent to a worker that would refuse it.
        self.assertEqual({w.state for w in h.pool.workers()}, {"sleeping"})
        self.assertEqual({name: len(refits_seen(w)) for name, w in self.workers.items()}, refits_before)
        self.assertEqual(h.json("POST", "/v1/images/generations", json={"prompt": "x"})[0], 503)
        code, body = h.json("POST", "/resume_memory_occupation", json={})
        self.assertEqual(code, 200, body)
        h.pump()
        self.assertEqual(len(h.pool.routable()), 3)
        for name, worker in self.workers.items():
            self.assertEqual(refits_seen(worker)[refits_before[name] :], [{"model_path": "/ckpt/step-1"}])

    def test_a_worker_url_blocked_now_is_not_restored(self) -> None:
        h = RouterHarness(Fleet())
        keeper = keeper_for(h, temp_dir(self))
        keeper.restore(
            StateDocument(workers=(WorkerRecord("http://169.254.169.254:80"), WorkerRecord("http://10.0.0.1:8000")))
        )
        self.assertEqual([w.url for w in h.pool.workers()], ["http://10.0.0.1:8000"])

    def test_the_journal_entry_is_durable_before_any_worker_is_sent_the_refit(self) -> None:
        path = self.path
        workers = self.workers

        class Watching(StateFile):
            order: list[tuple[str | None, int]] = []

            def save(self, doc: StateDocument) -> None:
                super().save(doc)
                sent = sum(1 for w in workers.values() for s in w.seen if s.request.path == REFIT.encode())
                if doc.journal:
                    self.order.append((doc.journal[-1].outcome, sent))

        h = RouterHarness(self.fleet)
        keeper = keeper_for(h, path, Watching(FilePath(str(path))))
        keeper.start()
        for url in self.urls.values():
            h.register(url)
        refit(h, "/ckpt/step-1")
        self.assertEqual(Watching.order, [(None, 0), ("succeeded", 3)])

    def test_a_refit_that_cannot_be_journaled_is_not_sent(self) -> None:
        def full(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        h = RouterHarness(self.fleet)
        keeper = keeper_for(h, self.path, StateFile(FilePath(str(self.path)), replace=full))
        for url in self.urls.values():
            h.register(url)
        h.parts.control.journal = keeper
        seen = {name: len(w.seen) for name, w in self.workers.items()}
        code, body = refit(h, "/ckpt/step-1")
        self.assertEqual(code, 503)
        self.assertIn("cannot write its state journal (No space left on device)", body["error"])
        self.assertEqual({name: len(w.seen) for name, w in self.workers.items()}, seen)
        self.assertEqual(h.json("GET", "/health")[1]["weight_version"], "0")
        self.assertEqual(len(h.pool.routable()), 3)  # nobody left busy


class CoalescingTests(TestCase):
    def setUp(self) -> None:
        self.path = temp_dir(self)
        self.fleet = Fleet()
        self.h = RouterHarness(self.fleet)
        self.keeper = keeper_for(self.h, self.path)
        self.keeper.start()
        self.assertEqual(self.keeper.writes, 1)

    def test_fleet_changes_are_written_once_on_the_next_turn(self) -> None:
        pool = self.h.pool
        for i in range(5):
            pool.add(f"http://10.0.0.{i + 1}:8000")
        for worker in pool.workers():
            pool.quarantine(worker, "test")
        self.assertEqual(self.keeper.writes, 1)
        self.h.clock.advance(0)
        self.assertEqual(self.keeper.writes, 2)
        document = saved(self.path)
        self.assertEqual(len(document.workers), 5)
        self.assertTrue(all(w.reason == "test" for w in document.workers))

    def test_owner_changes_wait_for_the_delay_and_make_one_write(self) -> None:
        images = self.h.parts.jobs.images
        for i in range(100):
            images.remember(f"img-{i}", "http://10.0.0.1:8000", finished=True)
            self.h.clock.advance(OWNER_WRITE_DELAY / 200)
        self.assertEqual(self.keeper.writes, 1)
        self.h.clock.advance(OWNER_WRITE_DELAY)
        self.assertEqual(self.keeper.writes, 2)
        self.assertEqual(saved(self.path).images.size, 100)
        self.h.clock.advance(10 * OWNER_WRITE_DELAY)
        self.assertEqual(self.keeper.writes, 2)  # nothing changed, nothing written

    def test_a_fleet_change_does_not_wait_behind_an_owner_write(self) -> None:
        self.h.parts.jobs.videos.remember("v", "http://10.0.0.1:8000")
        self.h.pool.add("http://10.0.0.9:8000")
        self.h.clock.advance(0)
        self.assertEqual(self.keeper.writes, 2)
        self.assertEqual(saved(self.path).videos.size, 1)  # written with it
        self.h.clock.advance(OWNER_WRITE_DELAY)
        self.assertEqual(self.keeper.writes, 2)

    def test_stop_writes_what_is_pending(self) -> None:
        self.h.parts.jobs.images.remember("img", "http://10.0.0.1:8000", finished=True)
        self.keeper.stop()
        self.assertEqual(self.keeper.writes, 2)
        self.assertEqual(saved(self.path).images, Owners(finished=(("img", "http://10.0.0.1:8000"),)))

    def test_managed_workers_are_not_kept(self) -> None:
        d = Deferred.fromCoroutine(self.h.parts.fleet.worker_ready("http://10.0.0.7:8000"))
        self.h.pool.add("http://10.0.0.8:8000")
        self.h.pump()
        self.assertEqual(self.successResultOf(d).url, "http://10.0.0.7:8000")
        self.assertEqual(len(self.h.pool), 2)
        self.assertEqual(saved(self.path).workers, (WorkerRecord("http://10.0.0.8:8000"),))

    def test_a_failed_write_is_logged_and_the_next_change_tries_again(self) -> None:
        broken = [True]

        def replace(src: str, dst: str) -> None:
            if broken[0]:
                raise OSError(28, "No space left on device")
            os.replace(src, dst)

        path = temp_dir(self)
        h = RouterHarness(Fleet())
        keeper = keeper_for(h, path, StateFile(FilePath(str(path)), replace=replace))
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        keeper.start()  # does not raise: the router keeps serving
        self.assertEqual(keeper.writes, 0)
        self.assertTrue(any(e.get("reason") == "No space left on device" for e in logged))
        broken[0] = False
        h.pool.add("http://10.0.0.1:8000")
        h.clock.advance(0)
        self.assertEqual(keeper.writes, 1)
        self.assertEqual(saved(path).workers, (WorkerRecord("http://10.0.0.1:8000"),))

    def test_owner_maps_are_restored_within_their_bound(self) -> None:
        h = RouterHarness(Fleet(), max_image_ids=3)
        keeper = keeper_for(h, temp_dir(self))
        running = tuple((f"run-{i}", "http://10.0.0.1:8000") for i in range(5))
        finished = tuple((f"done-{i}", "http://10.0.0.1:8000") for i in range(5))
        keeper.restore(StateDocument(images=Owners(running, finished)))
        # Finished items are evicted first, as in memory: the running ones keep their owner.
        self.assertEqual(keeper.snapshot().images, Owners(running[-2:], finished[-1:]))

