"""TokenChunker (rag_grpc/embed/chunking.py): chunk size, overlap and the edge cases."""

from __future__ import annotations

import itertools
import random

import pytest

from rag_grpc.embed.chunking import TokenChunker
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
