"""An LRU cache of embeddings, bounded in bytes, keyed by model id and a
hash of the normalised text (so the cache never holds the text itself)."""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Per-entry bookkeeping beyond the vector (key, tuple, dict slot), measured
# roughly with sys.getsizeof; it keeps the byte bound honest for small vectors.
_ENTRY_OVERHEAD = 200


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
    """Thread-safe LRU of (vector, token count) per text, at most max_bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[np.ndarray, int] | None:
        """The cached (vector, tokens), refreshed as most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def put(self, key: bytes, vector: np.ndarray, tokens: int) -> None:
        """Store a vector (copied, read-only), evicting least recently used entries."""
        size = vector.nbytes + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes + _ENTRY_OVERHEAD
            self._entries[key] = (stored, tokens)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes + _ENTRY_OVERHEAD

    def stats(self) -> CacheStats:
        """Hits, misses and size."""
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._bytes)
