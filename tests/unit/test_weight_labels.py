"""
A weight-version label names one checkpoint (issue 8 point 10): the pure
bookkeeping, and the refit call that refuses a reused label with 409.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.web.server import Request

from tests.support.fleet import FakeWorker, RouterHarness, json_answer, make_router
from twisted_router.labels import WeightLabels


def refits(worker: FakeWorker) -> int:
    return sum(1 for s in worker.seen if s.request.path == b"/update_weights_from_disk")


def refit(h: RouterHarness, model_path: str, version: Any = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"model_path": model_path}
    if version is not None:
        body["weight_version"] = version
    return h.json("POST", "/update_weights_from_disk", json=body)


# -- the bookkeeping -----------------------------------------------------------------


def test_a_new_label_and_the_same_checkpoint_again_are_fine() -> None:
    labels = WeightLabels()
    assert labels.conflict("1", "/ckpt/a") is None
    labels.record("1", "/ckpt/a")
    assert labels.conflict("1", "/ckpt/a") is None
    assert labels.conflict("2", "/ckpt/b") is None


def test_a_label_reused_for_another_checkpoint_is_a_conflict_naming_both() -> None:
    labels = WeightLabels()
    labels.record("1", "/ckpt/a")
    reason = labels.conflict("1", "/ckpt/b")
    assert reason is not None and "'/ckpt/a'" in reason and "'/ckpt/b'" in reason


def test_the_start_up_label_is_never_free() -> None:
    assert WeightLabels().conflict("0", "/ckpt/a") is not None


def test_the_counter_skips_labels_that_name_other_checkpoints() -> None:
    labels = WeightLabels()
    labels.record("2", "/ckpt/a")
    labels.record("3", "/ckpt/b")
    assert labels.next_free(2, "/ckpt/c") == "4"
    assert labels.next_free(2, "/ckpt/a") == "2"
    assert labels.next_free(1, "/ckpt/c") == "1"


# -- through the router --------------------------------------------------------------


def test_reusing_a_label_for_a_different_checkpoint_is_409_and_touches_no_worker() -> None:
    h, workers = make_router(2)
    assert refit(h, "/ckpt/a", "v1")[0] == 200
    sent = [refits(w) for w in workers]
    code, body = refit(h, "/ckpt/b", "v1")
    assert code == 409
    assert body["error"] == (
        "weight_version 'v1' already names checkpoint '/ckpt/a'; a refit to '/ckpt/b' "
        "needs a new weight_version so that samples from the two can be told apart"
    )
    assert [refits(w) for w in workers] == sent, "a refused refit reached a worker"
    assert h.json("GET", "/health")[1]["weight_version"] == "v1"
    assert h.json("GET", "/health")[1]["model_path"] == "/ckpt/a"
    assert all(w.routable for w in h.pool.workers())


def test_an_integer_label_and_its_string_are_the_same_label() -> None:
    h, _ = make_router(1)
    assert refit(h, "/ckpt/a", 7)[0] == 200
    assert refit(h, "/ckpt/b", "7")[0] == 409


def test_repeating_the_same_refit_with_the_same_label_is_allowed() -> None:
    """A trainer retrying a refit (after a 502, or a lost answer) must not be refused."""
    h, (w0,) = make_router(1)
    assert refit(h, "/ckpt/a", "5")[0] == 200
    code, body = refit(h, "/ckpt/a", "5")
    assert (code, body["weight_version"], body["success"]) == (200, "5", True)
    assert refits(w0) == 2


def test_label_zero_is_refused_it_means_start_up_weights() -> None:
    h, (w0,) = make_router(1)
    code, body = refit(h, "/ckpt/a", 0)
    assert code == 409 and "started with" in body["error"]
    assert refits(w0) == 0


def test_an_unlabelled_refit_never_takes_a_label_naming_another_checkpoint() -> None:
    h, _ = make_router(1)
    assert refit(h, "/ckpt/a", "2")[1]["weight_version"] == "2"
    code, body = refit(h, "/ckpt/b")  # the counter says 2, which names /ckpt/a
    assert (code, body["weight_version"]) == (200, "3")


def test_a_label_of_a_refit_every_worker_rejected_stays_free() -> None:
    """Only refits the fleet applied claim a label: a rejected one changed nothing."""
    h, (w0,) = make_router(1)

    def reject(request: Request) -> bytes:
        return json_answer(request, 400, {"success": False, "message": "no such checkpoint"})

    w0.on(b"POST", b"/update_weights_from_disk", reject)
    assert refit(h, "/ckpt/typo", "9")[0] == 502
    del w0.handlers[(b"POST", b"/update_weights_from_disk")]
    assert refit(h, "/ckpt/right", "9")[0] == 200


@pytest.mark.parametrize("first", ["/ckpt/a", "/ckpt/b"])
def test_a_refused_label_leaves_the_next_refit_free_to_use_it_correctly(first: str) -> None:
    h, _ = make_router(1)
    assert refit(h, first, "x")[0] == 200
    other = "/ckpt/b" if first == "/ckpt/a" else "/ckpt/a"
    assert refit(h, other, "x")[0] == 409
    assert refit(h, other, "y")[0] == 200
