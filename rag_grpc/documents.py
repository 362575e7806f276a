"""Values that travel through the core: documents, chunks, hits, filters.

Plain frozen dataclasses; the service layer converts them to and from the
protobuf messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from rag_grpc.errors import InvalidArgument
from rag_grpc.security.policy import TENANT_NAME

MetadataScalar: TypeAlias = str | int | float | bool
Metadata: TypeAlias = dict[str, MetadataScalar]

DEFAULT_NAMESPACE = "default"
# Between the tenant and its own namespace name in the stored name
# ("acme~default"); never allowed in a name a caller gives.
TENANT_SEPARATOR = "~"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_ID_BYTES = 512


@dataclass(frozen=True)
class GivenChunk:
    """A chunk whose vector the caller computed (bring your own vectors)."""

    text: str
    vector: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Document:
    """A stored document: id unique within its namespace, text, flat metadata."""

    id: str
    text: str
    metadata: Metadata = field(default_factory=dict)
    # MIME type of text: "" or text/plain, or text/markdown (not stored).
    content_type: str = field(default="", compare=False)
    # The caller's own chunks and vectors (empty: the server chunks and
    # embeds text), and the model they came from.
    chunks: tuple[GivenChunk, ...] = field(default=(), compare=False)
    vector_model_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk with its document's metadata."""

    document_id: str
    chunk_id: str
    score: float
    text: str
    metadata: Metadata


@dataclass(frozen=True)
class SearchTimings:
    """Milliseconds per search stage."""

    embed_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class SearchResult:
    """Hits of one query, best first, and the namespace generation they reflect."""

    hits: list[Hit]
    index_generation: int
    timings: SearchTimings = SearchTimings()
    # Tokens the embedding model read for a text query (0 for a vector query
    # or a result served from the result cache): what usage bills.
    embedding_tokens: int = 0


@dataclass(frozen=True)
class WriteResult:
    """Outcome of an upsert or delete."""

    documents: int
    chunks: int
    index_generation: int
    not_found_ids: tuple[str, ...] = ()
    # Upsert: documents already stored exactly so, skipped without work.
    unchanged: int = 0


def chunk_id(document_id: str, seq: int) -> str:
    """Chunk ids derive from the document id, so a re-upsert reuses them."""
    return f"{document_id}#{seq}"


def resolve_namespace(name: str) -> str:
    """Validate a namespace name as the core stores it; empty means the
    default namespace. A tenant's namespace is stored as "<tenant>~<name>"
    (see security/tenancy.py); callers name theirs without the prefix, and
    the services check that with `resolve_user_namespace`.

    A namespace names files in the data dir, so only [A-Za-z0-9_.-] (and
    the one '~' after a tenant name) and never dots alone ("." and ".." are
    directories)."""
    if not name:
        return DEFAULT_NAMESPACE
    if isinstance(name, str) and TENANT_SEPARATOR in name:
        tenant, _, own = name.partition(TENANT_SEPARATOR)
        if TENANT_NAME.fullmatch(tenant) and own:
            resolve_user_namespace(own)
            return name
    return resolve_user_namespace(name)


def resolve_user_namespace(name: str) -> str:
    """Validate a namespace name as a caller gives it (never with a tenant
    prefix); empty means the default namespace."""
    if not name:
        return DEFAULT_NAMESPACE
    if not isinstance(name, str) or not _NAME_RE.match(name) or not name.strip("."):
        raise InvalidArgument(
            f"namespace {printable(str(name)[:80])} is invalid: use 1 to 64 characters of "
            "A-Z a-z 0-9 _ . - and not only dots"
        )
    return name


def validate_metadata_key(key: str) -> None:
    """Metadata keys are short identifiers so they can be indexed and filtered."""
    if not _KEY_RE.match(key):
        raise InvalidArgument(
            f"metadata key {key[:80]!r} is invalid: use 1 to 128 characters of A-Z a-z 0-9 _ . -"
        )


def validate_document_id(doc_id: str) -> None:
    """Ids are non-empty, at most 512 UTF-8 bytes, and free of control
    characters (C0, DEL, C1) and of the bidirectional controls that make a
    printed id read as another (Trojan Source)."""
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidArgument("document id must not be empty")
    if len(doc_id.encode("utf-8", errors="surrogatepass")) > MAX_ID_BYTES:
        raise InvalidArgument(
            f"document id {printable(doc_id[:40])}... is over {MAX_ID_BYTES} bytes"
        )
    if _UNSAFE_RE.search(doc_id):
        raise InvalidArgument(
            f"document id {printable(doc_id[:40])} contains control or bidirectional "
            "formatting characters"
        )


# C0 controls, DEL, C1 controls, bidi embeddings/overrides/isolates, marks,
# and lone surrogates (not encodable as UTF-8).
_UNSAFE_RE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def validate_distinct_ids(
    documents: Sequence[Document],
    repeated: str,
    *,
    each: Callable[[Document], None] | None = None,
) -> None:
    """Every document's id valid and none given twice, in order; `repeated`
    ends the message that names a repeated id (where ids must be distinct),
    `each` checks a document further before the next one's id is looked at."""
    seen: set[str] = set()
    for doc in documents:
        validate_document_id(doc.id)
        if doc.id in seen:
            raise InvalidArgument(
                f"document id {printable(doc.id)} appears more than once{repeated}"
            )
        seen.add(doc.id)
        if each is not None:
            each(doc)


def printable(text: str) -> str:
    """text quoted, with every control or bidi character escaped, safe to
    print in a terminal or a log line."""
    escaped = _UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return "'" + escaped.replace("'", "\\'") + "'"
