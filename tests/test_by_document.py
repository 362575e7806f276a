"""Search by document (issue 16): k distinct documents, each with its best
chunks, through a real server, the client and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document, Hit
from rag_grpc.filters import Equals
from rag_grpc.index.retriever import SearchQuery
from tests.cli.command import cli
from tests.conftest import ServerThread, ask_citations

QUERY = "lava erupting from a volcano crater"

# One long document about volcanoes fills the top chunks of QUERY many times
# over, so a plain search returns it again and again and a by-document
# search has to fetch far past k chunks to find k documents.
DOCUMENTS = [
    Document(
        "volcano",
        " ".join(
            f"Eruption {i}: red lava poured from the volcano crater while magma rose "
            f"under the mountain and ash filled the sky."
            for i in range(40)
        ),
        {"topic": "geology"},
    ),
    Document(
        "ash",
        "Volcanic ash from an eruption grounds aircraft. Ash clouds travel far from "
        "the volcano. Fine ash damages jet engines.",
        {"topic": "geology"},
    ),
    Document(
        "glacier",
        "Glaciers carve valleys as ice moves downhill. Meltwater from glaciers feeds "
        "rivers. Ice ages left moraines behind.",
        {"topic": "geology"},
    ),
    Document(
        "bread",
        "Sourdough rises because wild yeast ferments the dough. Bakers fold the dough "
        "to build gluten. A hot oven gives a crisp crust.",
        {"topic": "food"},
    ),
    Document(
        "chess",
        "In chess the king must be protected from checkmate. Knights move in an L shape. "
        "Castling moves the king and a rook at once.",
        {"topic": "games"},
    ),
    Document(
        "ocean",
        "Tides are raised by the pull of the Moon. Ocean currents carry heat toward the "
        "poles. Waves break on the shore.",
        {"topic": "geography"},
    ),
]


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """A server that cuts documents into small chunks (a few per sentence),
    searching dense by default: these tests hold grouping to the plain dense
    ranking (hybrid by document is in test_hybrid.py)."""
    return start_server(
        chunking={"chunk_tokens": 16, "overlap_tokens": 0}, retrieval={"default_mode": "dense"}
    )


@pytest.fixture
def client(server: ServerThread) -> Iterator[RagClient]:
    """A client of `server` with DOCUMENTS stored."""
    with RagClient(server.target, timeout=60) as c:
        c.upsert(DOCUMENTS)
        yield c


def grouped(ranking: list[Hit], k: int, per_document: int) -> list[str]:
    """Chunk ids of the first k documents' best chunks in a full chunk ranking."""
    groups: dict[str, list[str]] = {}
    for hit in ranking:
        group = groups.get(hit.document_id)
        if group is None:
            if len(groups) == k:
                continue
            group = groups[hit.document_id] = []
        if len(group) < per_document:
            group.append(hit.chunk_id)
    return [chunk for group in groups.values() for chunk in group]


def document_runs(hits: list[Hit]) -> list[str]:
    """Document ids in hit order, one per run of consecutive hits."""
    runs: list[str] = []
    for hit in hits:
        if not runs or runs[-1] != hit.document_id:
            runs.append(hit.document_id)
    return runs


def test_k_distinct_documents_where_plain_search_repeats_one(client: RagClient) -> None:
    chunks = client.stats().namespaces[0].chunks
    assert chunks > 40  # the long document is many chunks
    plain = client.search(QUERY, k=5)
    assert {h.document_id for h in plain} == {"volcano"}  # duplicates only

    everything = client.search(QUERY, k=chunks)
    # The top 30 chunks are all one document: a fetch of k (or any small
    # multiple of it) finds one document; only growing the fetch finds three.
    assert {h.document_id for h in everything[:30]} == {"volcano"}
    hits = client.search(QUERY, k=3, by_document=True)
    assert [h.document_id for h in hits] == document_runs(everything)[:3]
    assert hits[0].document_id == "volcano"
    assert [h.chunk_id for h in hits] == grouped(everything, 3, 1)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_chunks_per_document_gives_each_document_its_best_chunks(client: RagClient) -> None:
    everything = client.search(QUERY, k=client.stats().namespaces[0].chunks)
    hits = client.search(QUERY, k=4, by_document=True, chunks_per_document=3)
    runs = document_runs(hits)
    assert len(runs) == len(set(runs)) == 4  # never two groups for one document
    assert runs == document_runs(everything)[:4]
    assert [h.chunk_id for h in hits] == grouped(everything, 4, 3)
    assert all(sum(h.document_id == d for h in hits) <= 3 for d in runs)
    assert sum(h.document_id == "volcano" for h in hits) == 3
    best = [next(h.score for h in hits if h.document_id == d) for d in runs]
    assert best == sorted(best, reverse=True)


