"""ANN benchmark: the native core beside hnswlib's Python binding, faiss
IndexHNSWFlat and usearch, on the same data in one run.

    python bench/ann.py [--n 100000] [--dim 384] [--queries 1000]

1. Recall@10 and QPS across ef (batch, all cores), single-query latency.
2. Filtered search at selectivity 50/10/1/0.1 %: the core's plan vs hnswlib's
   filter= callable vs post-filtering (over-fetch, then drop).
3. The exact-scan switch-over: graph walk vs exact scan by allowed-set size.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import faiss
import hnswlib
import numpy as np
import usearch.index

from bench.common import (
    command_line,
    embedding_like,
    exact_top_k,
    latencies_ms,
    recall_at_k,
    record,
    table,
    timed,
    unit_vectors,
)
from rag_grpc.native import VectorIndex

M, EF_CONSTRUCTION, K = 16, 200, 10
THREADS = os.cpu_count() or 1


def build_all(data: np.ndarray, labels: np.ndarray) -> tuple[dict[str, object], list[list[object]]]:
    dim = data.shape[1]
    built: dict[str, object] = {}
    rows = []

    ours = VectorIndex(dim, "ip", max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    rows.append(["rag-native", timed(lambda: ours.add(data, labels, num_threads=THREADS))])
    built["rag-native"] = ours

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
    if name == "rag-native":
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


def unfiltered(built: dict[str, object], queries: np.ndarray, truth: np.ndarray, efs: list[int]):  # type: ignore[no-untyped-def]
    rows = []
    for ef in efs:
        for name, index in built.items():
            if name == "usearch":
                index.expansion_search = ef  # type: ignore[attr-defined]
            search = search_fn(name, index, ef)
            found = search(queries, THREADS)
            batch_s = min(timed(lambda: search(queries, THREADS)) for _ in range(2))
            single = latencies_ms(lambda i: search(queries[i : i + 1], 1), min(500, len(queries)))
            rows.append(
                [
                    ef,
                    name,
                    recall_at_k(np.asarray(found).astype(np.int64), truth),
                    len(queries) / batch_s,
                    float(np.percentile(single, 50) * 1000),
                    float(np.percentile(single, 99) * 1000),
                    1000 / float(np.mean(single)),
                ]
            )
    return rows


def filtered(ours: VectorIndex, binding: hnswlib.Index, data: np.ndarray, queries: np.ndarray):  # type: ignore[no-untyped-def]
    rows = []
    rng = np.random.default_rng(7)
    n = len(data)
    ef = 100
    for selectivity in (0.5, 0.1, 0.01, 0.001):
        allowed = np.sort(rng.choice(n, int(n * selectivity), replace=False)).astype(np.uint64)
        mask = np.zeros(n, bool)
        mask[allowed.astype(np.int64)] = True
        truth_local = exact_top_k(data[mask], queries, K)
        truth = allowed[truth_local].astype(np.int64)
        allowed_set = set(allowed.tolist())

        found = ours.search(queries, k=K, ef=ef, allowed=allowed, num_threads=1)[0]
        t_ours = timed(lambda: ours.search(queries, k=K, ef=ef, allowed=allowed, num_threads=1))
        rows.append(
            [
                f"{selectivity:.1%}",
                "rag-native (auto plan)",
                recall_at_k(found.astype(np.int64), truth),
                len(queries) / t_ours,
            ]
        )

        binding.set_ef(ef)
        few = queries[: max(20, len(queries) // 10)]  # the callable is slow: fewer queries
        kk = min(K, len(allowed))
        found = binding.knn_query(few, k=kk, num_threads=1, filter=lambda x: x in allowed_set)[0]
        t_cb = timed(
            lambda: binding.knn_query(few, k=kk, num_threads=1, filter=lambda x: x in allowed_set)
        )
        rows.append(
            [
                f"{selectivity:.1%}",
                "hnswlib filter= callable",
                recall_at_k(found.astype(np.int64), truth[: len(few)]),
                len(few) / t_cb,
            ]
        )

        fetch = min(n, int(K / selectivity * 2))
        binding.set_ef(max(ef, fetch))

        def post_filter() -> np.ndarray:
            labels = binding.knn_query(few, k=fetch, num_threads=1)[0]
            out = np.full((len(few), K), -1, dtype=np.int64)
            for i, row in enumerate(labels):
                kept = row[mask[row.astype(np.int64)]][:K]
                out[i, : len(kept)] = kept
            return out

        found = post_filter()
        t_post = timed(post_filter)
        rows.append(
            [
                f"{selectivity:.1%}",
                f"post-filter (fetch {fetch})",
                recall_at_k(found, truth[: len(few)]),
                len(few) / t_post,
            ]
        )
    return rows


def switch_over(ours: VectorIndex, data: np.ndarray, queries: np.ndarray):  # type: ignore[no-untyped-def]
    """Graph walk vs exact scan for allowed sets of growing size (1 thread),
    one query per call (as a server answers Search) and as one batch."""
    rows = []
    rng = np.random.default_rng(9)
    saved = ours.exact_threshold
    q = queries[:200]
    sizes = [s for s in (1_000, 5_000, 10_000, 15_000, 20_000, 30_000, 50_000) if s < len(data)]
    for size in sizes:
        allowed = rng.choice(len(data), size, replace=False).astype(np.uint64)
        mask = np.zeros(len(data), bool)
        mask[allowed.astype(np.int64)] = True
        truth = np.flatnonzero(mask)[exact_top_k(data[mask], q, K)]
        measured = []
        for threshold in (0, 10**9):  # 0: always the graph; 10**9: always exact
            ours.exact_threshold = threshold
            found = ours.search(q, k=K, ef=100, allowed=allowed, num_threads=1)[0]
            single = latencies_ms(
                lambda i: ours.search(q[i], k=K, ef=100, allowed=allowed, num_threads=1), len(q)
            )
            batch_s = timed(lambda: ours.search(q, k=K, ef=100, allowed=allowed, num_threads=1))
            measured += [
                1000 / float(np.mean(single)),
                len(q) / batch_s,
                recall_at_k(found.astype(np.int64), truth),
            ]
        rows.append([size, *measured])
    ours.exact_threshold = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument(
        "--data",
        choices=["embedding-like", "random"],
        default="embedding-like",
        help="vectors drawn like MiniLM embeddings, or uniform on the sphere",
    )
    parser.add_argument("--no-record", action="store_true", help="print, do not append RESULTS.md")
    args = parser.parse_args()

    if args.data == "random":
        data = unit_vectors(args.n, args.dim, seed=1)
        queries = unit_vectors(args.queries, args.dim, seed=2)
    else:
        data = embedding_like(args.n, seed=1)
        queries = embedding_like(args.queries, seed=2)
    labels = np.arange(args.n, dtype=np.uint64)
    truth = exact_top_k(data, queries, K)
    built, build_rows = build_all(data, labels)
    results = {
        "build": build_rows,
        "unfiltered": unfiltered(built, queries, truth, args.ef),
        "filtered": filtered(built["rag-native"], built["hnswlib binding"], data, queries),  # type: ignore[arg-type]
        "switch_over": switch_over(built["rag-native"], data, queries),  # type: ignore[arg-type]
    }
    body = "\n\n".join(
        [
            f"{args.n:,} {args.data} unit vectors, d={args.dim}, {args.queries} queries, k={K}, "
            f"M={M}, ef_construction={EF_CONSTRUCTION}, {THREADS} threads for builds and batches.",
            "Build (seconds):\n\n" + table(["library", "build s"], build_rows),
            "Unfiltered: batch QPS uses all cores in one call; single-query latency is one "
            "query per call on one thread.\n\n"
            + table(
                [
                    "ef",
                    "library",
                    "recall@10",
                    "batch QPS",
                    "single p50 µs",
                    "single p99 µs",
                    "single QPS",
                ],
                results["unfiltered"],
            ),
            "Filtered (one thread, ef=100): the core picks exact scan or the filtered graph walk "
            "by the allowed-set size.\n\n"
            + table(["selectivity", "method", "recall@10", "QPS"], results["filtered"]),
            "Exact-scan switch-over (one thread, ef=100, 200 queries; one per call, or one batch)"
            ":\n\n"
            + table(
                [
                    "allowed vectors",
                    "graph single QPS",
                    "graph batch QPS",
                    "graph recall@10",
                    "exact single QPS",
                    "exact batch QPS",
                    "exact recall@10",
                ],
                results["switch_over"],
            ),
        ]
    )
    record(
        "ANN: native core vs hnswlib, faiss, usearch",
        command_line(),
        "hnswlib 0.8.0 Python binding, faiss-cpu 1.15.1 IndexHNSWFlat, usearch 2.26.6",
        body,
        results,
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
