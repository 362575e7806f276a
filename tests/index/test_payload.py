"""The payload index answers filters in memory, exactly as the SQL reference
(`DocumentStore.labels_matching`) does, and stays in step with every write:
upsert, replacement, delete, forget, retention, compaction and restart."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.documents import Document, MetadataScalar
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.filters import And, AnyOf, Equals, Filter, Or, Range
from rag_grpc.index import payload_file
from rag_grpc.index.payload import PayloadIndex
from rag_grpc.index.retriever import Retriever
from rag_grpc.store.sqlite import DocumentStore
from tests.conftest import CORPUS, MODEL_DIR, ServerThread
from tests.in_process import HashEmbedder

# -- the index on its own -----------------------------------------------------


def labels_of(index: PayloadIndex, flt: Filter) -> set[int]:
    found = index.matching(flt)
    assert found.dtype == np.uint64
    assert len(found) == len(set(found.tolist())), "labels repeat"
    return set(found.tolist())


def test_kinds_compare_as_in_sql() -> None:
    index = PayloadIndex.build(
        [
            (1, "v", 3),
            (2, "v", 3.0),
            (3, "v", "3"),
            (4, "v", True),
            (5, "v", 1),
            (6, "v", -0.0),
            (7, "other", 3),
            (8, "v", False),
        ]
    )
    assert labels_of(index, Equals("v", 3)) == {1, 2}  # int 3 is float 3.0
    assert labels_of(index, Equals("v", "3")) == {3}  # a string never equals a number
    assert labels_of(index, Equals("v", True)) == {4}  # bools are their own kind
    assert labels_of(index, Equals("v", 1)) == {5}
    assert labels_of(index, Equals("v", 0)) == {6}  # -0.0 == 0
    assert labels_of(index, AnyOf("v", ("3", 1.0, False))) == {3, 5, 8}
    assert labels_of(index, AnyOf("v", (0, False))) == {6, 8}  # though False == 0 in Python
    assert labels_of(index, Range("v", gte=1, lte=3)) == {1, 2, 5}  # numbers only
    assert labels_of(index, Range("v", gt=1, lt=3)) == set()
    assert labels_of(index, Range("v", lte=float("inf"))) == {1, 2, 5, 6}
    assert labels_of(index, Equals("missing", 3)) == set()
    assert labels_of(index, Range("missing", gte=0)) == set()
    assert labels_of(index, And((Equals("v", 3), Equals("other", 3)))) == set()
    assert labels_of(index, Or((Equals("v", "3"), Equals("other", 3)))) == {3, 7}


def test_labels_past_32_bits_widen_the_bitmaps() -> None:
    index = PayloadIndex.build([(5, "tag", "a"), (6, "tag", "b"), (7, "n", 1)])
    big = 2**40 + 3
    index.add([(big, "tag", "a"), (big + 1, "n", 1)])
    assert labels_of(index, Equals("tag", "a")) == {5, big}
    assert labels_of(index, Or((Equals("tag", "b"), Equals("n", 1)))) == {6, 7, big + 1}
    index.remove([(big, "tag", "a")])
    assert labels_of(index, Equals("tag", "a")) == {5}


def test_removing_rows_leaves_no_empty_values_behind() -> None:
    index = PayloadIndex.build([(i, "id", f"doc-{i}") for i in range(100)])
    index.add([(i, "n", float(i)) for i in range(100)])
    assert index.content_bytes() > 100 * 8
    index.remove([(i, "id", f"doc-{i}") for i in range(100)])
    index.remove([(i, "n", float(i)) for i in range(100)])
    assert index.content_bytes() == 0
    assert labels_of(index, Or((Equals("id", "doc-1"), Range("n", gte=0)))) == set()


# -- randomized equivalence with the SQL reference ----------------------------


STRINGS = ("red", "green", "blue", "3", "", "Red")
NUMBERS: tuple[float | int, ...] = (3, 3.0, -1, 0, 2.5, 10, 1e6, -0.0)
KEYS = ("color", "size", "flag", "mixed")


def random_value(rng: random.Random, key: str) -> MetadataScalar:
    kind = {"color": "s", "size": "n", "flag": "b"}.get(key) or rng.choice("snb")
    if kind == "s":
        return rng.choice(STRINGS)
    if kind == "b":
        return rng.random() < 0.5
    return rng.choice(NUMBERS) if rng.random() < 0.7 else round(rng.uniform(-5, 15), 2)


def random_document(rng: random.Random, doc_id: str) -> Document:
    metadata = {key: random_value(rng, key) for key in KEYS if rng.random() < 0.75}
    # 1 to 4 chunks at 8 tokens a chunk: every chunk of a document must match.
    words = " ".join(f"word{rng.randrange(50)}" for _ in range(rng.randrange(3, 30)))
    return Document(doc_id, words, metadata)


def random_filter(rng: random.Random, depth: int = 0) -> Filter:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        inner = tuple(random_filter(rng, depth + 1) for _ in range(rng.randrange(1, 4)))
        return And(inner) if rng.random() < 0.5 else Or(inner)
    key = rng.choice((*KEYS, "never_indexed"))
    if roll < 0.5:
        return Equals(key, random_value(rng, rng.choice(KEYS)))
    if roll < 0.75:
        return AnyOf(
            key, tuple(random_value(rng, rng.choice(KEYS)) for _ in range(rng.randrange(1, 5)))
        )
    bounds: dict[str, float] = {}
    low, high = sorted((rng.uniform(-3, 12), rng.uniform(-3, 12)))
    if rng.random() < 0.7:
        bounds["gte" if rng.random() < 0.5 else "gt"] = rng.choice((low, 3.0, 0.0))
    if not bounds or rng.random() < 0.7:
        bounds["lte" if rng.random() < 0.5 else "lt"] = rng.choice((high, 10.0, float("inf")))
    if bounds.get("gte", bounds.get("gt", -np.inf)) > bounds.get("lte", bounds.get("lt", np.inf)):
        bounds.pop("gte", None)
        bounds.pop("gt", None)
    return Range(key, **bounds)


def open_retriever(data: Path) -> Retriever:
    store = DocumentStore(data / "rag.sqlite3")
    chunker = TokenChunker(MODEL_DIR / "tokenizer.json", chunk_tokens=8, overlap_tokens=0)
    return Retriever(
        store,
        HashEmbedder(),
        chunker,
        data / "index",
        # Small compaction thresholds, so rebuilds happen along the way.
        IndexConfig(compact_min_slots=32, compact_deleted_fraction=0.3),
        LimitsConfig(),
    )


def assert_same_as_sql(
    retriever: Retriever, rng: random.Random, seed: int, rounds: int = 60
) -> None:
    payload = retriever.indexes.payload("default")
    for _ in range(rounds):
        flt = random_filter(rng)
        expected = set(retriever.store.labels_matching("default", flt).tolist())
        assert labels_of(payload, flt) == expected, f"seed {seed}: {flt}"


def test_answers_match_sql_after_random_writes_and_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    data = tmp_path / "data"
    retriever = open_retriever(data)
    ids = [f"d{i}" for i in range(40)]
    try:
        for step in range(40):
            action = rng.random()
            if action < 0.5:  # new documents and replacements, with changed metadata
                batch = rng.sample(ids, rng.randrange(1, 8))
                retriever.upsert("default", [random_document(rng, i) for i in batch])
            elif action < 0.65:
                retriever.delete("default", rng.sample(ids, rng.randrange(1, 5)))
            elif action < 0.72:
                retriever.delete("default", [], filter=random_filter(rng))
            elif action < 0.8:
                retriever.delete("default", rng.sample(ids, 2), forget=True)
            elif action < 0.88:
                # Retention: everything written before now, through the write path.
                expired = retriever.expired("default", ttl_s=1e-6)
                if expired is not None:
                    spared = expired.ids[: len(expired.ids) // 2]
                    # Refreshed after the sweep chose them: they must survive.
                    if spared:
                        retriever.upsert("default", [random_document(rng, i) for i in spared])
                    retriever.writes.apply_delete(expired)
            else:
                retriever.compact("default")
            if step % 4 == 3:
                assert_same_as_sql(retriever, rng, seed, rounds=20)
        retriever.upsert("default", [random_document(rng, i) for i in ids[:10]])
        assert_same_as_sql(retriever, rng, seed)
        retriever.save_indexes()
    finally:
        retriever.store.close()
    # After a restart the payload index is the saved one.
    with caplog.at_level(logging.INFO, logger="rag_grpc.index.namespaces"):
        reopened = open_retriever(data)
    assert "loaded the payload index of default, 0 newer values" in caplog.text
    try:
        assert_same_as_sql(reopened, rng, seed)
        everything = Or(tuple(AnyOf(key, (True, False, *STRINGS)) for key in KEYS))
        assert len(reopened.indexes.payload("default").matching(everything)) > 0
    finally:
        reopened.store.close()


def test_search_takes_allowed_labels_from_the_payload_index_not_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    retriever = open_retriever(tmp_path / "data")
    try:
        retriever.upsert("default", [Document(f"d{i}", f"text {i}", {"n": i}) for i in range(20)])

        def refuse(*_: object) -> None:
            raise AssertionError("the search path asked SQLite for a filter")

        monkeypatch.setattr(retriever.store, "labels_matching", refuse)
        from rag_grpc.index.search import SearchQuery

        result = retriever.search(SearchQuery(text="text 3", k=20, filter=Range("n", lt=5)))
        assert sorted(h.document_id for h in result.hits) == [f"d{i}" for i in range(5)]
    finally:
        retriever.store.close()


def test_a_saved_payload_index_catches_up_with_later_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    data = tmp_path / "data"
    ids = [f"d{i}" for i in range(30)]
    retriever = open_retriever(data)
    try:
        retriever.upsert("default", [random_document(rng, i) for i in ids[:20]])
        retriever.save_indexes()
        # Written after the save, never saved: new labels only.
        retriever.upsert("default", [random_document(rng, i) for i in ids[20:]])
    finally:
        retriever.store.close()
    with caplog.at_level(logging.INFO, logger="rag_grpc.index.namespaces"):
        reopened = open_retriever(data)
    try:
        assert "loaded the payload index of default" in caplog.text
        assert "default, 0 newer values" not in caplog.text
        assert_same_as_sql(reopened, rng, seed)
        # A delete after the save: the saved file cannot drop the deleted
        # documents' values, so the next start builds from the store.
        reopened.delete("default", ids[:5])
    finally:
        reopened.store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rag_grpc.index.namespaces"):
        third = open_retriever(data)
    try:
        assert "built the payload index of default" in caplog.text
        assert_same_as_sql(third, rng, seed)
    finally:
        third.store.close()


def test_a_damaged_payload_file_is_rebuilt_from_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    data = tmp_path / "data"
    retriever = open_retriever(data)
    try:
        retriever.upsert("default", [random_document(rng, f"d{i}") for i in range(20)])
        retriever.save_indexes()
        path = retriever.indexes.payload_path("default")
    finally:
        retriever.store.close()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="rag_grpc.index.namespaces"):
        reopened = open_retriever(data)
    try:
        assert "is not the file its meta describes" in caplog.text
        assert "built the payload index of default" in caplog.text
        assert_same_as_sql(reopened, rng, seed)
    finally:
        reopened.store.close()


def _forged(arrays: dict[str, np.ndarray], path: Path) -> dict[str, object]:
    """Write arrays as a payload file and describe it as its meta would: a
    forger who rewrote both files, so only the content checks remain."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    path.write_bytes(buffer.getvalue())
    return {
        "format": payload_file.FORMAT,
        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        "bytes": len(buffer.getvalue()),
    }


