"""
L{twisted_router.jobs.merge_job_lists}: the pure merge of the workers' job
lists (the HTTP side is covered through the router in C{test_app}).
"""

from __future__ import annotations

from typing import Any

from twisted_router.jobs import merge_job_lists


def page(*jobs: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {"object": "list", **extra, "data": [{"id": i, "created_at": t} for i, t in jobs],
            "first_id": "x", "last_id": "y", "has_more": True}


def ids(answer: dict[str, Any]) -> list[str]:
    return [job["id"] for job in answer["data"]]


def test_newest_first_across_workers_with_page_fields_recomputed() -> None:
    answer = merge_job_lists([page(("a1", 1), ("a3", 3)), page(("b2", 2))], "desc", None, None)
    assert ids(answer) == ["a3", "b2", "a1"]
    assert (answer["first_id"], answer["last_id"], answer["has_more"]) == ("a3", "a1", False)
    assert answer["object"] == "list"


def test_ascending_keeps_each_workers_same_second_order() -> None:
    answer = merge_job_lists([page(("a", 1), ("b", 1)), page(("c", 1))], "asc", None, None)
    assert ids(answer) == ["a", "b", "c"]


def test_after_and_limit_apply_to_the_merged_list() -> None:
    pages = [page(("a1", 1), ("a3", 3)), page(("b2", 2), ("b4", 4))]
    answer = merge_job_lists(pages, "desc", "b4", 2)
    assert ids(answer) == ["a3", "b2"] and answer["has_more"] is True
    assert merge_job_lists(pages, "desc", "unknown", None)["data"] == []


def test_entries_that_are_not_objects_and_odd_times_are_tolerated() -> None:
    odd = {"object": "list", "data": ["junk", {"id": "t", "created_at": True}, {"id": "n"}]}
    answer = merge_job_lists([odd, page(("z", 5))], "desc", None, None)
    assert ids(answer) == ["z", "t", "n"]  # a non-number time sorts as 0


def test_no_pages_is_an_empty_list() -> None:
    assert merge_job_lists([], "desc", None, 10) == {
        "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False
    }
