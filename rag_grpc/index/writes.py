"""The one write path: prepare, then apply.

    prepare   validate exactly as apply will, leave out documents stored
              unchanged, chunk and embed the rest (the expensive half; no lock)
    apply     check the prepared write again (it may have come from a log or
              another process), then one store transaction and the index
              update under the namespace's write lock (the cheap half)

Every writer goes through these two steps: Upsert in process, the SQLite job
worker, the NATS worker (prepare) and the NATS log applier (apply), and the
same for deletions (a delete by filter is resolved to ids when prepared).

What a write must be is checked in write_checks.py, and rebuilding indexes
without their deleted slots is compaction.py. The rest stays here (about 450
lines) because it is one path: capacity and quota admission, embedding, the
store transaction, the index and sizes all happen in order under the
namespace's write lock, and splitting them would scatter that order over
modules.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rag_grpc import deadlines
from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.documents import (
    Document,
    WriteResult,
    resolve_namespace,
)
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import InvalidArgument, NotFound, RagError, ResourceExhausted
from rag_grpc.filters import Filter, validate_filter
from rag_grpc.index.compaction import Compactor
from rag_grpc.index.namespaces import NamespaceIndexes
from rag_grpc.index.payload import chunk_rows
from rag_grpc.index.sizes import NamespaceSizes, Sizes
from rag_grpc.index.write_checks import WriteChecks
from rag_grpc.store.sqlite import DocumentStore, NewChunk, stored_bytes
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedUpsert:
    """Documents ready to store: validated, chunked and embedded.

    errors: documents left out with their reason (jobs fail documents one by
    one; an Upsert call fails as a whole instead). written_at: when the write
    was accepted; every replica stores it, so retention ages documents alike."""

    namespace: str
    documents: tuple[Document, ...]
    chunks: tuple[NewChunk, ...]
    unchanged: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()
    written_at: float = field(default_factory=time.time)


class WriteAdmission(Protocol):
    """Decides whether a write may add this much to a namespace (tenants'
    storage quotas, security/access.py); raises ResourceExhausted if not.
    adding: what the write adds, new_namespace: whether it creates the
    namespace."""

    def __call__(self, namespace: str, adding: Sizes, new_namespace: bool) -> None: ...


@dataclass(frozen=True)
class PreparedDelete:
    """Documents to delete by id (a filter was resolved when prepared).

    older_than: delete only those not written since (retention), decided in
    the write transaction so a document refreshed meanwhile survives."""

    namespace: str
    ids: tuple[str, ...]
    forget: bool = False
    actor: str = ""
    older_than: float | None = None


def memory_limit(configured: int | None) -> int:
    """limits.max_index_bytes in bytes: 0 for no limit, None for 70 % of RAM."""
    if configured is not None:
        return configured
    try:
        return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 0


def given_chunks(documents: Sequence[Document]) -> list[NewChunk]:
    """The chunks of documents that brought their own vectors, normalised:
    the index ranks by inner product of unit vectors (cosine)."""
    chunks = []
    for doc in documents:
        for seq, chunk in enumerate(doc.chunks):
            vector = np.asarray(chunk.vector, dtype=np.float32)
            chunks.append(NewChunk(doc.id, seq, chunk.text, vector / np.linalg.norm(vector)))
    return chunks


class WritePath:
    """Prepare and apply writes of documents and deletions; thread-safe."""

    def __init__(
        self,
        store: DocumentStore,
        indexes: NamespaceIndexes,
        embedder: Embedder,
        chunker: TokenChunker,
        config: IndexConfig,
        limits: LimitsConfig,
        telemetry: Recorder = OFF,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.embedder = embedder
        self.chunker = chunker
        self.config = config
        self.limits = limits
        self.telemetry = telemetry
        self.checks = WriteChecks(limits, embedder)
        # Called with a namespace after documents in it were forgotten, so
        # caches holding their text (results, answers) drop it.
        self.forget_listeners: list[Callable[[str], None]] = []
        self.memory_limit = memory_limit(limits.max_index_bytes)
        self.compactor = Compactor(store, indexes, config, telemetry)
        # Tenancy (set by the server when a policy is configured): the sizes
        # every applied write keeps current, the check of what a write may
        # add, and listeners told (namespace, tokens) of each embedding.
        self.sizes: NamespaceSizes | None = None
        self.admission: WriteAdmission | None = None
        self.embedding_listeners: list[Callable[[str, int], None]] = []

    def _check_memory(self, namespace: str, new_vectors: int) -> None:
        """ResourceExhausted when new_vectors more would take the indexes past
        limits.max_index_bytes (checked under the namespace's write lock,
        before anything is stored)."""
        limit = self.memory_limit
        if not limit or not new_vectors:
            return
        used = self.indexes.memory_bytes()
        # What one more vector costs: its int8 code, its float32 copy until
        # the index is saved, its links at level 0, and bookkeeping.
        dim, m = self.embedder.dimension, self.config.m
        per_vector = 5 * dim + 8 * m + 96
        needed = used + new_vectors * per_vector
        if needed > limit:
            raise ResourceExhausted(
                f"the write adds {new_vectors} vectors (~{new_vectors * per_vector:,} bytes) to "
                f"indexes holding {used:,} bytes; the limit is {limit:,} bytes "
                "(limits.max_index_bytes): delete documents and compact, or raise the limit"
            )

    def _check_namespace_room(self, namespace: str) -> None:
        if namespace in self.indexes or self.store.has_namespace(namespace):
            return
        count = len(self.store.namespaces())
        if count >= self.limits.max_namespaces:
            raise ResourceExhausted(
                f"this store holds {count} namespaces, the limit (limits.max_namespaces); "
                "write to an existing namespace or delete one"
            )

    # -- upsert --------------------------------------------------------------

    def prepare_upsert(
        self, namespace: str, documents: Sequence[Document], *, per_document: bool = False
    ) -> PreparedUpsert:
        """Validate, skip what is stored unchanged, chunk and embed.

        per_document: a bad document is left out with its reason (jobs);
        otherwise the first bad document fails the whole call (Upsert)."""
        namespace = resolve_namespace(namespace)
        errors: list[tuple[str, str]] = []
        if per_document:
            valid = []
            for doc in documents:
                try:
                    self.checks.validate_document(doc)
                    valid.append(doc)
                except RagError as exc:
                    errors.append((doc.id if isinstance(doc.id, str) else "", str(exc)))
        else:
            self.checks.validate_upsert(documents)
            valid = list(documents)
        if valid:
            self._check_namespace_room(namespace)
        # Re-submitting what is already stored does no work (no embedding, no
        # write, no new generation): idempotent by document id and content.
        # Documents bringing their own vectors are always written: their
        # vectors may be all that changed.
        texts = [d for d in valid if not d.chunks]
        same = self.store.unchanged(namespace, texts) if texts else set()
        fresh = [d for d in valid if d.id not in same]
        spans = {doc.id: self.chunker.split(doc.text) for doc in fresh if not doc.chunks}
        if self.admission is not None and fresh:
            # Before the embedding: a write over quota costs no model time.
            fresh, refused = self._admit(namespace, fresh, spans, per_document)
            errors += refused
        chunks = self._embed(
            namespace, [(d.id, spans[d.id]) for d in fresh if not d.chunks], not per_document
        )
        chunks += given_chunks([d for d in fresh if d.chunks])
        return PreparedUpsert(
            namespace,
            tuple(fresh),
            tuple(chunks),
            tuple(d.id for d in valid if d.id in same),
            tuple(errors),
        )

    def unchanged_result(self, prepared: PreparedUpsert) -> WriteResult:
        """The result of a prepared write with no document left to store
        (all stored unchanged): nothing to apply, the generation stays."""
        generation = self.store.generation(prepared.namespace)
        return WriteResult(0, 0, generation, unchanged=len(prepared.unchanged))

    def _admit(
        self,
        namespace: str,
        documents: list[Document],
        spans: Mapping[str, Sequence[object]],
        per_document: bool,
    ) -> tuple[list[Document], list[tuple[str, str]]]:
        """The documents the admission lets in, and the others with its reason:
        all or none for a call, the leading ones that fit for a job, so a job
        that crosses a quota stores exactly what the quota allows."""
        assert self.admission is not None
        old = self.store.document_sizes(namespace, [d.id for d in documents])
        new_namespace = namespace not in self.indexes and not self.store.has_namespace(namespace)

        def adds(doc: Document) -> Sizes:
            old_bytes, old_vectors = old.get(doc.id, (0, 0))
            vectors = len(doc.chunks) if doc.chunks else len(spans[doc.id])
            return Sizes(
                0 if doc.id in old else 1, vectors - old_vectors, stored_bytes(doc) - old_bytes
            )

        if not per_document:
            total = Sizes()
            for doc in documents:
                total = total + adds(doc)
            self.admission(namespace, total, new_namespace)
            return documents, []
        accepted: list[Document] = []
        refused: list[tuple[str, str]] = []
        admitted = Sizes()
        for doc in documents:
            candidate = admitted + adds(doc)
            try:
                self.admission(namespace, candidate, new_namespace)
            except ResourceExhausted as exc:
                refused.append((doc.id, str(exc)))
                continue
            accepted.append(doc)
            admitted = candidate
        return accepted, refused

    def _write_change(
        self, namespace: str, documents: Sequence[Document], chunks: Sequence[NewChunk]
    ) -> Sizes:
        """What storing these documents and chunks changes (read before the
        transaction, under the namespace's write lock)."""
        old = self.store.document_sizes(namespace, [d.id for d in documents])
        change = Sizes(vectors=len(chunks))
        for doc in documents:
            old_bytes, old_vectors = old.get(doc.id, (0, 0))
            change = change + Sizes(
                0 if doc.id in old else 1, -old_vectors, stored_bytes(doc) - old_bytes
            )
        return change

    def _embed(
        self, namespace: str, spans: Sequence[tuple[str, Sequence[Any]]], whole_call: bool
    ) -> list[NewChunk]:
        """Chunks with their vectors, embedded in slices the embedding queue can take."""
        texts = [span.text for _, doc_spans in spans for span in doc_spans]
        room = int(getattr(self.embedder, "max_queue_texts", 0) or len(texts) or 1)
        if whole_call and len(texts) > room:
            # A retry could never fit: say what does.
            raise InvalidArgument(
                f"the documents make {len(texts)} chunks, more than the embedding queue holds "
                f"({room}, embedding.max_queue_texts); send fewer or smaller documents per call "
                "or use IngestionService"
            )
        # Jobs embed in small slices so a stopping server (or a cancelled
        # call) waits for one slice at most, not for the whole batch.
        step = max(1, min(room, 1024 if whole_call else 64))
        vectors = np.empty((len(texts), self.embedder.dimension), dtype=np.float32)
        tokens = 0
        for start in range(0, len(texts), step):
            deadlines.check("embedding the documents")
            output = self.embedder.embed(texts[start : start + step])
            vectors[start : start + step] = output.vectors
            tokens += output.token_count
        if tokens:
            for listener in self.embedding_listeners:
                listener(namespace, tokens)
        chunks = []
        row = 0
        for doc_id, doc_spans in spans:
            for seq, span in enumerate(doc_spans):
                chunks.append(NewChunk(doc_id, seq, span.text, vectors[row]))
                row += 1
        return chunks

    def apply_upsert(
        self, prepared: PreparedUpsert, position: tuple[str, int] | None = None
    ) -> WriteResult:
        """Store prepared documents and their chunks, replacing any with the
        same ids; all or nothing. position (log, sequence) is committed with
        the write; documents already stored so are skipped, so a log entry
        applied twice changes nothing."""
        self.checks.check_upsert(prepared)
        namespace = prepared.namespace
        documents, chunks = list(prepared.documents), list(prepared.chunks)
        unchanged = len(prepared.unchanged)
        with self.indexes.write_lock(namespace):
            deadlines.check("storing the documents")
            same = self.store.unchanged(namespace, documents) if position else set()
            if same:
                documents = [d for d in documents if d.id not in same]
                chunks = [c for c in chunks if c.doc_id not in same]
                unchanged += len(same)
            if not documents:
                if position is not None:
                    self.store.set_position(*position)
                return WriteResult(0, 0, self.store.generation(namespace), unchanged=unchanged)
            self._check_namespace_room(namespace)
            self._check_memory(namespace, len(chunks))
            change = None
            if self.sizes is not None:
                self.sizes.ensure(namespace)
                change = self._write_change(namespace, documents, chunks)
                if self.admission is not None and position is None:
                    # Again under the lock: another write to this namespace
                    # may have been stored since this one was prepared.
                    self.admission(namespace, change, not self.store.has_namespace(namespace))
            # The replaced documents' metadata rows, read under the write lock
            # before they go, so the payload index drops exactly what it held.
            old_payload = self.store.metadata_rows(namespace, [d.id for d in documents])
            outcome = self.store.replace_documents(
                namespace, documents, chunks, position=position, written_at=prepared.written_at
            )
            self.indexes.remove(namespace, outcome.removed_labels, old_payload)
            vectors = (
                np.stack([c.vector for c in chunks])
                if chunks
                else np.zeros((0, self.embedder.dimension), np.float32)
            )
            new_payload = chunk_rows(
                outcome.added_labels.tolist(),
                [c.doc_id for c in chunks],
                {d.id: d.metadata for d in documents},
            )
            if self.sizes is not None and change is not None:
                self.sizes.change(namespace, change)
            self.indexes.add(namespace, vectors, outcome.added_labels, new_payload)
            self.indexes.set_generation(namespace, outcome.generation)
            self.compactor.maybe_compact(namespace)
        return WriteResult(len(documents), len(chunks), outcome.generation, unchanged=unchanged)

    # -- delete --------------------------------------------------------------

    def prepare_delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
        older_than: float | None = None,
    ) -> PreparedDelete:
        """Validate a deletion and resolve its filter to ids (at most
        limits.max_delete_matches of them)."""
        namespace = self.indexes.existing(namespace)
        if not doc_ids and filter is None:
            raise InvalidArgument("give document ids or a filter to delete by")
        if doc_ids:
            self.checks.check_ids(doc_ids)
        ids = list(dict.fromkeys(doc_ids))
        if filter is not None:
            validate_filter(filter, max_values=self.limits.max_filter_values)
            limit = self.limits.max_delete_matches
            matching = self.store.doc_ids_matching(namespace, filter, limit=limit + 1)
            if len(matching) > limit:
                raise InvalidArgument(
                    f"the filter matches more than {limit} documents (limits.max_delete_matches); "
                    "narrow it, or delete in several calls"
                )
            given = set(ids)
            ids += [i for i in matching if i not in given]
        return PreparedDelete(namespace, tuple(ids), forget, actor[:512], older_than)

    def apply_delete(
        self, prepared: PreparedDelete, position: tuple[str, int] | None = None
    ) -> WriteResult:
        """Delete the documents; unknown ids are reported, not errors. forget
        erases them for good (see DeleteRequest). position (log, sequence) is
        committed with the deletion."""
        self.checks.check_delete(prepared)
        namespace = prepared.namespace
        if not self.store.has_namespace(namespace):
            if position is not None:
                self.store.set_position(*position)
                return WriteResult(0, 0, 0, prepared.ids)
            raise NotFound(f"namespace {namespace!r} does not exist")
        with self.indexes.write_lock(namespace):
            deadlines.check("deleting the documents")
            # Read before the rows go (see apply_upsert); retention may spare
            # some of these documents, so only the deleted labels' rows count.
            payload = self.store.metadata_rows(namespace, prepared.ids)
            old_sizes: dict[str, tuple[int, int]] = {}
            if self.sizes is not None:
                self.sizes.ensure(namespace)
                old_sizes = self.store.document_sizes(namespace, prepared.ids)
            deleted, labels, generation = self.store.delete_documents(
                namespace,
                prepared.ids,
                erase=prepared.forget,
                position=position,
                older_than=prepared.older_than,
            )
            if self.sizes is not None:
                gone_bytes = sum(old_sizes.get(i, (0, 0))[0] for i in deleted)
                self.sizes.change(namespace, Sizes(-len(deleted), -len(labels), -gone_bytes))
            removed = set(labels.tolist())
            self.indexes.remove(namespace, labels, [row for row in payload if row[0] in removed])
            self.indexes.set_generation(namespace, generation)
            if prepared.forget:
                # hnswlib only marks deleted vectors: rebuild without them.
                self.indexes.rebuild(namespace)
                self.store.record_audit(prepared.actor or "unknown", "forget", namespace, deleted)
            else:
                self.compactor.maybe_compact(namespace)
        if prepared.forget:
            for listener in self.forget_listeners:
                listener(namespace)
        gone = set(deleted)
        missing = tuple(i for i in prepared.ids if i not in gone)
        return WriteResult(len(deleted), len(labels), generation, missing)

    @property
    def compactions(self) -> int:
        """Indexes rebuilt without their deleted slots since start."""
        return self.compactor.compactions

    def compact(self, namespace: str | None = None) -> dict[str, tuple[int, int]]:
        """Rebuild indexes without their deleted slots and vacuum the database
        (see `Compactor.compact`)."""
        return self.compactor.compact(namespace)
