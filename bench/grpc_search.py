"""gRPC Search end to end through a real `rag-grpc serve` process, beside the
same server's no-op RPC rate (grpc.health.v1.Health/Check), which is the
ceiling of Python gRPC on this machine. The load comes from several client
processes, each keeping a number of asyncio calls in flight.

    python bench/grpc_search.py [--n 100000] [--seconds 10] [--procs 2] [--inflight 8]

With `--backend milvus --milvus-uri http://127.0.0.1:19530` the server keeps
its vectors in that Milvus (start one with `milvus-server --data DIR
--proxy-port 19530`, PyPI `milvus`); it fills its collection from the store
at start, and searches it at `--consistency` (docs/milvus.md). `--backend
native milvus` runs both, one after the other, on the same store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from bench.common import command_line, embedding_like, exact_top_k, recall_at_k, record, table
from bench.load import NO_OP, run_load, start_server
from rag_grpc.documents import Document
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.store.sqlite import DocumentStore, NewChunk

ROOT = Path(__file__).resolve().parent.parent
DIM = 384
TEXT_QUERIES = [
    "how do I open a file for reading",
    "what is a list comprehension",
    "exception handling with try and except",
    "string formatting with f-strings",
    "sorting a dictionary by value",
    "reading environment variables",
]


def fill_store(data_dir: Path, vectors: np.ndarray) -> None:
    """Write one short document per vector straight into the store (the
    benchmark measures search, not embedding)."""
    store = DocumentStore(data_dir / "rag.sqlite3")
    for start in range(0, len(vectors), 2000):
        docs, chunks = [], []
        for i in range(start, min(start + 2000, len(vectors))):
            docs.append(Document(f"v{i}", f"synthetic passage {i}", {"shard": i % 10}))
            chunks.append(NewChunk(f"v{i}", 0, f"synthetic passage {i}", vectors[i]))
        store.replace_documents("default", docs, chunks)
    store.close()


def settle(max_wait_s: float, below: float = 1.0) -> float:
    """Wait until the 1-minute load average is under `below` (a build or a
    test run elsewhere on the two cores would otherwise be measured with
    us), at most `max_wait_s`; returns the load average measuring starts at."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def backend_env(backend: str, args: argparse.Namespace) -> dict[str, str]:
    if backend == "native":
        return {}
    return {
        "RAG_GRPC_INDEX__BACKEND": "milvus",
        "RAG_GRPC_INDEX__MILVUS__URI": args.milvus_uri,
        # A collection of this run's own, left in Milvus afterwards.
        "RAG_GRPC_INDEX__MILVUS__COLLECTION_PREFIX": f"bench_{os.getpid()}",
        "RAG_GRPC_INDEX__MILVUS__CONSISTENCY_LEVEL": args.consistency,
        "RAG_GRPC_INDEX__MILVUS__TIMEOUT_S": "1800",
    }


def measure(
    target: str, args: argparse.Namespace, vectors: np.ndarray, queries: np.ndarray
) -> list[list[object]]:
    """Recall of what the service returns, then each mode under load."""
    truth = exact_top_k(vectors, queries[:200], 10)
    payloads: dict[str, list[bytes]] = {
        "no-op": [health_pb2.HealthCheckRequest().SerializeToString()]
    }
    recalls: dict[str, float] = {}
    with grpc.insecure_channel(target) as channel:
        stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
        for ef in args.ef:
            requests = [
                retrieval_pb2.SearchRequest(vector=retrieval_pb2.QueryVector(values=q), k=10, ef=ef)
                for q in queries
            ]
            found = np.array(
                [
                    [int(h.document_id[1:]) for h in stub.Search(r, timeout=30).hits]
                    for r in requests[:200]
                ]
            )
            mode = f"vector Search, ef={ef}"
            recalls[mode] = recall_at_k(found, truth)
            payloads[mode] = [r.SerializeToString() for r in requests]
    text_mode = f"text Search, ef={args.ef[0]}"
    payloads[text_mode] = [
        retrieval_pb2.SearchRequest(text=t, k=10, ef=args.ef[0]).SerializeToString()
        for t in TEXT_QUERIES
    ]
    rows = [
        run_load(
            target,
            mode,
            NO_OP if mode == "no-op" else "/rag.v1.RetrievalService/Search",
            payload,
            procs=args.procs,
            inflight=args.inflight,
            seconds=args.seconds,
        )
        for mode, payload in payloads.items()
    ]
    ceiling = rows[0][2]
    for row in rows:
        row.append(row[2] / ceiling)  # type: ignore[operator]
        row.append(recalls.get(str(row[0]), "-"))
    return rows


