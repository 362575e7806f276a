"""The in-process test layer's parts: the core built directly, without a
server, over a temporary directory, with an embedder whose geometry is known.

The real encoder is tested elsewhere (tests/embed/test_batcher.py, the server
tests); here the vectors only have to be deterministic and make "shares words
with" mean "is near", so that which document a query finds is obvious from
the texts and the tests stay well under a second. Where what the vectors
mean does not matter at all (filters, telemetry), `HashEmbedder` gives each
text a fixed random direction."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import EmbedOutput
from rag_grpc.index.retriever import Retriever
from rag_grpc.store.sqlite import DocumentStore
from tests.conftest import MODEL_DIR

_WORD = re.compile(r"[a-z0-9]+")
# Words every English text has: left out, so that nearness means shared content.
_STOP_WORDS = frozenset(
    {"a", "an", "and", "are", "at", "be", "by", "can", "for", "from", "in", "is", "it"}
    | {"its", "of", "on", "or", "that", "the", "to", "with"}
)


def words(text: str) -> list[str]:
    """The words of a text the embedder counts (lower case, no stop words)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS]


class WordEmbedder:
    """Bag-of-words vectors: each word adds a fixed random direction (seeded
    by its hash), the sum is normalised. Texts sharing words are near, texts
    sharing none are nearly orthogonal; the same text always gives the same
    vector. Counts calls, so tests can see when the model was (not) asked."""

    model_id = "words-256"
    dimension = 256

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    @classmethod
    def word_vector(cls, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(cls.dimension)

    def vector(self, text: str) -> np.ndarray:
        """The unit vector of one text (a fixed direction for a text without words)."""
        total = np.zeros(self.dimension)
        for word in words(text):
            total += self.word_vector(word)
        norm = float(np.linalg.norm(total))
        if norm == 0:
            total[0], norm = 1.0, 1.0
        return (total / norm).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        self.calls += 1
        self.texts += len(texts)
        vectors = (
            np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dimension))
        )
        counts = np.array([len(words(t)) for t in texts], dtype=np.int64)
        return EmbedOutput(vectors.astype(np.float32), int(counts.sum()), counts)


class HashEmbedder:
    """Deterministic unit vectors from a text's hash, for tests that do not
    depend on what the vectors mean (the payload index's filters, telemetry):
    16 dimensions keep hundreds of writes fast."""

    model_id = "hash-16"
    dimension = 16

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(self.dimension)
            vectors[row] = vector / np.linalg.norm(vector)
        return EmbedOutput(vectors, sum(len(t.split()) for t in texts))


def open_retriever(
    data: Path,
    embedder: WordEmbedder | None = None,
    *,
    chunk_tokens: int = 64,
    limits: LimitsConfig | None = None,
    **options: Any,
) -> Retriever:
    """A Retriever over data/ (its SQLite store and index files), built as
    the server builds it but with the word embedder."""
    data.mkdir(parents=True, exist_ok=True)
    store = DocumentStore(data / "rag.sqlite3")
    chunker = TokenChunker(
        MODEL_DIR / "tokenizer.json", chunk_tokens=chunk_tokens, overlap_tokens=0
    )
    return Retriever(
        store,
        embedder or WordEmbedder(),
        chunker,
        data / "index",
        IndexConfig(),
        limits or LimitsConfig(),
        **options,
    )
