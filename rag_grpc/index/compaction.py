"""Compaction: rebuilding a namespace's index without its deleted slots
(hnswlib only marks deleted vectors), and vacuuming the database. The write
path compacts a namespace once its deleted slots pass
index.compact_deleted_fraction; `rag-grpc compact` does one namespace or all
in a data directory no server is using."""

from __future__ import annotations

import logging
import time

from rag_grpc.config import IndexConfig
from rag_grpc.index.namespaces import NamespaceIndexes
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)


class Compactor:
    """Rebuilds indexes without their deleted slots; thread-safe under the
    namespaces' write locks."""

    def __init__(
        self,
        store: DocumentStore,
        indexes: NamespaceIndexes,
        config: IndexConfig,
        telemetry: Recorder = OFF,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.config = config
        self.telemetry = telemetry
        self.compactions = 0

    def maybe_compact(self, namespace: str) -> None:
        """Rebuild an index whose deleted slots passed the configured fraction
        (caller holds the namespace's write lock)."""
        fraction = self.config.compact_deleted_fraction
        if not fraction or namespace not in self.indexes:
            return
        index = self.indexes.get(namespace)
        slots = index.slots
        if slots < self.config.compact_min_slots or (slots - len(index)) <= fraction * slots:
            return
        self._compact_locked(namespace)

    def compact(self, namespace: str | None = None) -> dict[str, tuple[int, int]]:
        """Rebuild indexes without their deleted slots and vacuum the database;
        returns namespace -> (slots before, after)."""
        names = [self.indexes.existing(namespace)] if namespace else self.indexes.names()
        done = {}
        for name in names:
            with self.indexes.write_lock(name):
                before = self.indexes.get(name).slots
                self._compact_locked(name, vacuum=False)
                done[name] = (before, self.indexes.get(name).slots)
        self.store.vacuum()
        return done

    def _compact_locked(self, namespace: str, vacuum: bool = True) -> None:
        started = time.perf_counter()
        before = self.indexes.get(namespace).slots
        index = self.indexes.rebuild(namespace)
        if vacuum:
            self.store.vacuum()
        self.compactions += 1
        self.telemetry.record("compactions", 1)
        log.info(
            "compacted %s: %d -> %d index slots in %.2f s",
            namespace,
            before,
            index.slots,
            time.perf_counter() - started,
        )
