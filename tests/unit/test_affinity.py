"""Tests for L{twisted_router.affinity}: the bounded sticky-routing map."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_router.affinity import FINISHED_STATES, OwnerMap

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OwnerMap(0)
    with pytest.raises(ValueError):
        OwnerMap(-1)
    assert len(OwnerMap(1)) == 0


def test_remember_and_look_up() -> None:
    owners = OwnerMap(10)
    owners.remember("job-1", A)
    owners.remember("job-2", B, finished=True)
    assert owners.owner("job-1") == A
    assert owners.owner("job-2") == B
    assert owners.owner("job-3") is None
    assert "job-1" in owners
    assert "job-2" in owners
    assert "job-3" not in owners
    assert 42 not in owners
    assert len(owners) == 2


def test_bounded_oldest_goes_first() -> None:
    owners = OwnerMap(3)
    for i in range(5):
        owners.remember(f"job-{i}", A)
    assert len(owners) == 3
    assert [f"job-{i}" in owners for i in range(5)] == [False, False, True, True, True]


def test_finished_entries_are_evicted_before_running_ones() -> None:
    owners = OwnerMap(3)
    owners.remember("running-old", A)
    owners.remember("finished", B, finished=True)
    owners.remember("running-new", A)
    owners.remember("newest", B)
    # The finished one goes, although "running-old" is older.
    assert "finished" not in owners
    assert {"running-old", "running-new", "newest"} == {
        i for i in ("running-old", "running-new", "newest") if i in owners
    }
    assert len(owners) == 3


def test_oldest_finished_is_evicted_first() -> None:
    owners = OwnerMap(3)
    owners.remember("f1", A, finished=True)
    owners.remember("f2", A, finished=True)
    owners.remember("r1", B)
    owners.remember("r2", B)
    assert "f1" not in owners
    assert "f2" in owners
    owners.remember("r3", B)
    assert "f2" not in owners
    assert all(i in owners for i in ("r1", "r2", "r3"))


def test_running_entries_are_evicted_oldest_first_when_nothing_finished() -> None:
    owners = OwnerMap(2)
    owners.remember("r1", A)
    owners.remember("r2", A)
    owners.remember("r3", B)
    assert "r1" not in owners
    assert owners.owner("r2") == A
    assert owners.owner("r3") == B


def test_forget() -> None:
    owners = OwnerMap(3)
    owners.remember("r", A)
    owners.remember("f", B, finished=True)
    owners.forget("r")
    owners.forget("f")
    owners.forget("never-known")
    assert len(owners) == 0
    assert owners.owner("r") is None
    assert owners.owner("f") is None


def test_remember_again_moves_the_entry_and_its_owner() -> None:
    owners = OwnerMap(2)
    owners.remember("a", A)
    owners.remember("b", A)
    owners.remember("a", B)  # refreshed: now the newest, with a new owner
    assert len(owners) == 2
    owners.remember("c", A)
    assert "b" not in owners
    assert owners.owner("a") == B


def test_remember_finished_moves_a_running_entry_to_finished() -> None:
    owners = OwnerMap(2)
    owners.remember("a", A)
    owners.remember("b", A)
    owners.remember("b", A, finished=True)
    assert len(owners) == 2
    owners.remember("c", B)
    assert "b" not in owners
    assert "a" in owners


def test_remember_running_again_moves_a_finished_entry_back() -> None:
    owners = OwnerMap(2)
    owners.remember("a", A, finished=True)
    owners.remember("b", A)
    owners.remember("a", A)  # running again (not finished)
    owners.remember("c", B)
    # Both were running; "b" is now the oldest.
    assert "b" not in owners
    assert "a" in owners and "c" in owners


def test_a_finished_entry_remembered_into_a_full_map_is_kept() -> None:
    """
    The entry just remembered is the one a client is about to ask for; it
    must survive its own insertion even when every other entry is running.
    """
    owners = OwnerMap(2)
    owners.remember("r1", A)
    owners.remember("r2", A)
    owners.remember("done", B, finished=True)
    assert owners.owner("done") == B
    assert len(owners) == 2
    assert "r2" in owners  # the oldest running entry made room


def test_capacity_one_keeps_the_latest() -> None:
    owners = OwnerMap(1)
    owners.remember("r", A)
    owners.remember("f", B, finished=True)
    assert list(filter(owners.__contains__, ["r", "f"])) == ["f"]
    owners.remember("r2", A)
    assert list(filter(owners.__contains__, ["r", "f", "r2"])) == ["r2"]


def test_finished_states() -> None:
    assert {"completed", "failed", "cancelled"} <= FINISHED_STATES
    assert "queued" not in FINISHED_STATES
    assert "in_progress" not in FINISHED_STATES


# -- properties -------------------------------------------------------------------

_ids = st.sampled_from([f"id-{i}" for i in range(12)])
_urls = st.sampled_from([A, B, "http://10.0.0.3:30000"])
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("remember"), _ids, _urls, st.booleans()),
        st.tuples(st.just("forget"), _ids),
    ),
    max_size=60,
)


@given(capacity=st.integers(min_value=1, max_value=6), operations=_operations)
def test_never_exceeds_capacity_and_keeps_the_most_recent(
    capacity: int, operations: list[tuple[object, ...]]
) -> None:
    owners = OwnerMap(capacity)
    for op in operations:
        if op[0] == "remember":
            _, item_id, url, finished = op
            assert isinstance(item_id, str) and isinstance(url, str) and isinstance(finished, bool)
            owners.remember(item_id, url, finished=finished)
            assert owners.owner(item_id) == url, "the most recent entry was evicted"
        else:
            owners.forget(str(op[1]))
            assert str(op[1]) not in owners
        assert 0 <= len(owners) <= capacity


@given(
    capacity=st.integers(min_value=1, max_value=6),
    finished=st.integers(min_value=0, max_value=10),
    running=st.integers(min_value=0, max_value=10),
)
def test_finished_entries_make_room_for_running_ones(
    capacity: int, finished: int, running: int
) -> None:
    """Finished entries are evicted (oldest first) before any running entry."""
    owners = OwnerMap(capacity)
    for i in range(finished):
        owners.remember(f"f{i}", B, finished=True)
    for i in range(running):
        owners.remember(f"r{i}", A)
    kept_running = [i for i in range(running) if f"r{i}" in owners]
    kept_finished = [i for i in range(finished) if f"f{i}" in owners]
    assert len(kept_running) == min(capacity, running)
    assert kept_running == list(range(running - len(kept_running), running))
    assert len(kept_finished) == min(finished, capacity - len(kept_running))
    assert kept_finished == list(range(finished - len(kept_finished), finished))
