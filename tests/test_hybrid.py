"""Lexical (BM25 over SQLite FTS5) and hybrid search (issue 16), through a
real server: the lexical index follows every write, user text is never FTS5
syntax, fusion is what its formula says, and bad choices get clear errors."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document, Hit
from rag_grpc.filters import Equals
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.store import lexical
from rag_grpc.store.sqlite import DocumentStore
from tests.conftest import ServerThread

DOCUMENTS = [
    Document(
        "paths",
        "Use os.path.join to build a file path from parts; os.path.exists tells whether "
        "it is there. Pathlib offers the same as methods.",
        {"topic": "code"},
    ),
    Document(
        "limits",
        "The setting max_ef bounds the search breadth a client may ask for. Raise "
        "max_ef_construction only when rebuilding.",
        {"topic": "code"},
    ),
    Document(
        "volcano",
        "Red lava poured from the volcano crater while magma rose under the mountain "
        "and ash filled the sky.",
        {"topic": "geology"},
    ),
    Document(
        "glacier",
        "Glaciers carve valleys as ice moves downhill. Meltwater from glaciers feeds rivers.",
        {"topic": "geology"},
    ),
    Document(
        "bread",
        "Sourdough rises because wild yeast ferments the dough. A hot oven gives a crisp crust.",
        {"topic": "food"},
    ),
    Document(
        "chess",
        "In chess the king must be protected from checkmate. Knights move in an L shape.",
        {"topic": "games"},
    ),
]


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(index={"result_cache_entries": 0})


@pytest.fixture
def client(server: ServerThread) -> Iterator[RagClient]:
    with RagClient(server.target, timeout=60) as c:
        c.upsert(DOCUMENTS)
        yield c


def ids(hits: list[Hit]) -> list[str]:
    return [h.document_id for h in hits]


def lexical_ids(client: RagClient, query: str, **options: object) -> list[str]:
    return ids(client.search(query, k=10, mode="lexical", **options))  # type: ignore[arg-type]


def test_lexical_finds_words_and_identifiers(client: RagClient) -> None:
    assert lexical_ids(client, "magma") == ["volcano"]
    # Porter stemming: "glacier" finds "Glaciers".
    assert lexical_ids(client, "glacier") == ["glacier"]
    # An identifier is matched as the phrase of its parts: the document that
    # says os.path.join ranks first, and one part alone still matches.
    assert lexical_ids(client, "os.path.join")[0] == "paths"
    assert lexical_ids(client, "max_ef")[0] == "limits"
    hits = client.search("crater lava", k=10, mode="lexical")
    assert ids(hits) == ["volcano"] and hits[0].score > 0  # BM25, higher is better


@pytest.mark.parametrize(
    "query",
    [
        'lava AND NOT "volcano',
        "lava*",
        "text:lava",
        "NEAR(lava crater)",
        "^lava",
        "lava OR (crater",
        "{text}: lava - crater + '",
    ],
)
def test_fts5_syntax_in_user_text_is_plain_text(client: RagClient, query: str) -> None:
    # Each query holds the word "lava" among FTS5 operators; none of them
    # acts as one (NOT would exclude, a column filter would fail).
    assert lexical_ids(client, query) == ["volcano"]
    assert "volcano" in ids(client.search(query, k=3, mode="hybrid"))


def test_stop_words_only(client: RagClient) -> None:
    for query in ("the of and", "?!... --"):
        with pytest.raises(RpcError) as err:
            client.search(query, mode="lexical")
        assert err.value.code == "INVALID_ARGUMENT" and "stop words" in err.value.message
        # Hybrid keeps the dense ranking when nothing can match lexically.
        dense = ids(client.search(query, k=4, mode="dense"))
        assert ids(client.search(query, k=4, mode="hybrid")) == dense


def test_no_lexical_match_returns_dense_results(client: RagClient) -> None:
    query = "frozen rivers of ice in mountain valleys"
    dense = ids(client.search(query, k=3, mode="dense"))
    assert ids(client.search("zyxwvut qqqq", k=3, mode="lexical")) == []
    assert ids(client.search("icy zyxwvut", k=3, mode="hybrid")) != []
    assert dense[0] == "glacier"


def rrf(rankings: list[list[str]], k: int, weights: tuple[float, float]) -> list[str]:
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
    return sorted(scores, key=lambda key: -scores[key])


def test_hybrid_is_the_rrf_of_both_rankings(client: RagClient) -> None:
    query = "lava from a crater, and os.path.join"
    candidates = 8
    dense = [h.chunk_id for h in client.search(query, k=candidates, mode="dense")]
    words = [h.chunk_id for h in client.search(query, k=candidates, mode="lexical")]
    assert dense and words and dense != words
    for k_rrf, weights in ((60, (1.0, 1.0)), (1, (0.2, 1.0))):
        hits = client.search(
            query,
            k=5,
            mode="hybrid",
            fusion="rrf",
            rrf_k=k_rrf,
            dense_weight=weights[0],
            lexical_weight=weights[1],
            candidates=candidates,
        )
        assert [h.chunk_id for h in hits] == rrf([dense, words], k_rrf, weights)[:5]
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_relative_score_fusion(client: RagClient) -> None:
    query = "yeast dough in a hot oven, ice, lava and the king"
    dense = client.search(query, k=6, mode="dense")
    words = client.search(query, k=6, mode="lexical")

    def scaled(hits: list[Hit]) -> dict[str, float]:
        low, high = min(h.score for h in hits), max(h.score for h in hits)
        return {h.chunk_id: (h.score - low) / (high - low) for h in hits}

    expected: dict[str, float] = {}
    for part, weight in ((scaled(dense), 0.7), (scaled(words), 0.3)):
        for key, value in part.items():
            expected[key] = expected.get(key, 0.0) + weight * value
    hits = client.search(
        query,
        k=6,
        mode="hybrid",
        fusion="relative_score",
        dense_weight=0.7,
        lexical_weight=0.3,
        candidates=6,
    )
    assert [h.chunk_id for h in hits] == sorted(expected, key=lambda c: -expected[c])[:6]
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.chunk_id], abs=1e-5)


def test_hybrid_by_document_has_no_duplicates_and_filters_apply(client: RagClient) -> None:
    hits = client.search("lava and glaciers", k=4, mode="hybrid", by_document=True)
    assert len(ids(hits)) == len(set(ids(hits))) == 4
    code = Equals("topic", "code")
    for mode in ("lexical", "hybrid"):
        found = client.search("path lava max_ef", k=10, mode=mode, filter=code)
        assert found and {h.document_id for h in found} <= {"paths", "limits"}
    assert lexical_ids(client, "lava", filter=Equals("topic", "food")) == []


def test_the_lexical_index_follows_every_write(client: RagClient, server: ServerThread) -> None:
    client.upsert([Document("volcano", "Basalt columns cooled slowly into hexagons.")])
    assert lexical_ids(client, "magma") == []
    assert lexical_ids(client, "basalt hexagons") == ["volcano"]
    client.delete(["glacier"])
    assert lexical_ids(client, "meltwater") == []
    client.upsert([Document("other", "Magma chambers feed the vent.")], namespace="ns2")
    # Namespaces do not see each other's words.
    assert lexical_ids(client, "chambers") == []
    assert ids(client.search("chambers", k=3, mode="lexical", namespace="ns2")) == ["other"]
    database = server.settings.data_dir / "rag.sqlite3"
    conn = sqlite3.connect(database)
    try:
        lexical.check_integrity(conn)
    finally:
        conn.close()


def test_forget_leaves_no_word_in_the_files(client: RagClient, server: ServerThread) -> None:
    secret = "Quetzalcoatlusfeathers"
    client.upsert([Document("secret", f"The codename is {secret} for the launch.")])
    assert lexical_ids(client, secret) == ["secret"]
    client.delete(["secret"], forget=True)
    assert lexical_ids(client, secret) == []
    data = server.settings.data_dir
    # Stored terms are lower case and stemmed: look for the stem's bytes.
    stem = secret.lower()[:16].encode()
    for path in data.glob("rag.sqlite3*"):
        assert stem not in path.read_bytes(), path


def test_a_database_from_before_the_lexical_index_gets_one(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    store = DocumentStore(path)
    store.close()
    conn = sqlite3.connect(path)
    lexical.drop(conn)
    conn.execute(
        "INSERT INTO chunks (namespace, doc_id, seq, text, vector) "
        "VALUES ('default', 'old', 0, 'an obsidian arrowhead', x'00')"
    )
    conn.commit()
    conn.close()
    store = DocumentStore(path)
    try:
        expression = lexical.match_expression("obsidian")
        assert expression is not None
        assert [label for label, _ in store.lexical_ranking("default", expression)] == [1]
    finally:
        store.close()


def test_an_older_form_of_the_lexical_index_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    DocumentStore(path).close()
    conn = sqlite3.connect(path)
    lexical.drop(conn)
    # The first form: the text alone, the chunks table as its content.
    conn.execute(
        "CREATE VIRTUAL TABLE chunk_words USING fts5(text, content='chunks', content_rowid='label')"
    )
    conn.execute(
        "INSERT INTO chunks (namespace, doc_id, seq, text, vector) "
        "VALUES ('default', 'old', 0, 'an obsidian arrowhead', x'00')"
    )
    conn.commit()
    conn.close()
    store = DocumentStore(path)
    try:
        assert [label for label, _ in store.lexical_ranking("default", '"obsidian"')] == [1]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        lexical.check_integrity(conn)
        assert (
            lexical.space_token("默认~ns")
            == conn.execute("SELECT 'n' || hex(?) || '0'", ("默认~ns",)).fetchone()[0]
        )
    finally:
        conn.close()


def test_match_expression_quotes_everything() -> None:
    assert lexical.match_expression("the of") is None
    assert lexical.match_expression("*** () ^") is None
    assert lexical.match_expression('NOT "x') == '"x"'
    assert lexical.match_expression("os.path.join") == '"os path join" OR "os" OR "path" OR "join"'


def raw_search(server: ServerThread, **fields: object) -> grpc.RpcError:
    with grpc.insecure_channel(server.target) as channel:
        stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
        request = retrieval_pb2.SearchRequest(text="lava", **fields)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(request, timeout=30)
    return err.value


def test_bad_choices_get_clear_errors(client: RagClient, server: ServerThread) -> None:
    before = client.stats().namespaces
    err = raw_search(server, mode=7)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown mode" in (
        err.details() or ""
    )
    err = raw_search(server, mode=3, fusion=retrieval_pb2.Fusion(method=9))  # type: ignore[arg-type]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "fusion" in (err.details() or "")
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"mode": "hybrid", "dense_weight": 1.5}, "INVALID_ARGUMENT", "weights"),
        ({"mode": "hybrid", "dense_weight": -0.1}, "INVALID_ARGUMENT", "weights"),
        (
            {"mode": "hybrid", "dense_weight": 0.0, "lexical_weight": 0.0},
            "INVALID_ARGUMENT",
            "both",
        ),
        ({"mode": "hybrid", "rrf_k": 5000}, "INVALID_ARGUMENT", "rrf_k"),
        ({"mode": "hybrid", "candidates": 10**6}, "INVALID_ARGUMENT", "candidates"),
        ({"mode": "dense", "rrf_k": 10}, "INVALID_ARGUMENT", "hybrid"),
        ({"mode": "hybrid", "rerank": True}, "FAILED_PRECONDITION", "re-ranker"),
        ({"rerank_top_n": 5}, "INVALID_ARGUMENT", "rerank"),
    ]
    for options, code, words in cases:
        with pytest.raises(RpcError) as caught:
            client.search("lava", **options)  # type: ignore[arg-type]
        assert caught.value.code == code and words in caught.value.message, options
    for mode in ("lexical", "hybrid"):
        with pytest.raises(RpcError) as caught:
            client.search([0.1] * 384, mode=mode)
        assert caught.value.code == "INVALID_ARGUMENT" and "text" in caught.value.message
    assert client.stats().namespaces == before
    assert lexical_ids(client, "magma") == ["volcano"]


class _NoFts5:
    """A connection of a SQLite built without FTS5 (the real one has it and
    is what every other test here runs on)."""

    def execute(self, sql: str, *args: object) -> None:
        raise sqlite3.OperationalError("no such module: fts5")


def test_a_sqlite_without_fts5_is_named_at_start() -> None:
    with pytest.raises(lexical.LexicalUnavailable, match=r"no FTS5.*lexical index needs it"):
        lexical.check_fts5(_NoFts5())  # type: ignore[arg-type]
