"""Each namespace's vector index: opened from its saved copy and caught up
with the store, rebuilt when missing or damaged, saved, snapshotted, and the
per-namespace write lock that keeps store and index in step. Beside it, the
namespace's payload index (metadata values -> labels, for filters), saved
with the vector index and changed with it (built from the store when its
file is missing, damaged, or deletes ran since it was saved).

SQLite is the truth; both indexes are derived from its rows and can always
be rebuilt from them.

Just over 400 lines: opening, catching up, saving and snapshotting are one
life cycle of the same files under the same write lock; the payload index
(payload.py, payload_file.py), the sizes (sizes.py) and Milvus
(milvus_index.py) already live beside it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc.config import IndexConfig
from rag_grpc.documents import resolve_namespace
from rag_grpc.errors import NotFound
from rag_grpc.filters import Filter
from rag_grpc.index import payload_file
from rag_grpc.index.milvus_index import MilvusCollection, MilvusIndex
from rag_grpc.index.payload import PayloadIndex, PayloadRow
from rag_grpc.native import VectorIndex
from rag_grpc.store.sqlite import DocumentStore

log = logging.getLogger(__name__)

# A namespace's vector index: the native core in this process, or its view
# of the Milvus collection (index.backend = "milvus").
Index = VectorIndex | MilvusIndex


class NamespaceIndexes:
    """The loaded index of every namespace, and their write locks."""

    def __init__(
        self, store: DocumentStore, dimension: int, index_dir: Path, config: IndexConfig
    ) -> None:
        self.store = store
        self.dimension = dimension
        self.index_dir = index_dir
        self.config = config
        self._indexes: dict[str, Index] = {}
        self._payloads: dict[str, PayloadIndex] = {}
        # Each namespace's write counter as of its last applied write, kept
        # here so a search reads it without a SQLite query (it was 11 % of a
        # vector Search's server time); writes set it under the write lock.
        self._generations: dict[str, int] = {}
        # The generation each namespace's index files were last saved at.
        self._saved_at: dict[str, int] = {}
        # One writer per namespace keeps store generation and index in step.
        self._write_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        index_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # With Milvus the vectors live there; payload indexes stay here (the
        # lexical arm's filters), rebuilt from the store at each start.
        self.milvus = (
            MilvusCollection(config.milvus, config, dimension, store)
            if config.backend == "milvus"
            else None
        )
        for namespace in store.namespaces():
            self._indexes[namespace], saved = self._open(namespace)
            self._payloads[namespace] = self._open_payload(namespace, saved)
            self._generations[namespace] = store.generation(namespace)

    # -- access ------------------------------------------------------------

    def __contains__(self, namespace: str) -> bool:
        return namespace in self._indexes

    def get(self, namespace: str) -> Index:
        """The namespace's index; NotFound if it does not exist."""
        index = self._indexes.get(namespace)
        if index is None:
            raise NotFound(f"namespace {namespace!r} does not exist; write a document to create it")
        return index

    def memory_bytes(self) -> int:
        """RAM every namespace's vector index holds (the payload indexes are
        a few per cent of it and not counted)."""
        return sum(index.memory_bytes for index in list(self._indexes.values()))

    def generation(self, namespace: str) -> int:
        """The namespace's generation as of its last applied write (0: none)."""
        return self._generations.get(namespace, 0)

    def set_generation(self, namespace: str, generation: int) -> None:
        """After a write is in the store and the index (caller holds the write lock)."""
        self._generations[namespace] = generation

    def for_search(self, namespace: str, flt: Filter | None) -> tuple[Index, np.ndarray | None]:
        """The namespace's index and the labels a filter allows; Milvus takes
        the filter itself, as an expression run inside it."""
        index = self.get(namespace)
        if isinstance(index, MilvusIndex):
            return index.where(flt), None
        return index, self.payload(namespace).matching(flt) if flt is not None else None

    def payload(self, namespace: str) -> PayloadIndex:
        """The namespace's payload index; NotFound if it does not exist."""
        payload = self._payloads.get(namespace)
        if payload is None:
            raise NotFound(f"namespace {namespace!r} does not exist; write a document to create it")
        return payload

    def existing(self, namespace: str) -> str:
        """A validated namespace name that has an index; NotFound otherwise."""
        name = resolve_namespace(namespace)
        self.get(name)
        return name

    def names(self) -> list[str]:
        """Namespaces with an index."""
        return list(self._indexes)

    def sizes(self) -> dict[str, int]:
        """Live vectors per namespace (no store access)."""
        return {name: len(index) for name, index in list(self._indexes.items())}

    def write_lock(self, namespace: str) -> threading.Lock:
        """The lock every change to this namespace's store rows and index holds."""
        with self._locks_guard:
            return self._write_locks.setdefault(namespace, threading.Lock())

    @contextmanager
    def all_locked(self) -> Iterator[list[str]]:
        """Every namespace's write lock held (in name order); yields the names."""
        namespaces = sorted(set(self._indexes) | set(self.store.namespaces()))
        locks = [self.write_lock(ns) for ns in namespaces]
        for lock in locks:
            lock.acquire()
        try:
            yield namespaces
        finally:
            for lock in reversed(locks):
                lock.release()

    # -- changes (callers hold the namespace's write lock) -------------------

    def add(
        self,
        namespace: str,
        vectors: np.ndarray,
        labels: np.ndarray,
        payload: Sequence[PayloadRow] = (),
    ) -> None:
        """Add vectors and their chunks' metadata values (payload), creating
        the namespace's indexes on its first write."""
        index = self._indexes.get(namespace)
        if index is None:
            index = self._indexes[namespace] = (
                self.milvus.new(namespace) if self.milvus else self.new_index(len(labels))
            )
        payload_index = self._payloads.get(namespace)
        if payload_index is None:
            payload_index = self._payloads[namespace] = PayloadIndex()
        payload_index.add(payload)
        if isinstance(index, MilvusIndex):
            index.add(vectors, labels, payload)
        elif len(labels):
            index.add(vectors, labels)

    def remove(
        self, namespace: str, labels: np.ndarray, payload: Sequence[PayloadRow] = ()
    ) -> None:
        """Mark labels deleted (hnswlib keeps their slots until a rebuild) and
        drop their chunks' metadata values (payload: the rows they had)."""
        index = self._indexes.get(namespace)
        if index is not None and len(labels):
            index.delete(labels)
        payload_index = self._payloads.get(namespace)
        if payload_index is not None:
            payload_index.remove(payload)

    def rebuild(self, namespace: str) -> Index:
        """A fresh index from the store's rows, swapped in and saved over the
        old files, so deleted vectors (hnswlib only marks them) are gone.
        The payload index stays: labels are row ids, the same after a rebuild.
        Milvus compacts its segments instead."""
        current = self._indexes.get(namespace)
        if isinstance(current, MilvusIndex):
            current.compact()
            return current
        index = self._build(namespace)
        self._indexes[namespace] = index
        self._save(namespace, index)
        return index

    # -- files -------------------------------------------------------------

    def new_index(self, capacity: int) -> VectorIndex:
        cfg = self.config
        return VectorIndex(
            self.dimension,
            "ip",
            max_elements=max(capacity, cfg.initial_capacity),
            M=cfg.m,
            ef_construction=cfg.ef_construction,
            exact_threshold=cfg.exact_scan_threshold,
        )

    def paths(self, namespace: str) -> tuple[Path, Path]:
        # resolve_namespace admits only [A-Za-z0-9_.-], with one '~' after a
        # tenant's name, never '/' and never a name of dots alone, so these
        # stay inside index_dir.
        resolve_namespace(namespace)
        return self.index_dir / f"{namespace}.hnsw", self.index_dir / f"{namespace}.json"

    def payload_path(self, namespace: str) -> Path:
        return self.paths(namespace)[0].with_suffix(".payload.npz")

    def _open(self, namespace: str) -> tuple[Index, _Saved | None]:
        """Load the saved index and bring it up to date from the store (rows
        newer than the last label it applied, minus deleted ones); rebuild it
        from the store when it is missing, damaged or does not match. With
        it, what the payload index needs to catch up the same way (None
        after a rebuild)."""
        if self.milvus is not None:
            return self.milvus.open(namespace), None
        path, meta_path = self.paths(namespace)
        generation = self.store.generation(namespace)
        live = self.store.labels(namespace)
        if path.exists() and meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                if not isinstance(meta, dict) or "last_label" not in meta:
                    raise ValueError("saved without its last applied label")
                index = VectorIndex.load(path, self.config.exact_scan_threshold)
                if index.dim != self.dimension:
                    raise ValueError(f"dimension {index.dim}, model has {self.dimension}")
                last = int(meta["last_label"])
                added, deleted = self._catch_up(namespace, index, last, live)
                if not added:
                    # Nothing newer than the file: no periodic save needed yet.
                    self._saved_at[namespace] = generation
                log.info(
                    "loaded index %s saved at generation %s, %d newer vectors applied; "
                    "store at generation %d",
                    namespace,
                    meta.get("generation"),
                    added,
                    generation,
                )
                return index, _Saved(meta.get("payload"), last, deleted)
            except (ValueError, TypeError, OSError) as exc:
                log.warning("rebuilding index %s: %s", namespace, exc)
        started = time.perf_counter()
        index = self._build(namespace)
        log.info(
            "rebuilt index %s from the store: %d vectors in %.2f s",
            namespace,
            len(index),
            time.perf_counter() - started,
        )
        return index, None

    def _open_payload(self, namespace: str, saved: _Saved | None) -> PayloadIndex:
        """The saved payload index plus the store's newer rows; or, when
        there is none, it is damaged, or documents were deleted since (the
        saved file no longer has their values to remove), one pass over the
        store's metadata rows joined with chunks."""
        started = time.perf_counter()
        if saved is not None and saved.deleted == 0:
            try:
                payload = payload_file.load(self.payload_path(namespace), saved.payload)
                newer = self.store.metadata_rows(namespace, after_label=saved.last_label)
                payload.add(newer)
                log.info(
                    "loaded the payload index of %s, %d newer values applied, in %.2f s",
                    namespace,
                    len(newer),
                    time.perf_counter() - started,
                )
                return payload
            except ValueError as exc:
                log.warning("building the payload index of %s from the store: %s", namespace, exc)
        rows = self.store.metadata_rows(namespace)
        payload = PayloadIndex.build(rows)
        log.info(
            "built the payload index of %s: %d values in %.2f s",
            namespace,
            len(rows),
            time.perf_counter() - started,
        )
        return payload

    def _build(self, namespace: str) -> VectorIndex:
        index = self.new_index(len(self.store.labels(namespace)))
        for labels, vectors in self.store.iter_vectors(namespace):
            index.add(vectors, labels)
        return index

    def _catch_up(
        self, namespace: str, index: VectorIndex, last: int, live: np.ndarray
    ) -> tuple[int, int]:
        """Apply the store's changes since the index was saved: labels are never
        reused, so rows above its last label are new and labels it has that the
        store lacks were deleted. Returns (added, deleted); raises ValueError
        when the result is not the store."""
        have = index.labels()
        gone = np.setdiff1d(have, live, assume_unique=True)
        if len(gone):
            index.delete(gone)
        added = 0
        for labels, vectors in self.store.iter_vectors(namespace, after=last):
            index.add(vectors, labels)
            added += len(labels)
        if not np.array_equal(np.sort(index.labels()), np.sort(live)):
            raise ValueError("its labels differ from the store's chunks after catching up")
        return added, len(gone)

    def save_all(self, changed_only: bool = False) -> int:
        """Persist every namespace's index with the last label it applied
        (changed_only: those written since their last save); returns how many."""
        saved = 0
        for namespace in list(self._indexes):
            with self.write_lock(namespace):
                if changed_only and self._saved_at.get(namespace) == self.generation(namespace):
                    continue
                self._save(namespace, self._indexes[namespace])
                saved += 1
        return saved

    def _save(self, namespace: str, index: Index) -> None:
        if isinstance(index, MilvusIndex):
            # Milvus persists itself (a write that failed to reach it is
            # reconciled here); the payload index is built at start.
            index.recover()
            self._saved_at[namespace] = self.generation(namespace)
            return
        path, meta_path = self.paths(namespace)
        # Saving also moves vectors added since the last save from RAM to the
        # mapped file (VectorIndex.save remaps).
        index.save(path)
        meta = self.meta(index, self.store.generation(namespace))
        payload = self._payloads.get(namespace)
        if payload is not None:
            # Under the same write lock as the index: the two describe one state.
            meta["payload"] = payload_file.save(payload, self.payload_path(namespace))
        write_json(meta_path, meta)
        self._saved_at[namespace] = self.generation(namespace)

    def save_copy(self, namespace: str, out_dir: Path, generation: int) -> None:
        """Save the namespace's index into out_dir (caller holds its write lock)."""
        index = self._indexes.get(namespace)
        if index is None or isinstance(index, MilvusIndex):
            # With Milvus the snapshot is the database alone: it holds every
            # chunk's vector, and the writer puts them back into Milvus at
            # start (docs/milvus.md).
            return
        # remap=False: the live index keeps reading its own file, never the
        # snapshot's copy (which is deleted once the archive is sent).
        index.save(out_dir / f"{namespace}.hnsw", remap=False)
        write_json(out_dir / f"{namespace}.json", self.meta(index, generation))

    def meta(self, index: Index, generation: int) -> dict[str, Any]:
        labels = index.labels()
        return {
            "generation": generation,
            # Rows above this label are newer than the saved index.
            "last_label": int(labels.max()) if len(labels) else 0,
            "dimension": self.dimension,
        }


@dataclass(frozen=True)
class _Saved:
    """What a loaded index's meta file says about its payload index: the
    file's description, the last label both hold, and how many labels the
    catch-up deleted."""

    payload: object
    last_label: int
    deleted: int


def write_json(path: Path, value: object) -> None:
    """Write a small JSON file durably: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(value))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in this directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
