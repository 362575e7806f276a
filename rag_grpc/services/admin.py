"""rag.v1.AdminService: what this process holds and runs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

import grpc

from rag_grpc import __version__
from rag_grpc.backup import BackupError, KeyProvider, SnapshotArchive, default_key_provider
from rag_grpc.config import IndexConfig
from rag_grpc.deadlines import in_thread
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.errors import FailedPrecondition, ResourceExhausted
from rag_grpc.index.retriever import Retriever
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Stats and snapshots (backup archives streamed to the caller)."""

    def __init__(
        self,
        *,
        services: list[str],
        retriever: Retriever | None,
        embedder: BatchingEmbedder | None,
        generator_name: str,
        generator_stats: Callable[[], dict[str, Any]] | None = None,
        index_config: IndexConfig,
        executor: Executor | None,
        backup_key: KeyProvider | None = None,
    ) -> None:
        self.backup_key = backup_key or default_key_provider()
        self.services = services
        self.retriever = retriever
        self.embedder = embedder
        self.generator_name = generator_name
        self.generator_stats = generator_stats
        self.index_config = index_config
        self.executor = executor
        self.started = time.monotonic()
        self._snapshot_running = False

    async def Stats(
        self, request: admin_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatsResponse:
        response = admin_pb2.StatsResponse(
            version=__version__,
            services=self.services,
            generator=self.generator_name,
            uptime_seconds=time.monotonic() - self.started,
        )
        if self.generator_name:
            backend = self.generator_stats() if self.generator_stats else {"ready": True}
            response.generation.CopyFrom(
                admin_pb2.GeneratorStats(name=self.generator_name, **backend)
            )
        if self.retriever is not None:
            for ns in await in_thread(self.executor, self.retriever.stats):
                response.namespaces.add(
                    name=ns.name,
                    documents=ns.documents,
                    chunks=ns.chunks,
                    vectors=ns.vectors,
                    index_generation=ns.generation,
                )
            cfg = self.index_config
            response.index.CopyFrom(
                admin_pb2.IndexParameters(
                    kind="rag-native-hnsw (hnswlib 0.8.0 headers)",
                    space="ip",
                    dimension=self.retriever.embedder.dimension,
                    m=cfg.m,
                    ef_construction=cfg.ef_construction,
                    ef_search=cfg.ef_search,
                )
            )
        if self.embedder is not None:
            encoder = self.embedder.encoder
            stats = self.embedder.stats()
            response.models.add(
                model_id=encoder.model_id,
                dimension=encoder.dimension,
                provider=encoder.provider,
                variant=encoder.variant,
                max_sequence_length=encoder.max_sequence_length,
                cache_hits=stats.cache.hits,
                cache_misses=stats.cache.misses,
                cache_hit_ratio=stats.cache.hit_ratio,
                cache_bytes=stats.cache.bytes,
                batches=stats.batches,
                batched_texts=stats.texts,
            )
        return response

    async def Snapshot(
        self, request: admin_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.SnapshotChunk]:
        retriever = self.retriever
        if retriever is None:
            raise FailedPrecondition("this process holds no data (it does not run retrieval)")
        try:
            key = self.backup_key.key()
        except BackupError as exc:
            raise FailedPrecondition(str(exc)) from None
        if key is None and not request.unencrypted:
            raise FailedPrecondition(
                "no backup key is configured on the server: set RAG_GRPC_BACKUP_KEY_FILE (or "
                "backup_key_file) to a file of 32 random bytes, or ask for an unencrypted "
                "archive (rag-grpc backup --unencrypted)"
            )
        # Each snapshot holds a copy of the whole data dir on disk: one at a time.
        if self._snapshot_running:
            raise ResourceExhausted(
                "a snapshot of this server is already being taken; wait for it to finish "
                "and try again"
            )
        self._snapshot_running = True
        archive = SnapshotArchive(retriever.snapshot, retriever.store.path.parent, key)
        try:
            await in_thread(self.executor, archive.open)
            while (piece := await in_thread(self.executor, archive.next_piece)) is not None:
                yield admin_pb2.SnapshotChunk(data=piece)
            yield admin_pb2.SnapshotChunk(
                total_bytes=archive.size, sha256=archive.sha256, encrypted=key is not None
            )
        finally:
            # Also when the caller went away: the copy is removed (after the
            # step still running in the pool) before another snapshot may start.
            await in_thread(self.executor, archive.close)
            self._snapshot_running = False
