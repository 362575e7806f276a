"""The source of truth: documents, chunks, vectors and metadata in SQLite."""

from rag_grpc.store.sqlite import ChunkRecord, DocumentStore, NamespaceCounts, NewChunk

__all__ = ["ChunkRecord", "DocumentStore", "NamespaceCounts", "NewChunk"]
