"""Commands on a data directory no server is using (rag_grpc/cli/data_dir.py):
`rag-grpc compact` offline."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.cli.command import cli
from tests.conftest import CORPUS, EXPORT_DIR, MODEL_DIR, ServerProcess

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_compact_reclaims_deleted_documents_offline(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    proc = server_process(data)
    filler = " ".join(f"word{i}" for i in range(150))
    documents = [Document(f"doc{i}", f"Document {i} about item {i}. {filler}") for i in range(60)]
    documents += CORPUS
    with RagClient(proc.target) as client:
        client.upsert(documents[:30])
        client.upsert(documents[30:])
        assert client.delete([d.id for d in documents[:60]]).documents == 60
    offline = ("compact", "--data-dir", str(data))
    env = {
        "RAG_GRPC_EMBEDDING__MODEL_DIR": str(MODEL_DIR),
        "RAG_GRPC_EMBEDDING__EXPORT_DIR": str(EXPORT_DIR),
    }
    busy = cli(*offline, env=env)
    assert busy.returncode == 2 and "in use by another process" in busy.stderr
    assert proc.stop() == 0

    compacted = cli(*offline, env=env)
    assert compacted.returncode == 0, compacted.stderr
    slots = re.search(r"default: index slots (\d+) -> (\d+)", compacted.stdout)
    assert slots, compacted.stdout
    assert int(slots.group(1)) > 60 and int(slots.group(2)) == len(CORPUS)
    sizes = re.search(r"database: (\d+) -> (\d+) bytes", compacted.stdout)
    assert sizes and int(sizes.group(2)) < int(sizes.group(1)) / 2, compacted.stdout

    proc = server_process(data)
    with RagClient(proc.target) as client:
        assert client.search("What erupts from a volcano?", k=1)[0].document_id == "volcano"
        assert client.search("item 7", k=3)[0].document_id in {d.id for d in CORPUS}
        assert [ns.vectors for ns in client.stats().namespaces] == [len(CORPUS)]
    proc.stop()
    missing = cli("compact", "--data-dir", str(tmp_path / "nothing"), env=env)
    assert missing.returncode == 2 and "nothing to compact" in missing.stderr
