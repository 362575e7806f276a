"""The interface every vector index implements (hnswlib binding now, the
native core later)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

MISSING_LABEL = np.uint64(2**64 - 1)


class VectorIndex(Protocol):
    """An approximate nearest-neighbour index over unit vectors, keyed by uint64 labels."""

    dim: int

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Insert (or replace) vectors float32 [n, dim] under labels uint64 [n]."""

    def delete(self, labels: np.ndarray) -> None:
        """Remove labels from results; unknown labels are ignored."""

    def search(
        self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: labels uint64 [q, k] and scores float32 [q, k], best first.

        Missing results are MISSING_LABEL with score -inf. ``allowed``
        restricts results to those labels.
        """
        ...

    def save(self, path: Path) -> None:
        """Write the index atomically to path."""

    def __len__(self) -> int:
        """Live (not deleted) vectors."""
        ...
