"""The payload index: a namespace's metadata values mapped to chunk labels, so
a filter becomes the allowed labels of a search in memory, not in SQLite.

Per metadata key, strings and booleans map each value to a roaring bitmap of
labels; numbers are one array of (value, label) pairs sorted by value, so an
equality or a range is two binary searches and a slice, however many distinct
values there are (for a range over 10k distinct values at 20k chunks, a union
of one 64-bit bitmap per value took 8 ms; the slice, even sorted, 0.3 ms).

The semantics are the SQL filter's (`DocumentStore.labels_matching` stays the
reference, and a test compares the two): a string never equals a number,
booleans are their own kind, int 3 equals float 3.0, ranges see numbers
only, and a chunk whose document lacks the key never matches.

Thread-safe: one lock around every change and every query; a query is tens of
microseconds of Python and roaring calls that hold the GIL anyway.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import numpy as np
from pyroaring import BitMap, BitMap64

from rag_grpc.documents import Metadata, MetadataScalar
from rag_grpc.filters import And, AnyOf, Equals, Filter, Or, Range

# (chunk label, metadata key, value): one row per chunk and key of its document.
PayloadRow: TypeAlias = tuple[int, str, MetadataScalar]
# BitMap or BitMap64: one API, though pyroaring's stubs type the two apart
# (an index holds one kind at a time, see _WIDE_LABEL).
Bitmap: TypeAlias = Any
# A partial answer: a bitmap, or an array of distinct labels (a numeric slice).
Labels: TypeAlias = Bitmap | np.ndarray

_EMPTY = np.zeros(0, dtype=np.uint64)
_EMPTY.flags.writeable = False
# Labels are SQLite AUTOINCREMENT row ids: they pass 32 bits only after four
# billion chunk writes. 32-bit bitmaps take half the memory of 64-bit ones for
# a value held by one document (230 vs 470 bytes measured), so they are used
# until a label needs more.
_WIDE_LABEL = 2**32


def chunk_rows(
    labels: Iterable[int], doc_ids: Iterable[str], metadata: Mapping[str, Metadata]
) -> list[PayloadRow]:
    """The rows of new chunks: label and document id of each chunk, and the
    metadata of each document by id."""
    return [
        (label, key, value)
        for label, doc_id in zip(labels, doc_ids, strict=True)
        for key, value in metadata[doc_id].items()
    ]


class NumberColumn:
    """The numeric values of one key: (value, label) pairs sorted by value,
    then label. The arrays are replaced on each change, never changed in
    place, so a slice handed to a search stays valid."""

    def __init__(self) -> None:
        self.values = np.zeros(0, dtype=np.float64)
        self.labels = _EMPTY

    def _set(self, values: np.ndarray, labels: np.ndarray) -> None:
        # Read-only: slices of labels leave this object as search filters.
        values.flags.writeable = False
        labels.flags.writeable = False
        self.values, self.labels = values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def restore(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Hold these arrays, already sorted by value then label (a saved file's)."""
        self._set(values, labels)

    def add(self, values: np.ndarray, labels: np.ndarray) -> None:
        order = np.lexsort((labels, values))
        values, labels = values[order], labels[order]
        if not len(self.labels) or labels.min() > self.labels.max():
            # New labels are the largest (row ids only grow), so each goes
            # after the equal values already here: one merge, no re-sort.
            at = np.searchsorted(self.values, values, side="right")
            self._set(np.insert(self.values, at, values), np.insert(self.labels, at, labels))
            return
        all_values = np.concatenate([self.values, values])
        all_labels = np.concatenate([self.labels, labels])
        order = np.lexsort((all_labels, all_values))
        self._set(all_values[order], all_labels[order])

    def remove(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Drop these (value, label) pairs; pairs not present are ignored."""
        starts = np.searchsorted(self.values, values, side="left")
        ends = np.searchsorted(self.values, values, side="right")
        found = []
        # Within a run of equal values labels are sorted: a binary search each.
        for start, end, label in zip(starts.tolist(), ends.tolist(), labels.tolist(), strict=True):
            at = start + int(np.searchsorted(self.labels[start:end], label))
            if at < end and int(self.labels[at]) == label:
                found.append(at)
        if found:
            self._set(np.delete(self.values, found), np.delete(self.labels, found))

    def equal(self, values: np.ndarray) -> np.ndarray:
        """Labels holding any of these distinct values."""
        starts = np.searchsorted(self.values, values, side="left")
        ends = np.searchsorted(self.values, values, side="right")
        if len(values) == 1:
            return self.labels[starts[0] : ends[0]]
        # The runs gathered in one step: any_of with hundreds of values
        # took 1.5 ms as a Python loop of slices.
        lengths = ends - starts
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        return self.labels[np.arange(int(lengths.sum())) + offsets]

    def between(self, flt: Range) -> np.ndarray:
        start, end = 0, len(self.values)
        if flt.gte is not None:
            start = int(np.searchsorted(self.values, flt.gte, side="left"))
        elif flt.gt is not None:
            start = int(np.searchsorted(self.values, flt.gt, side="right"))
        if flt.lte is not None:
            end = int(np.searchsorted(self.values, flt.lte, side="right"))
        elif flt.lt is not None:
            end = int(np.searchsorted(self.values, flt.lt, side="left"))
        return self.labels[start:end] if start < end else _EMPTY


class PayloadIndex:
    """One namespace's metadata values -> chunk labels; answers filters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bitmap: Any = BitMap
        # (key, kind, value) -> labels, kind "s" (string) or "b" (boolean).
        self._sets: dict[tuple[str, str, str | bool], Bitmap] = {}
        self._numbers: dict[str, NumberColumn] = {}

    @classmethod
    def build(cls, rows: Iterable[PayloadRow]) -> PayloadIndex:
        """An index holding these rows (from the store at start)."""
        index = cls()
        index.add(rows)
        return index

    @classmethod
    def restore(
        cls,
        sets: dict[tuple[str, str, str | bool], Bitmap],
        numbers: dict[str, NumberColumn],
        wide: bool,
    ) -> PayloadIndex:
        """An index of these parts (a saved file's, checked by its reader)."""
        index = cls()
        index._bitmap = BitMap64 if wide else BitMap
        index._sets, index._numbers = sets, numbers
        return index

    def snapshot(
        self,
    ) -> tuple[dict[tuple[str, str, str | bool], Bitmap], dict[str, NumberColumn], bool]:
        """The parts to save: bitmap slots, numeric columns, 64-bit labels or
        not. The caller holds the namespace's write lock, so no change runs
        until it has written them."""
        with self._lock:
            return dict(self._sets), dict(self._numbers), self._bitmap is BitMap64

    # -- changes (the namespace's write lock keeps them in step with SQLite) --

    def add(self, rows: Iterable[PayloadRow]) -> None:
        """Index new chunks' metadata values."""
        sets, numbers = _group(rows)
        with self._lock:
            if any(max(labels) >= _WIDE_LABEL for labels in sets.values()) or any(
                max(labels) >= _WIDE_LABEL for _, labels in numbers.values()
            ):
                self._widen()
            for slot, labels in sets.items():
                bitmap = self._sets.get(slot)
                if bitmap is None:
                    self._sets[slot] = self._bitmap(labels)
                else:
                    bitmap.update(labels)
            for key, (values, labels) in numbers.items():
                column = self._numbers.get(key)
                if column is None:
                    column = self._numbers[key] = NumberColumn()
                column.add(np.asarray(values, np.float64), np.asarray(labels, np.uint64))

    def remove(self, rows: Iterable[PayloadRow]) -> None:
        """Forget chunks' metadata values (rows as they were indexed)."""
        sets, numbers = _group(rows)
        with self._lock:
            for slot, labels in sets.items():
                bitmap = self._sets.get(slot)
                if bitmap is None:
                    continue
                bitmap.difference_update(self._bitmap(labels))
                if not bitmap:
                    # Values held by one document come and go: keep no
                    # empty bitmap behind.
                    del self._sets[slot]
            for key, (values, labels) in numbers.items():
                column = self._numbers.get(key)
                if column is None:
                    continue
                column.remove(np.asarray(values, np.float64), np.asarray(labels, np.uint64))
                if not len(column):
                    del self._numbers[key]

    def _widen(self) -> None:
        if self._bitmap is BitMap64:
            return
        self._bitmap = BitMap64
        self._sets = {slot: BitMap64(bitmap) for slot, bitmap in self._sets.items()}

    def content_bytes(self) -> int:
        """Bytes of the labels and values held: the numeric arrays and the
        roaring containers (their serialized size), without Python's
        per-object overhead (measure RSS for that). O(size): for stats only."""
        with self._lock:
            numbers = sum(c.values.nbytes + c.labels.nbytes for c in self._numbers.values())
            return numbers + sum(len(bitmap.serialize()) for bitmap in self._sets.values())

    # -- queries -------------------------------------------------------------

    def matching(self, flt: Filter) -> np.ndarray:
        """Labels (uint64, distinct, in no particular order) of the chunks
        whose document matches the validated filter."""
        with self._lock:
            return _as_array(self._match(flt))

    def _match(self, flt: Filter) -> Labels:
        if isinstance(flt, And):
            parts = [self._match(inner) for inner in flt.filters]
            if any(len(part) == 0 for part in parts):
                return _EMPTY
            # Smallest first: every later intersection is at most its size.
            bitmaps = sorted((self._as_bitmap(part) for part in parts), key=len)
            return self._bitmap.intersection(*bitmaps) if len(bitmaps) > 1 else bitmaps[0]
        if isinstance(flt, Or):
            parts = [self._match(inner) for inner in flt.filters]
            parts = [part for part in parts if len(part)]
            if len(parts) <= 1:
                return parts[0] if parts else _EMPTY
            return self._bitmap.union(*(self._as_bitmap(part) for part in parts))
        if isinstance(flt, Range):
            column = self._numbers.get(flt.key)
            return column.between(flt) if column is not None else _EMPTY
        assert isinstance(flt, Equals | AnyOf)
        values = (flt.value,) if isinstance(flt, Equals) else flt.values
        # A document holds one value per key, so the parts are disjoint and
        # their concatenation is the union.
        # Distinct values by kind: False == 0.0 in Python, not in a filter.
        distinct = dict.fromkeys((type(v), v) for v in map(_canonical, values))
        numbers = np.array([v for _, v in distinct if isinstance(v, float)], dtype=np.float64)
        column = self._numbers.get(flt.key)
        found: list[Labels] = []
        if len(numbers) and column is not None:
            found.append(column.equal(numbers))
        bitmaps = [
            bitmap
            for _, value in distinct
            if not isinstance(value, float)
            and (bitmap := self._sets.get((flt.key, _kind(value), value))) is not None
        ]
        if bitmaps:
            found.append(bitmaps[0] if len(bitmaps) == 1 else self._bitmap.union(*bitmaps))
        found = [part for part in found if len(part)]
        if len(found) == 1:
            return found[0]
        # A document holds one value per key, so numbers and the rest are
        # disjoint and their concatenation is the union.
        return np.concatenate([_as_array(part) for part in found]) if found else _EMPTY

    def _as_bitmap(self, labels: Labels) -> Bitmap:
        if isinstance(labels, np.ndarray):
            # Sorted input builds a roaring bitmap about twice as fast.
            return self._bitmap(np.sort(labels))
        return labels


def _kind(value: str | bool) -> str:
    return "b" if isinstance(value, bool) else "s"


def _canonical(value: MetadataScalar) -> str | bool | float:
    """Numbers as floats (int 3 is float 3.0, as in SQL's REAL column);
    booleans stay booleans, though Python counts them as ints."""
    if isinstance(value, bool | str):
        return value
    return float(value)


def _group(
    rows: Iterable[PayloadRow],
) -> tuple[dict[tuple[str, str, str | bool], list[int]], dict[str, tuple[list[float], list[int]]]]:
    """Rows grouped per bitmap slot and per numeric key, so a batch of
    documents costs one update per distinct value or key."""
    sets: dict[tuple[str, str, str | bool], list[int]] = defaultdict(list)
    numbers: dict[str, tuple[list[float], list[int]]] = {}
    for label, key, value in rows:
        value = _canonical(value)
        if isinstance(value, float):
            column = numbers.get(key)
            if column is None:
                column = numbers[key] = ([], [])
            column[0].append(value)
            column[1].append(int(label))
        else:
            sets[(key, _kind(value), value)].append(int(label))
    return sets, numbers


def _as_array(labels: Labels) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    packed = labels.to_array()
    # to_array gives array('I') for 32-bit bitmaps, array('Q') for 64-bit.
    return np.frombuffer(packed, dtype=np.uint32 if packed.typecode == "I" else np.uint64).astype(
        np.uint64, copy=False
    )
