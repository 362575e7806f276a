"""The memory section of the ANN benchmark: RSS per vector of each index
built or loaded in a fresh (spawned) process, before and after searching,
and after deleting half of an index and compacting it."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from bench.ann_libraries import EF_CONSTRUCTION, THREADS, M, search_fn
from bench.common import recall_at_k
from rag_grpc.native import VectorIndex


def rss_bytes() -> dict[str, int]:
    """This process's VmRSS and its anonymous and file-backed parts, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def memory_child(kind: str, work: str) -> list[dict[str, Any]]:
    """Build or load one index of kind in this (fresh) process; one dict per state measured."""
    folder = Path(work)
    data = np.load(folder / "data.npy")
    queries = np.load(folder / "queries.npy")
    truth = np.load(folder / "truth.npy")
    n, dim = data.shape
    labels = np.arange(n, dtype=np.uint64)
    # Compaction re-adds the live half; the server reads those vectors from
    # its store, so their copy is not the index's and is made before the baseline.
    live = labels[1::2]
    live_vectors = data[1::2].copy() if kind == "compaction" else data[:0]
    gc.collect()
    base = rss_bytes()
    states: list[dict[str, Any]] = []

    def note(state: str, index: Any = None, found: np.ndarray | None = None) -> None:
        now = rss_bytes()
        states.append(
            {
                "kind": kind,
                "state": state,
                "rss": now["VmRSS"] - base["VmRSS"],
                "anon": now["RssAnon"] - base["RssAnon"],
                "file": now["RssFile"] + now["RssShmem"] - base["RssFile"] - base["RssShmem"],
                "memory_bytes": getattr(index, "memory_bytes", None),
                "recall": None if found is None else recall_at_k(found.astype(np.int64), truth),
            }
        )

    def searched(index: Any) -> np.ndarray:
        search = search_fn("rag-native" if isinstance(index, VectorIndex) else kind, index, 100)
        found = search(queries, THREADS)
        for i in range(min(500, len(queries))):
            search(queries[i : i + 1], 1)
        return found

    if kind == "hnswlib binding":
        binding = hnswlib.Index(space="ip", dim=dim)
        binding.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
        binding.set_num_threads(THREADS)
        binding.add_items(data, labels)
        note("built")
        note("built, searched", found=searched(binding))
    elif kind in ("float", "int8"):
        index = VectorIndex(
            dim, "ip", max_elements=n, M=M, ef_construction=EF_CONSTRUCTION,
            quantized=kind == "int8",
        )  # fmt: skip
        index.add(data, labels, num_threads=THREADS)
        note("built (in memory)", index)
        index.save(folder / f"{kind}.hnsw")
        note("built, saved", index)
    elif kind in ("float loaded", "int8 loaded"):
        path = folder / f"{kind.split()[0]}.hnsw"
        index = VectorIndex.load(path, quantized=kind.startswith("int8"))
        note("loaded", index)
        note("loaded, searched", index, searched(index))
    elif kind == "compaction":
        # A loaded int8 index loses half its vectors, then is rebuilt from
        # the live ones the way the server compacts (a new index, saved,
        # swapped in; the old one dropped).
        old = VectorIndex.load(folder / "int8.hnsw")
        note("loaded", old)
        old.delete(labels[::2])
        fresh = VectorIndex(dim, "ip", max_elements=len(live), M=M, ef_construction=EF_CONSTRUCTION)
        fresh.add(live_vectors, live, num_threads=THREADS)
        fresh.save(folder / "compacted.hnsw")
        del old
        gc.collect()
        note("half deleted, compacted", fresh)
    return states


def memory(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, work: Path):  # type: ignore[no-untyped-def]
    np.save(work / "data.npy", data)
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)
    states = []
    kinds = ["hnswlib binding", "float", "int8", "float loaded", "int8 loaded", "compaction"]
    for kind in kinds:
        with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            states += pool.submit(memory_child, kind, str(work)).result()
    n = len(data)
    reference = next(s["rss"] for s in states if s["kind"] == "hnswlib binding") / n
    before_compaction = next(
        s["rss"] for s in states if s["kind"] == "compaction" and s["state"] == "loaded"
    )
    rows = []
    for s in states:
        rows.append(
            [
                s["kind"],
                s["state"],
                s["rss"] / n,
                s["anon"] / n,
                s["file"] / n,
                "" if s["memory_bytes"] is None else s["memory_bytes"] / n,
                s["rss"] / n / reference,
                "" if s["recall"] is None else s["recall"],
                "" if s["kind"] != "compaction" else s["rss"] / before_compaction,
            ]
        )
    return rows
