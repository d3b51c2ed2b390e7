"""A refit every worker rejects before loading must not quarantine the fleet (review finding)."""

from __future__ import annotations

import json

import pytest
from twisted.web.server import Request

from tests.support.fleet import Fleet, RouterHarness, json_answer

# --------------------------------------------------------------------------- refit path


def _real_update(request: Request) -> bytes:
    """POST /update_weights_from_disk as a real worker answers it (docs/worker-api.md §5.1)."""
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw)
    except ValueError:
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Internal Server Error"
    if not isinstance(body, dict) or not body.get("model_path"):
        return json_answer(request, 400, {"success": False, "message": "model_path is required"})
    return json_answer(request, 200, {"success": True, "message": "Updated 3 modules (transformer, vae, text_encoder)."})


@pytest.mark.parametrize("body", [b"", b"{}", b'{"target_modules": ["vae"]}'])
def test_a_refit_without_model_path_does_not_quarantine_the_whole_fleet(body: bytes) -> None:
    """
    A refit whose body has no C{model_path} (a controller bug, or C{curl -X
    POST} with no body) is refused by every real worker *before* it touches
    its weights (400 "model_path is required", or a plain 500 for an empty
    body). The router still treats each refusal as a failed refit and
    quarantines every worker: one malformed call takes the whole fleet out,
    and launched workers stay out until an operator re-admits each one.
    The router should refuse the call itself (400), or at least not
    quarantine workers whose weights are provably unchanged.
    """
    fleet = Fleet()
    h = RouterHarness(fleet)
    for i in range(3):
        url, worker = fleet.add(f"w{i}")
        worker.on(b"POST", b"/update_weights_from_disk", _real_update)
        h.register(url)
    code, _, _ = h.call("POST", "/update_weights_from_disk", data=body,
                        headers={b"content-type": [b"application/json"]})
    dead = [w.url for w in h.pool.workers() if w.is_dead]
    assert not dead, f"router answered {code} and quarantined every worker: {dead}"
    assert code == 400


