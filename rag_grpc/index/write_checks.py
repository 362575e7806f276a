"""What a write must be before it is stored: an Upsert call's documents
(ids, content type, sizes, metadata, vectors brought along), and a prepared
write or deletion checked again when applied, whatever its source (a log entry
may have been written by another version, or forged)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rag_grpc.config import LimitsConfig
from rag_grpc.documents import (
    Document,
    printable,
    resolve_namespace,
    validate_distinct_ids,
    validate_document_id,
    validate_metadata_key,
)
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import InvalidArgument

if TYPE_CHECKING:
    from rag_grpc.index.writes import PreparedDelete, PreparedUpsert

# Document text formats taken as they are (no conversion from other formats).
SUPPORTED_CONTENT_TYPES = frozenset({"", "text/plain", "text/markdown"})
# Chunks of one document: far above what max_document_bytes can produce with
# any sane chunk size, low enough that a forged log entry cannot ask for more.
MAX_CHUNKS_PER_DOCUMENT = 100_000
# Chunks one document may bring with its own vectors.
MAX_GIVEN_CHUNKS = 10_000


class WriteChecks:
    """Validation of documents, ids and prepared writes against the limits
    and the embedding model; stateless, thread-safe."""

    def __init__(self, limits: LimitsConfig, embedder: Embedder) -> None:
        self.limits = limits
        self.embedder = embedder

    def validate_upsert(self, documents: Sequence[Document]) -> None:
        """An Upsert call as a whole: 1 to max_documents_per_upsert valid, distinct documents."""
        if not documents:
            raise InvalidArgument("upsert needs at least one document")
        if len(documents) > self.limits.max_documents_per_upsert:
            raise InvalidArgument(
                f"upsert has {len(documents)} documents; at most "
                f"{self.limits.max_documents_per_upsert} per call (use IngestionService for more)"
            )
        validate_distinct_ids(
            documents, "; ids must be unique per request", each=self.validate_document
        )

    def validate_document(self, doc: Document) -> None:
        """Id, content type, size (text and metadata), text and metadata checks."""
        validate_document_id(doc.id)
        name = printable(doc.id[:80])
        kind = doc.content_type.split(";", 1)[0].strip().lower()
        if kind not in SUPPORTED_CONTENT_TYPES:
            raise InvalidArgument(
                f"document {name} has content type {printable(doc.content_type[:80])}; send "
                "text as text/plain or text/markdown (convert other formats before ingesting)"
            )
        if not isinstance(doc.text, str) or not doc.text.strip():
            raise InvalidArgument(f"document {name} has no text")
        if not isinstance(doc.metadata, dict):
            raise InvalidArgument(f"document {name} metadata must be a map of keys to values")
        limits = self.limits
        if len(doc.metadata) > limits.max_metadata_keys:
            raise InvalidArgument(
                f"document {name} has {len(doc.metadata)} metadata keys; at most "
                f"{limits.max_metadata_keys}"
            )
        size = len(doc.text.encode("utf-8", errors="surrogatepass"))
        for key, value in doc.metadata.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"document {name} has a metadata key that is not text")
            validate_metadata_key(key)
            size += len(key)
            if isinstance(value, bool | int):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
                    raise InvalidArgument(f"document {name} metadata {key!r} is out of range")
                size += 8
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise InvalidArgument(
                        f"document {name} metadata {key!r} is not a finite number"
                    )
                size += 8
            elif isinstance(value, str):
                value_bytes = len(value.encode("utf-8", errors="surrogatepass"))
                if value_bytes > limits.max_metadata_value_bytes:
                    raise InvalidArgument(
                        f"document {name} metadata {key!r} is {value_bytes} bytes; at most "
                        f"{limits.max_metadata_value_bytes} bytes per value"
                    )
                size += value_bytes
            else:
                raise InvalidArgument(
                    f"document {name} metadata {key!r} must be a string, number or boolean"
                )
        if size > limits.max_document_bytes:
            raise InvalidArgument(
                f"document {name} is {size} bytes with its metadata; the limit is "
                f"{limits.max_document_bytes} bytes (split it into several documents)"
            )
        if doc.chunks:
            self._validate_given_chunks(doc, name)

    def _validate_given_chunks(self, doc: Document, name: str) -> None:
        """The caller's own vectors: from the model queries are embedded with,
        of the index's dimension, finite and not zero; chunk texts present."""
        model = self.embedder.model_id
        if doc.vector_model_id != model:
            given = printable(doc.vector_model_id[:80]) if doc.vector_model_id else "(none given)"
            raise InvalidArgument(
                f"document {name} brings vectors of model {given}; "
                f"this index holds vectors of {model!r} (set vector_model_id to it, and embed "
                "with the same model)"
            )
        if len(doc.chunks) > MAX_GIVEN_CHUNKS:
            raise InvalidArgument(
                f"document {name} brings {len(doc.chunks)} chunks; at most {MAX_GIVEN_CHUNKS}"
            )
        dimension = self.embedder.dimension
        for number, chunk in enumerate(doc.chunks):
            vector = np.asarray(chunk.vector)
            if vector.shape != (dimension,):
                raise InvalidArgument(
                    f"document {name} chunk {number} has a vector of {vector.size} values; "
                    f"this index has dimension {dimension}"
                )
            if not np.isfinite(vector).all():
                raise InvalidArgument(
                    f"document {name} chunk {number} has NaN or infinite values in its vector"
                )
            if not vector.any():
                raise InvalidArgument(
                    f"document {name} chunk {number} has an all-zero vector (no direction)"
                )
            if not isinstance(chunk.text, str) or not chunk.text.strip():
                raise InvalidArgument(f"document {name} chunk {number} has no text")

    def check_upsert(self, prepared: PreparedUpsert) -> None:
        """Everything apply relies on, checked on a prepared write from any
        source (a log entry may have been written by another version, or forged)."""
        if resolve_namespace(prepared.namespace) != prepared.namespace:
            raise InvalidArgument("the write names no namespace")
        if not math.isfinite(prepared.written_at) or prepared.written_at <= 0:
            raise InvalidArgument("the write has no valid write time")
        ids: set[str] = set()
        for doc in prepared.documents:
            self.validate_document(doc)
            if doc.id in ids:
                raise InvalidArgument(f"document id {printable(doc.id)} appears more than once")
            ids.add(doc.id)
        seqs: set[tuple[str, int]] = set()
        dimension = self.embedder.dimension
        if len(prepared.chunks) > MAX_CHUNKS_PER_DOCUMENT * max(1, len(ids)):
            raise InvalidArgument(f"the write has {len(prepared.chunks)} chunks; too many")
        for chunk in prepared.chunks:
            if chunk.doc_id not in ids:
                raise InvalidArgument(
                    f"a chunk belongs to document {printable(str(chunk.doc_id)[:80])}, "
                    "which the write does not hold"
                )
            if not isinstance(chunk.seq, int) or not 0 <= chunk.seq < MAX_CHUNKS_PER_DOCUMENT:
                raise InvalidArgument(f"chunk position {chunk.seq!r} is invalid")
            if (chunk.doc_id, chunk.seq) in seqs:
                raise InvalidArgument(f"chunk {chunk.seq} of {printable(chunk.doc_id)} repeats")
            seqs.add((chunk.doc_id, chunk.seq))
            if not isinstance(chunk.text, str):
                raise InvalidArgument("a chunk has no text")
            vector = chunk.vector
            if (
                not isinstance(vector, np.ndarray)
                or vector.shape != (dimension,)
                or vector.dtype.kind != "f"
            ):
                raise InvalidArgument(
                    f"a chunk of {printable(chunk.doc_id)} has a vector of shape "
                    f"{getattr(vector, 'shape', None)}; this index has dimension {dimension}"
                )
            if not np.isfinite(vector).all():
                raise InvalidArgument(
                    f"a chunk of {printable(chunk.doc_id)} has NaN or infinite values"
                )

    def check_delete(self, prepared: PreparedDelete) -> None:
        """Everything apply relies on, for a deletion from any source."""
        if resolve_namespace(prepared.namespace) != prepared.namespace:
            raise InvalidArgument("the deletion names no namespace")
        limit = self.limits.max_ids_per_request + self.limits.max_delete_matches
        if len(prepared.ids) > limit:
            raise InvalidArgument(f"the deletion has {len(prepared.ids)} ids; at most {limit}")
        for doc_id in prepared.ids:
            validate_document_id(doc_id)
        if prepared.older_than is not None and not math.isfinite(prepared.older_than):
            raise InvalidArgument("the deletion's cut-off time is not a number")

    def check_ids(self, doc_ids: Sequence[str]) -> None:
        """1 to max_ids_per_request valid ids."""
        if not doc_ids:
            raise InvalidArgument("give at least one document id")
        if len(doc_ids) > self.limits.max_ids_per_request:
            raise InvalidArgument(
                f"{len(doc_ids)} ids given; at most {self.limits.max_ids_per_request} per request"
            )
        for doc_id in doc_ids:
            validate_document_id(doc_id)
