"""The core library without a server: chunking, filters, the store, the index."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import MAX_DEPTH, And, AnyOf, Equals, Or, Range, validate_filter
from rag_grpc.index.base import MISSING_LABEL
from rag_grpc.index.hnsw import HnswIndex
from tests.conftest import MODEL_DIR


@pytest.fixture(scope="module")
def chunker() -> TokenChunker:
    return TokenChunker(MODEL_DIR / "tokenizer.json", chunk_tokens=32, overlap_tokens=8)


def random_text(rng: random.Random, words: int) -> str:
    vocabulary = [
        "river",
        "stone",
        "quickly",
        "bright",
        "market",
        "engine",
        "silver",
        "winter",
        "paper",
        "garden",
    ]
    return " ".join(rng.choice(vocabulary) + rng.choice(["", ",", "."]) for _ in range(words))


def test_chunks_respect_size_and_overlap(chunker: TokenChunker) -> None:
    rng = random.Random(7)
    text = random_text(rng, 400)
    spans = chunker.split(text)
    assert len(spans) > 5
    tokenizer = chunker._tokenizer
    for span in spans:
        assert len(tokenizer.encode(span.text, add_special_tokens=False).ids) <= 32
        assert text[span.start : span.end].strip() == span.text
    for first, second in itertools.pairwise(spans):
        assert first.start < second.start < first.end  # consecutive chunks overlap
    assert spans[0].start == 0 and spans[-1].end == len(text)


def test_short_and_blank_texts(chunker: TokenChunker) -> None:
    assert [s.text for s in chunker.split("One short sentence.")] == ["One short sentence."]
    assert chunker.split("   \n ") == []


def test_chunker_rejects_overlap_not_below_size() -> None:
    with pytest.raises(ValueError):
        TokenChunker(MODEL_DIR / "tokenizer.json", chunk_tokens=10, overlap_tokens=10)


@pytest.mark.parametrize(
    "flt",
    [
        Equals("bad key", 1),
        AnyOf("k", ()),
        Range("k"),
        Range("k", gte=1, gt=2),
        Range("k", gte=3, lte=1),
        Range("k", lt=float("nan")),
        And(()),
        Or(()),
    ],
)
def test_malformed_filters_are_rejected(flt) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        validate_filter(flt)


def test_filter_depth_and_size_limits() -> None:
    deep: Equals | And = Equals("k", 1)
    for _ in range(MAX_DEPTH):
        deep = And((deep,))
    with pytest.raises(InvalidArgument, match="deeper"):
        validate_filter(deep)
    with pytest.raises(InvalidArgument, match="conditions"):
        validate_filter(Or(tuple(Equals("k", i) for i in range(65))))
    validate_filter(Or(tuple(Equals("k", i) for i in range(64))))


def unit_vectors(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return [int(labels[i]) for i in order]


def test_index_grows_deletes_and_filters(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = unit_vectors(rng, 3000)
    labels = np.arange(10, 3010, dtype=np.uint64)
    index = HnswIndex(32, capacity=64, exact_scan_max=100)
    index.add(vectors, labels)
    assert len(index) == 3000 and index.capacity >= 3000
    query = vectors[5]
    found, scores = index.search(query, k=5, ef=100)
    assert int(found[0, 0]) == 15 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)

    index.delete(np.array([15], dtype=np.uint64))
    found, _ = index.search(query, k=5, ef=100)
    assert 15 not in found[0].tolist() and len(index) == 2999

    small = labels[100:150]  # under exact_scan_max: exact scan, recall 1
    found, _ = index.search(query, k=10, ef=10, allowed=small)
    assert found[0].tolist() == exact_top(vectors[100:150], small, query, 10)

    large = labels[::2]  # over exact_scan_max: graph walk with the filter
    found, _ = index.search(query, k=10, ef=200, allowed=large)
    assert set(found[0].tolist()) <= set(large.tolist())

    found, scores = index.search(query, k=5, ef=50, allowed=np.array([11, 12], np.uint64))
    assert found[0, 2:].tolist() == [int(MISSING_LABEL)] * 3 and np.isneginf(scores[0, 2:]).all()

    path = tmp_path / "i.hnsw"
    index.save(path)
    live = np.array(sorted(set(labels.tolist()) - {15}), dtype=np.uint64)
    loaded = HnswIndex.load(path, 32, live)
    assert len(loaded) == 2999
    found, _ = loaded.search(query, k=5, ef=100)
    assert 15 not in found[0].tolist()
    with pytest.raises(ValueError, match="lacks vectors"):
        HnswIndex.load(path, 32, np.array([99999], np.uint64))
    path.write_bytes(b"not an index")
    with pytest.raises(ValueError):
        HnswIndex.load(path, 32, live)
