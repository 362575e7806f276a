"""Compaction (rag_grpc/index/compaction.py): deletes past the configured
fraction rebuild the index without their slots and vacuum the database, and
the explicit command reclaims what is left below the threshold."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.conftest import ServerThread


def test_deletes_are_compacted_away(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data, index={"compact_min_slots": 10, "compact_deleted_fraction": 0.4})
    retriever = server.server.retriever
    assert retriever is not None
    documents = [
        Document(f"d{i}", f"Catalogue entry {i}: " + "words of filler text " * 40)
        for i in range(60)
    ]
    with RagClient(server.target) as client:
        client.upsert(documents)
        index = retriever.indexes.get("default")
        full = index.slots
        assert full == len(index) >= 60
        size_full = checkpointed_size(data / "rag.sqlite3")
        client.delete([d.id for d in documents[:20]])
        assert retriever.indexes.get("default").slots == full  # under the threshold: marked only
        client.delete([d.id for d in documents[20:40]])
        index = retriever.indexes.get("default")
        # Crossing 40 % deleted rebuilt the index without them and vacuumed the file.
        assert index.slots == len(index) < full
        assert retriever.writes.compactions == 1
        assert checkpointed_size(data / "rag.sqlite3") < 0.8 * size_full
        hits = client.search("Catalogue entry 45", k=3)
        assert hits and all(int(h.document_id[1:]) >= 40 for h in hits)
        # The explicit command reclaims what is left below the threshold.
        client.delete([documents[40].id])
        assert retriever.indexes.get("default").slots > len(retriever.indexes.get("default"))
        before, after = retriever.compact("default")["default"]
        assert before > after == len(retriever.indexes.get("default"))


def checkpointed_size(path: Path) -> int:
    """The database file's size with everything in its WAL written back."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size
