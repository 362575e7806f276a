"""rag-grpc as a peer: `rag-grpc serve`, fed through Upsert with the
documents' own vectors, searched through RagClient."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from bench.common import free_port
from bench.peers import EF, EF_CONSTRUCTION, ROOT, K, M
from bench.peers.harness import SearchClient
from bench.peers.processes import stop_tree


class RagGrpc:
    """`rag-grpc serve` fed through Upsert with the documents' own vectors."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.ef = workdir, free_port(), EF
        self.target = f"127.0.0.1:{self.port}"

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def start(self) -> None:
        from bench.load import start_server

        env = {
            "RAG_GRPC_INDEX__M": str(M),
            "RAG_GRPC_INDEX__EF_CONSTRUCTION": str(EF_CONSTRUCTION),
            # Queries repeat under load: every call must reach the index.
            "RAG_GRPC_INDEX__RESULT_CACHE_ENTRIES": "0",
        }
        self.proc = start_server(
            self.workdir / "rag",
            self.port,
            self.workdir / "rag.log",
            "retrieval,embedding,admin",
            env,
        )
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        from rag_grpc.client import RagClient
        from rag_grpc.documents import Document, GivenChunk

        with RagClient(self.target, timeout=600) as client:
            model = client.stats().models[0]
            for start in range(0, len(vectors), 1000):  # limits.max_documents_per_upsert
                client.upsert(
                    [
                        Document(
                            f"v{i}",
                            f"passage {i}",
                            {"s100": i % 100, "s10": i % 10},
                            chunks=(GivenChunk(f"passage {i}", vectors[i]),),
                            vector_model_id=model,
                        )
                        for i in range(start, min(start + 1000, len(vectors)))
                    ]
                )

    def ready(self) -> None:
        pass

    def client(self) -> SearchClient:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from rag_grpc.client import RagClient
        from rag_grpc.filters import Equals

        outer = self

        class Client:
            def __init__(self, target: str) -> None:
                self.rag = RagClient(target)
                self.health = health_pb2_grpc.HealthStub(self.rag.channel)

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                flt = Equals(key, 0) if key else None
                hits = self.rag.search(vector, k=K, ef=outer.ef, filter=flt)
                return [int(h.document_id[1:]) for h in hits]

            def noop(self) -> object:
                return self.health.Check(health_pb2.HealthCheckRequest(), timeout=30)

        return Client(self.target)

    def version(self) -> str:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        return f"rag-grpc {out.stdout.strip()}"
