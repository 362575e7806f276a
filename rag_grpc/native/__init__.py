"""The native search core (Cython over hnswlib's C++ index, built by setup.py
from native/): GIL-free batched search, filters inside the graph walk, exact
scan for small allowed sets, concurrent writes."""

from rag_grpc.native._vector_index import (
    DEFAULT_EXACT_THRESHOLD,
    MISSING_LABEL,
    SPACES,
    VectorIndex,
)

__all__ = ["DEFAULT_EXACT_THRESHOLD", "MISSING_LABEL", "SPACES", "VectorIndex"]
