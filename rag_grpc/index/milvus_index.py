"""Milvus as the vector index (index.backend = "milvus"): the vectors of
every namespace, and the metadata filters read, in one Milvus collection, so
the index can outgrow one machine's RAM; SQLite keeps documents, chunk text
and vectors as with the native index, and stays the truth the collection is
caught up from.

One collection, `<prefix>_d<dimension>`, with the namespace as its partition
key (Milvus's multi-tenancy pattern): namespaces are many and mostly small
(a tenant's), a collection per namespace would cost each its own segments,
index builds, load and channels (and Milvus caps collections per cluster),
while a search with `namespace == "x"` in its expression only reads the
partition that name hashes to. Rows: `label` (the chunk's SQLite row id,
primary key), `namespace`, `vector` (unit length, inner product) and `meta`,
the document's metadata as JSON with each key prefixed by its kind
(`s:`, `n:`, `b:`), so a filter runs inside Milvus as an expression on it
with the payload index's semantics (milvus_filter.py).

`MilvusIndex` is one namespace's view, with the parts of the native
`VectorIndex` interface that `NamespaceIndexes`, `WritePath` and `Searcher`
use, so the write and search paths stay one. Only the process configured as
the writer (`index.milvus.writer`, the designated applier) changes the
collection; every other replica applies the same log to its own SQLite and
only searches Milvus (docs/milvus.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

from rag_grpc import deadlines
from rag_grpc.config import IndexConfig, MilvusConfig, redact_url
from rag_grpc.errors import FailedPrecondition, Unavailable
from rag_grpc.filters import Filter
from rag_grpc.index.milvus_filter import filter_expression, literal, metadata_by_label
from rag_grpc.index.payload import PayloadRow
from rag_grpc.native import MISSING_LABEL
from rag_grpc.store.sqlite import DocumentStore

log = logging.getLogger(__name__)

# Rows per insert call: 2048 x 384 floats is ~3 MB, well under gRPC's 64 MB.
INSERT_BATCH = 2048
# Primary keys per delete call (its expression is `label in [...]`).
DELETE_BATCH = 8192
# Stored namespace names are at most 64 characters plus a tenant's prefix.
NAMESPACE_CHARS = 256


class MilvusCollection:
    """This process's client of the collection: connected, checked and
    loaded when created; it hands out each namespace's `MilvusIndex`."""

    def __init__(
        self, config: MilvusConfig, index: IndexConfig, dimension: int, store: DocumentStore
    ) -> None:
        pymilvus = _pymilvus()
        self.config = config
        self.dimension = dimension
        self.store = store
        self.name = f"{config.collection_prefix}_d{dimension}"
        self.index_params = config.index_params or {
            "M": index.m,
            "efConstruction": index.ef_construction,
        }
        where = redact_url(config.uri)
        try:
            self.client = pymilvus.MilvusClient(
                uri=config.uri,
                token=config.token.get_secret_value() if config.token else "",
                db_name=config.db_name,
                timeout=config.timeout_s,
            )
            self._ensure_collection()
        except Exception as exc:
            if isinstance(exc, FailedPrecondition):
                raise
            raise Unavailable(
                f'index.backend is "milvus" but Milvus at {where} (index.milvus.uri) '
                f"cannot be used: {exc}; start Milvus or correct index.milvus.uri/token"
            ) from exc
        log.info(
            "Milvus at %s: collection %s, consistency %s, %s",
            where,
            self.name,
            config.consistency_level,
            "writer" if config.writer else "reader (another process writes)",
        )

    def _ensure_collection(self) -> None:
        pymilvus = _pymilvus()
        DataType, MilvusException = pymilvus.DataType, pymilvus.MilvusException
        client, cfg = self.client, self.config
        if not client.has_collection(self.name):
            if not cfg.writer:
                raise FailedPrecondition(
                    f"Milvus has no collection {self.name}; the writer "
                    "(index.milvus.writer = true) creates it: start it first"
                )
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("label", DataType.INT64, is_primary=True)
            schema.add_field(
                "namespace",
                DataType.VARCHAR,
                max_length=NAMESPACE_CHARS,
                is_partition_key=True,
            )
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
            schema.add_field("meta", DataType.JSON)
            params = client.prepare_index_params()
            params.add_index(
                field_name="vector",
                index_type=cfg.index_type,
                metric_type="IP",
                params=dict(self.index_params),
            )
            try:
                client.create_collection(
                    self.name,
                    schema=schema,
                    index_params=params,
                    consistency_level=cfg.consistency_level,
                    num_partitions=cfg.partitions,
                )
            except MilvusException:
                if not client.has_collection(self.name):
                    raise
        fields = {f["name"]: f for f in client.describe_collection(self.name)["fields"]}
        vector = fields.get("vector")
        dim = int(vector.get("params", {}).get("dim", 0)) if vector else 0
        if dim != self.dimension or "meta" not in fields or "namespace" not in fields:
            raise FailedPrecondition(
                f"Milvus collection {self.name} is not one rag-grpc made for dimension "
                f"{self.dimension} (vector dimension {dim}); use another "
                "index.milvus.collection_prefix"
            )
        client.load_collection(self.name)

    def open(self, namespace: str) -> MilvusIndex:
        """The namespace's view; the writer first makes the collection hold
        exactly the store's chunks (a crash between the SQLite commit and
        Milvus, a restored backup, a move from the native index)."""
        index = MilvusIndex(self, namespace, len(self.store.labels(namespace)))
        if self.config.writer:
            self.reconcile(index)
        return index

    def new(self, namespace: str) -> MilvusIndex:
        """The view of a namespace that has no chunks yet."""
        return MilvusIndex(self, namespace, 0)

    def reconcile(self, index: MilvusIndex) -> None:
        """Insert the store's chunks Milvus lacks and delete those it has
        that the store does not (caller holds the namespace's write lock)."""
        store = self.store
        started = time.perf_counter()
        live = store.labels(index.namespace)
        held = index.labels()
        extra = np.setdiff1d(held, live, assume_unique=True)
        missing = np.setdiff1d(live, held, assume_unique=True)
        if len(extra):
            index.delete(extra)
        if len(missing):
            wanted = set(missing.tolist())
            rows = [r for r in store.metadata_rows(index.namespace) if r[0] in wanted]
            for labels, vectors in store.iter_vectors(index.namespace):
                keep = np.isin(labels, missing)
                if keep.any():
                    index.add(vectors[keep], labels[keep], rows, count=False)
            # Seal what was inserted, so Milvus indexes it now instead of
            # scanning growing segments until its own flush.
            self.call("flushing", "flush")
        index.count = len(live)
        index.stale = False
        log.info(
            "Milvus holds namespace %s: %d chunks, %d inserted and %d deleted to match "
            "the store, in %.2f s",
            index.namespace,
            len(live),
            len(missing),
            len(extra),
            time.perf_counter() - started,
        )

    def call(self, what: str, method: str, **kwargs: Any) -> Any:
        """A client call under the caller's deadline; Milvus's failures
        become Unavailable, saying what failed."""
        timeout = deadlines.remaining(self.config.timeout_s)
        try:
            return getattr(self.client, method)(self.name, timeout=timeout, **kwargs)
        except _pymilvus().MilvusException as exc:
            raise Unavailable(f"Milvus failed {what}: {exc.message}") from exc

    def close(self) -> None:
        """Close the client's channel."""
        self.client.close()


