"""The document store's tables (store/sqlite.py): created if missing when a
store opens. The lexical (FTS5) table and its triggers are in lexical.py."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    namespace TEXT NOT NULL,
    doc_ids TEXT NOT NULL
);
-- How far this store has applied each write log it follows (NATS JetStream
-- stream sequence), committed with the writes themselves.
CREATE TABLE IF NOT EXISTS log_positions (
    log TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
-- Which write-log entries carry each document's content (text and vectors),
-- so forgetting a document can erase every entry that holds a version of it.
-- A fact about the log, recorded before the entry is applied: rows go with
-- the entries (pruned below the log's first sequence, dropped once erased).
CREATE TABLE IF NOT EXISTS log_documents (
    namespace TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, doc_id, log, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_documents_by_seq ON log_documents (log, seq);
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    namespace TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, doc_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (namespace, doc_id);
-- One row per (document, key): the filter index. kind: s string, n number, b bool.
CREATE TABLE IF NOT EXISTS metadata (
    namespace TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    s TEXT,
    n REAL
);
CREATE INDEX IF NOT EXISTS metadata_by_doc ON metadata (namespace, doc_id);
CREATE INDEX IF NOT EXISTS metadata_by_s ON metadata (namespace, key, kind, s);
CREATE INDEX IF NOT EXISTS metadata_by_n ON metadata (namespace, key, kind, n);
"""
