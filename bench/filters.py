"""Filtered Search end to end: filtered vs unfiltered p50 through a real
`rag-grpc serve` process, for equals, any_of and range filters at 0.1 %, 1 %,
10 % and 50 % selectivity, with recall@10 against exact search over the
allowed documents. Beside it, in process: the allowed set from the payload
index vs from SQLite (`labels_matching`, the old Search path), and the payload
index's build time and memory at --memory-chunks chunks with 3 keys.

    python -m bench.filters [--n 20000] [--queries 300] [--memory-chunks 100000]
                            [--exact-threshold N]

--exact-threshold sets the server's index.exact_scan_threshold: filters
allowing at most that many chunks are answered by exact scan, larger ones by
the filtered graph walk.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from bench.common import command_line, embedding_like, record, table
from bench.load import start_server
from rag_grpc.documents import Document
from rag_grpc.filters import AnyOf, Equals, Filter, Range
from rag_grpc.index.payload import PayloadIndex
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.services.convert import filter_to_pb
from rag_grpc.store.sqlite import DocumentStore, NewChunk

SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)
K = 10


def metadata(rank: int, n: int) -> dict[str, str | int | float]:
    """Keys whose values select a known share of the documents: rank is the
    document's place in a random permutation, so shares are exact and
    independent of where its vector lies."""
    return {
        # equals: one value of a string key holds 0.1 %, 1 %, 10 % or 50 %.
        "t1000": f"v{rank % 1000}",
        "t100": f"v{rank % 100}",
        "t10": f"v{rank % 10}",
        "t2": f"v{rank % 2}",
        # any_of: several values of an int key, 0.1 % each.
        "g1000": rank % 1000,
        # range: a float distinct per document.
        "score": rank / n,
    }


def filters_for(selectivity: float) -> dict[str, Filter]:
    equals_key = {0.001: "t1000", 0.01: "t100", 0.1: "t10", 0.5: "t2"}[selectivity]
    return {
        "equals": Equals(equals_key, "v0"),
        "any_of": AnyOf("g1000", tuple(range(round(selectivity * 1000)))),
        "range": Range("score", lt=selectivity),
    }


def allowed_positions(flt: Filter, ranks: np.ndarray, n: int) -> np.ndarray:
    """Positions of the documents the filter admits, computed here (not by the server)."""
    if isinstance(flt, Equals):
        modulus = int(str(flt.key)[1:])
        return np.flatnonzero(ranks % modulus == 0)
    if isinstance(flt, AnyOf):
        return np.flatnonzero(np.isin(ranks % 1000, np.asarray(flt.values)))
    assert isinstance(flt, Range) and flt.lt is not None
    return np.flatnonzero(ranks / n < flt.lt)


def fill_store(path: Path, vectors: np.ndarray, ranks: np.ndarray) -> None:
    """One one-chunk document per vector, straight into the store (this
    measures search, not embedding)."""
    store = DocumentStore(path)
    n = len(vectors)
    for start in range(0, n, 2000):
        docs, chunks = [], []
        for i in range(start, min(start + 2000, n)):
            docs.append(Document(f"v{i}", f"passage {i}", metadata(int(ranks[i]), n)))
            chunks.append(NewChunk(f"v{i}", 0, f"passage {i}", vectors[i]))
        store.replace_documents("default", docs, chunks)
    store.close()


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(path: str, out: mp.Queue) -> None:
    store = DocumentStore(Path(path))
    started = time.perf_counter()
    rows = store.metadata_rows("default")
    read_s = time.perf_counter() - started
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss()
    started = time.perf_counter()
    index = PayloadIndex.build(rows)
    build_s = time.perf_counter() - started
    gc.collect()
    # Give freed heap pages back, so RSS shows what the index holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # rows stay alive, so the difference is the index (and whatever the
    # allocator kept of the build's temporaries: an upper bound).
    grown = _rss() - before
    matched = len(index.matching(Range("year", gte=0)))
    out.put((read_s, build_s, grown, index.content_bytes(), len(rows), matched))
    store.close()


def payload_memory(chunks: int, workdir: Path) -> tuple[float, float, int, int, int]:
    """(SQLite read s, build s, RSS growth, content bytes, rows) of a payload
    index over `chunks` one-chunk documents with 3 keys: category (20
    strings), year (50 ints), score (a float distinct per document); built in
    a fresh process."""
    path = workdir / "memory.sqlite3"
    store = DocumentStore(path)
    rng = np.random.default_rng(3)
    vector = np.zeros(8, dtype=np.float32)  # the payload index never reads vectors
    for start in range(0, chunks, 5000):
        ids = range(start, min(start + 5000, chunks))
        store.replace_documents(
            "default",
            [
                Document(
                    f"d{i}",
                    "x",
                    {
                        "category": f"c{rng.integers(20)}",
                        "year": int(1980 + rng.integers(50)),
                        "score": float(rng.random()),
                    },
                )
                for i in ids
            ],
            [NewChunk(f"d{i}", 0, "x", vector) for i in ids],
        )
    store.close()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(str(path), out))
    child.start()
    read_s, build_s, grown, content, rows, matched = out.get()
    child.join()
    assert matched == chunks, (matched, chunks)
    return read_s, build_s, grown, content, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--memory-chunks", type=int, default=100_000)
    parser.add_argument("--exact-threshold", type=int, default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    n = args.n
    vectors = embedding_like(n, seed=1)
    queries = embedding_like(args.queries, seed=2)
    ranks = np.random.default_rng(7).permutation(n)
    workdir = Path(tempfile.mkdtemp(prefix="rag-bench-filters-"))
    port = 50000 + os.getpid() % 10000
    try:
        database = workdir / "data" / "rag.sqlite3"
        fill_store(database, vectors, ranks)
        modes: dict[str, Filter | None] = {"unfiltered": None}
        for selectivity in SELECTIVITIES:
            for kind, flt in filters_for(selectivity).items():
                modes[f"{kind} {selectivity:.1%}"] = flt
        server = start_server(
            workdir / "data",
            port,
            workdir / "server.log",
            "retrieval,embedding,admin",
            # Every call must reach the index: no cached results.
            env={"RAG_GRPC_INDEX__RESULT_CACHE_ENTRIES": "0"}
            | (
                {"RAG_GRPC_INDEX__EXACT_SCAN_THRESHOLD": str(args.exact_threshold)}
                if args.exact_threshold is not None
                else {}
            ),
        )
        latencies: dict[str, list[float]] = {mode: [] for mode in modes}
        found: dict[str, list[list[int]]] = {mode: [] for mode in modes}
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
                requests = {
                    mode: [
                        retrieval_pb2.SearchRequest(
                            vector=retrieval_pb2.QueryVector(values=q),
                            k=K,
                            filter=filter_to_pb(flt) if flt is not None else None,
                        )
                        for q in queries
                    ]
                    for mode, flt in modes.items()
                }
                for mode in modes:  # warm-up: first calls, caches, code paths
                    for request in requests[mode][:5]:
                        stub.Search(request, timeout=30)
                # Modes interleaved query by query, so drift in the machine's
                # load falls on all of them alike.
                for i in range(args.queries):
                    for mode in modes:
                        started = time.perf_counter()
                        reply = stub.Search(requests[mode][i], timeout=30)
                        latencies[mode].append((time.perf_counter() - started) * 1000)
                        if i < args.recall_queries:
                            found[mode].append([int(h.document_id[1:]) for h in reply.hits])
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

        # The allowed set alone, in process: payload index vs SQLite.
        store = DocumentStore(database)
        payload = PayloadIndex.build(store.metadata_rows("default"))
        base = float(np.percentile(latencies["unfiltered"], 50))
        rows: list[list[object]] = []
        for mode, condition in modes.items():
            p50 = float(np.percentile(latencies[mode], 50))
            p99 = float(np.percentile(latencies[mode], 99))
            if condition is None:
                allowed = np.arange(n)
                payload_ms = sql_ms = 0.0
            else:
                flt = condition
                allowed = allowed_positions(flt, ranks, n)
                assert len(payload.matching(flt)) == len(allowed), mode
                payload_ms = median_ms(lambda: payload.matching(flt), 50)
                sql_ms = median_ms(lambda: store.labels_matching("default", flt), 5)
            rows.append(
                [
                    mode,
                    len(allowed),
                    p50,
                    p99,
                    p50 / base,
                    recall(found[mode], vectors, queries, allowed),
                    payload_ms,
                    sql_ms,
                ]
            )
        store.close()
        threshold = "default" if args.exact_threshold is None else str(args.exact_threshold)
        read_s, build_s, nbytes, content, payload_rows = payload_memory(args.memory_chunks, workdir)
        body = (
            f"{n:,} embedding-like unit vectors (d=384) stored as one-chunk documents with 6 "
            "metadata keys; server `rag-grpc serve` on loopback with the result cache off; "
            f"one sequential client, {args.queries} vector queries per mode, modes interleaved "
            f"query by query; k={K}, default ef; index.exact_scan_threshold "
            f"{threshold}. Recall@10 over {args.recall_queries} queries "
            "against exact search among the allowed documents. Allowed set: median time to "
            "compute it in process from the payload index (the Search path now) and from "
            "SQLite (`labels_matching`, the Search path before). Target: filtered p50 <= 1.5x "
            "unfiltered p50 at every selectivity, recall@10 >= 0.99 at <= 1 %.\n\n"
            + table(
                [
                    "mode",
                    "allowed",
                    "p50 ms",
                    "p99 ms",
                    "p50 / unfiltered",
                    "recall@10",
                    "payload index ms",
                    "SQLite ms",
                ],
                rows,
            )
            + f"\n\nPayload index at {args.memory_chunks:,} chunks with 3 keys (category: 20 "
            "strings, year: 50 ints, score: a float distinct per document), built in a fresh "
            f"process: SQLite read of {payload_rows:,} rows {read_s:.2f} s, build {build_s:.2f} "
            f"s; RSS growth {nbytes / 2**20:.1f} MiB = {nbytes / args.memory_chunks:.0f} bytes "
            "per chunk (an upper bound: the allocator keeps some of the build's temporaries); "
            f"content (numeric arrays + roaring containers) {content / args.memory_chunks:.0f} "
            "bytes per chunk."
        )
        record(
            "Filtered Search end to end",
            command_line(),
            "the same server's unfiltered Search; SQLite's labels_matching for the allowed set",
            body,
            {
                "rows": rows,
                "payload_build_s": build_s,
                "payload_read_s": read_s,
                "payload_bytes": nbytes,
                "payload_content_bytes": content,
            },
            save=not args.no_record,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def recall(
    found: list[list[int]], vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray
) -> float:
    """Share of the true k nearest allowed documents among the hits."""
    hits = total = 0
    subset = vectors[allowed]
    for row, ids in enumerate(found):
        scores = subset @ queries[row]
        k = min(K, len(allowed))
        truth = allowed[np.argpartition(-scores, k - 1)[:k]]
        hits += len(set(ids) & set(truth.tolist()))
        total += k
    return hits / total if total else 1.0


if __name__ == "__main__":
    main()
