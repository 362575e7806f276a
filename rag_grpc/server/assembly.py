"""The components one process runs, built from the settings: only what the
chosen services need (a store and index for retrieval and ingestion, the
encoder wherever text is embedded, a generator for generation and rag, or
channels to remote services that provide them)."""

from __future__ import annotations

import functools
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from rag_grpc.config import ServerConfig, Settings
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.cache import EmbeddingCache
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import OnnxEncoder
from rag_grpc.embed.loader import load_encoder
from rag_grpc.flags import FeatureFlags
from rag_grpc.generate.base import Generator
from rag_grpc.generate.extractive import ExtractiveGenerator
from rag_grpc.generate.pipeline import AnswerCache, LocalSearch, RagPipeline, SearchBackend
from rag_grpc.generate.triton import TritonGenerator
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.search import Rescorer
from rag_grpc.ingest.backend import IngestionBackend, LocalWrites, WriteBackend
from rag_grpc.ingest.jobs import IngestionManager, JobQueue
from rag_grpc.ingest.nats_log import NatsIngestion
from rag_grpc.security.access import AccessControl
from rag_grpc.security.audit import AuditLog
from rag_grpc.security.usage import UsageLedger
from rag_grpc.server.probes import RemoteDependency
from rag_grpc.services.remote import RemoteGenerator, RemoteSearch
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)


def local_retrieval(settings: Settings) -> bool:
    """Whether this process keeps a store (and, on NATS, follows the log)."""
    s = settings
    return bool(
        set(s.services) & {"retrieval", "ingestion"}
        or ("rag" in s.services and not s.remote.retrieval_target)
    )


def channel_options(server: ServerConfig) -> list[tuple[str, Any]]:
    """Message size and keepalive options shared by the server and its channels."""
    return [
        ("grpc.max_send_message_length", server.max_message_bytes),
        ("grpc.max_receive_message_length", server.max_message_bytes),
        ("grpc.keepalive_time_ms", int(server.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(server.keepalive_timeout_s * 1000)),
    ]


class Components:
    """The core objects of one process, in two steps: `build_core` (encoder,
    store, index, write path; on a worker thread) then `build_serving`
    (generator, Ask pipeline, ingestion backend), before the services are
    registered over them. Anything the settings do not need stays None."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(
            max_workers=settings.server.worker_threads, thread_name_prefix="rag-core"
        )
        # Writes, ingestion and admin work (snapshots, forget, compaction) run
        # on their own threads, so they can never take every thread that
        # searches need.
        self.write_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rag-write")
        # Read per request; SIGHUP reloads them from the same files.
        self.flags = FeatureFlags.from_settings(settings)
        # Where every component records its metrics and spans: the server
        # sets its Telemetry here before building; OFF builds silent ones.
        self.telemetry: Recorder = OFF
        self.access: AccessControl | None = None
        self.audit: AuditLog | None = None
        self.usage: UsageLedger | None = None
        self.store: DocumentStore | None = None
        self.retriever: Retriever | None = None
        self.encoder: OnnxEncoder | None = None
        self.embedder: BatchingEmbedder | None = None
        self.writes: WriteBackend | None = None
        self.nats: NatsIngestion | None = None
        self.generator: Generator | None = None
        self.triton: TritonGenerator | None = None
        self.answer_cache: AnswerCache | None = None
        self.pipeline: RagPipeline | None = None
        self.job_queue: JobQueue | None = None
        self.ingestion: IngestionBackend | None = None
        # Remote services this process calls, probed by probes.probe_remotes.
        self.remotes: list[RemoteDependency] = []

    def build_core(self) -> None:
        """The encoder and embedder, the store, the retriever and the write
        path (local, or the NATS write log every store follows)."""
        s = self.settings
        wanted = set(s.services)
        local_store = local_retrieval(s)
        local_generation = "generation" in wanted or (
            "rag" in wanted and not s.remote.generation_target
        )
        if local_store or local_generation or "embedding" in wanted:
            e = s.embedding
            self.encoder = load_encoder(e, s.data_dir)
            self.embedder = BatchingEmbedder(
                self.encoder,
                max_batch_size=e.max_batch_size,
                max_delay_s=e.max_delay_ms / 1000,
                max_queue_texts=e.max_queue_texts,
                cache=EmbeddingCache(e.cache_bytes),
                telemetry=self.telemetry,
            )
        if local_store:
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
                self.store,
                self.embedder,
                chunker,
                s.data_dir / "index",
                s.index,
                s.limits,
                retrieval=s.retrieval,
                reranker=self._reranker(),
                rerank=s.rerank,
                telemetry=self.telemetry,
                relevance_threshold=s.telemetry.relevance_threshold,
            )
            if s.ingestion.queue == "nats":
                # Every process with a store follows the shared write log.
                self.nats = NatsIngestion(
                    s.ingestion,
                    self.retriever,
                    self.write_executor,
                    s.limits,
                    worker="ingestion" in wanted,
                    telemetry=self.telemetry,
                )
                self.nats.usage = self.usage
                self.writes = self.nats
            else:
                self.writes = LocalWrites(self.retriever, self.write_executor)

    def build_serving(self) -> None:
        """What the generation, rag and ingestion services run on."""
        s = self.settings
        if "generation" in s.services or "rag" in s.services:
            self.generator = self._generator()
        if "rag" in s.services:
            assert self.generator is not None
            answers = s.generation.answer_cache_entries
            answer_cache = self.answer_cache = AnswerCache(answers) if answers else None
            if answer_cache is not None and self.retriever is not None:
                # Forgotten documents leave no answer quoting them behind.
                self.retriever.writes.forget_listeners.append(answer_cache.drop_namespace)
            self.pipeline = RagPipeline(
                self._search_backend(),
                self.generator,
                s.limits,
                answer_cache,
                answer_cache_on=functools.partial(self.flags.enabled, "answer_cache"),
                telemetry=self.telemetry,
            )
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
                    telemetry=self.telemetry,
                )

    def local_writes(self) -> WriteBackend:
        """The write path; only a process with a local store has one."""
        assert self.writes is not None, "writes need a local store"
        return self.writes

    def _reranker(self) -> Rescorer | None:
        """The configured cross-encoder, loaded (and exported) now so a
        missing file or a wrong hash stops the start, not a search."""
        s = self.settings
        if not s.rerank.configured:
            return None
        from rag_grpc.rerank import load_reranker

        return load_reranker(s.rerank, s.data_dir)

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
                telemetry=self.telemetry,
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
        for remote in self.remotes:
            if remote.target == target and remote.service == service:
                remote.dependents.append(dependent)
                return remote.channel
        channel = grpc.aio.insecure_channel(target, options=channel_options(self.settings.server))
        self.remotes.append(RemoteDependency(target, service, channel, [dependent]))
        return channel
