"""Chroma as a peer: `chroma run` over HTTP (the peer's venv only), HNSW
parameters from the collection's configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import free_port
from bench.peers import EF, EF_CONSTRUCTION, K, M
from bench.peers.harness import SearchClient
from bench.peers.processes import stop_tree, wait_until


class Chroma:
    """`chroma run` over HTTP; HNSW parameters from the collection's configuration."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()

    def set_ef(self, ef: int) -> None:
        import chromadb  # type: ignore[import-not-found]  # the peer's venv only

        collection = chromadb.HttpClient(host="127.0.0.1", port=self.port).get_collection("bench")
        collection.modify(configuration={"hnsw": {"ef_search": ef}})

    def start(self) -> None:
        log = self.workdir / "chroma.log"
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "chroma"),
                "run",
                "--path",
                str(self.workdir / "chroma"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        import chromadb

        wait_until(
            lambda: chromadb.HttpClient(host="127.0.0.1", port=self.port).heartbeat(),
            self.proc,
            log,
        )

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        import chromadb

        client = chromadb.HttpClient(host="127.0.0.1", port=self.port)
        collection = client.create_collection(
            "bench",
            metadata={
                "hnsw:space": "ip",
                "hnsw:M": M,
                "hnsw:construction_ef": EF_CONSTRUCTION,
                "hnsw:search_ef": EF,
            },
        )
        batch = min(5000, client.get_max_batch_size())
        for start in range(0, len(vectors), batch):
            ids = range(start, min(start + batch, len(vectors)))
            collection.add(
                ids=[str(i) for i in ids],
                embeddings=np.ascontiguousarray(vectors[start : start + len(ids)]),
                metadatas=[{"s100": i % 100, "s10": i % 10} for i in ids],
            )

    def ready(self) -> None:
        pass

    def client(self) -> SearchClient:
        import chromadb

        class Client:
            def __init__(self, port: int) -> None:
                self.http = chromadb.HttpClient(host="127.0.0.1", port=port)
                self.collection = self.http.get_collection("bench")

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                reply = self.collection.query(
                    query_embeddings=[vector],
                    n_results=K,
                    where={key: 0} if key else None,
                    include=["distances"],
                )
                return [int(i) for i in reply["ids"][0]]

            def noop(self) -> object:
                return self.http.heartbeat()

        return Client(self.port)

    def version(self) -> str:
        import chromadb

        config = self.client().collection.configuration  # type: ignore[attr-defined]
        return f"chromadb {chromadb.__version__} (hnsw {dict(config.get('hnsw') or {})})"