def _header(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"header": _header([1, 2])}, "unknown header"),
        (
            {
                "header": _header(
                    {"format": 1, "wide": False, "sets": [["k", "s", True, 0, 8]], "numbers": []}
                ),
                "bitmaps": np.zeros(8, dtype=np.uint8),
            },
            "wrong kind",
        ),
        (
            {
                "header": _header(
                    {"format": 1, "wide": False, "sets": [["k", "s", "v", 0, 99]], "numbers": []}
                ),
                "bitmaps": np.zeros(8, dtype=np.uint8),
            },
            "do not tile",
        ),
        (
            {
                "header": _header(
                    {"format": 1, "wide": False, "sets": [["k", "s", "v", 0, 8]], "numbers": []}
                ),
                "bitmaps": np.full(8, 0x41, dtype=np.uint8),
            },
            "deserialize",
        ),
        (
            {
                "header": _header({"format": 1, "wide": False, "sets": [], "numbers": ["n"]}),
                "bitmaps": np.zeros(0, dtype=np.uint8),
                "values_0": np.array([2.0, 1.0]),
                "labels_0": np.array([1, 2], dtype=np.uint64),
            },
            "not sorted",
        ),
        (
            {
                "header": _header({"format": 1, "wide": False, "sets": [], "numbers": ["n"]}),
                "bitmaps": np.zeros(0, dtype=np.uint8),
                "values_0": np.array([1.0, np.nan]),
                "labels_0": np.array([1, 2], dtype=np.uint64),
            },
            "not sorted",
        ),
        (
            {
                "header": _header({"format": 1, "wide": False, "sets": [], "numbers": ["n"]}),
                "bitmaps": np.zeros(0, dtype=np.uint8),
                "values_0": np.array([1.0]),
            },
            "malformed",
        ),
        (
            {
                "header": _header({"format": 1, "wide": False, "sets": [], "numbers": ["n"]}),
                "bitmaps": np.zeros(0, dtype=np.uint8),
                "values_0": np.array([1.0, 2.0]),
                "labels_0": np.array([1, 2], dtype=np.int8),
            },
            "wrong type",
        ),
    ],
)
def test_a_forged_payload_file_is_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], reason: str
) -> None:
    path = tmp_path / "default.payload.npz"
    meta = _forged(arrays, path)
    with pytest.raises(ValueError, match=reason):
        payload_file.load(path, meta)


