"""
Regression tests from a critical review of the router core (control plane,
dispatch, proxy, admin API, site). Each test pins one defect; they run in
memory on the fake fleet of L{tests.support.fleet}.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.server import Request

from tests.support.deferreds import failure_result_of, success_result_of
from tests.support.fleet import FakeWorker, RouterHarness, json_answer
from tests.support.fleet import make_router as make
from twisted_router.site import RouterSite


def update_bodies(worker: FakeWorker) -> list[bytes]:
    return [s.body for s in worker.seen if s.request.path == b"/update_weights_from_disk"]


def count(worker: FakeWorker, path: bytes) -> int:
    return sum(1 for s in worker.seen if s.request.path == path)


def answer(request: Request, payload: dict[str, Any]) -> None:
    """Finish a held worker request, if the router is still connected to it."""
    if request.channel is None:
        return
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(payload).encode())
    request.finish()


def refuse_release(request: Request) -> bytes:
    # What a real worker answers when offloading fails (docs/worker-api.md §5.3).
    return json_answer(
        request, 400, {"success": False, "sleeping": False, "message": "offload failed; rolled back to keep state"}
    )


def generate(h: RouterHarness) -> tuple[int, str | None, str | None]:
    code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    served = response.headers.getRawHeaders(b"x-worker-id")
    version = response.headers.getRawHeaders(b"x-weight-version")
    return code, served[0].decode() if served else None, version[0].decode() if version else None


def raw_exchange(h: RouterHarness, data: bytes, *, max_request_body: int = 1 << 20) -> StringTransport:
    """Feed raw bytes to the router's real Site and return the client transport."""
    site = RouterSite(
        h.parts.router.app.resource(), access_log=False, reactor=h.clock, max_request_body=max_request_body
    )
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    h.pump()
    return transport


# ---------------------------------------------------------------- control plane vs. the invariant


def test_worker_syncing_when_a_release_is_refused_is_still_caught_up_before_traffic() -> None:
    """
    control.py _busy_broadcast resets every target's activity to None, wiping
    the SYNCING mark of a worker admitted while the lock was held. If that
    worker refuses the sleep, it is awake, routable, and never caught up.
    """
    h, (w0,) = make(1)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    w0.hold(b"POST", b"/release_memory_occupation")
    first = h.client.post("http://router/release_memory_occupation", json={})
    h.pump()
    second = h.client.post("http://router/release_memory_occupation", json={})  # queued on the lock
    h.pump()
    url, late = h.fleet.add("late")
    late.on(b"POST", b"/release_memory_occupation", refuse_release)
    _, body = h.json("POST", "/workers", json={"url": url})
    # Joins while a sleep runs: whether it joins asleep is decided under the lock (it is behind, too).
    assert body["worker"]["state"] == "joining"
    answer(w0.held.pop(), {"success": True, "sleeping": True, "message": "released"})
    h.pump()
    assert success_result_of(first).code == success_result_of(second).code == 200

    code, served, version = generate(h)
    assert code == 200 and served == "late"
    assert [json.loads(b) for b in update_bodies(late)] == [{"model_path": "/ckpt/1"}], "served before catch-up"
    assert version == "1"


@pytest.mark.parametrize("path", [b"/update_weights_from_disk", b"/release_memory_occupation"])
def test_controller_that_disconnects_mid_broadcast_does_not_get_the_fleet_quarantined(path: bytes) -> None:
    """
    Klein cancels the route when the client goes away; the cancellation reaches
    WorkerCaller.fan_out, whose DeferredList turns it into one status-less
    reply per worker, and the controller quarantines every target.
    """
    h, workers = make(2)
    for w in workers:
        w.hold(b"POST", path)
    d = h.client.post("http://router" + path.decode(), json={"model_path": "/ckpt/1"})
    h.pump()
    assert [len(w.held) for w in workers] == [1, 1]
    d.cancel()  # e.g. the RL controller's HTTP timeout, or Ctrl-C
    failure_result_of(d, CancelledError, ResponseNeverReceived)
    h.pump()
    for w in workers:
        for request in w.held:
            answer(request, {"success": True, "sleeping": path == b"/release_memory_occupation"})
    h.pump()
    assert [(w.is_dead, w.dead_reason) for w in h.pool.workers()] == [(False, None), (False, None)]


@pytest.mark.parametrize("control", ["/update_weights_from_disk", "/release_memory_occupation"])
def test_request_queued_for_a_connection_slot_never_reaches_a_busy_or_sleeping_worker(control: str) -> None:
    """
    _dispatch checks routability when it picks the worker, but the proxy may
    then wait for a per-worker slot (--max-connections); a refit or sleep that
    starts meanwhile does not stop the request from being sent afterwards.
    """
    h, (w0,) = make(1, max_connections=1)
    w0.hold(b"POST", b"/v1/images/generations")
    w0.hold(b"POST", b"/update_weights_from_disk")
    h.client.post("http://router/v1/images/generations", json={"prompt": "a"})
    h.pump()
    h.client.post("http://router/v1/images/generations", json={"prompt": "b"})  # waits for w0's only slot
    h.pump()
    assert count(w0, b"/v1/images/generations") == 1
    h.client.post("http://router" + control, json={"model_path": "/ckpt/1"})
    h.pump()
    worker = h.pool.workers()[0]
    assert not worker.routable  # updating weights, or asleep
    answer(w0.held.pop(0), {"id": "a", "data": []})  # the first generation ends: its slot frees up
    h.pump()
    assert not worker.routable
    assert count(w0, b"/v1/images/generations") == 1, f"generation sent to a worker that is {worker.state}"


