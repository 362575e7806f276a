"""Merging rankings: reciprocal rank fusion and relative-score fusion.

Both take rankings of keys (chunk ids, or document ids for a by-document
search), each best first with its own scores, and weights per ranking, and
give one score per key (higher is better); a key missing from a ranking gets
nothing from it.

- RRF (Cormack et al. 2009; Milvus' RRFRanker, Qdrant's fusion "rrf"):
  sum of weight / (k + rank), rank counted from 1. Scores' scales do not
  matter, only the order.
- Relative score (Weaviate's relativeScoreFusion): each ranking's scores
  scaled to [0, 1] by its best and worst, then the weighted sum. Keeps how
  far apart the candidates are, which RRF throws away.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

METHODS = ("rrf", "relative_score")


def rrf(
    rankings: Sequence[Sequence[tuple[K, float]]], weights: Sequence[float], k: int
) -> dict[K, float]:
    """Reciprocal rank fusion of rankings [(key, score), ...] best first."""
    fused: dict[K, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, (key, _) in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return fused


def relative_score(
    rankings: Sequence[Sequence[tuple[K, float]]], weights: Sequence[float]
) -> dict[K, float]:
    """Weighted sum of each ranking's scores scaled to [0, 1]."""
    fused: dict[K, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        if not ranking:
            continue
        scores = [score for _, score in ranking]
        low, high = min(scores), max(scores)
        span = high - low
        for key, score in ranking:
            scaled = (score - low) / span if span > 0 else 1.0
            fused[key] = fused.get(key, 0.0) + weight * scaled
    return fused


def fuse(
    rankings: Sequence[Sequence[tuple[K, float]]],
    weights: Sequence[float],
    method: str,
    rrf_k: int,
) -> list[tuple[K, float]]:
    """The fused ranking, best first (ties keep the first ranking's order)."""
    fused = rrf(rankings, weights, rrf_k) if method == "rrf" else relative_score(rankings, weights)
    return sorted(fused.items(), key=lambda item: -item[1])
