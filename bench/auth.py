"""What authentication, authorization, tenancy, rate quota and usage cost a
Search: the same data served twice, by an open server (no policy) and by a
server with a policy whose reader authenticates with an API key, under the
issue's harness (8 threads, each with its own sync client, result cache
off). The two are loaded in alternating rounds so drift in the machine's
load falls on both alike. Target (issue 15): authorization adds <= 5 %.

    python -m bench.auth [--n 20000] [--rounds 6] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import command_line, embedding_like, free_port, record, table
from bench.load import start_server
from rag_grpc.documents import Document
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.security.api_keys import new_api_key
from rag_grpc.store.sqlite import DocumentStore, NewChunk

THREADS = 8
K = 10


def fill(path: Path, namespace: str, vectors: np.ndarray) -> None:
    store = DocumentStore(path)
    for start in range(0, len(vectors), 2000):
        ids = range(start, min(start + 2000, len(vectors)))
        store.replace_documents(
            namespace,
            [Document(f"v{i}", f"passage {i}", {"n": i}) for i in ids],
            [NewChunk(f"v{i}", 0, f"passage {i}", vectors[i]) for i in ids],
        )
    store.close()


def load(port: int, requests: list[bytes], seconds: float, key: str | None) -> float:
    """Searches per second of THREADS sync clients for `seconds`."""
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    counts = [0] * THREADS
    stop = time.monotonic() + seconds

    def worker(t: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = retrieval_service_pb2_grpc.RetrievalServiceStub(channel)
            i = t
            while time.monotonic() < stop:
                stub.Search(
                    retrieval_pb2.SearchRequest.FromString(requests[i % len(requests)]),
                    metadata=metadata,
                    timeout=30,
                )
                counts[t] += 1
                i += THREADS

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    vectors = embedding_like(args.n, seed=1)
    queries = embedding_like(300, seed=2)
    requests = [
        retrieval_pb2.SearchRequest(
            vector=retrieval_pb2.QueryVector(values=q), k=K, ef=100
        ).SerializeToString()
        for q in queries
    ]
    work = Path(tempfile.mkdtemp(prefix="rag-bench-auth-"))
    key, entry = new_api_key("bench")
    policy = work / "policy.toml"
    policy.write_text(
        '[[tenants]]\nname = "bench"\n'
        'members = [{ identity = "apikey:bench", role = "reader" }]\n\n'
        f'[[api_keys]]\nname = "bench"\nhash = "{entry.hash}"\n'
    )
    servers = []
    try:
        fill(work / "open" / "rag.sqlite3", "default", vectors)
        fill(work / "policy" / "rag.sqlite3", "bench~default", vectors)
        env = {"RAG_GRPC_INDEX__RESULT_CACHE_ENTRIES": "0"}
        ports = {"open": free_port(), "policy": free_port()}
        for mode in ("open", "policy"):
            extra = {"RAG_GRPC_AUTH__POLICY_FILE": str(policy)} if mode == "policy" else {}
            servers.append(
                start_server(
                    work / mode, ports[mode], work / f"{mode}.log", "retrieval,embedding,admin",
                    env=env | extra,
                )
            )  # fmt: skip
        keys = {"open": None, "policy": key}
        for mode in ports:  # warm-up
            load(ports[mode], requests, 1.0, keys[mode])
        rates: dict[str, list[float]] = {mode: [] for mode in ports}
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            order = ("open", "policy") if r % 2 == 0 else ("policy", "open")
            for mode in order:
                rates[mode].append(load(ports[mode], requests, args.seconds, keys[mode]))
        loads.append(os.getloadavg()[0])
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    open_qps = float(np.median(rates["open"]))
    rows = [
        [
            "open (no policy, no credential)",
            open_qps,
            " / ".join(f"{x:.0f}" for x in rates["open"]),
            1.0,
        ],
        [
            "policy, API key, reader of a tenant",
            float(np.median(rates["policy"])),
            " / ".join(f"{x:.0f}" for x in rates["policy"]),
            float(np.median(rates["policy"])) / open_qps,
        ],
    ]
    body = (
        f"{args.n:,} embedding-like vectors (d=384) stored straight into each server's store; "
        f"two `rag-grpc serve` processes on loopback with the result cache off, one open and one "
        f"with a policy (tenant `bench`, its reader authenticated by an API key, so every call "
        f"is authenticated, authorized, scoped to `bench~default`, rate-checked and counted); "
        f"{THREADS} threads each with its own sync client, vector Search k={K} ef=100, "
        f"{args.rounds} alternating rounds of {args.seconds:g} s per server; load average "
        f"{loads[0]:.2f} -> {loads[1]:.2f}. Target: policy >= 0.95x open.\n\n"
        + table(["server", "median QPS", "rounds QPS", "x open"], rows)
    )
    record(
        "Authorization cost on Search",
        command_line(),
        "the same data on an open rag-grpc server in the same run",
        body,
        {"rates": rates},
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
