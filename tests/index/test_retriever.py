"""The Retriever built directly (no server): writes, reads and searches over
a temporary store, with the deterministic word embedder."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_grpc.config import LimitsConfig
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument, NotFound
from rag_grpc.filters import Equals, Range
from rag_grpc.index.query import SearchQuery
from rag_grpc.index.retriever import Retriever
from tests.conftest import CORPUS
from tests.in_process import WordEmbedder, open_retriever


@pytest.fixture
def embedder() -> WordEmbedder:
    return WordEmbedder()


@pytest.fixture
def retriever(tmp_path: Path, embedder: WordEmbedder) -> Retriever:
    r = open_retriever(tmp_path / "data", embedder)
    r.upsert("", CORPUS)
    return r


def ids(retriever: Retriever, **query: object) -> list[str]:
    return [h.document_id for h in retriever.search(SearchQuery(**query)).hits]  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_each_mode_finds_the_document_that_shares_the_querys_words(
    retriever: Retriever, mode: str
) -> None:
    assert ids(retriever, text="volcanic ash and lava", k=3, mode=mode)[0] == "volcano"
    assert ids(retriever, text="chlorophyll chloroplasts", k=3, mode=mode)[0] == "photosynthesis"


def test_a_lexical_search_finds_only_documents_with_the_word(retriever: Retriever) -> None:
    assert ids(retriever, text="espresso crema", k=5, mode="lexical") == ["espresso"]
    assert ids(retriever, text="zeppelin", k=5, mode="lexical") == []


def test_k_bounds_the_hits_and_they_come_best_first(retriever: Retriever) -> None:
    hits = retriever.search(SearchQuery(text="the game of chess", k=3, mode="dense")).hits
    assert len(hits) == 3
    assert hits[0].document_id == "chess"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].metadata == {"topic": "games", "year": 2015, "reviewed": False}
    assert hits[0].chunk_id == "chess#0"


def test_a_query_vector_searches_like_its_text(retriever: Retriever) -> None:
    vector = WordEmbedder().vector("a mutex in CPython")
    assert ids(retriever, vector=vector.tolist(), k=1, mode="dense") == ["gil"]


def test_filters_restrict_the_hits_to_matching_metadata(retriever: Retriever) -> None:
    found = ids(retriever, text="volcano", k=5, mode="dense", filter=Equals("topic", "food"))
    assert found == ["espresso"]
    recent = ids(retriever, text="volcano", k=5, mode="dense", filter=Range("year", gte=2021))
    assert sorted(recent) == ["espresso", "gil", "photosynthesis"]
    assert ids(retriever, text="volcano", k=5, filter=Equals("reviewed", "yes")) == []


def test_every_write_bumps_the_generation_and_an_unchanged_one_does_not(
    retriever: Retriever, embedder: WordEmbedder
) -> None:
    before = retriever.search(SearchQuery(text="chess", k=1)).index_generation
    embedded = embedder.texts
    again = retriever.upsert("", CORPUS[:2])
    assert (again.documents, again.unchanged, again.index_generation) == (0, 2, before)
    assert embedder.texts == embedded  # unchanged documents are not embedded again
    changed = retriever.upsert("", [Document("chess", "Draughts is played on a checkerboard.")])
    assert changed.documents == 1 and changed.index_generation == before + 1
    assert retriever.search(SearchQuery(text="chess", k=1)).index_generation == before + 1


def test_a_replaced_document_is_found_by_its_new_text_only(retriever: Retriever) -> None:
    retriever.upsert("", [Document("chess", "Draughts is played on a checkerboard.")])
    assert "chess" not in ids(retriever, text="king queen rooks bishops", k=5, mode="lexical")
    assert ids(retriever, text="draughts checkerboard", k=1, mode="lexical") == ["chess"]
    assert ids(retriever, text="draughts checkerboard", k=1, mode="dense") == ["chess"]


def test_deleted_documents_leave_the_results_and_unknown_ids_are_reported(
    retriever: Retriever,
) -> None:
    result = retriever.delete("", ["volcano", "atlantis"])
    assert result.documents == 1
    assert result.not_found_ids == ("atlantis",)
    assert "volcano" not in ids(retriever, text="volcanic lava eruptions", k=5, mode="dense")
    assert ids(retriever, text="volcanic lava", k=5, mode="lexical") == []


def test_delete_by_filter_removes_exactly_the_matching_documents(retriever: Retriever) -> None:
    result = retriever.delete("", [], filter=Equals("reviewed", False))
    assert result.documents == 2
    docs, missing = retriever.get("", [d.id for d in CORPUS])
    assert [d.id for d in docs] == ["volcano", "photosynthesis", "gil"]
    assert missing == ["chess", "espresso"]


def test_namespaces_are_isolated(retriever: Retriever) -> None:
    retriever.upsert("other", [Document("volcano", "A different text about tea.")])
    assert ids(retriever, text="tea", k=5, namespace="other", mode="lexical") == ["volcano"]
    assert ids(retriever, text="tea", k=5, mode="lexical") == []
    stats = {s.name: (s.documents, s.chunks, s.vectors) for s in retriever.stats()}
    assert stats == {"default": (5, 5, 5), "other": (1, 1, 1)}


def test_get_returns_documents_in_request_order_once(retriever: Retriever) -> None:
    docs, missing = retriever.get("", ["gil", "nope", "chess", "gil"])
    assert [d.id for d in docs] == ["gil", "chess"]
    assert docs[0] == CORPUS[4]
    assert missing == ["nope"]


def test_an_unknown_namespace_is_not_found(retriever: Retriever) -> None:
    with pytest.raises(NotFound):
        retriever.search(SearchQuery(namespace="never-written", text="x", k=1))
    with pytest.raises(NotFound):
        retriever.get("never-written", ["a"])


@pytest.mark.parametrize(
    "query",
    [
        SearchQuery(text="x", k=-1),
        SearchQuery(text="x", k=LimitsConfig().max_k + 1),
        SearchQuery(k=1),
        SearchQuery(text="x", k=1, mode="fuzzy"),
        SearchQuery(vector=[0.0] * WordEmbedder.dimension, k=1),
        SearchQuery(vector=[1.0] * 3, k=1),
        SearchQuery(text="x", k=1, namespace="../etc"),
    ],
    ids=[
        "k-negative",
        "k-over-max",
        "empty",
        "mode",
        "zero-vector",
        "wrong-dimension",
        "namespace",
    ],
)
def test_malformed_queries_are_invalid(retriever: Retriever, query: SearchQuery) -> None:
    with pytest.raises(InvalidArgument):
        retriever.search(query)


def test_an_upsert_with_a_bad_document_writes_nothing(retriever: Retriever) -> None:
    generation = retriever.stats()[0].generation
    with pytest.raises(InvalidArgument):
        retriever.upsert("", [Document("fine", "ok"), Document("bad\x00id", "text")])
    assert retriever.get("", ["fine"])[1] == ["fine"]
    assert retriever.stats()[0].generation == generation


def test_by_document_returns_each_document_once(tmp_path: Path) -> None:
    retriever = open_retriever(tmp_path, chunk_tokens=8)
    long_text = " ".join(f"river stone number {i}." for i in range(12))
    retriever.upsert("", [Document("long", long_text), Document("short", "a river bank")])
    chunks = retriever.search(SearchQuery(text="river stone", k=4, mode="dense")).hits
    assert len({h.document_id for h in chunks}) < len(chunks)  # one document crowds the rest
    grouped = retriever.search(SearchQuery(text="river stone", k=4, by_document=True)).hits
    assert sorted(h.document_id for h in grouped) == ["long", "short"]


def test_the_index_survives_reopening(tmp_path: Path) -> None:
    first = open_retriever(tmp_path)
    first.upsert("", CORPUS)
    first.save_indexes()
    first.store.close()
    again = open_retriever(tmp_path)
    assert [h.document_id for h in again.search(SearchQuery(text="espresso", k=1)).hits] == [
        "espresso"
    ]
    assert again.stats()[0].generation == 1