def test_a_payload_file_round_trips(tmp_path: Path) -> None:
    index = PayloadIndex.build(
        [
            (1, "tag", "a"),
            (2, "tag", "b"),
            (3, "flag", True),
            (1, "n", 2.0),
            (2, "n", 2.0),
            (3, "n", -1.5),
            (2**33, "tag", "a"),
        ]
    )
    path = tmp_path / "default.payload.npz"
    loaded = payload_file.load(path, payload_file.save(index, path))
    for flt in (Equals("tag", "a"), Equals("flag", True), Range("n", gte=0), Equals("n", 2)):
        assert labels_of(loaded, flt) == labels_of(index, flt), flt


# -- through a real server -----------------------------------------------------


def found(client: RagClient, flt: Filter, namespace: str = "") -> set[str]:
    return {
        h.document_id
        for h in client.search("anything at all", k=50, filter=flt, namespace=namespace)
    }


@pytest.fixture
def served(start_server: Callable[..., ServerThread]) -> Iterator[tuple[ServerThread, RagClient]]:
    server = start_server()
    with RagClient(server.target, timeout=60) as client:
        client.upsert(CORPUS)
        yield server, client


def test_filtered_search_follows_upsert_delete_and_forget(
    served: tuple[ServerThread, RagClient],
) -> None:
    _, client = served
    reviewed = Equals("reviewed", True)
    assert found(client, reviewed) == {"volcano", "photosynthesis", "gil"}
    # A replacement moves the document between values at once.
    chess = next(d for d in CORPUS if d.id == "chess")
    client.upsert([Document("chess", chess.text, {**chess.metadata, "reviewed": True})])
    assert found(client, reviewed) == {"volcano", "photosynthesis", "gil", "chess"}
    assert found(client, Equals("reviewed", False)) == {"espresso"}
    # A document that lost the key no longer matches any condition on it.
    client.upsert([Document("espresso", "Espresso is strong coffee.", {"topic": "food"})])
    assert found(client, Equals("reviewed", False)) == set()
    assert found(client, Range("year", gte=2000)) == {"volcano", "photosynthesis", "chess", "gil"}
    client.delete(["volcano"])
    assert found(client, reviewed) == {"photosynthesis", "gil", "chess"}
    client.delete([], filter=Equals("topic", "games"))
    assert found(client, reviewed) == {"photosynthesis", "gil"}
    client.delete(["gil"], forget=True)
    assert found(client, reviewed) == {"photosynthesis"}
    assert found(client, AnyOf("topic", ("computing", "biology", "food"))) == {
        "photosynthesis",
        "espresso",
    }


