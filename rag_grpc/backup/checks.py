"""Checking what an archive restored: the database (SQLite's integrity
check, our tables, no SQL objects we never make) and each index (loads, or
is dropped and rebuilt from the database at start).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from rag_grpc.backup.extract import fsync_dir
from rag_grpc.backup.format import REQUIRED_TABLES, BackupError, member_namespace
from rag_grpc.store import lexical


def check_database(path: Path) -> None:
    """SQLite's integrity check, and our tables (a database, but not ours, is refused)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"the database in the archive cannot be opened: {exc}") from None
    try:
        # The database is untrusted until checked: no SQL functions from its
        # schema, and page damage found rather than followed.
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA cell_size_check = ON")
        result = conn.execute("PRAGMA integrity_check").fetchone()
        if not result or result[0] != "ok":
            raise BackupError(
                f"the database in the archive fails SQLite's integrity check: {result}"
            )
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        raise BackupError(f"the database in the archive is damaged: {exc}") from None
    finally:
        conn.close()
    tables = {name for kind, name, _ in objects if kind == "table"}
    if not tables >= REQUIRED_TABLES:
        raise BackupError(
            "the database in the archive is not a rag-grpc database (it lacks the tables "
            f"{sorted(REQUIRED_TABLES - tables)})"
        )
    # We create tables and indexes, and the lexical index (virtual table, view,
    # triggers) exactly as lexical.SCHEMA writes it; another trigger, view or
    # virtual table in a restored database would run its SQL or module on our
    # reads and writes.
    ours = lexical.definitions()
    foreign = sorted(
        f"{kind} {name}"
        for kind, name, sql in objects
        if not (
            kind == "index"
            or (kind == "table" and not (sql or "").upper().startswith("CREATE VIRTUAL"))
            or ours.get(name) == sql
        )
    )
    if foreign:
        raise BackupError(
            f"the database in the archive holds objects rag-grpc never makes: {foreign}"
        )
    if lexical.TABLE in tables:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA trusted_schema = OFF")
                lexical.check_integrity(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise BackupError(
                f"the database's lexical index disagrees with its chunks: {exc}"
            ) from None


def check_indexes(index_dir: Path) -> dict[str, str]:
    """Load each restored index; drop the files of every namespace whose
    index is incomplete or does not load (the server rebuilds it from the
    database at start). Returns namespace -> why it was dropped."""
    from rag_grpc.native import VectorIndex

    namespaces: dict[str, list[Path]] = {}
    for path in sorted(index_dir.iterdir()) if index_dir.is_dir() else []:
        namespace = member_namespace(f"index/{path.name}")
        assert namespace is not None
        namespaces.setdefault(namespace, []).append(path)
    dropped: dict[str, str] = {}
    for namespace, paths in namespaces.items():
        graph, graph_meta, meta = (
            index_dir / f"{namespace}{s}" for s in (".hnsw", ".hnsw.meta.json", ".json")
        )
        try:
            if not (graph.is_file() and graph_meta.is_file() and meta.is_file()):
                raise ValueError("its index files are incomplete")
            saved = json.loads(meta.read_text())
            if not isinstance(saved, dict) or not isinstance(saved.get("last_label"), int):
                raise ValueError(f"{meta.name} does not say which rows the index holds")
            # Structural checks happen in load(); the int8 codes are not needed here.
            VectorIndex.load(graph, quantized=False)
        except (ValueError, UnicodeDecodeError) as exc:
            dropped[namespace] = str(exc)
            for path in paths:
                path.unlink()
    if dropped:
        fsync_dir(index_dir)
    return dropped
