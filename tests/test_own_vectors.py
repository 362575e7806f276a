"""Bring your own vectors: documents with the caller's embeddings (one for
the whole text, or one per chunk) through Upsert, Submit and the NATS log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document, GivenChunk, Metadata
from tests.conftest import ServerThread, wait_for
from tests.ingest.nats_setup import Nats, on_nats


def unit(seed: int, dim: int = 384) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def own(doc_id: str, seed: int, model: str, metadata: Metadata | None = None) -> Document:
    return Document(
        doc_id,
        f"Text of {doc_id}.",
        metadata or {},
        chunks=(GivenChunk(f"Text of {doc_id}.", unit(seed) * 3.0),),
        vector_model_id=model,
    )


def model_of(client: RagClient) -> str:
    return client.stats().models[0]


def test_upsert_search_and_replace_with_own_vectors(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    with RagClient(server.target) as client:
        model = model_of(client)
        client.upsert([own(f"v{i}", i, model, {"i": i}) for i in range(50)])
        hit = client.search(unit(7), k=1)[0]
        # Stored normalised (the vector was sent at length 3): cosine 1.
        assert hit.document_id == "v7" and hit.score == pytest.approx(1.0, abs=1e-4)
        assert client.search(unit(7), k=3, filter=None)[0].text == "Text of v7."
        # Several chunks, each with its own vector and text.
        chunks = tuple(GivenChunk(f"part {n}", unit(100 + n)) for n in range(3))
        client.upsert([Document("multi", "whole", chunks=chunks, vector_model_id=model)])
        hit = client.search(unit(101), k=1)[0]
        assert (hit.document_id, hit.chunk_id, hit.text) == ("multi", "multi#1", "part 1")
        # Re-sent with other vectors: replaced, not skipped as unchanged.
        client.upsert([own("v7", 999, model)])
        assert client.search(unit(999), k=1)[0].document_id == "v7"
        assert client.search(unit(7), k=1)[0].document_id != "v7"


def test_own_vectors_that_cannot_be_stored_are_refused(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    with RagClient(server.target) as client:
        model = model_of(client)
        client.upsert([own("ok", 1, model)])
        bad = {
            "383 values": Document(
                "b", "t", chunks=(GivenChunk("t", unit(2, 383)),), vector_model_id=model
            ),
            "NaN": Document(
                "b",
                "t",
                chunks=(GivenChunk("t", np.full(384, np.nan, np.float32)),),
                vector_model_id=model,
            ),
            "all-zero": Document(
                "b",
                "t",
                chunks=(GivenChunk("t", np.zeros(384, np.float32)),),
                vector_model_id=model,
            ),
            "other-model": own("b", 2, "other-model"),
            "(none given)": own("b", 2, ""),
            "no text": Document(
                "b", "t", chunks=(GivenChunk(" ", unit(2)),), vector_model_id=model
            ),
        }
        for words, document in bad.items():
            with pytest.raises(RpcError) as info:
                client.upsert([document])
            assert info.value.code == "INVALID_ARGUMENT" and words in info.value.message, words
        assert client.get(["b"])[1] == ["b"]
        assert [n.documents for n in client.stats().namespaces] == [1]


def test_a_job_carries_own_vectors(start_server: Callable[..., ServerThread]) -> None:
    server = start_server()
    with RagClient(server.target) as client:
        model = model_of(client)
        job = client.submit([own(f"j{i}", i, model) for i in range(40)] + [own("x", 1, "nope")])
        final = list(client.watch_job(job, timeout=60))[-1]
        assert (final.state, final.processed, final.failed, final.chunks) == (
            "SUCCEEDED",
            41,
            1,
            40,
        )
        assert client.search(unit(33), k=1)[0].document_id == "j33"


def test_own_vectors_reach_every_replica_through_the_log(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    (tmp_path / "nats").mkdir()
    node = Nats(tmp_path / "nats").start()
    try:
        first = start_server(tmp_path / "a", **on_nats(node.url))
        second = start_server(tmp_path / "b", **on_nats(node.url, worker=False))
        for replica in (first, second):
            assert replica.server.nats is not None
            wait_for(replica.server.nats.connected.is_set)
        with RagClient(first.target) as a, RagClient(second.target) as b:
            model = model_of(a)
            a.upsert([own(f"n{i}", i, model) for i in range(10)])
            a.submit([own(f"s{i}", 50 + i, model) for i in range(10)])
            wait_for(lambda: not b.get(["n9", "s9"])[1])
            assert b.search(unit(55), k=1)[0].document_id == "s5"
            assert b.search(unit(4), k=1)[0].document_id == "n4"
    finally:
        node.stop()