def test_a_restarted_server_has_the_payload_index_of_before(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = start_server(data)
    with RagClient(first.target) as client:
        client.upsert(CORPUS)
        client.delete(["chess"])
        client.upsert([Document("late", "A note written last.", {"year": 2015.0})])
    first.stop()
    second = start_server(data)
    with RagClient(second.target) as client:
        assert found(client, Equals("year", 2015)) == {"late"}
        assert found(client, Range("year", lt=2021)) == {"late", "volcano"}
        assert found(client, Equals("reviewed", False)) == {"espresso"}


def test_retention_deletes_leave_the_payload_index(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(retention={"ttl_s": {"ephemeral": 1.0}, "sweep_interval_s": 0.2})
    with RagClient(server.target) as client:
        client.upsert(
            [Document(f"n{i}", f"A note about tides {i}.", {"kind": "note"}) for i in range(3)],
            "ephemeral",
        )
        assert found(client, Equals("kind", "note"), "ephemeral") == {"n0", "n1", "n2"}
        deadline = time.monotonic() + 15
        while client.get(["n0"], namespace="ephemeral")[0]:
            assert time.monotonic() < deadline, "the sweeper never removed the notes"
            time.sleep(0.2)
        assert found(client, Equals("kind", "note"), "ephemeral") == set()
        retriever = server.server.retriever
        assert retriever is not None
        assert len(retriever.indexes.payload("ephemeral").matching(Equals("kind", "note"))) == 0


def test_bad_filters_get_a_clear_status_and_change_nothing(
    served: tuple[ServerThread, RagClient],
) -> None:
    server, client = served
    store = server.server.store
    assert store is not None
    generation = store.generation("default")
    # A key no document has: no hits, not an error.
    assert found(client, Equals("never_indexed", "x")) == set()
    assert found(client, Range("never_indexed", gte=0)) == set()
    # Mixed kinds in any_of are valid: each value matches fields of its kind.
    assert found(client, AnyOf("year", ("2019", 2021, True))) == {"photosynthesis"}
    assert found(client, AnyOf("reviewed", (1, False, "True"))) == {"chess", "espresso"}
    bad: list[tuple[Filter, tuple[str, ...]]] = [
        (AnyOf("topic", ()), ("any_of", "1 to")),
        (Range("year", gte=float("nan")), ("NaN",)),
        (Range("year", lt=float("nan"), gt=1.0), ("NaN",)),
        (Equals("year", float("nan")), ("finite",)),
        (Equals("year", float("inf")), ("finite",)),
    ]
    for flt, words in bad:
        with pytest.raises(RpcError) as info:
            client.search("lava", filter=flt)
        assert info.value.code == "INVALID_ARGUMENT", info.value
        assert all(word in info.value.message for word in words), info.value.message
        with pytest.raises(RpcError) as info:
            client.delete([], filter=flt)
        assert info.value.code == "INVALID_ARGUMENT", info.value
    assert store.generation("default") == generation
    assert found(client, Range("year", gte=0)) == {d.id for d in CORPUS}
