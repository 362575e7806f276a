"""Chunk records kept in memory for hydrating search hits. A label's chunk
never changes (a re-upsert writes new labels), so a record stays valid until
its chunk is deleted; the oldest kept go first past either bound."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rag_grpc.documents import Metadata

# At most this many records, and about this many bytes of their text and
# metadata.
CHUNK_CACHE_SIZE = 65_536
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ChunkRecord:
    """A stored chunk joined with its document's metadata."""

    label: int
    doc_id: str
    seq: int
    text: str
    metadata: Metadata


class ChunkCache:
    """Thread-safe records by label, bounded in entries and in bytes."""

    def __init__(self, entries: int = CHUNK_CACHE_SIZE, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._records: dict[int, ChunkRecord] = {}
        self._bytes = 0

    def lookup(self, labels: Iterable[int]) -> tuple[dict[int, ChunkRecord], list[int]]:
        """The records held, by label, and the labels not held (in order)."""
        found = {}
        missing = []
        with self._lock:
            for label in labels:
                record = self._records.get(label)
                if record is None:
                    missing.append(label)
                else:
                    found[label] = record
        return found, missing

    def add(self, records: Mapping[int, ChunkRecord]) -> None:
        """Keep newly read records, dropping the oldest past either bound."""
        with self._lock:
            for label, record in records.items():
                if label not in self._records:
                    self._records[label] = record
                    self._bytes += _record_bytes(record)
            while self._records and (
                len(self._records) > self.entries or self._bytes > self.max_bytes
            ):
                oldest = next(iter(self._records))  # oldest first
                self._bytes -= _record_bytes(self._records.pop(oldest))

    def forget(self, labels: Sequence[int]) -> None:
        """Drop the records of deleted chunks."""
        with self._lock:
            for label in labels:
                record = self._records.pop(label, None)
                if record is not None:
                    self._bytes -= _record_bytes(record)


def _record_bytes(record: ChunkRecord) -> int:
    return 200 + len(record.text) + len(record.doc_id) + 64 * len(record.metadata)
