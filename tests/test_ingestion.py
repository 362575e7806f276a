"""IngestionService: asynchronous, durable jobs with per-document errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import CORPUS, ServerThread


def many_documents(n: int) -> list[Document]:
    return [
        Document(f"doc-{i}", f"Document {i} describes item {i} of the catalogue in plain words.")
        for i in range(n)
    ]


def test_submit_returns_a_job_that_stores_the_documents(client: RagClient) -> None:
    job_id = client.submit(CORPUS)
    states = list(client.watch_job(job_id, timeout=60))
    assert states[-1].state == "SUCCEEDED"
    assert (states[-1].processed, states[-1].failed, states[-1].chunks) == (5, 0, 5)
    assert [s.processed for s in states] == sorted(s.processed for s in states)
    assert client.get_job(job_id) == states[-1]
    assert client.search("lava", k=1)[0].document_id == "volcano"


def test_bad_documents_fail_alone(client: RagClient) -> None:
    docs = [*CORPUS[:2], Document("blank", "   "), Document("meta", "ok", {"bad key": 1})]
    job_id = client.submit(docs)
    final = list(client.watch_job(job_id, timeout=60))[-1]
    assert final.state == "SUCCEEDED"
    assert (final.processed, final.failed) == (4, 2)
    assert {doc_id for doc_id, _ in final.errors} == {"blank", "meta"}
    assert any("no text" in message for _, message in final.errors)
    found, missing = client.get(["volcano", "photosynthesis", "blank", "meta"])
    assert [d.id for d in found] == ["volcano", "photosynthesis"]
    assert missing == ["blank", "meta"]


def test_job_request_errors(client: RagClient) -> None:
    unknown = "0" * 32  # well formed, never issued
    with pytest.raises(RpcError) as info:
        client.get_job(unknown)
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(RpcError) as info:
        list(client.watch_job(unknown))
    assert info.value.code == "NOT_FOUND"
    # Not a job id at all: said so, and never echoed at length.
    for bad in ("no-such-job", "../../etc/passwd", "A" * 100_000, "0" * 31 + "\u202e"):
        with pytest.raises(RpcError) as info:
            client.get_job(bad)
        assert info.value.code == "INVALID_ARGUMENT", bad[:40]
        assert "32 hexadecimal" in info.value.message and len(info.value.message) < 300
        assert "\u202e" not in info.value.message
    with pytest.raises(RpcError) as info:
        client.submit([Document("a", "x"), Document("a", "y")])
    assert info.value.code == "INVALID_ARGUMENT" and "more than once" in info.value.message
    with pytest.raises(RpcError) as info:
        client.submit([])
    assert info.value.code == "INVALID_ARGUMENT"


def test_pending_job_limit_gives_resource_exhausted(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(limits={"max_pending_jobs": 1})
    with RagClient(server.target) as client:
        first = client.submit(many_documents(300))
        with pytest.raises(RpcError) as info:
            client.submit(CORPUS)
        assert info.value.code == "RESOURCE_EXHAUSTED" and "retry" in info.value.message
        assert list(client.watch_job(first, timeout=120))[-1].state == "SUCCEEDED"
        client.submit(CORPUS)  # accepted again once the queue drained


def test_job_resumes_after_restart(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    data_dir = tmp_path / "durable"
    server = start_server(data_dir)
    docs = many_documents(600)
    with RagClient(server.target) as client:
        job_id = client.submit(docs)
        deadline = time.monotonic() + 60
        while client.get_job(job_id).processed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    server.stop()
    restarted = start_server(data_dir)
    with RagClient(restarted.target) as client:
        status = client.get_job(job_id)
        # Stopped part-way: the restart picks the job up where it was left.
        assert status.state in ("QUEUED", "RUNNING") and 0 < status.processed < 600
        final = list(client.watch_job(job_id, timeout=120))[-1]
        assert final.state == "SUCCEEDED" and final.processed == 600 and final.failed == 0
        found, missing = client.get([d.id for d in docs])
        assert len(found) == 600 and not missing
        assert client.stats().namespaces[0].vectors == 600
