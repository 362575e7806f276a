"""RetrievalService end to end through a real server: write, search, filter, delete."""

from __future__ import annotations

import numpy as np
import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.filters import And, AnyOf, Equals, Or, Range
from rag_grpc.index.retriever import SearchQuery
from tests.conftest import CORPUS


def test_search_finds_the_document_that_answers(seeded: RagClient) -> None:
    expectations = {
        "How do plants turn light into sugar?": "photosynthesis",
        "molten rock erupting from a mountain": "volcano",
        "which piece must be checkmated?": "chess",
        "coffee made under high pressure": "espresso",
        "why can only one Python thread run at once?": "gil",
    }
    for question, doc_id in expectations.items():
        hits = seeded.search(question, k=3)
        assert hits[0].document_id == doc_id, (question, [h.document_id for h in hits])
        assert hits[0].chunk_id == f"{doc_id}#0"
        assert hits[0].score > hits[-1].score
        assert "topic" in hits[0].metadata


def test_hits_carry_text_and_typed_metadata(seeded: RagClient) -> None:
    hit = seeded.search("Mount Etna eruption", k=1)[0]
    assert hit.document_id == "volcano"
    assert "Etna" in hit.text
    assert hit.metadata == {"topic": "geology", "year": 2019, "reviewed": True}


def test_k_limits_the_number_of_hits(seeded: RagClient) -> None:
    assert len(seeded.search("anything at all", k=2)) == 2
    assert len(seeded.search("anything at all", k=50)) == len(CORPUS)


def test_vector_query_matches_text_query(seeded: RagClient) -> None:
    vector = seeded.embed(["chlorophyll absorbs light"])[0]
    by_vector = seeded.search(vector.tolist(), k=3)
    # A vector query is dense whatever the server's default; so is this one.
    by_text = seeded.search("chlorophyll absorbs light", k=3, mode="dense")
    assert [h.chunk_id for h in by_vector] == [h.chunk_id for h in by_text]
    assert by_vector[0].score == pytest.approx(by_text[0].score, abs=1e-4)


def test_upsert_is_idempotent_and_replaces_chunks(seeded: RagClient) -> None:
    before = seeded.stats().namespaces[0]
    again = seeded.upsert([CORPUS[0]])
    assert (again.documents, again.unchanged) == (0, 1)  # identical: no work at all
    after = seeded.stats().namespaces[0]
    assert (after.documents, after.chunks, after.vectors) == (
        before.documents,
        before.chunks,
        before.vectors,
    )
    assert after.generation == before.generation

    replaced = Document(
        "volcano", "Sourdough bread rises because of wild yeast.", {"topic": "food"}
    )
    seeded.upsert([replaced])
    hits = seeded.search("lava and magma", k=5)
    assert all("lava" not in h.text for h in hits)
    top = seeded.search("wild yeast bread", k=1)[0]
    assert (top.document_id, top.text) == ("volcano", replaced.text)
    docs, missing = seeded.get(["volcano"])
    assert docs == [replaced] and missing == []


def test_long_document_is_chunked_with_ids_from_the_document(client: RagClient) -> None:
    sentences = [
        f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(300)
    ]
    result = client.upsert([Document("long", " ".join(sentences))])
    assert result.chunks > 5
    hits = client.search("Sentence number 250", k=result.chunks)
    assert {h.chunk_id for h in hits} == {f"long#{i}" for i in range(result.chunks)}


def test_get_returns_documents_in_order_and_names_missing(seeded: RagClient) -> None:
    docs, missing = seeded.get(["gil", "nope", "chess"])
    assert [d.id for d in docs] == ["gil", "chess"]
    assert docs[0] == CORPUS[4]
    assert missing == ["nope"]


