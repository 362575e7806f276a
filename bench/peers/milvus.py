"""Milvus as a peer: `milvus-server` (standalone, embedded etcd) through
pymilvus's MilvusClient (the peer's venv only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import free_port
from bench.peers import EF, EF_CONSTRUCTION, K, M
from bench.peers.harness import SearchClient
from bench.peers.processes import stop_tree, wait_until


class Milvus:
    """`milvus-server` (standalone, embedded etcd) through pymilvus's MilvusClient."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.consistency = workdir, free_port(), "Bounded"
        self.ef = EF

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def start(self) -> None:
        log = self.workdir / "milvus.log"
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "milvus-server"),
                "--data",
                str(self.workdir / "milvus"),
                "--proxy-port",
                str(self.port),
            ],
            stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        wait_until(lambda: self._client().has_collection("bench"), self.proc, log)

    def _client(self) -> Any:
        from pymilvus import MilvusClient  # type: ignore[import-untyped]

        return MilvusClient(uri=f"http://127.0.0.1:{self.port}", timeout=600)

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        from pymilvus import DataType

        client = self._client()
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        schema.add_field("s100", DataType.INT64)
        schema.add_field("s10", DataType.INT64)
        client.create_collection("bench", schema=schema, consistency_level="Bounded")
        for start in range(0, len(vectors), 10_000):
            ids = range(start, min(start + 10_000, len(vectors)))
            client.insert(
                "bench",
                [
                    {"id": i, "vec": vectors[i].tolist(), "s100": i % 100, "s10": i % 10}
                    for i in ids
                ],
            )
        client.flush("bench")
        index = client.prepare_index_params()
        index.add_index(
            field_name="vec",
            index_type="HNSW",
            metric_type="IP",
            params={"M": M, "efConstruction": EF_CONSTRUCTION},
        )
        client.create_index("bench", index, sync=True)
        self.ready()

    def ready(self) -> None:
        self._client().load_collection("bench")

    def client(self) -> SearchClient:
        outer = self

        class Client:
            def __init__(self) -> None:
                self.milvus = outer._client()

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                reply = self.milvus.search(
                    "bench",
                    data=[vector.tolist()],
                    limit=K,
                    filter=f"{key} == 0" if key else "",
                    search_params={"metric_type": "IP", "params": {"ef": outer.ef}},
                    consistency_level=outer.consistency,
                )
                return [int(hit["id"]) for hit in reply[0]]

            def noop(self) -> object:
                return self.milvus.has_collection("bench")

        return Client()

    def version(self) -> str:
        import pymilvus

        return f"Milvus {self._client().get_server_version()} (pymilvus {pymilvus.__version__})"
