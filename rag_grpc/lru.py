"""A thread-safe LRU bounded in entries and in bytes: the shape of every
cache that holds results for callers (search results, answers, embeddings)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """At most `entries` values and about `max_bytes` bytes, as measured by
    size_of; the least recently used go first."""

    def __init__(self, entries: int, max_bytes: int, size_of: Callable[[K, V], int]) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value, refreshed as most recently used; None on a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        """Store a value, evicting the least recently used past either bound."""
        size = self.size_of(key, value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while len(self._items) > self.entries or self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]

    def counters(self) -> tuple[int, int, int, int]:
        """(hits, misses, entries, bytes), read together."""
        with self._lock:
            return self.hits, self.misses, len(self._items), self.bytes

    def drop(self, doomed: Callable[[K], bool]) -> None:
        """Remove every entry whose key is doomed."""
        with self._lock:
            for key in [k for k in self._items if doomed(k)]:
                self.bytes -= self._items.pop(key)[1]
