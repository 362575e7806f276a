"""Builds and runs the grpc.aio server: the configured services over the
core library, standard health checking, reflection and the interceptor."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import Observation

from rag_grpc import telemetry
from rag_grpc.backup import default_key_provider
from rag_grpc.config import Settings
from rag_grpc.documents import Document
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.cache import EmbeddingCache
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import OnnxEncoder
from rag_grpc.embed.loader import load_encoder
from rag_grpc.generate.base import Generator
from rag_grpc.generate.extractive import ExtractiveGenerator
from rag_grpc.generate.pipeline import AnswerCache, LocalSearch, RagPipeline, SearchBackend
from rag_grpc.generate.triton import TritonGenerator
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.backend import IngestionBackend, LocalWrites, WriteBackend
from rag_grpc.ingest.jobs import IngestionManager, JobQueue
from rag_grpc.ingest.nats_log import NatsIngestion
from rag_grpc.pb import (
    SERVICE_FILES,
    admin_service_pb2_grpc,
    embedding_service_pb2_grpc,
    generation_service_pb2_grpc,
    ingestion_service_pb2_grpc,
    rag_service_pb2_grpc,
    retrieval_service_pb2_grpc,
)
from rag_grpc.services.admin import AdminServicer
from rag_grpc.services.embedding import EmbeddingServicer
from rag_grpc.services.generation import GenerationServicer
from rag_grpc.services.ingestion import IngestionServicer
from rag_grpc.services.interceptors import ServiceInterceptor
from rag_grpc.services.rag import RagServicer
from rag_grpc.services.remote import RemoteGenerator, RemoteSearch
from rag_grpc.services.retrieval import RetrievalServicer
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAMES = {
    name: SERVICE_FILES[i].DESCRIPTOR.services_by_name[cls].full_name
    for i, (name, cls) in enumerate(
        [
            ("retrieval", "RetrievalService"),
            ("embedding", "EmbeddingService"),
            ("generation", "GenerationService"),
            ("rag", "RagService"),
            ("ingestion", "IngestionService"),
            ("admin", "AdminService"),
        ]
    )
}


@dataclass
class _RemoteDependency:
    """A remote service this process needs, probed through its health service."""

    target: str
    service: str
    channel: grpc.aio.Channel
    dependents: list[str] = field(default_factory=list)


class RagServer:
    """One rag-grpc process: start() binds and serves, stop() drains and saves."""

    def __init__(self, settings: Settings, seed_documents: list[Document] | None = None) -> None:
        self.settings = settings
        self.seed_documents = seed_documents
        self.port = 0
        self.executor = ThreadPoolExecutor(
            max_workers=settings.server.worker_threads, thread_name_prefix="rag-core"
        )
        # Writes, ingestion and admin work (snapshots, forget, compaction) run
        # on their own threads, so they can never take every thread that
        # searches need.
        self.write_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rag-write")
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.store: DocumentStore | None = None
        self.retriever: Retriever | None = None
        self.encoder: OnnxEncoder | None = None
        self.embedder: BatchingEmbedder | None = None
        self.ingestion: IngestionBackend | None = None
        self.writes: WriteBackend | None = None
        self.answer_cache: AnswerCache | None = None
        self.job_queue: JobQueue | None = None
        self.nats: NatsIngestion | None = None
        self._remotes: list[_RemoteDependency] = []
        self._probe_task: asyncio.Task[None] | None = None
        self.triton: TritonGenerator | None = None
        self.telemetry: Telemetry | None = None
        self._triton_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None

    # -- assembly ----------------------------------------------------------

    def _build_core(self) -> None:
        s = self.settings
        wanted = set(s.services)
        local_retrieval = bool(
            wanted & {"retrieval", "ingestion"}
            or ("rag" in wanted and not s.remote.retrieval_target)
        )
        local_generation = "generation" in wanted or (
            "rag" in wanted and not s.remote.generation_target
        )
        if local_retrieval or local_generation or "embedding" in wanted:
            e = s.embedding
            self.encoder = load_encoder(e, s.data_dir)
            self.embedder = BatchingEmbedder(
                self.encoder,
                max_batch_size=e.max_batch_size,
                max_delay_s=e.max_delay_ms / 1000,
                max_queue_texts=e.max_queue_texts,
                cache=EmbeddingCache(e.cache_bytes),
            )
        if local_retrieval:
            assert self.embedder is not None
            s.data_dir.mkdir(parents=True, exist_ok=True)
            # Copies of snapshots a crash interrupted: nothing reads them again.
            for leftover in s.data_dir.glob(".snapshot-*"):
                log.warning("removing %s, left by an interrupted snapshot", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            self.store = DocumentStore(s.data_dir / "rag.sqlite3")
            assert self.encoder is not None
            chunker = TokenChunker(
                self.encoder.spec.tokenizer,
                s.chunking.chunk_tokens,
                s.chunking.overlap_tokens,
            )
            self.retriever = Retriever(
                self.store, self.embedder, chunker, s.data_dir / "index", s.index, s.limits
            )
            if s.ingestion.queue == "nats":
                # Every process with a store follows the shared write log.
                self.nats = NatsIngestion(
                    s.ingestion,
                    self.retriever,
                    self.write_executor,
                    s.limits,
                    worker="ingestion" in wanted,
                )
                self.writes = self.nats
            else:
                self.writes = LocalWrites(self.retriever, self.write_executor)

    def _generator(self) -> Generator:
        s = self.settings
        if s.remote.generation_target and "generation" not in s.services:
            channel = self._remote(s.remote.generation_target, "generation", "rag")
            return RemoteGenerator(
                channel, s.remote.generation_target, s.remote.call_timeout_s, self._call_metadata()
            )
        assert self.encoder is not None
        extractive = ExtractiveGenerator(
            self.encoder,
            self.executor,
            embedder=self.embedder,
            sentences=s.generation.extractive_sentences,
            default_max_tokens=s.generation.default_max_tokens,
        )
        if s.generation.generator == "triton":
            self.triton = TritonGenerator(
                s.generation,
                self.encoder.spec.tokenizer,
                fallback=extractive if s.generation.fallback_to_extractive else None,
            )
            return self.triton
        return extractive

    def _search_backend(self) -> SearchBackend:
        s = self.settings
        if self.retriever is not None and not s.remote.retrieval_target:
            return LocalSearch(self.retriever, self.executor)
        assert s.remote.retrieval_target, (
            "rag without local retrieval needs remote.retrieval_target"
        )
        channel = self._remote(s.remote.retrieval_target, "retrieval", "rag")
        return RemoteSearch(
            channel, s.remote.retrieval_target, s.remote.call_timeout_s, self._call_metadata()
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.settings.server.auth_token
        return (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()

    def _remote(self, target: str, service: str, dependent: str) -> grpc.aio.Channel:
        for remote in self._remotes:
            if remote.target == target and remote.service == service:
                remote.dependents.append(dependent)
                return remote.channel
        channel = grpc.aio.insecure_channel(target, options=self._channel_options())
        self._remotes.append(_RemoteDependency(target, service, channel, [dependent]))
        return channel

    def _channel_options(self) -> list[tuple[str, Any]]:
        srv = self.settings.server
        return [
            ("grpc.max_send_message_length", srv.max_message_bytes),
            ("grpc.max_receive_message_length", srv.max_message_bytes),
            ("grpc.keepalive_time_ms", int(srv.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(srv.keepalive_timeout_s * 1000)),
        ]

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> int:
        """Build everything, bind the port, start serving; return the bound port."""
        s = self.settings
        self.telemetry = Telemetry(s.telemetry)
        telemetry.install(self.telemetry)
        await asyncio.get_running_loop().run_in_executor(self.executor, self._build_core)
        self._register_gauges()
        server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(
                    s.server.auth_token.get_secret_value() if s.server.auth_token else None,
                    trusted_proxies=s.server.trusted_proxies,
                    call_log_sample_ratio=s.logging.call_log_sample_ratio,
                )
            ],
            options=[
                *self._channel_options(),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=s.server.max_concurrent_rpcs,
        )
        self.server = server
        served: list[str] = []
        generator: Generator | None = None
        for name in s.services:
            served.append(SERVICE_NAMES[name])
        if "retrieval" in s.services:
            assert self.retriever is not None
            retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server(
                RetrievalServicer(self.retriever, self.executor, self._writes()), server
            )
        if "embedding" in s.services:
            assert self.embedder is not None
            embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(
                EmbeddingServicer(self.embedder, s.limits), server
            )
        if "generation" in s.services or "rag" in s.services:
            generator = self._generator()
        if "generation" in s.services:
            assert generator is not None
            generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
                GenerationServicer(generator, s.limits), server
            )
        if "rag" in s.services:
            assert generator is not None
            answers = s.generation.answer_cache_entries
            answer_cache = self.answer_cache = AnswerCache(answers) if answers else None
            if answer_cache is not None and self.retriever is not None:
                # Forgotten documents leave no answer quoting them behind.
                self.retriever.writes.forget_listeners.append(answer_cache.drop_namespace)
            pipeline = RagPipeline(
                self._search_backend(),
                generator,
                s.limits,
                answer_cache,
            )
            rag_service_pb2_grpc.add_RagServiceServicer_to_server(RagServicer(pipeline), server)
        if "ingestion" in s.services:
            assert self.retriever is not None
            if self.nats is not None:
                self.ingestion = self.nats
            else:
                self.job_queue = JobQueue(s.data_dir / "rag.sqlite3")
                self.ingestion = IngestionManager(
                    self.job_queue,
                    self.retriever,
                    self.write_executor,
                    s.limits,
                    watch_max_s=s.ingestion.watch_max_s,
                )
            ingestion_service_pb2_grpc.add_IngestionServiceServicer_to_server(
                IngestionServicer(self.ingestion), server
            )
        if "admin" in s.services:
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
                AdminServicer(
                    services=served,
                    retriever=self.retriever,
                    embedder=self.embedder,
                    generator_name=generator.name if generator else "",
                    generator_stats=self.triton.stats if self.triton is not None else None,
                    index_config=s.index,
                    executor=self.write_executor,
                    backup_key=default_key_provider(s.backup_key_file),
                ),
                server,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                *served,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {s.host}:{s.port}")
        await server.start()
        for name in served:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.nats is not None:
            self.nats.stall_listeners.append(self._stalled)
            self.nats.start()
        elif self.ingestion is not None:
            self.ingestion.start()
        if self.ingestion is not None:
            await self._seed()
        if self._remotes:
            self._probe_task = asyncio.create_task(self._probe_remotes(), name="remote-probe")
        if self.retriever is not None and s.retention.ttl_s:
            self._sweeper = asyncio.create_task(self._sweep(), name="retention")
        if self.retriever is not None and s.index.save_interval_s:
            self._saver = asyncio.create_task(self._save_periodically(), name="index-saver")
        if self.triton is not None:
            await self._apply_triton_health(await self.triton.probe())
            self._triton_task = asyncio.create_task(self._probe_triton(), name="triton-probe")
        log.info("rag-grpc serving %s on %s:%d", ", ".join(s.services), s.host, self.port)
        return self.port

    def _register_gauges(self) -> None:
        """Observable metrics read at collection time."""
        t = self.telemetry
        assert t is not None
        embedder, retriever = self.embedder, self.retriever
        if embedder is not None:
            t.observe(
                "rag_embed_cache_hit_ratio",
                "Embedding cache hits / lookups since start",
                lambda: [Observation(embedder.stats().cache.hit_ratio)],
            )
            t.observe(
                "rag_embed_queue_texts",
                "Texts waiting for the embedding model",
                lambda: [Observation(embedder.stats().queued_texts)],
            )
        if retriever is not None:
            t.observe(
                "rag_index_vectors",
                "Live vectors per namespace index",
                lambda: [
                    Observation(size, {"namespace": name})
                    for name, size in retriever.index_sizes().items()
                ],
            )

        def lag() -> list[Observation]:
            if self.nats is not None:
                return [Observation(self.nats.pending_documents)]
            queue = self.job_queue
            return [Observation(queue.pending_count())] if queue is not None else []

        t.observe("rag_ingestion_pending_jobs", "Ingestion jobs not finished yet", lag)

    async def _seed(self) -> None:
        assert self.ingestion is not None and self.store is not None
        if self.seed_documents and not any(c.documents for c in self.store.counts()):
            job_id = await self.ingestion.submit("", self.seed_documents)
            log.info(
                "empty data dir: ingesting %d demo documents as job %s",
                len(self.seed_documents),
                job_id,
            )

    async def _probe_remotes(self) -> None:
        """Turn dependents NOT_SERVING while a remote dependency's health check fails."""
        interval = self.settings.remote.health_probe_interval_s
        while True:
            for remote in self._remotes:
                stub = health_pb2_grpc.HealthStub(remote.channel)
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAMES[remote.service]),
                        timeout=interval,
                    )
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    ok = False
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for dependent in remote.dependents:
                    await self.health.set(SERVICE_NAMES[dependent], status)
            await asyncio.sleep(interval)

    async def _sweep(self) -> None:
        """Enforce each namespace's time to live."""
        retention = self.settings.retention
        assert self.retriever is not None
        writes = self._writes()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(retention.sweep_interval_s)
            for namespace, ttl in retention.ttl_s.items():
                try:
                    expired = await loop.run_in_executor(
                        self.write_executor, self.retriever.expired, namespace, ttl
                    )
                    if expired is None:
                        continue
                    # Through the write path (and the log, under NATS); the
                    # cut-off is checked again inside the write transaction.
                    result = await writes.apply_delete(expired)
                    log.info(
                        "retention: deleted %d expired documents from %s",
                        result.documents,
                        namespace,
                    )
                except Exception:  # the sweeper must outlive one bad pass
                    log.exception("retention sweep of %s failed", namespace)

    async def _save_periodically(self) -> None:
        """Save indexes written since their last save, every save_interval_s."""
        assert self.retriever is not None
        retriever = self.retriever
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.index.save_interval_s)
            try:
                saved = await loop.run_in_executor(
                    self.write_executor, functools.partial(retriever.save_indexes, True)
                )
                if saved:
                    log.info("saved %d changed indexes", saved)
            except Exception:  # a failed save must not end the saver
                log.exception("saving the indexes failed; retrying at the next interval")

    async def _stalled(self, reason: str) -> None:
        """A replica that can no longer follow the write log serves stale data:
        every service says NOT_SERVING so probes and gateways route around it."""
        for name in [*self.settings.services, ""]:
            service = SERVICE_NAMES[name] if name else ""
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _writes(self) -> WriteBackend:
        assert self.writes is not None, "writes need a local store"
        return self.writes

    async def _probe_triton(self) -> None:
        """Follow Triton's server and model readiness in our health status."""
        assert self.triton is not None
        while True:
            await asyncio.sleep(self.settings.generation.triton.probe_interval_s)
            await self._apply_triton_health(await self.triton.probe())

    async def _apply_triton_health(self, ready: bool) -> None:
        # With the extractive fallback, Ask still answers while Triton is down.
        serving = ready or self.settings.generation.fallback_to_extractive
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("generation", "rag"):
            if name in self.settings.services:
                await self.health.set(SERVICE_NAMES[name], status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace
        period, then stop the worker and save the indexes."""
        grace = self.settings.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._probe_task:
            self._probe_task.cancel()
        if self._triton_task:
            self._triton_task.cancel()
        if self._sweeper:
            self._sweeper.cancel()
        if self._saver:
            self._saver.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if self.ingestion is not None:
            await self.ingestion.stop()
        if self.nats is not None and self.nats is not self.ingestion:
            await self.nats.stop()
        for remote in self._remotes:
            await remote.channel.close(None)
        if self.triton is not None:
            await self.triton.close()
        loop = asyncio.get_running_loop()
        # Core work already running on the pool (an ingestion batch whose task
        # was cancelled, say) finishes before anything it uses is closed.
        # Queued work that has not started is dropped (it is durable where it
        # matters: a job resumes, a caller already got its status).
        await loop.run_in_executor(
            None, functools.partial(self.executor.shutdown, True, cancel_futures=True)
        )
        await loop.run_in_executor(
            None, functools.partial(self.write_executor.shutdown, True, cancel_futures=True)
        )
        if self.retriever is not None:
            await loop.run_in_executor(None, self.retriever.save_indexes)
        if self.embedder is not None:
            self.embedder.close()
        if self.job_queue is not None:
            self.job_queue.close()
        if self.store is not None:
            self.store.close()
        if self.telemetry is not None:
            if telemetry.current() is self.telemetry:
                telemetry.install(None)
            self.telemetry.shutdown()
        log.info("rag-grpc stopped")


async def serve(settings: Settings, seed_documents: list[Document] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RagServer(settings, seed_documents)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"rag-grpc listening on {settings.host}:{server.port}", flush=True)
    await stop.wait()
    log.info(
        "signal received: draining in-flight calls (grace %.1f s)", settings.server.grace_period_s
    )
    await server.stop()
