"""What the native tests measure an index against: fresh seeded, clustered
random vectors, the exact k nearest by brute force, and recall; and an index
built over them."""

from __future__ import annotations

from typing import Any

import numpy as np

from rag_grpc.native import VectorIndex

DIM = 48


N = 6000


def make_data(seed: int, n: int = N, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Clustered, like real embeddings, rather than uniform noise.
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    data = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return data.astype(np.float32)


def exact(
    space: str, data: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    if space == "l2":
        dist = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    else:
        if space == "cosine":
            data = data / np.linalg.norm(data, axis=1, keepdims=True)
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        dist = 1.0 - queries @ data.T
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return labels[order], np.take_along_axis(dist, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def build(space: str, data: np.ndarray, labels: np.ndarray, **kwargs: Any) -> VectorIndex:
    index = VectorIndex(DIM, space, max_elements=256, M=16, ef_construction=100, **kwargs)
    index.add(data, labels)
    return index
