"""
The router in memory in front of simulated workers of each version
(docs/worker-api.md): warm-up, fleets without sleep/wake, msgpack rollouts,
Range downloads and the merged video list.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import TestCase

import msgpack
from twisted.internet.defer import Deferred

from tests.support.fleet import Fleet, RouterHarness
from twisted_router.pool import Activity
from twisted_router.simulator.app import SimulatedWorker
from twisted_router.simulator.model import TaskType


def _fleet_of_simulators(
    n: int, **config: Any
) -> tuple[RouterHarness, list[str], list[SimulatedWorker]]:
    """A router and C{n} simulated workers on the fleet's clock (not yet registered)."""
    fleet = Fleet()
    harness = RouterHarness(fleet, timeout=30.0)
    urls, sims = [], []
    for i in range(n):
        url, sim = fleet.add_simulator(f"sim{i}", **config)
        urls.append(url)
        sims.append(sim)
    return harness, urls, sims


def _finish(harness: RouterHarness, d: Deferred[Any], step: float = 0.01, limit: int = 10_000) -> Any:
    """Pump and advance the shared clock in small steps until C{d} fires."""
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(limit):
        harness.pump()
        if results:
            break
        harness.clock.advance(step)
    assert results, "no answer"
    return results[0]


def _call(harness: RouterHarness, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
    response = _finish(harness, harness.client.request(method, "http://router" + path, **kwargs))
    body = _finish(harness, harness.client.content(response))
    return response, body


def _post_json(harness: RouterHarness, path: str, body: Any) -> tuple[Any, bytes]:
    return _call(
        harness, "POST", path, data=json.dumps(body).encode(),
        headers={b"content-type": [b"application/json"]},
    )


class WarmUpTests(TestCase):
    def test_a_warming_worker_stays_starting_until_health_is_200(self) -> None:
        harness, (url,), _ = _fleet_of_simulators(1, api_version="upstream", warmup_seconds=20)
        worker, _ = harness.enroll(url)
        self.assertTrue(_finish(harness, Deferred.fromCoroutine(harness.parts.fleet.bring_up(worker))) is False)
        self.assertEqual(worker.activity, Activity.STARTING)
        self.assertFalse(worker.is_dead)
        # A health round during the warm-up: still starting, never quarantined.
        for _ in range(5):
            _finish(harness, harness.parts.health.check_all())
        self.assertEqual((worker.activity, worker.is_dead), (Activity.STARTING, False))
        harness.clock.advance(20)
        _finish(harness, harness.parts.health.check_all())
        self.assertIsNone(worker.activity)
        self.assertEqual(worker.task_type, "T2I")


class MissingEndpointTests(TestCase):
    def test_sleep_on_a_fleet_without_sleep_is_501_and_quarantines_nobody(self) -> None:
        harness, urls, _ = _fleet_of_simulators(
            2, disabled_endpoints=("/release_memory_occupation", "/resume_memory_occupation"),
        )
        for url in urls:
            harness.register(url)
        response, body = _post_json(harness, "/release_memory_occupation", {})
        answer = json.loads(body)
        self.assertEqual(response.code, 501)
        self.assertIn("every worker answered 404", answer["message"])
        self.assertEqual([w.is_dead or w.is_sleeping for w in harness.pool.workers()], [False, False])
        # The fleet still serves.
        response, _ = _post_json(harness, "/v1/images/generations", {"prompt": "x"})
        self.assertEqual(response.code, 200)


class MissingNativeEndpointTests(TestCase):
    def test_the_other_versions_native_endpoint_is_a_relayed_404(self) -> None:
        for version, missing in (("pinned", "/rollout/generate"), ("upstream", "/v1/diffusion/generate")):
            harness, urls, _ = _fleet_of_simulators(1, api_version=version)
            harness.register(urls[0])
            response, body = _post_json(harness, missing, {"prompt": "x", "seed": 1})
            self.assertEqual((response.code, json.loads(body)), (404, {"detail": "Not Found"}), version)
            self.assertEqual([w.is_dead for w in harness.pool.workers()], [False], version)


class RelayTests(TestCase):
    def test_msgpack_rollout_is_relayed_untouched_with_its_headers(self) -> None:
        harness, (url,), sims = _fleet_of_simulators(1, api_version="upstream")
        harness.register(url)
        response, body = _post_json(harness, "/rollout/generate", {
            "prompt": "x", "seed": 5, "width": 256, "height": 256, "num_inference_steps": 3,
            "num_outputs_per_prompt": 2, "rollout_return_dit_trajectory": True,
        })
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/msgpack"])
        timing = response.headers.getRawHeaders(b"x-sgld-timing")
        self.assertIsNotNone(timing)
        self.assertIsNotNone(response.headers.getRawHeaders(b"x-sgld-stages"))
        items = msgpack.unpackb(body)
        self.assertEqual(json.loads(timing[0])["request_id"], items[0]["request_id"])
        self.assertEqual([i["seed"] for i in items], [5, 5])
        self.assertEqual(len(items[1]["dit_trajectory"]["latents"]["data"]), 4 * 4 * 256 * 64)
        self.assertEqual(sims[0].state.served, 1)

    def test_range_downloads_are_relayed_as_206(self) -> None:
        harness, (url,), _ = _fleet_of_simulators(1, image_bytes=100_000)
        harness.register(url)
        _, created = _post_json(harness, "/v1/images/generations", {"prompt": "x"})
        content = json.loads(created)["data"][0]["url"]
        whole, whole_body = _call(harness, "GET", content)
        self.assertEqual((whole.code, len(whole_body)), (200, 100_000))
        self.assertEqual(whole.headers.getRawHeaders(b"accept-ranges"), [b"bytes"])
        part, part_body = _call(harness, "GET", content, headers={b"range": [b"bytes=1000-1999"]})
        self.assertEqual(part.code, 206)
        self.assertEqual(part_body, whole_body[1000:2000])
        self.assertEqual(part.headers.getRawHeaders(b"content-range"), [b"bytes 1000-1999/100000"])
        self.assertEqual(part.headers.getRawHeaders(b"etag"), whole.headers.getRawHeaders(b"etag"))


class MergedVideoListTests(TestCase):
    def test_merge_follows_the_worker_order_rules(self) -> None:
        harness, urls, _ = _fleet_of_simulators(2, task_type=TaskType.T2V)
        for url in urls:
            harness.register(url)
        ids = []
        for i in range(4):
            _, body = _post_json(harness, "/v1/videos", {"prompt": f"p{i}"})
            ids.append(json.loads(body)["id"])
        harness.clock.advance(2)
        _, body = _post_json(harness, "/v1/videos", {"prompt": "later"})
        later = json.loads(body)["id"]

        def listed(query: str) -> list[str]:
            response, body = _call(harness, "GET", "/v1/videos" + query)
            self.assertEqual(response.code, 200, body)
            return [job["id"] for job in json.loads(body)["data"]]

        ascending = listed("?order=ASC")
        self.assertEqual(ascending[-1], later)
        self.assertEqual(sorted(ascending[:-1]), sorted(ids))
        self.assertEqual(listed("?order=sideways")[0], later)
        self.assertEqual(listed("?order=DESC")[0], later)
        # Same-second jobs keep the same relative order both ways.
        self.assertEqual(listed("")[1:], ascending[:-1])
