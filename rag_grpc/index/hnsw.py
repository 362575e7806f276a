"""VectorIndex over hnswlib's Python binding (replaced by the native core in
a later step, behind the same interface)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hnswlib
import numpy as np

from rag_grpc.embed.model_files import sha256_file
from rag_grpc.index.base import MISSING_LABEL


class _ReadWriteLock:
    """Many searches at once; add/delete/resize/save alone.

    hnswlib allows concurrent searches; its resize and our label bookkeeping
    do not tolerate a concurrent search.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class HnswIndex:
    """Inner-product HNSW index that grows itself and scans exactly when a
    filter leaves only a few candidates."""

    kind = "hnswlib"
    space = "ip"

    def __init__(
        self,
        dim: int,
        *,
        m: int = 16,
        ef_construction: int = 200,
        capacity: int = 1024,
        exact_scan_max: int = 4096,
        num_threads: int = 1,
    ) -> None:
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.exact_scan_max = exact_scan_max
        self._lock = _ReadWriteLock()
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(max_elements=capacity, M=m, ef_construction=ef_construction)
        self._index.set_num_threads(num_threads)
        self._live: set[int] = set()

    @classmethod
    def load(cls, path: Path, dim: int, live_labels: np.ndarray, **kwargs: int) -> HnswIndex:
        """Load a saved index whose live labels the store lists; raise
        ValueError if the file is not a usable index."""
        _verify_checksum(path)
        index = cls(dim, **kwargs)
        try:
            index._index.load_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"index file {path} cannot be loaded: {exc}") from None
        if index._index.dim != dim:
            raise ValueError(f"index file {path} has dimension {index._index.dim}, expected {dim}")
        index._live = {int(x) for x in live_labels}
        stored = {int(x) for x in index._index.get_ids_list()}
        if not index._live <= stored:
            raise ValueError(f"index file {path} lacks vectors the store has")
        for label in stored - index._live:
            try:
                index._index.mark_deleted(label)
            except RuntimeError:
                pass  # already marked deleted in the file
        return index

    def __len__(self) -> int:
        return len(self._live)

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.uint64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(labels):
            raise ValueError(f"expected vectors [n, {self.dim}] and n labels")
        if not len(labels):
            return
        with self._lock.write():
            needed = self._index.get_current_count() + len(labels)
            if needed > self.capacity:
                self._index.resize_index(max(needed, 2 * self.capacity))
            self._index.add_items(vectors, labels, replace_deleted=False)
            self._live.update(int(x) for x in labels)

    def delete(self, labels: np.ndarray) -> None:
        with self._lock.write():
            for label in labels:
                if int(label) in self._live:
                    self._index.mark_deleted(int(label))
                    self._live.discard(int(label))

    def search(
        self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        out_labels = np.full((len(queries), k), MISSING_LABEL, dtype=np.uint64)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        with self._lock.read():
            if allowed is not None:
                candidates = np.fromiter(
                    (x for x in allowed.tolist() if x in self._live), dtype=np.uint64
                )
                if len(candidates) <= self.exact_scan_max:
                    return self._exact(queries, k, candidates, out_labels, out_scores)
            else:
                candidates = None
            available = len(self._live) if candidates is None else len(candidates)
            k_found = min(k, available)
            if k_found == 0:
                return out_labels, out_scores
            self._index.set_ef(max(ef, k_found))
            allowed_set = set(candidates.tolist()) if candidates is not None else None
            try:
                labels, distances = self._index.knn_query(
                    queries,
                    k=k_found,
                    filter=(lambda label: label in allowed_set) if allowed_set else None,
                )
            except RuntimeError:
                # The graph walk found fewer than k_found live results (possible
                # after many deletes); the exact scan always can.
                everything = np.fromiter(self._live, dtype=np.uint64)
                pool = candidates if candidates is not None else everything
                return self._exact(queries, k, pool, out_labels, out_scores)
        out_labels[:, :k_found] = labels
        out_scores[:, :k_found] = 1.0 - distances
        return out_labels, out_scores

    def _exact(
        self,
        queries: np.ndarray,
        k: int,
        candidates: np.ndarray,
        out_labels: np.ndarray,
        out_scores: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        if not len(candidates):
            return out_labels, out_scores
        vectors = np.asarray(self._index.get_items(candidates, return_type="numpy"), np.float32)
        scores = queries @ vectors.T
        top = min(k, len(candidates))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        out_labels[:, :top] = candidates[order]
        out_scores[:, :top] = np.take_along_axis(scores, order, axis=1)
        return out_labels, out_scores

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with self._lock.write():
            self._index.save_index(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        checksum = _checksum_path(path)
        checksum_tmp = checksum.with_name(checksum.name + ".tmp")
        checksum_tmp.write_text(f"{sha256_file(tmp)}\n")
        # Data first, then its checksum: a crash between the two renames leaves
        # a mismatch, which load() reports and the retriever rebuilds from.
        os.replace(tmp, path)
        os.replace(checksum_tmp, checksum)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verify_checksum(path: Path) -> None:
    """hnswlib trusts its file and can crash on a damaged one: check it first."""
    checksum = _checksum_path(path)
    try:
        expected = checksum.read_text().strip()
    except OSError:
        raise ValueError(f"index file {path} has no checksum file {checksum.name}") from None
    if not path.is_file() or sha256_file(path) != expected:
        raise ValueError(f"index file {path} is damaged or truncated (checksum mismatch)")
