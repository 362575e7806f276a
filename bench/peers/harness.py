"""The client harness every peer is measured with: what a peer and its client
provide, sequential searches, CLIENTS threads at once, and one server's
searches (plain and filtered) summed up."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bench.peers import CLIENTS, RECALL_QUERIES, SELECTIVITY_KEYS


class SearchClient(Protocol):
    """One connection to a server: a vector search and a no-op call."""

    def search(self, vector: np.ndarray, key: str | None = None) -> list[int]: ...

    def noop(self) -> object: ...


class Peer(Protocol):
    """A server under test: start/stop, load the data, open clients."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def ingest(self, vectors: np.ndarray) -> None: ...

    def ready(self) -> None: ...

    def client(self) -> SearchClient: ...

    def version(self) -> str: ...

    def set_ef(self, ef: int) -> None: ...

    pid: int
    proc: subprocess.Popen[bytes]


def sequential(
    client: SearchClient, queries: np.ndarray, count: int, key: str | None = None
) -> tuple[dict[str, float], list[list[int]]]:
    """p50/p99/QPS of `count` searches one after another, and the ids found."""
    latencies, found = [], []
    started = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        ids = client.search(queries[i % len(queries)], key)
        latencies.append(time.perf_counter() - t0)
        if i < RECALL_QUERIES:
            found.append(ids)
    elapsed = time.perf_counter() - started
    return summary(latencies, elapsed), found


def concurrent(
    make_client: Callable[[], SearchClient],
    call: Callable[[SearchClient, int], object],
    seconds: float,
) -> dict[str, float]:
    """p50/p99/QPS of CLIENTS threads, each with its own sync client, calling for `seconds`."""
    clients = [make_client() for _ in range(CLIENTS)]
    for c in clients:
        call(c, 0)  # connect before the clock starts
    barrier = threading.Barrier(CLIENTS + 1)
    latencies: list[list[float]] = [[] for _ in clients]

    def worker(n: int) -> None:
        barrier.wait()
        stop_at = time.perf_counter() + seconds
        i = n * 7919
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            call(clients[n], i)
            latencies[n].append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return summary([x for per in latencies for x in per], time.perf_counter() - started)


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "qps": len(ms) / elapsed,
        "calls": len(ms),
    }


def measure(peer: Peer, queries: np.ndarray, seconds: float, seq_count: int) -> dict[str, Any]:
    """Searches of one server: sequential, CLIENTS at once, filtered (recall
    over the first min(seq_count, RECALL_QUERIES) queries)."""
    first = peer.client()
    for q in queries[:20]:  # warm-up
        first.search(q)
    out: dict[str, Any] = {}
    out["seq"], out["found"] = sequential(first, queries, seq_count)
    out["c8"] = concurrent(peer.client, lambda c, i: c.search(queries[i % len(queries)]), seconds)
    for label, key in SELECTIVITY_KEYS.items():
        out[f"filtered {label}"], out[f"found {label}"] = sequential(
            first, queries, min(seq_count, RECALL_QUERIES), key
        )
    return out
