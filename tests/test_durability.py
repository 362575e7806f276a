"""Ingestion and writes that are safe to repeat: idempotent by document id
and content."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rag_grpc.client import RagClient
from tests.conftest import CORPUS, ServerThread


def test_resubmitting_unchanged_documents_does_no_work(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    with RagClient(server.target) as client:
        first = client.upsert(CORPUS)
        assert (first.documents, first.unchanged) == (len(CORPUS), 0)
        embedded = embedded_texts(client)
        again = client.upsert(CORPUS)
        assert (again.documents, again.chunks, again.unchanged) == (0, 0, len(CORPUS))
        assert again.index_generation == first.index_generation  # nothing was written
        assert embedded_texts(client) == embedded  # and nothing was embedded
        # One document's metadata changes: only it is written.
        changed = [replace(CORPUS[0], metadata={**CORPUS[0].metadata, "year": 2030}), *CORPUS[1:]]
        third = client.upsert(changed)
        assert (third.documents, third.unchanged) == (1, len(CORPUS) - 1)
        assert third.index_generation == first.index_generation + 1
        hits = client.search("volcanic ash and lava", k=1)
        assert hits[0].document_id == "volcano" and hits[0].metadata["year"] == 2030


def embedded_texts(client: RagClient) -> int:
    from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

    stub = admin_service_pb2_grpc.AdminServiceStub(client.channel)
    return int(stub.Stats(admin_pb2.StatsRequest(), timeout=10).models[0].batched_texts)


def test_cached_results_never_hide_a_write_from_any_client(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    from rag_grpc.documents import Document

    server = start_server()
    cache = server.server.retriever._results  # type: ignore[union-attr]
    assert cache is not None
    with RagClient(server.target) as writer, RagClient(server.target) as reader:
        writer.upsert(CORPUS)
        query = "a rare orchid that blooms at night"
        before = reader.search(query, k=1)
        hits_before = cache.hits
        assert reader.search(query, k=1) == before and cache.hits == hits_before + 1  # cached
        assert before[0].document_id != "orchid"
        writer.upsert([Document("orchid", "The night-blooming orchid opens only after dark.", {})])
        after = reader.search(query, k=1)  # the other client sees the write at once
        assert after[0].document_id == "orchid"
        writer.delete(["orchid"])
        assert reader.search(query, k=1)[0].document_id != "orchid"
    # With the cache off, the same answers.
    plain = start_server(tmp_path / "plain", index={"result_cache_entries": 0})
    assert plain.server.retriever._results is None  # type: ignore[union-attr]