class MilvusIndex:
    """One namespace's vectors in the Milvus collection, answering as the
    native `VectorIndex` does (labels and inner-product distances, padded
    with MISSING_LABEL) so the write and search paths stay one.

    Its size is counted here (the store's chunks at open, then every change
    applied), so sizes and limits never ask Milvus."""

    def __init__(
        self,
        collection: MilvusCollection,
        namespace: str,
        count: int,
        expression: str | None = None,
    ) -> None:
        self.collection = collection
        self.namespace = namespace
        self.dim = collection.dimension
        self.count = count
        self._base = expression or f"namespace == {literal(namespace)}"
        self._lock = threading.Lock()
        # A write stored in SQLite failed to reach Milvus: the next save
        # (index.save_interval_s, or shutdown) reconciles the namespace.
        self.stale = False

    def where(self, flt: Filter | None) -> MilvusIndex:
        """A view whose searches also match the filter, inside Milvus."""
        if flt is None:
            return self
        view = MilvusIndex(
            self.collection,
            self.namespace,
            self.count,
            f"{self._base} and ({filter_expression(flt)})",
        )
        view._lock = self._lock
        return view

    def __len__(self) -> int:
        return self.count

    @property
    def slots(self) -> int:
        # Milvus reclaims deleted rows by its own compaction: nothing for
        # WritePath's compaction to count.
        return self.count

    @property
    def memory_bytes(self) -> int:
        # The vectors live in Milvus's memory, not this process's.
        return 0

    def labels(self) -> npt.NDArray[np.uint64]:
        """Every label Milvus holds for the namespace (Strong: up to now).
        One query with no limit: 8 bytes a label, 40k labels in 0.65 s here."""
        rows = self.collection.call(
            "listing labels",
            "query",
            filter=self._base,
            output_fields=["label"],
            consistency_level="Strong",
        )
        return np.unique(np.asarray([int(r["label"]) for r in rows], dtype=np.uint64))

    def add(
        self,
        vectors: npt.ArrayLike,
        labels: npt.ArrayLike,
        payload: Sequence[PayloadRow] = (),
        *,
        count: bool = True,
    ) -> None:
        """Insert chunks with their documents' metadata (payload rows: label,
        key, value), by the writer only; others just count them."""
        vectors = np.asarray(vectors, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.uint64)
        if self.collection.config.writer and len(labels):
            meta = metadata_by_label(payload)
            rows = [
                {
                    "label": int(label),
                    "namespace": self.namespace,
                    "vector": vector.tolist(),
                    "meta": meta.get(int(label), {}),
                }
                for label, vector in zip(labels, vectors, strict=True)
            ]
            self._write_batches("storing vectors", "insert", "data", rows, INSERT_BATCH)
        if count:
            with self._lock:
                self.count += len(labels)

    def delete(self, labels: npt.ArrayLike) -> int:
        """Delete chunks by label (the writer only); Milvus hides them from
        searches at once and drops them from disk at its next compaction."""
        keys = [int(x) for x in np.asarray(labels, dtype=np.uint64).tolist()]
        if self.collection.config.writer:
            self._write_batches("deleting vectors", "delete", "ids", keys, DELETE_BATCH)
        with self._lock:
            self.count = max(0, self.count - len(keys))
        return len(keys)

    def compact(self) -> None:
        """Seal what was written and ask Milvus to compact, so deleted
        (forgotten) vectors leave its segments; the segment files they were
        in are removed by Milvus's garbage collection later (docs/milvus.md)."""
        if not self.collection.config.writer:
            return
        self.collection.call("flushing", "flush")
        self.collection.call("compacting", "compact")

    def search(
        self,
        queries: npt.ArrayLike,
        k: int = 10,
        ef: int = 100,
        allowed: npt.ArrayLike | None = None,
        num_threads: int = 0,
        exact_threshold: int | None = None,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]:
        """The k nearest labels of each query and their distances (1 - inner
        product), padded with MISSING_LABEL; a filter comes with `where`
        (allowed labels would be a list as long as the matches: refused)."""
        if allowed is not None:
            raise ValueError("Milvus searches take a filter through where(), not labels")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        labels = np.full((len(queries), k), MISSING_LABEL, dtype=np.uint64)
        distances = np.full((len(queries), k), np.inf, dtype=np.float32)
        if not self.count or not len(queries):
            return labels, distances
        cfg = self.collection.config
        replies = self.collection.call(
            "searching",
            "search",
            data=queries.tolist(),
            limit=k,
            filter=self._base,
            search_params={"metric_type": "IP", "params": {"ef": max(ef, k)}},
            consistency_level=cfg.consistency_level,
        )
        for row, hits in enumerate(replies):
            for column, hit in enumerate(list(hits)[:k]):
                labels[row, column] = int(hit["id"])
                distances[row, column] = 1.0 - float(hit["distance"])
        return labels, distances

    def _write_batches(
        self, what: str, method: str, argument: str, items: Sequence[Any], batch: int
    ) -> None:
        """Call the collection's `method` with `argument` = items, `batch` at a
        time; a write that fails to reach Milvus leaves the view stale."""
        try:
            for start in range(0, len(items), batch):
                self.collection.call(what, method, **{argument: items[start : start + batch]})
        except Unavailable:
            self.stale = True
            raise

    def save(self, path: str | PathLike[str], remap: bool = True) -> None:
        """Nothing to save: Milvus persists the collection itself."""

    def recover(self) -> None:
        """Reconcile with the store if a write failed to reach Milvus (caller
        holds the namespace's write lock)."""
        if self.stale and self.collection.config.writer:
            self.collection.reconcile(self)


def _pymilvus() -> Any:
    """The client library, imported on first use (it is an optional extra,
    and its import costs ~1 s)."""
    try:
        import pymilvus  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FailedPrecondition(
            'index.backend = "milvus" needs pymilvus: pip install "rag-grpc[milvus]"'
        ) from exc
    return pymilvus
