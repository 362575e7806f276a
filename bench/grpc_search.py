"""gRPC Search end to end through a real `rag-grpc serve` process, beside the
same server's no-op RPC rate (grpc.health.v1.Health/Check), which is the
ceiling of Python gRPC on this machine. The load comes from several client
processes, each keeping a number of asyncio calls in flight.

    python bench/grpc_search.py [--n 100000] [--seconds 10] [--procs 2] [--inflight 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import command_line, embedding_like, exact_top_k, recall_at_k, record, table
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


def start_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAG_GRPC_EMBEDDING__MODEL_DIR": str(ROOT / "models/all-MiniLM-L6-v2")}
    proc = subprocess.Popen(
        [
            shutil.which("rag-grpc", path=str(Path(sys.executable).parent)) or "rag-grpc",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--services",
            "retrieval,embedding,admin",
        ],
        stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc
            except grpc.RpcError:
                time.sleep(0.5)
    raise RuntimeError("server did not start")


async def _load(
    target: str, mode: str, payloads: list[bytes], seconds: float, inflight: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    method = (
        "/grpc.health.v1.Health/Check" if mode == "no-op" else "/rag.v1.RetrievalService/Search"
    )
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                await call(payloads[i % len(payloads)], timeout=30)
                latencies.append(time.perf_counter() - started)
                i += inflight

        await asyncio.gather(*(worker(j) for j in range(inflight)))
    out.put(latencies)


def _process(
    target: str, mode: str, payloads: list[bytes], seconds: float, inflight: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    asyncio.run(_load(target, mode, payloads, seconds, inflight, out))


def run_load(
    target: str, mode: str, payloads: list[bytes], args: argparse.Namespace
) -> list[object]:
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [
        mp.Process(
            target=_process,
            args=(target, mode, payloads[p:] + payloads[:p], args.seconds, args.inflight, out),
        )
        for p in range(args.procs)
    ]
    for p in procs:
        p.start()
    latencies = np.concatenate([np.asarray(out.get()) for _ in procs]) * 1000
    for p in procs:
        p.join()
    rate = len(latencies) / args.seconds
    return [
        mode,
        len(latencies),
        rate,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 320])
    parser.add_argument("--no-record", action="store_true")
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
        started = time.perf_counter()
        server = start_server(workdir / "data", port, workdir / "server.log")
        start_s = time.perf_counter() - started
        try:
            truth = exact_top_k(vectors, queries[:200], 10)
            payloads: dict[str, list[bytes]] = {
                "no-op": [health_pb2.HealthCheckRequest().SerializeToString()]
            }
            recalls: dict[str, float] = {}
            with grpc.insecure_channel(target) as channel:
                stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
                for ef in args.ef:
                    requests = [
                        retrieval_pb2.SearchRequest(
                            vector=retrieval_pb2.QueryVector(values=q), k=10, ef=ef
                        )
                        for q in queries
                    ]
                    # Recall of what the service returns, against exact search.
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
            rows = [run_load(target, mode, payload, args) for mode, payload in payloads.items()]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        ceiling = rows[0][2]
        for row in rows:
            row.append(row[2] / ceiling)  # type: ignore[operator]
            row.append(recalls.get(str(row[0]), "-"))
        body = (
            f"{args.n:,} embedding-like unit vectors (d={DIM}) stored as one-chunk documents; "
            "server "
            f"`rag-grpc serve --services retrieval,embedding,admin` on loopback; load from "
            f"{args.procs} client processes x {args.inflight} asyncio calls in flight, "
            f"{args.seconds:.0f} s per mode, k=10. Store filled in {fill_s:.1f} s; server start "
            f"(index rebuilt from SQLite) {start_s:.1f} s. Recall@10 is of the hits the service "
            "returned for 200 queries, against exact search. Client and server share the "
            "machine's cores.\n\n"
            + table(["mode", "calls", "RPC/s", "p50 ms", "p99 ms", "vs no-op", "recall@10"], rows)
        )
        record(
            "gRPC Search end to end",
            command_line(),
            "the same server's no-op RPC (grpc.health.v1.Health/Check) as the ceiling",
            body,
            {"rows": rows},
            save=not args.no_record,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
