"""What the backup tests share: a 32-byte key file (the `key` fixture), the
answers a server gives to a few queries (to compare a restored copy with its
source), and a genuine empty database to build archives around."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rag_grpc.client import RagClient
from rag_grpc.store.sqlite import DocumentStore

QUERIES = ["an erupting mountain", "a game with a king and a queen", "making coffee"]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def results(client: RagClient) -> list[list[tuple[str, float]]]:
    return [[(h.chunk_id, round(h.score, 4)) for h in client.search(q, k=3)] for q in QUERIES]


def genuine_database(tmp_path: Path) -> bytes:
    path = tmp_path / "genuine" / "rag.sqlite3"
    path.parent.mkdir()
    DocumentStore(path).close()
    return path.read_bytes()
