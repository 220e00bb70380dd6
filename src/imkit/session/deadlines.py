"""A set of keyed deadlines, so a session can ask for its next one in O(log n)."""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Iterator


class DeadlineQueue:
    """
    Each key has at most one deadline; setting it again replaces the old one.

    Replaced and discarded deadlines stay in the heap until they surface (lazy deletion); each
    heap entry carries a unique stamp, so an entry is live only if it is the key's latest one.
    The heap is rebuilt when stale entries outnumber live ones, so memory stays proportional to
    the live keys.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, tuple[float, int]] = {}
        self._stamps = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._due

    def get(self, key: Hashable) -> float | None:
        entry = self._due.get(key)
        return None if entry is None else entry[0]

    def set(self, key: Hashable, due: float) -> None:
        current = self._due.get(key)
        if current is not None and current[0] == due:
            return
        stamp = next(self._stamps)
        self._due[key] = (due, stamp)
        heapq.heappush(self._heap, (due, stamp, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._compact()

    def discard(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def clear(self) -> None:
        self._heap.clear()
        self._due.clear()

    def next(self) -> float | None:
        """The earliest live deadline, or None."""
        heap = self._heap
        due = self._due
        while heap:
            when, stamp, key = heap[0]
            if due.get(key) == (when, stamp):
                return when
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> Iterator[Hashable]:
        """Remove and yield, earliest first, every key whose deadline is at or before ``now``."""
        heap = self._heap
        due = self._due
        while heap and heap[0][0] <= now:
            when, stamp, key = heapq.heappop(heap)
            if due.get(key) == (when, stamp):
                del due[key]
                yield key

    def _compact(self) -> None:
        due = self._due
        self._heap = [entry for entry in self._heap if due.get(entry[2]) == (entry[0], entry[1])]
        heapq.heapify(self._heap)
