"""The process set-up that goes with a command's settings
(rag_grpc/cli/settings.py): the files `rag-grpc serve` writes are private."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient
from tests.conftest import CORPUS, ServerProcess

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_serve_leaves_no_file_readable_by_others(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    previous = os.umask(0o022)  # the usual umask, so the server must tighten it itself
    try:
        proc = server_process(data)
    finally:
        os.umask(previous)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS)
        client.delete(["chess"])
    assert proc.stop() == 0
    paths = [data, *data.rglob("*")]
    assert any(p.suffix == ".hnsw" for p in paths) and any(p.name == "rag.sqlite3" for p in paths)
    open_to_others = {
        str(p.relative_to(data)): oct(p.stat().st_mode & 0o777)
        for p in paths
        if p.stat().st_mode & 0o077
    }
    assert open_to_others == {}
