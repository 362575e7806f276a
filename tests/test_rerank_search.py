"""The re-rank stage in Search (issue 16), through a real server with a
small random-weight cross-encoder: hits come back in the model's order with
its scores, by document too, and a broken model stops the start."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.config import RerankConfig
from rag_grpc.documents import Document
from rag_grpc.embed.model_files import ModelFilesError
from rag_grpc.rerank import load_reranker
from tests.conftest import ServerThread
from tests.rerank.cross_encoder import WINDOW, WORDS, write_cross_encoder

QUERY = "kalo mire nusa tive"


def documents() -> list[Document]:
    """Texts in the test tokenizer's words (others would all be [UNK])."""
    rng = np.random.default_rng(7)
    return [
        Document(f"doc-{i}", " ".join(rng.choice(WORDS, size=12)) + ". " + QUERY * (i % 2))
        for i in range(12)
    ]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_cross_encoder(tmp_path / "cross-encoder", num_labels=1, seed=3)


def settings_for(model: Path) -> dict[str, object]:
    return {
        "rerank": {"model_dir": model, "max_sequence_length": WINDOW, "top_n": 6},
        "index": {"result_cache_entries": 0},
    }


@pytest.fixture
def client(start_server: Callable[..., ServerThread], model: Path) -> Iterator[RagClient]:
    server = start_server(**settings_for(model))
    with RagClient(server.target, timeout=60) as c:
        c.upsert(documents())
        yield c


def test_hits_come_in_the_cross_encoder_order(
    client: RagClient, model: Path, tmp_path: Path
) -> None:
    reranker = load_reranker(
        RerankConfig(model_dir=model, max_sequence_length=WINDOW), tmp_path / "local"
    )
    for mode in ("dense", "hybrid", "lexical"):
        pool = client.search(QUERY, k=8, mode=mode, candidates=8) if mode == "hybrid" else None
        pool = pool or client.search(QUERY, k=8, mode=mode)
        expected = reranker.score(QUERY, [h.text for h in pool])
        order = np.argsort(-expected, kind="stable")
        hits = client.search(QUERY, k=5, mode=mode, rerank=True, rerank_top_n=8)
        assert [h.chunk_id for h in hits] == [pool[i].chunk_id for i in order[:5]], mode
        assert [h.score for h in hits] == pytest.approx(expected[order[:5]].tolist(), abs=1e-4)
    # The plain search is not re-ranked unless asked.
    plain = client.search(QUERY, k=5, mode="dense")
    assert [h.score for h in plain] != [h.score for h in client.search(QUERY, k=5, rerank=True)]


def test_by_document_re_ranks_documents(client: RagClient) -> None:
    hits = client.search(QUERY, k=4, mode="hybrid", by_document=True, rerank=True)
    assert len({h.document_id for h in hits}) == len(hits) == 4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_rerank_top_n_is_bounded(client: RagClient) -> None:
    for top_n in (3, 201):  # below k, above rerank.max_top_n
        with pytest.raises(RpcError) as err:
            client.search(QUERY, k=5, rerank=True, rerank_top_n=top_n)
        assert err.value.code == "INVALID_ARGUMENT" and "rerank_top_n" in err.value.message


def test_a_broken_model_stops_the_start(
    start_server: Callable[..., ServerThread], model: Path
) -> None:
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"tokenizer\.json"):
        start_server(**settings_for(model))
