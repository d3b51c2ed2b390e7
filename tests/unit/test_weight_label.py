"""
X-Weight-Version is the version the worker held when the request was sent,
not the fleet's or the worker's version when the answer comes back: a
generation in flight across a refit was made on the old weights.
"""

from __future__ import annotations

import json

from tests.support.deferreds import success_result_of
from tests.support.fleet import make_router


def test_a_generation_in_flight_across_a_refit_carries_the_version_at_send_time() -> None:
    h, (w0,) = make_router(1)
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    [held] = w0.held

    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/m", "weight_version": "v1"})
    assert code == 200 and body["weight_version"] == "v1"
    worker = h.pool.workers()[0]
    assert worker.weight_version == "v1" and h.parts.control.version == "v1"

    held.setHeader(b"content-type", b"application/json")
    held.write(json.dumps({"data": []}).encode())
    held.finish()
    h.pump()
    response = success_result_of(d)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-weight-version") == [b"0"]

    # A request sent after the refit is labelled with the new version.
    w0.handlers.clear()
    _, _, after = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert after.headers.getRawHeaders(b"x-weight-version") == [b"v1"]
