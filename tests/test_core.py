"""The core library without a server: chunking and filters."""

from __future__ import annotations

import itertools
import random

import pytest

from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import MAX_DEPTH, And, AnyOf, Equals, Or, Range, validate_filter
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
