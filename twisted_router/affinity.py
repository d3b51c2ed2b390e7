"""
Which worker owns which video job or image: the router's sticky-routing memory.

A real worker keeps its jobs and images in per-process memory, so a poll,
download or delete must reach the worker that made them. The map is bounded:
when it is full, the oldest I{finished} entries are forgotten first, and only
then the oldest unfinished ones, so a long RL run can never grow it without
limit while jobs still running keep their owner. A forgotten owner is not
fatal: the router can still find it by asking the workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

#: Job states after which the worker's answer will no longer change.
FINISHED_STATES = frozenset({"completed", "failed", "cancelled", "canceled", "expired"})


class OwnerMap:
    """A bounded C{id -> worker URL} map with finished-first eviction. Pure, no I/O."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._running: OrderedDict[str, str] = OrderedDict()
        self._finished: OrderedDict[str, str] = OrderedDict()
        #: Called after every change (the durable state saves the map, coalesced).
        self.on_change: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._running) + len(self._finished)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._running or item_id in self._finished

    def owner(self, item_id: str) -> str | None:
        """The URL of the worker that owns C{item_id}, or None when unknown."""
        return self._running.get(item_id) or self._finished.get(item_id)

    def remember(self, item_id: str, worker_url: str, *, finished: bool = False) -> None:
        """Record (or move) C{item_id}; evict the oldest entries beyond capacity."""
        self._running.pop(item_id, None)
        self._finished.pop(item_id, None)
        # Make room first, so the entry being remembered is never the one evicted.
        while len(self) >= self._capacity:
            (self._finished or self._running).popitem(last=False)
        (self._finished if finished else self._running)[item_id] = worker_url
        if self.on_change is not None:
            self.on_change()

    def forget(self, item_id: str) -> None:
        """Drop C{item_id} (e.g. after a successful DELETE)."""
        dropped = self._running.pop(item_id, None) is not None
        dropped = self._finished.pop(item_id, None) is not None or dropped
        if dropped and self.on_change is not None:
            self.on_change()

    def rows(self) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        """
        The C{(id, worker URL)} rows of running items and of finished ones,
        each oldest first (a copy made at C speed: the durable state takes
        one every time the map changes). Remembering the running ones, then
        the finished ones, in this order rebuilds the same map.
        """
        return tuple(self._running.items()), tuple(self._finished.items())
