"""An LRU cache of embeddings, bounded in bytes, keyed by model id and a
hash of the normalised text (so the cache never holds the text itself)."""

from __future__ import annotations

import hashlib
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np

from rag_grpc.lru import BoundedLRU

# Per-entry bookkeeping beyond the vector (key, tuple, dict slot), measured
# roughly with sys.getsizeof; it keeps the byte bound honest for small vectors.
_ENTRY_OVERHEAD = 200


def _entry_bytes(key: bytes, entry: tuple[np.ndarray, int]) -> int:
    return entry[0].nbytes + _ENTRY_OVERHEAD


def text_key(model_id: str, text: str) -> bytes:
    """Cache key: model id + hash of the text in NFC with whitespace runs folded."""
    normalised = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.blake2b(f"{model_id}\0{normalised}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class CacheStats:
    """Counters since start."""

    hits: int
    misses: int
    entries: int
    bytes: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class EmbeddingCache:
    """Thread-safe LRU of (vector, token count) per text, at most max_bytes
    (the shared `BoundedLRU`, bounded in bytes only)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: BoundedLRU[bytes, tuple[np.ndarray, int]] = BoundedLRU(
            sys.maxsize, max_bytes, _entry_bytes
        )

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None:
        """The cached (vector, tokens), refreshed as most recently used."""
        return self._lru.get(key)

    def put(self, key: bytes, vector: np.ndarray, tokens: int) -> None:
        """Store a vector (copied, read-only), evicting least recently used entries."""
        if vector.nbytes + _ENTRY_OVERHEAD > self.max_bytes:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        self._lru.put(key, (stored, tokens))

    def stats(self) -> CacheStats:
        """Hits, misses and size."""
        return CacheStats(*self._lru.counters())
