"""The libraries the ANN benchmark compares (the native core both ways,
hnswlib's binding, faiss IndexHNSWFlat, usearch): their shared HNSW
parameters, how each is built, and one search call for each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import hnswlib
import numpy as np
import usearch.index

from bench.common import timed
from rag_grpc.native import VectorIndex

M, EF_CONSTRUCTION, K = 16, 200, 10
THREADS = os.cpu_count() or 1


def build_all(
    data: np.ndarray, labels: np.ndarray, saved: Path
) -> tuple[dict[str, object], list[list[object]]]:
    dim = data.shape[1]
    built: dict[str, object] = {}
    rows = []

    ours = VectorIndex(dim, "ip", max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    rows.append(["rag-native", timed(lambda: ours.add(data, labels, num_threads=THREADS))])
    # Saved, so searches re-rank from the memory-mapped file as a server's
    # loaded index does (save() remaps the float32 vectors onto it).
    ours.save(saved / "rag-native.hnsw")
    built["rag-native"] = ours

    floats = VectorIndex(
        dim, "ip", max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION, quantized=False
    )
    rows.append(
        ["rag-native float walk", timed(lambda: floats.add(data, labels, num_threads=THREADS))]
    )
    built["rag-native float walk"] = floats

    binding = hnswlib.Index(space="ip", dim=dim)
    binding.init_index(max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    binding.set_num_threads(THREADS)
    rows.append(["hnswlib binding", timed(lambda: binding.add_items(data, labels))])
    built["hnswlib binding"] = binding

    faiss.omp_set_num_threads(THREADS)
    flat = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    flat.hnsw.efConstruction = EF_CONSTRUCTION
    rows.append(["faiss IndexHNSWFlat", timed(lambda: flat.add(data))])
    built["faiss IndexHNSWFlat"] = flat

    us = usearch.index.Index(ndim=dim, metric="ip", connectivity=M, expansion_add=EF_CONSTRUCTION)
    rows.append(["usearch", timed(lambda: us.add(labels.astype(np.uint64), data, threads=THREADS))])
    built["usearch"] = us
    return built, rows


SearchFn = Callable[[np.ndarray, int], np.ndarray]


def search_fn(name: str, index: Any, ef: int) -> SearchFn:
    """A function (queries, threads) -> labels [q, K] for one library at one ef."""
    if name.startswith("rag-native"):
        return lambda q, t: index.search(q, k=K, ef=ef, num_threads=t)[0]
    if name == "hnswlib binding":
        index.set_ef(ef)
        return lambda q, t: index.knn_query(q, k=K, num_threads=t)[0]
    if name == "faiss IndexHNSWFlat":
        params = faiss.SearchParametersHNSW(efSearch=ef)

        def run(q: np.ndarray, t: int) -> np.ndarray:
            faiss.omp_set_num_threads(t)
            return index.search(q, K, params=params)[1]

        return run
    return lambda q, t: index.search(q, K, exact=False, threads=t).keys