def test_fewer_documents_than_k_returns_each_once(client: RagClient) -> None:
    hits = client.search(QUERY, k=50, by_document=True)
    assert sorted(h.document_id for h in hits) == sorted(d.id for d in DOCUMENTS)


def test_filters_combine_with_grouping(client: RagClient) -> None:
    geology = Equals("topic", "geology")
    hits = client.search(QUERY, k=10, by_document=True, filter=geology)
    assert sorted(h.document_id for h in hits) == ["ash", "glacier", "volcano"]
    two = client.search(QUERY, k=2, by_document=True, chunks_per_document=2, filter=geology)
    runs = document_runs(two)
    assert len(runs) == len(set(runs)) == 2 and len(two) == 4 and runs[0] == "volcano"
    assert client.search(QUERY, k=3, by_document=True, filter=Equals("topic", "food"))[
        0
    ].document_id == ("bread")


def test_search_batch_and_the_result_cache_keep_the_modes_apart(client: RagClient) -> None:
    queries = [
        SearchQuery(text=QUERY, k=3),
        SearchQuery(text=QUERY, k=3, by_document=True),
        SearchQuery(text=QUERY, k=3, by_document=True, chunks_per_document=2),
    ]
    for _ in range(2):  # the second round is answered from the result cache
        plain, by_document, two_each = client.search_batch(queries)
        assert {h.document_id for h in plain.hits} == {"volcano"}
        assert len(plain.hits) == 3
        assert len({h.document_id for h in by_document.hits}) == len(by_document.hits) == 3
        assert len(document_runs(two_each.hits)) == 3 and len(two_each.hits) == 6
    again = client.search(QUERY, k=3)
    assert [h.chunk_id for h in again] == [h.chunk_id for h in plain.hits]


def test_bad_grouping_arguments_are_invalid(client: RagClient) -> None:
    before = client.stats().namespaces[0]
    with pytest.raises(RpcError) as without:
        client.search(QUERY, k=3, chunks_per_document=2)
    assert without.value.code == "INVALID_ARGUMENT"
    assert "chunks_per_document applies to by_document searches only" in without.value.message
    with pytest.raises(RpcError) as too_many:
        client.search(QUERY, k=3, by_document=True, chunks_per_document=17)
    assert too_many.value.code == "INVALID_ARGUMENT"
    assert "between 1 and 16" in too_many.value.message and "17" in too_many.value.message
    with pytest.raises(RpcError) as in_batch:
        client.search_batch(
            [SearchQuery(text=QUERY, k=3), SearchQuery(text=QUERY, chunks_per_document=1)]
        )
    assert in_batch.value.code == "INVALID_ARGUMENT"
    after = client.stats().namespaces[0]
    assert (after.documents, after.chunks) == (before.documents, before.chunks)
    assert len(client.search(QUERY, k=3, by_document=True)) == 3


def test_the_fetch_stops_at_the_limit(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(
        chunking={"chunk_tokens": 16, "overlap_tokens": 0},
        index={"ef_search": 8},
        limits={"max_ef": 8},
    )
    with RagClient(server.target, timeout=60) as c:
        c.upsert(DOCUMENTS)
        # 8 candidates at most, all of the long document: one document, no error.
        hits = c.search(QUERY, k=3, by_document=True, mode="dense")
        assert {h.document_id for h in hits} == {"volcano"}


def test_cli_by_document(client: RagClient, server: ServerThread) -> None:
    target = ("--target", server.target)
    found = cli("search", QUERY, "-k", "3", "--by-document", "--json", *target)
    assert found.returncode == 0, found.stderr
    assert len({h["document_id"] for h in json.loads(found.stdout)}) == 3
    two = cli(
        "search", QUERY, "-k", "2", "--by-document", "--chunks-per-document", "2", "--json", *target
    )
    assert two.returncode == 0, two.stderr
    ids = [h["document_id"] for h in json.loads(two.stdout)]
    assert ids[:2] == ["volcano"] * 2 and len(ids) == 4 and len(set(ids)) == 2
    bad = cli("search", QUERY, "--chunks-per-document", "2", *target)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    assert "by_document" in bad.stderr


def test_ask_cites_distinct_documents(client: RagClient) -> None:
    # A plain search for this question is the volcano document alone.
    assert {h.document_id for h in client.search(QUERY, k=3)} == {"volcano"}
    citations = ask_citations(list(client.ask(QUERY, k=3)))
    sources = [h.document_id for h in citations]
    assert len(sources) == 3 and len(set(sources)) == 3
    assert sources[0] == "volcano"
