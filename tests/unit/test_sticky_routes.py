"""
Sticky routes (video poll, delete and content, image content): the worker that
holds the item answers, the in-flight lease is released on every path, and an
id the router does not know (a restart) is found by asking the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.web._newclient import ResponseNeverReceived

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.fleet import FakeWorker, Fleet, RouterHarness

TIMEOUT = 30.0


@dataclass(frozen=True)
class Route:
    name: str
    task_type: str
    method: str
    #: (router path, worker path) for an item id
    paths: Callable[[str], tuple[str, str]]

    def create(self, h: RouterHarness) -> str:
        if self.task_type == "T2V":
            code, body = h.json("POST", "/v1/videos", json={"prompt": "waves"})
        else:
            code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        assert code == 200
        return str(body["id"])


ROUTES = [
    Route("video poll", "T2V", "GET", lambda i: (f"/v1/videos/{i}", f"/v1/videos/{i}")),
    Route("video poll by query", "T2V", "GET", lambda i: (f"/v1/videos?video_id={i}", f"/v1/videos/{i}")),
    Route("video delete", "T2V", "DELETE", lambda i: (f"/v1/videos/{i}", f"/v1/videos/{i}")),
    Route("video content", "T2V", "GET", lambda i: (f"/v1/videos/{i}/content", f"/v1/videos/{i}/content")),
    Route("image content", "T2I", "GET", lambda i: (f"/v1/images/{i}/content", f"/v1/images/{i}/content")),
]


def setup(route: Route) -> tuple[RouterHarness, FakeWorker, str, str, str]:
    fleet = Fleet()
    h = RouterHarness(fleet, timeout=TIMEOUT)
    url, worker = fleet.add("w0", task_type=route.task_type)
    h.register(url)
    item = route.create(h)
    router_path, worker_path = route.paths(item)
    return h, worker, url, router_path, worker_path


def start(h: RouterHarness, route: Route, path: str) -> Deferred[object]:
    d: Deferred[object] = h.client.request(route.method, "http://router" + path)
    h.pump()
    return d


def in_flight(h: RouterHarness) -> int:
    return sum(w.active_requests for w in h.pool.workers())


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_success_releases_the_lease(route: Route) -> None:
    h, _, _, path, _ = setup(route)
    code, _, _ = h.call(route.method, path)
    assert code == 200
    assert in_flight(h) == 0


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_unreachable_owner_is_502_and_releases_the_lease(route: Route) -> None:
    h, _, url, path, _ = setup(route)
    h.fleet.down.add(url.removeprefix("http://"))
    code, body, _ = h.call(route.method, path)
    assert code == 502 and body.startswith(b'{"error": "Worker request failed: w0:8000')
    assert in_flight(h) == 0
    assert h.pool.workers()[0].failed_requests == 1


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_owner_timing_out_is_504_and_releases_the_lease(route: Route) -> None:
    h, worker, _, path, worker_path = setup(route)
    worker.hold(route.method.encode(), worker_path.encode())
    d = start(h, route, path)
    assert in_flight(h) == 1
    h.clock.advance(TIMEOUT + 1)
    h.pump()
    response = success_result_of(d)
    assert response.code == 504  # type: ignore[attr-defined]
    assert in_flight(h) == 0


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_owner_stalling_mid_answer_releases_the_lease(route: Route) -> None:
    h, worker, _, path, worker_path = setup(route)
    worker.hold(route.method.encode(), worker_path.encode())
    d = start(h, route, path)
    [held] = worker.held
    held.setHeader(b"content-length", b"1000")
    held.write(b"the first bytes of 1000")
    h.pump()
    assert in_flight(h) == 1
    h.clock.advance(TIMEOUT + 1)  # nothing more comes: the answer broke off
    h.pump()
    d.addErrback(lambda _: None)  # the client sees a cut connection, never a complete-looking body
    assert in_flight(h) == 0
    assert h.pool.workers()[0].failed_requests == 1


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_client_going_away_releases_the_lease(route: Route) -> None:
    h, worker, _, path, worker_path = setup(route)
    worker.hold(route.method.encode(), worker_path.encode())
    d = start(h, route, path)
    assert_no_result(d)
    assert in_flight(h) == 1
    d.cancel()
    failure_result_of(d, CancelledError, ResponseNeverReceived)
    h.pump()
    assert in_flight(h) == 0
    assert not h.pool.workers()[0].is_dead


# ---------------------------------------------------------------- image owners after a restart


def restarted_router(fleet: Fleet, urls: list[str]) -> RouterHarness:
    """A new router over the same workers: it remembers no image id."""
    h = RouterHarness(fleet, timeout=TIMEOUT)
    for url in urls:
        h.register(url)
    return h


def test_image_id_survives_a_router_restart() -> None:
    fleet = Fleet()
    first = RouterHarness(fleet, timeout=TIMEOUT, routing_algorithm="round-robin")
    urls = []
    for name in ("w0", "w1"):
        url, _ = fleet.add(name)
        first.register(url)
        urls.append(url)
    ids = [first.json("POST", "/v1/images/generations", json={"prompt": "x"})[1]["id"] for _ in range(2)]
    assert {i.split("-")[0] for i in ids} == {"w0", "w1"}

    h = restarted_router(fleet, urls)
    for image_id in ids:
        code, content, response = h.call("GET", f"/v1/images/{image_id}/content")
        assert code == 200, content
        assert content == f"JPEG:/v1/images/{image_id}/content".encode()
        assert response.headers.getRawHeaders(b"x-worker-id") == [image_id.split("-")[0].encode()]
    assert in_flight(h) == 0

    # Found once, remembered: the next download goes straight to the owner, nobody else is asked.
    w0, w1 = fleet.workers["w0:8000"], fleet.workers["w1:8001"]
    seen = (len(w0.seen), len(w1.seen))
    code, _, _ = h.call("GET", f"/v1/images/{ids[1]}/content")
    assert code == 200
    owner_is_w1 = ids[1].startswith("w1")
    assert (len(w0.seen), len(w1.seen)) == (seen[0] + (not owner_is_w1), seen[1] + owner_is_w1)


def test_image_id_nobody_holds_is_404_after_asking_every_image_worker() -> None:
    fleet = Fleet()
    urls = [fleet.add(name)[0] for name in ("w0", "w1")]
    video_url, video = fleet.add("v0", task_type="T2V")
    h = restarted_router(fleet, [*urls, video_url])
    code, body = h.json("GET", "/v1/images/gone/content")
    assert (code, body) == (404, {"error": "Unknown image_id: gone"})
    for name in ("w0:8000", "w1:8001"):
        assert b"/v1/images/gone/content" in [s.uri for s in fleet.workers[name].seen]
    assert not any(s.uri.startswith(b"/v1/images/") for s in video.seen)  # video workers make no images
    assert in_flight(h) == 0


def test_image_lookup_skips_dead_workers_and_survives_a_failing_one() -> None:
    fleet = Fleet()
    url0, _ = fleet.add("w0")
    url1, w1 = fleet.add("w1")
    first = RouterHarness(fleet)
    first.register(url1)
    image_id = first.json("POST", "/v1/images/generations", json={"prompt": "x"})[1]["id"]
    h = restarted_router(fleet, [url0, url1])
    fleet.down.add("w0:8000")  # refuses the lookup: not the owner, and no crash
    code, content, _ = h.call("GET", f"/v1/images/{image_id}/content")
    assert code == 200 and content.startswith(b"JPEG:")
    assert in_flight(h) == 0