def describe(backend: str, args: argparse.Namespace) -> str:
    if backend == "milvus":
        return (
            f"Milvus ({args.milvus_uri}, consistency {args.consistency}; start = filling "
            "its collection from the store: insert, flush, HNSW index, load)"
        )
    return "native index (start = the HNSW index rebuilt from SQLite)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 320])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--backend",
        choices=["native", "milvus"],
        nargs="+",
        default=["native"],
        help="one server per backend, one after another, on the same store",
    )
    parser.add_argument("--milvus-uri", default="http://127.0.0.1:19530")
    parser.add_argument(
        "--consistency", choices=["Strong", "Session", "Bounded", "Eventually"], default="Strong"
    )
    parser.add_argument(
        "--start-within", type=float, default=600, help="seconds a server may take to serve"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0,
        help="before measuring, wait up to this many seconds for load average < 1",
    )
    args = parser.parse_args()

    vectors = embedding_like(args.n, seed=1)
    queries = embedding_like(1000, seed=2)
    workdir = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    port = 50000 + os.getpid() % 10000
    target = f"127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        fill_store(workdir / "data", vectors)
        fill_s = time.perf_counter() - started
        sections, summary = [], []
        for backend in args.backend:
            started = time.perf_counter()
            server = start_server(
                workdir / "data",
                port,
                workdir / f"server-{backend}.log",
                "retrieval,embedding,admin",
                backend_env(backend, args),
                ready_within_s=args.start_within,
            )
            start_s = time.perf_counter() - started
            try:
                load_before = settle(args.settle)
                rows = measure(target, args, vectors, queries)
                load_after = os.getloadavg()[0]
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=120)
            sections.append(
                f"Backend: {describe(backend, args)}. Server start {start_s:.1f} s; load "
                f"average {load_before:.2f} -> {load_after:.2f} while measuring.\n\n"
                + table(
                    ["mode", "calls", "RPC/s", "p50 ms", "p99 ms", "vs no-op", "recall@10"], rows
                )
            )
            vector_row = rows[1]
            summary.append(
                [
                    backend if backend == "native" else f"milvus ({args.consistency})",
                    vector_row[2],
                    vector_row[3],
                    vector_row[4],
                    vector_row[5],
                    vector_row[6],
                    f"{start_s:.0f}",
                ]
            )
        body = (
            f"{args.n:,} embedding-like unit vectors (d={DIM}) stored as one-chunk documents "
            f"(store filled in {fill_s:.1f} s); one server per backend on that store, one after "
            "another: `rag-grpc serve --services retrieval,embedding,admin` on loopback; load "
            f"from {args.procs} client processes x {args.inflight} asyncio calls in flight, "
            f"{args.seconds:.0f} s per mode, k=10. Recall@10 is of the hits the service "
            "returned for 200 queries, against exact search. The six text queries repeat, so "
            "after the first round they come from the embedding cache. Client and server share "
            "the machine's cores.\n\n" + "\n\n".join(sections)
        )
        if len(summary) > 1:
            body += f"\n\nSide by side, vector Search at ef={args.ef[0]}:\n\n" + table(
                ["backend", "RPC/s", "p50 ms", "p99 ms", "vs no-op", "recall@10", "start s"],
                summary,
            )
        record(
            "gRPC Search end to end",
            command_line(),
            "the same server's no-op RPC (grpc.health.v1.Health/Check) as the ceiling"
            + ("; " + " and ".join(args.backend) + " backends" if len(args.backend) > 1 else ""),
            body,
            {"backends": args.backend, "summary": summary},
            save=not args.no_record,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