def test_delete_removes_from_search_and_get(seeded: RagClient) -> None:
    result = seeded.delete(["espresso", "unknown"])
    assert result.documents == 1
    assert result.not_found_ids == ("unknown",)
    hits = seeded.search("coffee brewed under pressure", k=10)
    assert "espresso" not in {h.document_id for h in hits}
    assert len(hits) == len(CORPUS) - 1
    assert seeded.get(["espresso"]) == ([], ["espresso"])
    assert seeded.stats().namespaces[0].vectors == len(CORPUS) - 1


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Equals("topic", "biology"), {"photosynthesis"}),
        (Equals("reviewed", True), {"volcano", "photosynthesis", "gil"}),
        (Equals("year", 2015), {"chess"}),
        (Equals("year", 2015.0), {"chess"}),
        (AnyOf("topic", ("food", "games")), {"chess", "espresso"}),
        (Range("year", gte=2021), {"photosynthesis", "espresso", "gil"}),
        (Range("year", gt=2015, lt=2022), {"volcano", "photosynthesis"}),
        (And((Equals("reviewed", False), Range("year", lte=2020))), {"chess"}),
        (Or((Equals("topic", "geology"), Equals("topic", "food"))), {"volcano", "espresso"}),
        (Equals("topic", "astronomy"), set()),
        (Equals("missing_key", "x"), set()),
    ],
)
def test_metadata_filters(seeded: RagClient, flt, expected) -> None:  # type: ignore[no-untyped-def]
    hits = seeded.search("tell me something interesting", k=10, filter=flt)
    assert {h.document_id for h in hits} == expected


def test_namespaces_are_separate(client: RagClient) -> None:
    client.upsert(CORPUS[:2], namespace="team-a")
    client.upsert(CORPUS[2:], namespace="team-b")
    a = {h.document_id for h in client.search("anything", k=10, namespace="team-a")}
    b = {h.document_id for h in client.search("anything", k=10, namespace="team-b")}
    assert a == {"volcano", "photosynthesis"}
    assert b == {"chess", "espresso", "gil"}
    names = {n.name: n.documents for n in client.stats().namespaces}
    assert names == {"default": 0, "team-a": 2, "team-b": 3}


def test_search_batch_answers_each_query_in_order(seeded: RagClient) -> None:
    vector = seeded.embed(["chess pieces"])[0].tolist()
    results = seeded.search_batch(
        [
            SearchQuery(text="lava", k=1),
            SearchQuery(vector=vector, k=2),
            SearchQuery(text="plants", k=1, filter=Equals("topic", "food")),
        ]
    )
    assert [r.hits[0].document_id for r in results] == ["volcano", "chess", "espresso"]
    assert len(results[1].hits) == 2


def test_embed_returns_packed_unit_vectors(client: RagClient) -> None:
    vectors = client.embed(["first text", "second, different text", "first text"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)
    assert float(vectors[0] @ vectors[1]) < 0.99


def test_stats_describe_index_and_model(seeded: RagClient) -> None:
    stats = seeded.stats()
    assert stats.version
    assert stats.generator == "extractive"
    assert stats.models == ("sentence-transformers/all-MiniLM-L6-v2",)
    assert "rag.v1.RetrievalService" in stats.services
    ns = stats.namespaces[0]
    assert (ns.name, ns.documents, ns.chunks, ns.vectors) == ("default", 5, 5, 5)


def test_a_boolean_filter_and_a_number_filter_are_not_the_same_search(client: RagClient) -> None:
    # Equals("n", True) == Equals("n", 1) as Python values (True == 1); a
    # boolean never matches a number, so neither the result cache nor one
    # batched index call may take one for the other.
    client.upsert([Document("yes", "a lamp", {"n": True}), Document("one", "a lamp", {"n": 1})])
    for _ in range(2):  # the second round is served from the result cache
        assert [h.document_id for h in client.search("lamp", filter=Equals("n", True))] == ["yes"]
        assert [h.document_id for h in client.search("lamp", filter=Equals("n", 1))] == ["one"]
    both = client.search_batch(
        [
            SearchQuery(text="lamp", filter=Equals("n", True), mode="dense"),
            SearchQuery(text="lamp", filter=Equals("n", 1), mode="dense"),
        ]
    )
    assert [[h.document_id for h in r.hits] for r in both] == [["yes"], ["one"]]