def test_worker_that_slept_through_a_refit_is_caught_up_even_if_version_labels_collide() -> None:
    """
    Freshness is judged by comparing version labels (control.py _sleep_or_wake,
    _update's "joined"), but labels come from the client and the counter can
    produce one already used: an explicit "2", then an unlabelled refit, was "2" again.
    (Since issue 8 the counter skips a label that names another checkpoint, and
    a label may repeat only for the same checkpoint; freshness still never
    compares labels.)
    """
    h, (w0, w1) = make(2)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/A", "weight_version": "2"})
    w0.on(b"POST", b"/release_memory_occupation", refuse_release)
    h.json("POST", "/release_memory_occupation", json={})  # only w1 goes to sleep
    assert [w.is_sleeping for w in h.pool.workers()] == [False, True]
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/B"})
    assert code == 200 and body["weight_version"] == "3"  # counter 2 would collide with the label "2"
    h.json("POST", "/resume_memory_occupation", json={})
    h.pump()
    assert json.loads(update_bodies(w1)[-1])["model_path"] == "/ckpt/B", "w1 still holds /ckpt/A"


def test_managed_worker_restarted_while_asleep_is_known_to_be_awake() -> None:
    """
    A restarted process is awake (holding GPU memory), but worker_ready keeps
    is_sleeping=True, so the next release skips it ("already sleeping") while
    the trainer needs that memory.
    """
    h, (w0, _) = make(2)
    h.json("POST", "/release_memory_occupation", json={})
    fleet = h.parts.fleet
    fleet.worker_lost("http://w0:8000", "process exited with status 9")
    before = count(w0, b"/release_memory_occupation")
    d = Deferred.fromCoroutine(fleet.worker_ready("http://w0:8000"))
    h.pump()
    success_result_of(d)
    _, body = h.json("POST", "/release_memory_occupation", json={})
    # Put to sleep as it rejoins the sleeping fleet, so the second release rightly skips it.
    assert count(w0, b"/release_memory_occupation") == before + 1, body
    assert h.pool.get("http://w0:8000").is_sleeping  # type: ignore[union-attr]


def test_removing_the_only_busy_worker_answers_waiting_requests_at_once() -> None:
    """Waiters are only woken by the control plane; DELETE /workers does not notify them."""
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/update_weights_from_disk")
    h.client.post("http://router/update_weights_from_disk", json={"model_path": "/x"})
    h.pump()
    gen = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    code, _ = h.json("DELETE", "/workers/http%3A%2F%2Fw0%3A8000")
    assert code == 200
    h.pump()  # no clock advance: nothing is left to wait for
    response = success_result_of(gen)
    assert response.code == 503


# ---------------------------------------------------------------- HTTP surface


NESTED = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("path", "task_type", "worker_answer"),
    [
        (b"/v1/videos", "T2V", NESTED),  # _parse_json raises RecursionError
        (b"/v1/videos", "T2V", b'{"id": "job-1", "status": ["queued"]}'),  # unhashable status in _learn_job
        (b"/v1/images/generations", "T2I", b'{"id": "img-1", "data": 5}'),  # _learn_images iterates an int
    ],
)
def test_post_processing_a_worker_answer_never_appends_bytes_to_it(
    path: bytes, task_type: str, worker_answer: bytes
) -> None:
    """
    After the worker's answer has been streamed, the handler parses it to learn
    ids; an exception there reaches the catch-all error handler, which writes a
    500 JSON body after the worker's complete one (desyncing keep-alive).
    """
    h, (w0,) = make(1)
    h.pool.workers()[0].task_type = task_type

    def odd(request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return worker_answer

    w0.on(b"POST", path, odd)
    body = b'{"prompt": "x"}'
    transport = raw_exchange(
        h,
        b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path, len(body), body),
    )
    _, _, sent = transport.value().partition(b"\r\n\r\n")
    assert sent == worker_answer


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/workers"),
        ("POST", "/add_worker"),
        ("POST", "/remove_worker"),
        ("PUT", "/workers/http%3A%2F%2Fw0%3A8000"),
        ("POST", "/update_weights_from_disk"),
    ],
)
def test_deeply_nested_json_body_is_a_400_not_a_500(method: str, path: str) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting."""
    h, _ = make(1)
    code, body = h.json(method, path, data=b"[" * 100_000 + b"]" * 100_000)
    assert code == 400 and body["error"].startswith("Invalid JSON body")


def test_oversized_body_with_expect_100_continue_is_refused_before_the_upload() -> None:
    """
    BoundedRequest.gotLength knows the body is too large: the client gets the
    413 instead of Twisted's 100 Continue, so it never uploads the body.
    """
    h, (w0,) = make(1)
    site = RouterSite(h.parts.router.app.resource(), access_log=False, reactor=h.clock, max_request_body=10)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    h.pump()
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    assert b"--max-request-body" in answer
    assert transport.disconnecting  # no body is on its way: closed at once
    assert not any(seen.request.path == b"/v1/images/generations" for seen in w0.seen)


@pytest.mark.parametrize(
    "path", ["/v1/images/%2F%0A/content", "/v1/videos/%2F%0A/content", "/v1/videos/%2F%0A"]
)
def test_a_path_werkzeug_would_redirect_is_a_400_not_a_500(path: str) -> None:
    """An encoded slash leaving an empty segment made werkzeug raise RequestRedirect, answered 500."""
    h, _ = make(1)
    code, body = h.json("GET", path)
    assert code == 400 and "encoded slash" in body["error"]
