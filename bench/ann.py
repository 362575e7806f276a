"""ANN benchmark: the native core beside hnswlib's Python binding, faiss
IndexHNSWFlat and usearch, on the same data in one run.

    python bench/ann.py [--n 100000] [--dim 384] [--queries 1000] [--sections ...]

1. Recall@10 and QPS across ef (batch, all cores), single-query latency; the
   core both ways: int8 walk with float32 vectors memory-mapped from its saved
   file (the default), and float32 records (quantized=False).
2. Filtered search at selectivity 50/10/1/0.1 %: the core's plan vs hnswlib's
   filter= callable vs post-filtering (over-fetch, then drop).
3. The exact-scan switch-over: graph walk vs exact scan by allowed-set size.
4. Memory: RSS per vector (each index built or loaded in a fresh process)
   for hnswlib, the float32 core and the int8 core, before and after
   searching, and after deleting half of an index and compacting it.

The libraries are built and searched in ann_libraries.py, the memory
section runs in ann_memory.py; this module runs the other sections and
writes the table.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import hnswlib
import numpy as np

from bench.ann_libraries import EF_CONSTRUCTION, THREADS, K, M, build_all, search_fn
from bench.ann_memory import memory
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


# -- memory ---------------------------------------------------------------------
#
# Each measurement runs in a fresh interpreter (spawned, not forked), which
# reads the data, notes its RSS, then builds or loads one index: the RSS
# growth is that index's, not what earlier builds left in malloc's arenas.


SECTIONS = ("unfiltered", "filtered", "switch_over", "memory")


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
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which parts to run (default: all)",
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
    with tempfile.TemporaryDirectory(prefix="ann-bench-") as work:
        results, parts = run_sections(args, data, labels, queries, truth, Path(work))
    body = "\n\n".join(
        [
            f"{args.n:,} {args.data} unit vectors, d={args.dim}, {args.queries} queries, k={K}, "
            f"M={M}, ef_construction={EF_CONSTRUCTION}, {THREADS} threads for builds and batches.",
            *parts,
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


def run_sections(  # type: ignore[no-untyped-def]
    args, data: np.ndarray, labels: np.ndarray, queries: np.ndarray, truth: np.ndarray, work: Path
) -> tuple[dict[str, object], list[str]]:
    """Run the chosen sections; their results and their Markdown parts."""
    results: dict[str, object] = {}
    parts: list[str] = []
    if set(args.sections) - {"memory"}:
        built, build_rows = build_all(data, labels, work)
        results["build"] = build_rows
        parts.append("Build (seconds):\n\n" + table(["library", "build s"], build_rows))
    if "unfiltered" in args.sections:
        results["unfiltered"] = unfiltered(built, queries, truth, args.ef)
        parts.append(
            "Unfiltered: batch QPS uses all cores in one call; single-query latency is one "
            "query per call on one thread. rag-native walks int8 codes and re-ranks the beam "
            "from float32 vectors memory-mapped from its saved file; the float walk keeps "
            "float32 records in RAM.\n\n"
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
                results["unfiltered"],  # type: ignore[arg-type]
            )
        )
    if "filtered" in args.sections:
        results["filtered"] = filtered(built["rag-native"], built["hnswlib binding"], data, queries)  # type: ignore[arg-type]
        parts.append(
            "Filtered (one thread, ef=100): the core picks exact scan or the filtered graph walk "
            "by the allowed-set size.\n\n"
            + table(["selectivity", "method", "recall@10", "QPS"], results["filtered"])  # type: ignore[arg-type]
        )
    if "switch_over" in args.sections:
        results["switch_over"] = switch_over(built["rag-native"], data, queries)  # type: ignore[arg-type]
        parts.append(
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
                results["switch_over"],  # type: ignore[arg-type]
            )
        )
    if "memory" in args.sections:
        if set(args.sections) - {"memory"}:
            del built  # this process's indexes play no part in the children's RSS
            gc.collect()
        results["memory"] = memory(data, queries, truth, work)
        parts.append(
            "Memory: RSS growth of a fresh process (spawned) that builds or loads one index "
            "(VmRSS; anonymous and file-backed parts), divided by the full n; memory_bytes is "
            "VectorIndex's own estimate; searched = after 1,000 batch and 500 single queries "
            "at ef=100, whose re-ranks map pages of the float32 file (page cache, reclaimable). "
            "Compaction: a loaded int8 index deletes every other label, a new index is built "
            "from the live half and saved, the old one dropped; RSS against its loaded state."
            "\n\n"
            + table(
                [
                    "index",
                    "state",
                    "RSS B/vector",
                    "anon B/vector",
                    "file B/vector",
                    "memory_bytes B/vector",
                    "RSS / hnswlib",
                    "recall@10 (ef=100)",
                    "RSS / before compaction",
                ],
                results["memory"],  # type: ignore[arg-type]
            )
        )
    return results, parts


if __name__ == "__main__":
    main()
