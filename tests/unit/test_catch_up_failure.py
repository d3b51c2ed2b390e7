"""
A failed catch-up keeps the worker out of rotation: a second test,
independent of test_rl_control's (a newly registered worker that refuses the
update), for a worker woken behind the fleet whose catch-up gets no answer.
"""

from __future__ import annotations

from tests.support.deferreds import success_result_of
from tests.support.fleet import make_router


def test_a_woken_worker_whose_catch_up_gets_no_answer_is_quarantined_and_never_served() -> None:
    h, (w0, w1) = make_router(2, weight_update_timeout=30)
    sleeper = h.pool.workers()[1]
    sleeper.is_sleeping = True  # it alone was put to sleep: only w0 is refitted
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/9", "weight_version": "9"})
    assert code == 200 and [r["worker_url"] for r in body["results"]] == [h.pool.workers()[0].url]

    w1.hold(b"POST", b"/update_weights_from_disk")  # the catch-up will hang
    code, body = h.json("POST", "/resume_memory_occupation", json={})
    assert code == 200 and body["catching_up"] == [sleeper.url]
    h.pump()
    assert sleeper.state == "syncing"
    served = set()
    for _ in range(4):
        code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
        assert code == 200
        served.add(response.headers.getRawHeaders(b"x-worker-id")[0])
        assert response.headers.getRawHeaders(b"x-weight-version") == [b"9"]
    assert served == {b"w0"}

    h.clock.advance(30)  # --weight-update-timeout
    h.pump()
    assert sleeper.is_dead and "catch-up to weight version 9 failed" in (sleeper.dead_reason or "")
    assert (sleeper.weight_version, sleeper.weights_seq, sleeper.model_path) == (None, None, None)
    _, listing = h.json("GET", "/workers")
    assert [w["state"] for w in listing["workers"]] == ["ready", "dead"]
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert success_result_of(d).headers.getRawHeaders(b"x-worker-id") == [b"w0"]
