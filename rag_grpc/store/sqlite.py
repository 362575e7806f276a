"""SQLite (WAL) document store: documents, chunks with their vectors, metadata.

The vector index is derived from the ``chunks`` table and can be rebuilt from
it at any time. Chunk labels are AUTOINCREMENT row ids, never reused, so a
label found in the index names at most one chunk forever.

Long (about 650 lines) on purpose: DocumentStore is one class over one writer
connection and its lock, and its transactions span the tables (a write
replaces documents, chunks and metadata, bumps the generation and records the
write log's position in one commit), so its methods stay together. The parts
that stand alone live beside it: the tables (schema.py), connections and
storage errors (database.py), filters as SQL (filter_sql.py), the chunk
record cache (chunk_cache.py) and the full-text arm (lexical.py).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc.documents import DEFAULT_NAMESPACE, Document, MetadataScalar
from rag_grpc.errors import Unavailable
from rag_grpc.filters import Filter
from rag_grpc.store import lexical
from rag_grpc.store.chunk_cache import ChunkCache, ChunkRecord
from rag_grpc.store.database import (
    connect,
    immediate_transaction,
    interruptible,
    private_file,
    storage_error,
)
from rag_grpc.store.filter_sql import compile_filter, metadata_columns
from rag_grpc.store.schema import SCHEMA

# Imported from here by callers that predate database.py (security/, services/).
__all__ = [
    "ChunkRecord",
    "DocumentStore",
    "NamespaceCounts",
    "NewChunk",
    "ReplaceOutcome",
    "connect",
    "private_file",
    "storage_error",
    "stored_bytes",
]


def stored_bytes(document: Document) -> int:
    """The bytes a document takes in the documents table: its text (UTF-8)
    and its metadata as stored (JSON), as `namespace_sizes` sums them."""
    return len(document.text.encode("utf-8", errors="surrogatepass")) + len(
        json.dumps(document.metadata)
    )


@dataclass(frozen=True)
class NewChunk:
    """A chunk about to be written: its document, position, text and vector."""

    doc_id: str
    seq: int
    text: str
    vector: np.ndarray


@dataclass(frozen=True)
class NamespaceCounts:
    """Sizes of one namespace as stored."""

    name: str
    documents: int
    chunks: int
    generation: int


@dataclass(frozen=True)
class ReplaceOutcome:
    """Labels removed and added by a write, and the namespace generation after it."""

    removed_labels: np.ndarray
    added_labels: np.ndarray
    generation: int


class DocumentStore:
    """Thread-safe access to the SQLite database.

    Writes go through one connection under a lock; reads use one connection
    per thread, which WAL lets run beside the writer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        private_file(path)
        self._write_lock = threading.Lock()
        self._chunks = ChunkCache()
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        lexical.install(self._writer)
        # The default namespace always exists, so a fresh server answers
        # searches with no hits rather than NOT_FOUND.
        self._writer.execute(
            "INSERT OR IGNORE INTO namespaces (name, generation, created_at) VALUES (?, 0, ?)",
            (DEFAULT_NAMESPACE, time.time()),
        )

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.path)
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def unchanged(self, namespace: str, documents: Sequence[Document]) -> set[str]:
        """Ids of the documents stored with exactly this text and metadata."""
        if not documents:
            return set()
        wanted = {d.id: d for d in documents}
        ids = list(wanted)
        same: set[str] = set()
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = self._reader().execute(
                f"SELECT doc_id, text, metadata FROM documents WHERE namespace = ? "
                f"AND doc_id IN ({','.join('?' * len(part))})",
                (namespace, *part),
            )
            for doc_id, text, metadata in rows:
                doc = wanted[doc_id]
                if text == doc.text and json.loads(metadata) == doc.metadata:
                    same.add(doc_id)
        return same

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the whole database through SQLite's online
        backup API (readers and writers carry on meanwhile)."""
        source = self._connect()
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
            source.close()

    def close(self) -> None:
        """Close the writer connection (readers close with their threads)."""
        self._writer.close()

    # -- writes ------------------------------------------------------------

    def replace_documents(
        self,
        namespace: str,
        documents: Sequence[Document],
        chunks: Sequence[NewChunk],
        *,
        position: tuple[str, int] | None = None,
        written_at: float | None = None,
    ) -> ReplaceOutcome:
        """Atomically replace the given documents (and all their chunks);
        position (log, sequence) is recorded in the same transaction.
        written_at: when the write was accepted (kept for retention)."""
        now = time.time() if written_at is None else written_at
        with self._write_lock:
            conn = self._writer
            with immediate_transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO namespaces (name, generation, created_at) "
                    "VALUES (?, 0, ?)",
                    (namespace, now),
                )
                removed = self._delete_docs(conn, namespace, [d.id for d in documents])
                conn.executemany(
                    "INSERT INTO documents (namespace, doc_id, text, metadata, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(namespace, d.id, d.text, json.dumps(d.metadata), now) for d in documents],
                )
                conn.executemany(
                    "INSERT INTO metadata (namespace, doc_id, key, kind, s, n) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (namespace, d.id, key, *metadata_columns(value))
                        for d in documents
                        for key, value in d.metadata.items()
                    ],
                )
                added = []
                for chunk in chunks:
                    cur = conn.execute(
                        "INSERT INTO chunks (namespace, doc_id, seq, text, vector) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            namespace,
                            chunk.doc_id,
                            chunk.seq,
                            chunk.text,
                            np.ascontiguousarray(chunk.vector, dtype="<f4").tobytes(),
                        ),
                    )
                    added.append(cur.lastrowid)
                generation = self._bump(conn, namespace)
                if position is not None:
                    self._set_position(conn, *position)
            self._chunks.forget(removed)
        return ReplaceOutcome(
            np.asarray(removed, dtype=np.uint64), np.asarray(added, dtype=np.uint64), generation
        )

    def delete_documents(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        erase: bool = False,
        position: tuple[str, int] | None = None,
        older_than: float | None = None,
    ) -> tuple[list[str], np.ndarray, int]:
        """Delete documents; return (deleted ids, removed chunk labels, generation).

        older_than: only those last written before this time (decided inside
        the transaction, so a document refreshed meanwhile stays). With erase
        the deleted content is also gone from the files: see `erase`.
        """
        with self._write_lock:
            conn = self._writer
            with immediate_transaction(conn):
                present = self._existing_ids(conn, namespace, doc_ids, older_than)
                removed = self._delete_docs(conn, namespace, present)
                generation = (
                    self._bump(conn, namespace) if present else self._generation(conn, namespace)
                )
                if position is not None:
                    self._set_position(conn, *position)
            self._chunks.forget(removed)
            if erase:
                self._erase(conn)
        return present, np.asarray(removed, dtype=np.uint64), generation

    def _erase(self, conn: sqlite3.Connection) -> None:
        """Leave no copy of deleted content in the database or its WAL, on any
        SQLite build: every connection runs with secure_delete, but a page
        freed by another connection (or a build or caller that turned it off)
        may still hold old text, so VACUUM rewrites the file from live rows
        (after the lexical index merged its segments, which keep deleted
        chunks' words until then) and the WAL is checkpointed and truncated
        (checked, not assumed)."""
        self._checkpoint(conn)
        lexical.merge_away_deleted(conn)
        conn.execute("VACUUM")
        self._checkpoint(conn)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + 10
        while True:
            busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy and (log_frames in (0, -1) or done == log_frames):
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    "the deletion is committed, but readers kept the write-ahead log from "
                    "being truncated; run the forget again to finish erasing"
                )
            time.sleep(0.05)

    def vacuum(self) -> None:
        """Give the space of deleted rows back to the file system."""
        with self._write_lock:
            self._writer.execute("VACUUM")
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def doc_ids_matching(self, namespace: str, flt: Filter, limit: int | None = None) -> list[str]:
        """Ids of the documents whose metadata matches the filter (at most limit)."""
        clause, params = compile_filter(flt, namespace)
        sql = f"SELECT d.doc_id FROM documents d WHERE d.namespace = ? AND {clause}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with interruptible(self._reader()) as conn:
            return [row[0] for row in conn.execute(sql, [namespace, *params])]

    def expired_ids(self, namespace: str, before: float) -> list[str]:
        """Documents of the namespace last written before this time."""
        rows = self._reader().execute(
            "SELECT doc_id FROM documents WHERE namespace = ? AND updated_at < ? LIMIT 10000",
            (namespace, before),
        )
        return [row[0] for row in rows]

    def record_audit(self, actor: str, action: str, namespace: str, doc_ids: Sequence[str]) -> None:
        """Who did what to which ids, when (never document content)."""
        with self._write_lock:
            self._writer.execute(
                "INSERT INTO audit (at, actor, action, namespace, doc_ids) VALUES (?, ?, ?, ?, ?)",
                (time.time(), actor, action, namespace, json.dumps(list(doc_ids))),
            )

    def audit_log(self) -> list[dict[str, object]]:
        rows = self._reader().execute(
            "SELECT at, actor, action, namespace, doc_ids FROM audit ORDER BY id"
        )
        return [
            {
                "at": at,
                "actor": actor,
                "action": action,
                "namespace": ns,
                "doc_ids": json.loads(ids),
            }
            for at, actor, action, ns, ids in rows
        ]

    @staticmethod
    def _delete_docs(conn: sqlite3.Connection, namespace: str, doc_ids: Sequence[str]) -> list[int]:
        removed: list[int] = []
        for doc_id in doc_ids:
            removed.extend(
                row[0]
                for row in conn.execute(
                    "SELECT label FROM chunks WHERE namespace = ? AND doc_id = ?",
                    (namespace, doc_id),
                )
            )
            conn.execute(
                "DELETE FROM chunks WHERE namespace = ? AND doc_id = ?", (namespace, doc_id)
            )
            conn.execute(
                "DELETE FROM metadata WHERE namespace = ? AND doc_id = ?", (namespace, doc_id)
            )
            conn.execute(
                "DELETE FROM documents WHERE namespace = ? AND doc_id = ?", (namespace, doc_id)
            )
        return removed

    @staticmethod
    def _set_position(conn: sqlite3.Connection, log: str, seq: int) -> None:
        conn.execute(
            "INSERT INTO log_positions (log, seq) VALUES (?, ?) "
            "ON CONFLICT (log) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            (log, seq),
        )

    def set_position(self, log: str, seq: int) -> None:
        """Record that the log is applied up to seq (an entry that changed nothing)."""
        with self._write_lock:
            self._set_position(self._writer, log, seq)

    def position(self, log: str) -> int:
        """The last sequence of the log applied here (0: none)."""
        row = (
            self._reader().execute("SELECT seq FROM log_positions WHERE log = ?", (log,)).fetchone()
        )
        return int(row[0]) if row else 0

    def record_log_documents(
        self, log: str, seq: int, namespace: str, doc_ids: Sequence[str]
    ) -> None:
        """Note that entry seq of the log carries these documents' content."""
        with self._write_lock:
            conn = self._writer
            with immediate_transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO log_documents (namespace, doc_id, log, seq) "
                    "VALUES (?, ?, ?, ?)",
                    [(namespace, doc_id, log, seq) for doc_id in doc_ids],
                )

    def log_documents(
        self, log: str, namespace: str, doc_ids: Sequence[str]
    ) -> dict[str, list[int]]:
        """The log entries known to carry each of these documents, by id."""
        found: dict[str, list[int]] = {}
        conn = self._reader()
        for doc_id in dict.fromkeys(doc_ids):
            rows = conn.execute(
                "SELECT seq FROM log_documents WHERE namespace = ? AND doc_id = ? AND log = ? "
                "ORDER BY seq",
                (namespace, doc_id, log),
            )
            seqs = [int(row[0]) for row in rows]
            if seqs:
                found[doc_id] = seqs
        return found

    def drop_log_documents(self, log: str, *, seqs: Sequence[int] = (), below: int = 0) -> None:
        """Forget the rows of erased entries (seqs) and of entries the log no
        longer holds (below its first sequence)."""
        with self._write_lock:
            conn = self._writer
            with immediate_transaction(conn):
                conn.executemany(
                    "DELETE FROM log_documents WHERE log = ? AND seq = ?",
                    [(log, seq) for seq in seqs],
                )
                if below:
                    conn.execute(
                        "DELETE FROM log_documents WHERE log = ? AND seq < ?", (log, below)
                    )

    @staticmethod
    def _bump(conn: sqlite3.Connection, namespace: str) -> int:
        conn.execute(
            "UPDATE namespaces SET generation = generation + 1 WHERE name = ?", (namespace,)
        )
        return DocumentStore._generation(conn, namespace)

    @staticmethod
    def _generation(conn: sqlite3.Connection, namespace: str) -> int:
        row = conn.execute(
            "SELECT generation FROM namespaces WHERE name = ?", (namespace,)
        ).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _existing_ids(
        conn: sqlite3.Connection,
        namespace: str,
        doc_ids: Sequence[str],
        older_than: float | None = None,
    ) -> list[str]:
        found = []
        sql = "SELECT 1 FROM documents WHERE namespace = ? AND doc_id = ?"
        if older_than is not None:
            sql += " AND updated_at < ?"
        for doc_id in dict.fromkeys(doc_ids):
            args = (namespace, doc_id) if older_than is None else (namespace, doc_id, older_than)
            if conn.execute(sql, args).fetchone():
                found.append(doc_id)
        return found

    # -- reads -------------------------------------------------------------

    def namespaces(self) -> list[str]:
        """Names of all namespaces, sorted."""
        rows = self._reader().execute("SELECT name FROM namespaces ORDER BY name")
        return [r[0] for r in rows]

    def has_namespace(self, namespace: str) -> bool:
        """Whether the namespace was ever written."""
        row = (
            self._reader()
            .execute("SELECT 1 FROM namespaces WHERE name = ?", (namespace,))
            .fetchone()
        )
        return row is not None

    def generation(self, namespace: str) -> int:
        """The namespace's write counter (0 if it does not exist)."""
        return self._generation(self._reader(), namespace)

    def counts(self) -> list[NamespaceCounts]:
        """Documents and chunks per namespace."""
        conn = self._reader()
        result = []
        for name, generation in conn.execute(
            "SELECT name, generation FROM namespaces ORDER BY name"
        ).fetchall():
            docs = conn.execute(
                "SELECT COUNT(*) FROM documents WHERE namespace = ?", (name,)
            ).fetchone()[0]
            chunks = conn.execute(
                "SELECT COUNT(*) FROM chunks WHERE namespace = ?", (name,)
            ).fetchone()[0]
            result.append(NamespaceCounts(name, int(docs), int(chunks), int(generation)))
        return result

    def namespace_sizes(self, namespace: str) -> tuple[int, int, int]:
        """Documents, chunks and stored bytes (`stored_bytes`) of a namespace,
        read in one snapshot. Reads every document row: call it once per
        namespace and keep the figures current from the writes (index/sizes.py)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            docs, stored = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(text AS BLOB)) + LENGTH(metadata)), 0) "
                "FROM documents WHERE namespace = ?",
                (namespace,),
            ).fetchone()
            chunks = conn.execute(
                "SELECT COUNT(*) FROM chunks WHERE namespace = ?", (namespace,)
            ).fetchone()[0]
        finally:
            conn.execute("COMMIT")
        return int(docs), int(chunks), int(stored)

    def document_sizes(self, namespace: str, doc_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(stored bytes, chunks) of the stored documents among doc_ids, by id
        (primary-key and chunks_by_doc lookups: the cost of the ids given)."""
        conn = self._reader()
        sizes: dict[str, tuple[int, int]] = {}
        ids = list(dict.fromkeys(doc_ids))
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            stored = dict(
                conn.execute(
                    "SELECT doc_id, LENGTH(CAST(text AS BLOB)) + LENGTH(metadata) FROM documents "
                    f"WHERE namespace = ? AND doc_id IN ({marks})",
                    (namespace, *part),
                ).fetchall()
            )
            chunks = dict(
                conn.execute(
                    "SELECT doc_id, COUNT(*) FROM chunks WHERE namespace = ? "
                    f"AND doc_id IN ({marks}) GROUP BY doc_id",
                    (namespace, *part),
                ).fetchall()
            )
            for doc_id, size in stored.items():
                sizes[doc_id] = (int(size), int(chunks.get(doc_id, 0)))
        return sizes

    def get_documents(self, namespace: str, doc_ids: Sequence[str]) -> dict[str, Document]:
        """Stored documents by id; absent ids are left out."""
        conn = self._reader()
        found: dict[str, Document] = {}
        for doc_id in dict.fromkeys(doc_ids):
            row = conn.execute(
                "SELECT text, metadata FROM documents WHERE namespace = ? AND doc_id = ?",
                (namespace, doc_id),
            ).fetchone()
            if row:
                found[doc_id] = Document(doc_id, row[0], json.loads(row[1]))
        return found

    def get_chunks(self, labels: Sequence[int]) -> dict[int, ChunkRecord]:
        """Chunks by label with their document's metadata; deleted labels are left out.

        A label's chunk never changes (a re-upsert writes new labels), so
        records are cached until their chunk is deleted.
        """
        found, missing = self._chunks.lookup(labels)
        if not missing:
            return found
        placeholders = ",".join("?" * len(missing))
        rows = self._reader().execute(
            "SELECT c.label, c.doc_id, c.seq, c.text, d.metadata FROM chunks c "
            "JOIN documents d ON d.namespace = c.namespace AND d.doc_id = c.doc_id "
            f"WHERE c.label IN ({placeholders})",
            missing,
        )
        fetched = {
            int(label): ChunkRecord(int(label), doc_id, int(seq), text, json.loads(meta))
            for label, doc_id, seq, text, meta in rows
        }
        self._chunks.add(fetched)
        return found | fetched

    def lexical_ranking(
        self, namespace: str, expression: str, allowed: np.ndarray | None = None
    ) -> Iterator[tuple[int, float]]:
        """(label, BM25 score) of the namespace's chunks matching an FTS5
        expression from `lexical.match_expression`, best first; consume it in
        the calling thread (it reads through that thread's connection)."""
        conn = self._reader()
        with interruptible(conn, "matching words"):
            yield from lexical.ranked_labels(conn, namespace, expression, allowed)

    def labels(self, namespace: str) -> np.ndarray:
        """Chunk labels of a namespace, without reading their vectors."""
        rows = self._reader().execute(
            "SELECT label FROM chunks WHERE namespace = ? ORDER BY label", (namespace,)
        )
        return np.fromiter((r[0] for r in rows), dtype=np.uint64)

    def iter_vectors(
        self, namespace: str, batch_size: int = 4096, *, after: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of a namespace with labels above after, in batches:
        all of them to rebuild its index, the newer rows to bring a saved one up to date."""
        cursor = self._reader().execute(
            "SELECT label, vector FROM chunks WHERE namespace = ? AND label > ? ORDER BY label",
            (namespace, after),
        )
        while rows := cursor.fetchmany(batch_size):
            labels = np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
            vectors = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])
            yield labels, vectors

    def labels_matching(self, namespace: str, flt: Filter) -> np.ndarray:
        """Chunk labels of the namespace's documents that satisfy the filter."""
        clause, params = compile_filter(flt, namespace)
        with interruptible(self._reader()) as conn:
            rows = conn.execute(
                "SELECT c.label FROM chunks c WHERE c.namespace = ? AND c.doc_id IN "
                f"(SELECT d.doc_id FROM documents d WHERE d.namespace = ? AND {clause})",
                [namespace, namespace, *params],
            )
            return np.fromiter((r[0] for r in rows), dtype=np.uint64)

    def metadata_rows(
        self, namespace: str, doc_ids: Sequence[str] | None = None, after_label: int | None = None
    ) -> list[tuple[int, str, MetadataScalar]]:
        """(chunk label, key, value) for each chunk and metadata key of the
        namespace's documents, or of these documents only, or of chunks newer
        than after_label only: what the in-memory payload index holds.
        Numbers come back as floats, as they are stored and compared."""
        if after_label is not None:
            # The chunks' rowid range first (CROSS JOIN fixes the join order,
            # NOT INDEXED leaves the rowid), then each one's metadata by
            # document: a restart's catch-up reads only the new rows.
            sql = (
                "SELECT c.label, m.key, m.kind, m.s, m.n FROM chunks c NOT INDEXED "
                "CROSS JOIN metadata m INDEXED BY metadata_by_doc "
                "ON m.namespace = c.namespace AND m.doc_id = c.doc_id "
                "WHERE c.label > ? AND c.namespace = ?"
            )
            return [
                (int(label), key, s if kind == "s" else bool(n) if kind == "b" else float(n))
                for label, key, kind, s, n in self._reader().execute(sql, (after_label, namespace))
            ]
        # By document: metadata and chunks are read in the same order (left
        # to itself SQLite took metadata_by_n and 0.96 s for 300k rows; this
        # plan 0.38 s).
        sql = (
            "SELECT c.label, m.key, m.kind, m.s, m.n FROM metadata m INDEXED BY metadata_by_doc "
            "JOIN chunks c ON c.namespace = m.namespace AND c.doc_id = m.doc_id "
            "WHERE m.namespace = ?"
        )
        conn = self._reader()
        if doc_ids is None:
            parts: list[list[Any]] = [[namespace]]
        else:
            ids = list(dict.fromkeys(doc_ids))
            sql += " AND m.doc_id IN (SELECT value FROM json_each(?))"
            parts = [
                [namespace, json.dumps(ids[start : start + 10_000])]
                for start in range(0, len(ids), 10_000)
            ]
        return [
            (int(label), key, s if kind == "s" else bool(n) if kind == "b" else float(n))
            for params in parts
            for label, key, kind, s, n in conn.execute(sql, params)
        ]
