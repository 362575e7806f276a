"""Peers at server level: rag-grpc, a Chroma server and a Milvus standalone
server, loaded with the same vectors through their public APIs and measured
with the same client harness, one server after another (never in parallel).

    python -m bench.peers [--sizes 10000 100000] [--systems rag-grpc chroma milvus]
                          [--seconds 10] [--no-record]

Per system and size: ingest time (until searchable), start-up of a restarted
server from its saved data (process start until the first search answers,
Milvus's load_collection included), RSS summed over the server's process
tree, recall@10 against exact search, sequential and 8-client p50/p99/QPS,
filtered p50 and recall at 1 % and 10 % (equality on an int field), and the
same server's no-op rate. HNSW M=16, efConstruction=200, ef=100, k=10, inner
product on unit vectors everywhere.

Each peer runs in its own venv under bench/.cache (created on first use):
the orchestrator (__main__.py, in the project venv) writes the data to a work
directory and runs `python -m bench.peers --driver SYSTEM` with that venv's
interpreter, which starts the server, measures, stops it and writes JSON.
The driver side imports only numpy and the peer's own client library.

The package: harness.py (the client harness: sequential and concurrent
searches, what a peer provides), one module per peer (rag_grpc.py,
chroma.py, milvus.py), processes.py (a server's process tree: RSS, stop,
wait), driver.py (one server measured, in its venv) and __main__.py (the
orchestrator: data, venvs, exact search, the table).
"""

from __future__ import annotations

from bench.common import BENCH_DIR

ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
K, EF, M, EF_CONSTRUCTION = 10, 100, 16, 200
CLIENTS = 8
RECALL_QUERIES = 200
# Milvus Strong waits ~0.4 s per search for its time tick: fewer queries.
STRONG_QUERIES = 50
# The peers' own venvs: the exact server versions this benchmark is about.
VENVS = {
    "chroma": (CACHE / "chroma-venv", ["chromadb==1.5.9"]),
    "milvus": (CACHE / "milvus-venv", ["milvus==2.3.5", "pymilvus==2.6.*", "numpy"]),
}
SELECTIVITY_KEYS = {"1 %": "s100", "10 %": "s10"}  # key == 0 admits that share
