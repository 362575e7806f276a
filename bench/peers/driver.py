"""One server measured, in its own venv (`python -m bench.peers --driver
SYSTEM`): ingest, restart, searches at every ef, RSS; the result as JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import EF, STRONG_QUERIES
from bench.peers.chroma import Chroma
from bench.peers.harness import Peer, concurrent, measure
from bench.peers.milvus import Milvus
from bench.peers.processes import tree_rss, wait_until
from bench.peers.rag_grpc import RagGrpc


def drive(peer: Peer, workdir: Path, seconds: float, efs: list[int]) -> dict[str, Any]:
    """The whole measurement of one server: ingest, restart, searches, RSS."""
    vectors = np.load(workdir / "vectors.npy", mmap_mode="r")
    queries = np.load(workdir / "queries.npy")
    peer.start()
    started = time.perf_counter()
    peer.ingest(vectors)
    peer.client().search(queries[0])
    ingest_s = time.perf_counter() - started
    peer.stop()
    started = time.perf_counter()
    peer.start()
    peer.ready()
    first = peer.client()
    wait_until(lambda: first.search(queries[0]), peer.proc, workdir / "none")
    out: dict[str, Any] = {"ingest_s": ingest_s, "startup_s": time.perf_counter() - started}
    try:
        out["version"] = peer.version()
        out |= measure(peer, queries, seconds, 500)
        out["noop"] = concurrent(peer.client, lambda c, i: c.noop(), seconds / 2)
        out["rss"] = tree_rss(peer.pid)
        if isinstance(peer, Milvus):
            # Read-your-writes costs Milvus a wait for its time tick per search.
            peer.consistency = "Strong"
            out["strong"] = measure(peer, queries, seconds, STRONG_QUERIES)
            peer.consistency = "Bounded"
        # Wider searches on the same server, to compare at equal recall.
        out["ef"] = {}
        for ef in efs:
            if ef != EF:
                peer.set_ef(ef)
                out["ef"][str(ef)] = measure(peer, queries, seconds, 500)
    finally:
        peer.stop()
    return out


def driver_main(system: str, workdir: Path, seconds: float, efs: list[int]) -> None:
    (workdir / system).mkdir(exist_ok=True)
    peers: dict[str, Callable[[Path], Peer]] = {
        "rag-grpc": RagGrpc,
        "chroma": Chroma,
        "milvus": Milvus,
    }
    peer = peers[system](workdir / system)
    result = drive(peer, workdir, seconds, efs)
    (workdir / f"{system}.json").write_text(json.dumps(result))
